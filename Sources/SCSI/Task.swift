import BlockIO
#if canImport(Glibc)
import Glibc
#endif

/// One SCSI command and its result, as a front-end hands it to the core.
///
/// Front-ends keep one per queue slot, preallocated, and reuse it for every command that slot
/// carries: the core fills in `status`, `sense` and `dataInLength` in place.
public struct SCSITask: Sendable {
    // MARK: Inputs, set by the front-end
    /// The I_T nexus the command arrived on.
    public var nexus: ITNexus
    /// The addressed LUN; nil when the front-end could not decode the LUN address (the core answers
    /// LOGICAL UNIT NOT SUPPORTED, and INQUIRY answers peripheral qualifier 3).
    public var lun: LogicalUnitNumber?
    /// The initiator's task tag.
    public var tag: UInt64
    /// Task attribute.
    public var attribute: TaskAttribute
    /// The CDB.
    public var cdb: CDB
    /// Data-out buffers (initiator to target), possibly empty.
    public var dataOut: IOVectorList
    /// Data-in buffers (target to initiator), possibly empty.
    public var dataIn: IOVectorList

    // MARK: Results, set by the core
    /// SAM status once the task completes.
    public var status: SCSIStatus = .good
    /// Encoded sense data (length 0 when none).
    public var sense: SenseBytes = SenseBytes()
    /// Bytes of data-in produced (residual = dataIn.totalLength - dataInLength).
    public var dataInLength: Int = 0
    /// Bytes of data-out consumed.
    public var dataOutLength: Int = 0

    // MARK: Routing, set by the core when it asks for I/O
    /// Which back-end a `.submit` disposition is for (the LUN's `backendID`).
    public var backendID: Int = -1
    /// The LUN's generation when the task started (for detecting hot-removal during I/O).
    public var lunGeneration: UInt64 = 0
    /// Set by PERSISTENT RESERVE OUT / PREEMPT AND ABORT when it completes: the front-end applies this
    /// plan to its task sets (`apply(to:)`, `finishTaskManagement`) before sending the command's status.
    /// nil for every other command.
    public var taskManagementRequest: TaskManagementPlan? { taskManagementBox?.plan }
    /// Boxed so that the per-command clear is a pointer store, not an optional-struct copy.
    var taskManagementBox: TaskManagementPlanBox? = nil

    // MARK: Continuation state for multi-step commands, owned by the core
    var step: TaskStep = .none
    var scratch: ScratchBuffer? = nil
    /// The core's own scratch memory of a multi-request command (VERIFY, COMPARE AND WRITE, WRITE SAME, ...), if it has
    /// one: its back-end requests may point into it as well as into the task's data buffers (tests and fuzzing check this).
    public var scratchMemory: UnsafeRawBufferPointer? { scratch.map { UnsafeRawBufferPointer($0.memory) } }
    /// The logical unit the command runs against, retained across `.submit` for `resume`
    /// (a hot-removed LUN stays alive until its commands complete).
    var unit: LogicalUnit? = nil

    /// Creates a task.
    public init(nexus: ITNexus, lun: LogicalUnitNumber?, tag: UInt64, attribute: TaskAttribute = .simple,
                cdb: CDB, dataOut: IOVectorList = .empty, dataIn: IOVectorList = .empty) {
        self.nexus = nexus
        self.lun = lun
        self.tag = tag
        self.attribute = attribute
        self.cdb = cdb
        self.dataOut = dataOut
        self.dataIn = dataIn
    }

    /// Resets the result fields so the slot can carry a new command.
    public mutating func reset(nexus: ITNexus, lun: LogicalUnitNumber?, tag: UInt64, attribute: TaskAttribute,
                               cdb: CDB, dataOut: IOVectorList, dataIn: IOVectorList) {
        self.nexus = nexus
        self.lun = lun
        self.tag = tag
        self.attribute = attribute
        self.cdb = cdb
        self.dataOut = dataOut
        self.dataIn = dataIn
        status = .good
        sense.length = 0
        dataInLength = 0
        dataOutLength = 0
        backendID = -1
        step = .none
        scratch = nil
        unit = nil
        taskManagementBox = nil
    }

    /// Residual of data-in (bytes the initiator asked for but did not get).
    public var dataInResidual: Int { max(0, dataIn.totalLength - dataInLength) }
}

/// What the front-end must do next with a task.
public enum TaskDisposition: Sendable {
    /// The task is complete: send `status`, `sense` and data to the initiator.
    case complete
    /// Submit this request to the back-end `task.backendID`, then call `SCSITarget.resume(_:with:)`.
    case submit(BlockRequest)
}

/// Holds a task management plan a command hands back to the front-end.
final class TaskManagementPlanBox: Sendable {
    let plan: TaskManagementPlan
    init(_ plan: TaskManagementPlan) { self.plan = plan }
}

/// Internal continuation of a multi-step command (COMPARE AND WRITE, VERIFY with BYTCHK, WRITE AND VERIFY,
/// WRITE SAME emulated by writes...). Defined by the command layer.
enum TaskStep: Sendable {
    case none
    /// Single back-end request; complete when it completes.
    case single(op: BlockOperation, lba: UInt64, blocks: UInt64)
    /// A command-specific step number with its LBA cursor.
    case multi(kind: UInt8, stage: UInt8, lba: UInt64, blocks: UInt64, cursor: UInt64)
}

/// Heap scratch memory for the rare commands that need it (compare buffers, WRITE SAME patterns).
/// Never used by READ or WRITE.
final class ScratchBuffer: @unchecked Sendable {
    let memory: UnsafeMutableRawBufferPointer
    var iovecs: IOVectorStorage

    init(byteCount: Int, alignment: Int = 4096) {
        memory = .allocate(byteCount: max(byteCount, 1), alignment: alignment)
        memory.initializeMemory(as: UInt8.self, repeating: 0)
        iovecs = IOVectorStorage(capacity: 1)
        iovecs.elements[0] = iovec(iov_base: memory.baseAddress, iov_len: byteCount)
    }

    deinit { memory.deallocate() }

    var list: IOVectorList { iovecs.view(count: 1) }
}
