/// A LUN provider: owns the backing store (file, block device, remote iSCSI LUN) and hands each
/// event-loop thread its own submission channel.
///
/// Back-ends are shared between threads; channels are not (one owner thread each).
public protocol BlockBackend: AnyObject, Sendable {
    /// The channel type, concrete so that the per-I/O path never goes through an existential.
    associatedtype Channel: BlockChannel
    /// Current size and capabilities.
    var geometry: BlockGeometry { get }
    /// Creates a channel for one event-loop thread.
    func makeChannel() throws(BlockBackendError) -> Channel
}

/// A single-thread submission/completion channel to a back-end, polled by an event loop.
///
/// Requests are queued by `submit`, sent in one batch by `commit`, and completed later:
/// the loop waits on `completionFD` (readable when completions are ready) and calls `reap`.
public protocol BlockChannel: AnyObject {
    /// A file descriptor that becomes readable when completions are ready (eventfd, socket), or -1 if
    /// completions are only ever produced by `reap` being called (synchronous back-ends).
    var completionFD: Int32 { get }
    /// Queues one request; `token` comes back with its completion. Returns 0, or a positive errno
    /// when the request cannot be queued (the request is then not completed later).
    func submit(_ request: BlockRequest, token: UInt64) -> Int32
    /// Sends the queued requests to the back-end (one syscall per batch where possible).
    func commit()
    /// Delivers ready completions to `handler`; returns how many were delivered.
    func reap(_ handler: (UInt64, BlockResult) -> Void) -> Int
    /// Requests queued or in flight.
    var inFlight: Int { get }
}

/// Why a back-end could not be opened or a channel created.
public struct BlockBackendError: Error, CustomStringConvertible, Sendable, Equatable {
    /// Human-readable reason, naming the path or URL.
    public var message: String
    /// errno if the failure came from a system call.
    public var errno: Int32

    /// Creates an error.
    public init(_ message: String, errno: Int32 = 0) {
        self.message = message
        self.errno = errno
    }

    public var description: String { message }
}
