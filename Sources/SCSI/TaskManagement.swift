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

/// The set of tasks a TMF acts on: every task matching all the non-nil fields.
public struct TaskScope: Sendable, Equatable {
    public var nexus: ITNexus?
    public var lun: LogicalUnitNumber?
    public var tag: UInt64?
    public init(nexus: ITNexus?, lun: LogicalUnitNumber?, tag: UInt64?) {
        self.nexus = nexus
        self.lun = lun
        self.tag = tag
    }

    /// Whether a task of (`nexus`, `lun`, `tag`) is in this scope. A task with no LUN matches only a
    /// scope with no LUN.
    @inline(__always)
    public func matches(nexus taskNexus: ITNexus, lun taskLUN: LogicalUnitNumber?, tag taskTag: UInt64) -> Bool {
        if let nexus, nexus != taskNexus { return false }
        if let lun, lun != taskLUN { return false }
        if let tag, tag != taskTag { return false }
        return true
    }
}

/// What `TaskSet.register` found.
public enum TaskRegistration: Sendable, Equatable {
    /// The task is now tracked in its slot.
    case registered
    /// Another live task of the same I_T_L nexus already uses this tag: the new command was not
    /// registered; complete it with `TaskSet.overlappedCommandsError` (SAM-5 5.10 "overlapped commands").
    case overlapped(existingSlot: Int)
    /// The slot index is outside the set or already holds a live task (a front-end bug): not registered.
    case slotUnavailable
}

/// How a tracked task ended, from `TaskSet.complete(slot:)`.
public enum TaskEnd: Sendable, Equatable {
    /// Completed normally: send its status.
    case normal
    /// A TMF aborted it: complete it with TASK ABORTED (or the transport's "aborted" response).
    case aborted
    /// The slot held no live task (already completed): send nothing.
    case notActive
}

/// In-flight tasks of one queue group (owned by that group's event-loop thread; not thread-safe).
/// Front-ends register each task they hand to the core and remove it on completion; a TMF marks
/// matching tasks aborted so that each completes exactly once, with TASK ABORTED.
///
/// Storage is allocated once (`capacity` slots, one per queue slot of the front-end, and an
/// open-addressing tag index of twice that size); registering and completing never allocate.
///
/// Life of a task:
/// 1. `register(slot:nexus:lun:tag:attribute:)` when the command arrives.
/// 2. `setInBackend(slot:true)` while the back-end owns it (submitted I/O), `false` when it returns.
/// 3. `complete(slot:)` once, when the front-end sends the response; it says whether to report TASK ABORTED.
/// After a TMF (`markAborted`), tasks that are in the back-end finish through step 3 when their I/O
/// completes; tasks that are not are handed out by `takeAborted(_:)`, which completes them.
public struct TaskSet: ~Copyable {
    private struct Entry {
        var nexus = ITNexus(initiator: 0)
        var lun: LogicalUnitNumber? = nil
        var tag: UInt64 = 0
        var attribute: TaskAttribute = .simple
        var state: UInt8 = TaskSet.free
        var inBackend = false
    }

    private static let free: UInt8 = 0
    private static let live: UInt8 = 1
    private static let abortedState: UInt8 = 2

    /// Number of slots.
    public let capacity: Int
    private let entries: UnsafeMutablePointer<Entry>
    /// Tag index: slot + 1, 0 = empty. Linear probing with backward-shift deletion.
    private let index: UnsafeMutablePointer<Int32>
    private let indexMask: Int
    /// Live tasks (including aborted ones not yet completed).
    public private(set) var count = 0
    /// Aborted tasks not yet completed.
    public private(set) var abortedCount = 0

    /// Creates a set of `capacity` slots (at least 1).
    public init(capacity: Int) {
        let capacity = max(1, min(capacity, Int(Int32.max / 4)))
        self.capacity = capacity
        entries = .allocate(capacity: capacity)
        entries.initialize(repeating: Entry(), count: capacity)
        var size = 2
        while size < capacity * 2 { size <<= 1 }
        indexMask = size - 1
        index = .allocate(capacity: size)
        index.initialize(repeating: 0, count: size)
    }

