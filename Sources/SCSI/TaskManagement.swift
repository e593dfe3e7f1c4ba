// OWNER: scsi-state helper. STUB: replace bodies; keep the public signatures (or extend them).

/// SAM-5 task management functions.
public enum TaskManagementFunction: Sendable, Equatable {
    case abortTask(tag: UInt64)
    case abortTaskSet
    case clearTaskSet
    case logicalUnitReset
    case itNexusReset
    case queryTask(tag: UInt64)
    case queryTaskSet
    case queryAsyncEvent
    case clearACA
}

/// SAM-5 service responses of a task management function.
public enum TaskManagementResponse: Sendable, Equatable {
    case functionComplete
    case functionSucceeded
    case functionRejected
    case incorrectLUN
    case serviceDeliveryFailure
}

/// The set of tasks a TMF acts on.
public struct TaskScope: Sendable, Equatable {
    public var nexus: ITNexus?
    public var lun: LogicalUnitNumber?
    public var tag: UInt64?
    public init(nexus: ITNexus?, lun: LogicalUnitNumber?, tag: UInt64?) {
        self.nexus = nexus
        self.lun = lun
        self.tag = tag
    }
}

/// In-flight tasks of one queue group (owned by that group's event-loop thread; not thread-safe).
/// Front-ends register each task they hand to the core and remove it on completion; a TMF marks
/// matching tasks aborted so that each completes exactly once, with TASK ABORTED.
public struct TaskSet: ~Copyable {
    public init(capacity: Int) {}
}
