import BlockIO
import SCSI

/// What the PVSCSI device needs from the SCSI core: the LUN map, LUN events and the command layer.
///
/// `SCSITarget` provides `refresh`, `subscribe` and `unsubscribe`; the command layer adds
/// `execute(_:view:)`, `resume(_:with:)` and the task management planning. The device is generic over this protocol so
/// that no existential sits in the per-I/O path.
public protocol SCSICommandTarget: AnyObject, Sendable {
    /// Brings `view` up to date with the LUN map.
    func refresh(_ view: inout LUNMapView)
    /// Starts a command.
    func execute(_ task: inout SCSITask, view: inout LUNMapView) -> TaskDisposition
    /// Continues a command after its back-end request completed.
    func resume(_ task: inout SCSITask, with result: BlockResult) -> TaskDisposition
    /// Registers a LUN event handler; returns a token.
    @discardableResult
    func subscribe(_ handler: @escaping @Sendable (LUNEvent) -> Void) -> Int
    /// Removes a LUN event handler.
    func unsubscribe(_ token: Int)
    /// Decides a task management function and applies its logical-unit side effects (unit attentions,
    /// reservations); the device aborts the matching in-flight requests itself.
    func planTaskManagement(_ function: TaskManagementFunction, nexus: ITNexus, lun: LogicalUnitNumber?) -> TaskManagementPlan
    /// Completes a plan after the device applied it.
    func finishTaskManagement(_ plan: TaskManagementPlan, _ outcome: TaskManagementOutcome)
}

/// The SCSI core's target: LUN map and events (Target.swift) plus the command layer (CommandDispatch.swift).
extension SCSITarget: SCSICommandTarget {}

/// The back-end channel interface the device drives: `BlockChannel`'s members without its class
/// constraint, so that the gateway's `AnyBlockChannel` enum (branch `backends`) can be used directly:
/// `extension AnyBlockChannel: PVSCSIChannel {}` (its members already match). Any `BlockChannel`
/// class conforms the same way with an empty extension.
public protocol PVSCSIChannel {
    /// Readable when completions are ready, or -1 for channels that complete inside `commit`/`reap`.
    var completionFD: Int32 { get }
    /// Whether committed requests are complete on return from `commit` (the device then reaps at once).
    /// Default: no completion fd. A channel may have both (an fd for what completes later).
    var completesOnCommit: Bool { get }
    /// Queues one request; returns 0 or a positive errno.
    func submit(_ request: BlockRequest, token: UInt64) -> Int32
    /// Sends the queued requests.
    func commit()
    /// Delivers ready completions; returns how many.
    func reap(_ handler: (UInt64, BlockResult) -> Void) -> Int
    /// Requests queued or in flight.
    var inFlight: Int { get }
    /// Asks the back-end to abort the request submitted with `token`; it still completes through `reap`
    /// (ECANCELED if the abort won). False when the back-end cannot abort (local I/O just completes).
    func abort(token: UInt64) -> Bool
    /// Asks the back-end to reset its logical unit (a remote iSCSI LUN RESET); requests in flight complete
    /// through `reap`. False when there is nothing to reset remotely.
    func resetLogicalUnit() -> Bool
    /// Releases the channel (worker threads, fds): when the controller stops, and when its LUN was
    /// removed and nothing of it is in flight any more.
    func close()
}

extension PVSCSIChannel {
    public var completesOnCommit: Bool { completionFD < 0 }
}
