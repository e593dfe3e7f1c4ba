import Logging
import Synchronization

/// Records what a component logs through swift-log (every level, message text only), for tests that check
/// a line was written; shared by the test targets of every module that takes a `Logger`.
public final class TestLog: Sendable {
    private let recorded = Mutex<[String]>([])

    public init() {}

    /// A logger (level trace) whose lines this log records.
    public var logger: Logger { Self.logger { [self] _, text in recorded.withLock { $0.append(text) } } }

    /// The lines recorded so far.
    public var all: [String] { recorded.withLock { $0 } }

    /// Whether a recorded line contains `s`.
    public func contains(_ s: String) -> Bool { recorded.withLock { $0.contains { $0.contains(s) } } }

    /// A logger (level trace) that hands each line to `sink`.
    public static func logger(_ sink: @escaping @Sendable (Logger.Level, String) -> Void) -> Logger {
        Logger(label: "test") { _ in ClosureLogHandler(sink: sink) }
    }

    /// A logger that writes nothing.
    public static var quiet: Logger { Logger(label: "test") { _ in SwiftLogNoOpLogHandler() } }
}

/// A swift-log handler that passes each message (with its level) to a closure.
private struct ClosureLogHandler: LogHandler {
    let sink: @Sendable (Logger.Level, String) -> Void
    var logLevel: Logger.Level = .trace
    var metadata: Logger.Metadata = [:]

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) { sink(event.level, event.message.description) }
}
