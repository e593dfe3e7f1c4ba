import BlockIO

/// What a device model needs from the SCSI core: the LUN map, LUN events, the command layer and the task
/// management planning (the device applies plans to its own `TaskSet`s).
///
/// `SCSITarget` provides `refresh`, `subscribe` and `unsubscribe`; the command layer adds
/// `execute(_:view:)`, `resume(_:with:)` and the task management planning. PVSCSI is generic over this
/// protocol (its tests drive a scripted target), so that no existential sits in the per-I/O path.
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
