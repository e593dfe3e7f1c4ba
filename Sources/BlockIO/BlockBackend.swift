import SystemErrors

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

/// The one back-end channel contract: a single-thread submission/completion channel to a back-end,
/// polled by an event loop. Every device model (virtio-scsi, virtio-blk, PVSCSI) drives its LUNs through it,
/// and every back-end provides it.
///
/// Requests are queued by `submit`, sent in one batch by `commit`, and completed later: the loop waits on
/// `completionFD` (readable when completions are ready) and calls `reap`, or calls `poll` while it polls.
///
/// Not class-bound, so that both channel classes (`FileChannel`, `NullChannel`, `ISCSIChannel`,
/// `PolicyChannel`) and the gateway's `AnyBlockChannel` enum conform; the device models are generic over it,
/// so no existential sits in the per-I/O path. A channel is used by one event-loop thread only.
public protocol BlockChannel: SendableMetatype {
    /// A file descriptor that becomes readable when completions are ready (eventfd, socket), or -1 if
    /// completions are only ever produced by `reap` being called (synchronous back-ends).
    var completionFD: Int32 { get }
    /// Whether committed requests are complete on return from `commit` (the device models then `reap` at
    /// once, with no wake-up round trip). Default: no completion fd. A channel may have both: an fd for what
    /// completes later (a held request's timer) and completions on commit.
    var completesOnCommit: Bool { get }
    /// Queues one request; `token` comes back with its completion. Returns 0, or a positive errno
    /// when the request cannot be queued (the request is then not completed later).
    func submit(_ request: BlockRequest, token: UInt64) -> Int32
    /// Sends the queued requests to the back-end (one syscall per batch where possible).
    func commit()
    /// Delivers ready completions to `handler`; returns how many were delivered.
    func reap(_ handler: (UInt64, BlockResult) -> Void) -> Int
    /// Delivers the completions found without a system call (the loop calls it while it polls; the
    /// completion fd may stay readable, and `reap` then finds what is left). Default: `reap`.
    func poll(_ handler: (UInt64, BlockResult) -> Void) -> Int
    /// Requests queued or in flight.
    var inFlight: Int { get }
    /// Asks the back-end to abort the request submitted with `token` (the core's ABORT TASK and the
    /// aborts of ABORT TASK SET / CLEAR TASK SET / I_T NEXUS RESET). The request still completes
    /// through `reap`, with ECANCELED if the abort won or its real result if it finished first.
    /// Returns false when the back-end cannot abort (local I/O: the request just completes). Default: false.
    func abort(token: UInt64) -> Bool
    /// Asks the back-end to reset the logical unit (the core's LOGICAL UNIT RESET): every request
    /// still completes through `reap` (ECANCELED or its real result). Returns false when the
    /// back-end has nothing to reset (local I/O). Default: false.
    func resetLogicalUnit() -> Bool
    /// Releases the channel (worker threads, completion fd, its hold on the back-end). Called once, on the
    /// channel's thread, after the last completion was reaped and the completion fd was taken out of the
    /// event loop (see `LUNChannelTable`); the channel is not used afterwards.
    func close()
}

extension BlockChannel {
    /// Channels without a completion fd complete inside `commit`.
    public var completesOnCommit: Bool { completionFD < 0 }
    /// Channels with no cheaper path poll by reaping.
    public func poll(_ handler: (UInt64, BlockResult) -> Void) -> Int { reap(handler) }
    /// Local back-ends cannot abort a submitted request; it completes normally.
    public func abort(token: UInt64) -> Bool { false }
    /// Local back-ends have no remote logical unit to reset.
    public func resetLogicalUnit() -> Bool { false }
}

/// Why a back-end could not be opened or a channel created.
public struct BlockBackendError: ReasonedError, Sendable, Equatable {
    /// Why it failed: a failed system call (its context names the path or URL) or another reason (unreachable remote, closed back-end, unknown ID).
    public var reason: FailureReason
    public init(reason: FailureReason) { self.reason = reason }
}
