#if canImport(Glibc)
import Glibc
#endif

/// A failed system call: which call, the errno it set (or returned negated, as io_setup and the CSystem
/// shims do), and what it was doing. The one errno-carrying error of the package (as swift-system's `Errno`
/// or NIO's `IOError`): the domain errors of the modules (`BlockBackendError`, `VfioUserError`, ...) carry
/// it in their `systemCall` case instead of a message with an errno of their own.
///
/// `description` reads `CONTEXT: CALL failed: errno N: TEXT`, with `strerror`'s text, for example
/// `control socket /run/scsigate/control.sock: bind failed: errno 98: Address already in use`.
public struct SystemCallError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The call that failed, as written in the source: `"epoll_ctl"`, `"io_setup(128)"`, `"bind"`.
    public var call: String
    /// Its errno (positive).
    public var errno: Int32
    /// What was being done, naming the path, socket or object (nil: the call says it all).
    public var context: String?

    /// The failure of `call` with `errno` while doing `context`.
    public init(_ call: String, errno: Int32, context: String? = nil) {
        self.call = call
        self.errno = errno
        self.context = context
    }

    /// The failure of `call` with the calling thread's current errno.
    public static func current(_ call: String, context: String? = nil) -> SystemCallError {
        SystemCallError(call, errno: Glibc.errno, context: context)
    }

    /// The same failure with `outer` in front of its context (`outer: context`): what the caller was doing.
    public func within(_ outer: String) -> SystemCallError {
        var copy = self
        copy.context = context.map { "\(outer): \($0)" } ?? outer
        return copy
    }

    /// `errno N: TEXT` (`strerror`).
    public var errnoDescription: String { Self.describe(errno: errno) }

    public var description: String {
        let failure = "\(call) failed: \(errnoDescription)"
        guard let context else { return failure }
        return "\(context): \(failure)"
    }

    /// `errno N: TEXT` for any errno value (`strerror`'s text; "unknown error" when it has none).
    public static func describe(errno code: Int32) -> String {
        "errno \(code): \(text(errno: code))"
    }

    /// `strerror`'s text of an errno value.
    public static func text(errno code: Int32) -> String {
        guard let text = strerror(code) else { return "unknown error" }
        return String(cString: text)
    }
}