    deinit {
        entries.deinitialize(count: capacity)
        entries.deallocate()
        index.deallocate()
    }

    /// ABORTED COMMAND, OVERLAPPED COMMANDS ATTEMPTED: the sense for a command whose tag duplicates a live one.
    public static let overlappedCommandsError = SCSIError.check(.abortedCommand, .overlappedCommandsAttempted)

    // MARK: Registering and completing

    /// Starts tracking a task in `slot`.
    public mutating func register(slot: Int, nexus: ITNexus, lun: LogicalUnitNumber?, tag: UInt64,
                                  attribute: TaskAttribute) -> TaskRegistration {
        guard slot >= 0 && slot < capacity, entries[slot].state == Self.free else { return .slotUnavailable }
        var i = home(nexus: nexus, lun: lun, tag: tag)
        while index[i] != 0 {
            let other = Int(index[i]) - 1
            let e = entries[other]
            if e.tag == tag && e.nexus == nexus && e.lun == lun { return .overlapped(existingSlot: other) }
            i = (i + 1) & indexMask
        }
        index[i] = Int32(slot + 1)
        entries[slot] = Entry(nexus: nexus, lun: lun, tag: tag, attribute: attribute, state: Self.live, inBackend: false)
        count += 1
        return .registered
    }

    /// Records whether the back-end currently owns the task (aborted tasks in the back-end are completed
    /// when their I/O returns, never by `takeAborted`).
    @inline(__always)
    public mutating func setInBackend(slot: Int, _ inBackend: Bool) {
        guard slot >= 0 && slot < capacity, entries[slot].state != Self.free else { return }
        entries[slot].inBackend = inBackend
    }

    /// Stops tracking the task in `slot` and says how it ended. Exactly one call per registered task
    /// returns `.normal` or `.aborted`; any later call returns `.notActive`.
    @discardableResult
    public mutating func complete(slot: Int) -> TaskEnd {
        guard slot >= 0 && slot < capacity else { return .notActive }
        let state = entries[slot].state
        guard state != Self.free else { return .notActive }
        removeFromIndex(slot: slot)
        entries[slot].state = Self.free
        entries[slot].inBackend = false
        count -= 1
        if state == Self.abortedState {
            abortedCount -= 1
            return .aborted
        }
        return .normal
    }

    // MARK: Queries

    /// Whether `slot` holds a live task that a TMF aborted (complete it with TASK ABORTED).
    @inline(__always)
    public func isAborted(slot: Int) -> Bool {
        slot >= 0 && slot < capacity && entries[slot].state == Self.abortedState
    }

    /// Whether `slot` holds a live task (aborted or not).
    @inline(__always)
    public func isActive(slot: Int) -> Bool {
        slot >= 0 && slot < capacity && entries[slot].state != Self.free
    }

    /// The slot of the live task with this I_T_L_Q nexus, if any (aborted tasks included).
    public func slot(nexus: ITNexus, lun: LogicalUnitNumber?, tag: UInt64) -> Int? {
        var i = home(nexus: nexus, lun: lun, tag: tag)
        while index[i] != 0 {
            let s = Int(index[i]) - 1
            let e = entries[s]
            if e.tag == tag && e.nexus == nexus && e.lun == lun { return s }
            i = (i + 1) & indexMask
        }
        return nil
    }

