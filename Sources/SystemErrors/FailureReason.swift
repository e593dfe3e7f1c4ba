/// Why something could not be set up: a failed system call, or another reason in words. The one shape of the
/// modules' set-up errors (`BlockBackendError`, `VfioUserError`, `VhostUserServerError`, `VirtioDeviceError`,
/// `FrontEndError`, `SocketServerError`), each a `ReasonedError` that names its module's failures.
public enum FailureReason: Sendable, Equatable, CustomStringConvertible {
    /// A system call failed; its context names the path, socket or object.
    case systemCall(SystemCallError)
    /// Any other reason, naming the path, socket or object.
    case failed(String)

    /// The same reason with `outer` in front: `outer: reason`.
    public func within(_ outer: String) -> FailureReason {
        switch self {
        case let .systemCall(error): return .systemCall(error.within(outer))
        case let .failed(message): return .failed("\(outer): \(message)")
        }
    }

    public var description: String {
        switch self {
        case let .systemCall(error): return error.description
        case let .failed(message): return message
        }
    }
}

/// An error of one module that carries a `FailureReason`; the members below are its whole interface, so the
/// module's error type is only its name and documentation.
public protocol ReasonedError: Error, CustomStringConvertible {
    /// Why it failed.
    var reason: FailureReason { get }
    /// An error for `reason`.
    init(reason: FailureReason)
}

extension ReasonedError {
    /// A failure for another reason than a system call.
    public init(_ message: String) { self.init(reason: .failed(message)) }

    /// A failed system call.
    public static func systemCall(_ error: SystemCallError) -> Self { Self(reason: .systemCall(error)) }

    /// The failed system call, if that is the reason.
    public var systemCallError: SystemCallError? {
        if case let .systemCall(error) = reason { return error }
        return nil
    }

    /// One line, naming the path, socket or object.
    public var message: String { reason.description }

    public var description: String { reason.description }

    /// The same error with `outer` in front: `outer: reason`.
    public func within(_ outer: String) -> Self { Self(reason: reason.within(outer)) }
}
