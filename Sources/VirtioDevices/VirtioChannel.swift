import BlockIO

/// What the virtio devices need from a back-end channel: the `BlockChannel` operations without its
/// class requirement, so that both `BlockChannel` classes and the gateway's `AnyBlockChannel` enum
/// (Backends) fit. Declare conformance with an empty extension, e.g. `extension AnyBlockChannel: VirtioChannel {}`.
///
/// A channel is used by one event-loop thread; the devices are generic over it (no existential in the
/// per-I/O path).
public protocol VirtioChannel: SendableMetatype {
    /// Readable when completions are ready (-1 when completions only come from `reap`).
    var completionFD: Int32 { get }
    /// Whether committed requests are complete on return from `commit` (the devices then `reap` at once,
    /// with no wake-up round trip). Default: no completion fd. A channel may have both: an fd for what
    /// completes later (a held request's timer) and completions on commit.
    var completesOnCommit: Bool { get }
    /// Queues one request; 0 or a positive errno (the request is then not completed later).
    func submit(_ request: BlockRequest, token: UInt64) -> Int32
    /// Sends the queued requests.
    func commit()
    /// Delivers ready completions; returns how many.
    func reap(_ handler: (UInt64, BlockResult) -> Void) -> Int
    /// Delivers the completions found without a system call (the loop calls it while it polls; the
    /// completion fd may stay readable, and `reap` then finds what is left). Default: `reap`.
    func poll(_ handler: (UInt64, BlockResult) -> Void) -> Int
    /// Releases the channel (worker threads, completion fd, its hold on the back-end). The devices call
    /// it once, on the channel's thread, after the last completion was reaped and the completion fd was
    /// taken out of the event loop; the channel is not used afterwards.
    func close()
    /// Asks the back-end to abort the request submitted with `token`; it still completes through
    /// `reap` (ECANCELED when the abort won). False when the back-end cannot abort (local I/O).
    /// `BlockChannel` types get this from BlockIO (false for local back-ends).
    func abort(token: UInt64) -> Bool
    /// Asks the back-end to reset its logical unit (LOGICAL UNIT RESET); every request still completes
    /// through `reap`. False when there is nothing to reset (local I/O).
    func resetLogicalUnit() -> Bool
}

extension VirtioChannel {
    public func poll(_ handler: (UInt64, BlockResult) -> Void) -> Int { reap(handler) }
    public var completesOnCommit: Bool { completionFD < 0 }
}