    /// Number of live tasks in `scope`; with `includingAborted: false` (what QUERY TASK and QUERY TASK SET
    /// ask), tasks already aborted are not counted.
    public func count(in scope: TaskScope, includingAborted: Bool = false) -> Int {
        if let nexus = scope.nexus, let tag = scope.tag, let lun = scope.lun {
            guard let s = slot(nexus: nexus, lun: lun, tag: tag) else { return 0 }
            return includingAborted || entries[s].state == Self.live ? 1 : 0
        }
        var n = 0
        for s in 0..<capacity {
            let e = entries[s]
            guard e.state == Self.live || (includingAborted && e.state == Self.abortedState) else { continue }
            if scope.matches(nexus: e.nexus, lun: e.lun, tag: e.tag) { n += 1 }
        }
        return n
    }

    /// Whether any live, not aborted task is in `scope` (QUERY TASK: FUNCTION SUCCEEDED when true).
    public func contains(_ scope: TaskScope) -> Bool { count(in: scope) > 0 }

    // MARK: Aborting

    /// Marks every live, not yet aborted task in `scope` aborted; returns how many. `onAbort` sees the
    /// nexus of each one (to establish COMMANDS CLEARED BY ANOTHER INITIATOR for the others).
    @discardableResult
    public mutating func markAborted(_ scope: TaskScope, onAbort: (ITNexus) -> Void = { _ in }) -> Int {
        var n = 0
        if let nexus = scope.nexus, let tag = scope.tag, let lun = scope.lun {
            if let s = slot(nexus: nexus, lun: lun, tag: tag), entries[s].state == Self.live {
                entries[s].state = Self.abortedState
                onAbort(nexus)
                n = 1
            }
        } else {
            for s in 0..<capacity where entries[s].state == Self.live {
                let e = entries[s]
                if scope.matches(nexus: e.nexus, lun: e.lun, tag: e.tag) {
                    entries[s].state = Self.abortedState
                    onAbort(e.nexus)
                    n += 1
                }
            }
        }
        abortedCount += n
        return n
    }

    /// Completes every aborted task the back-end does not own, calling `body` with each slot so that the
    /// front-end sends TASK ABORTED for it; returns how many.
    @discardableResult
    public mutating func takeAborted(_ body: (Int) -> Void) -> Int {
        guard abortedCount > 0 else { return 0 }
        var n = 0
        for s in 0..<capacity where entries[s].state == Self.abortedState && !entries[s].inBackend {
            _ = complete(slot: s)
            body(s)
            n += 1
        }
        return n
    }

    // MARK: Index internals

    @inline(__always)
    private func home(nexus: ITNexus, lun: LogicalUnitNumber?, tag: UInt64) -> Int {
        var h = tag &* 0x9E37_79B9_7F4A_7C15
        h ^= nexus.initiator &* 0xC2B2_AE3D_27D4_EB4F
        h ^= UInt64(nexus.targetPort) << 32 | UInt64(lun?.value ?? 0xFFFF)
        h ^= h >> 29
        h = h &* 0xBF58_476D_1CE4_E5B9
        h ^= h >> 32
        return Int(truncatingIfNeeded: h) & indexMask
    }

    private mutating func removeFromIndex(slot: Int) {
        let e = entries[slot]
        var i = home(nexus: e.nexus, lun: e.lun, tag: e.tag)
        while index[i] != 0 && Int(index[i]) - 1 != slot { i = (i + 1) & indexMask }
        guard index[i] != 0 else { return }
        index[i] = 0
        // Backward-shift: move later entries of the probe run into the hole when their home allows it.
        var hole = i
        var j = (i + 1) & indexMask
        while index[j] != 0 {
            let o = entries[Int(index[j]) - 1]
            let h = home(nexus: o.nexus, lun: o.lun, tag: o.tag)
            // Move if h is cyclically outside (hole, j].
            let fromHome = (j - h) & indexMask
            let fromHole = (j - hole) & indexMask
            if fromHome >= fromHole {
                index[hole] = index[j]
                index[j] = 0
                hole = j
            }
            j = (j + 1) & indexMask
        }
    }
}

/// A `TaskSet` moves between threads only by being consumed (it is non-copyable), so sending it is safe.
extension TaskSet: @unchecked Sendable {}
