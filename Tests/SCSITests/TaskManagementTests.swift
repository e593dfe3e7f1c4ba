import Testing
import BlockIO
@testable import SCSI

private let me = ITNexus(initiator: 1)
private let other = ITNexus(initiator: 2)
private let idle = ITNexus(initiator: 3)
private let lun0 = LogicalUnitNumber(0)!
private let lun1 = LogicalUnitNumber(1)!

private func makeUnit(_ lun: LogicalUnitNumber) -> LogicalUnit {
    LogicalUnit(number: lun, identity: LogicalUnitIdentity(serial: "S\(lun.value)", naa: 0x5000_0000_0000_0000 | UInt64(lun.value)),
                geometry: BlockGeometry(logicalBlockSize: 512, physicalBlockSize: 512, blockCount: 2048),
                backendID: Int(lun.value))
}

@Suite("Task sets")
struct TaskSetTests {
    @Test func registerCompleteExactlyOnce() {
        var tasks = TaskSet(capacity: 4)
        #expect(tasks.register(slot: 0, nexus: me, lun: lun0, tag: 10, attribute: .simple) == .registered)
        #expect(tasks.count == 1)
        #expect(tasks.isActive(slot: 0) == true)
        #expect(tasks.slot(nexus: me, lun: lun0, tag: 10) == 0)
        #expect(tasks.complete(slot: 0) == .normal)
        #expect(tasks.complete(slot: 0) == .notActive)
        #expect(tasks.count == 0)
        #expect(tasks.slot(nexus: me, lun: lun0, tag: 10) == nil)
        // The tag is free again.
        #expect(tasks.register(slot: 1, nexus: me, lun: lun0, tag: 10, attribute: .ordered) == .registered)
    }

    @Test func duplicateTagIsOverlapped() {
        var tasks = TaskSet(capacity: 8)
        #expect(tasks.register(slot: 2, nexus: me, lun: lun0, tag: 7, attribute: .simple) == .registered)
        #expect(tasks.register(slot: 3, nexus: me, lun: lun0, tag: 7, attribute: .simple) == .overlapped(existingSlot: 2))
        #expect(tasks.isActive(slot: 3) == false)
        // Same tag from another nexus or on another LUN is a different task.
        #expect(tasks.register(slot: 3, nexus: other, lun: lun0, tag: 7, attribute: .simple) == .registered)
        #expect(tasks.register(slot: 4, nexus: me, lun: lun1, tag: 7, attribute: .simple) == .registered)
        var sense = SenseBytes()
        TaskSet.overlappedCommandsError.sense!.encode(.fixed, into: &sense)
        #expect(sense.array == [0x70, 0, 0x0B, 0, 0, 0, 0, 0x0A, 0, 0, 0, 0, 0x4E, 0x00, 0, 0, 0, 0])
    }

    @Test func badSlotsAreRefused() {
        var tasks = TaskSet(capacity: 2)
        #expect(tasks.register(slot: -1, nexus: me, lun: lun0, tag: 1, attribute: .simple) == .slotUnavailable)
        #expect(tasks.register(slot: 2, nexus: me, lun: lun0, tag: 1, attribute: .simple) == .slotUnavailable)
        #expect(tasks.register(slot: 0, nexus: me, lun: lun0, tag: 1, attribute: .simple) == .registered)
        #expect(tasks.register(slot: 0, nexus: me, lun: lun0, tag: 2, attribute: .simple) == .slotUnavailable)
        #expect(tasks.complete(slot: 99) == .notActive)
        #expect(tasks.isAborted(slot: -5) == false)
    }

    @Test func abortedTasksCompleteOnceWithTaskAborted() {
        var tasks = TaskSet(capacity: 8)
        for (slot, tag) in [(0, 100), (1, 101), (2, 102)] {
            _ = tasks.register(slot: slot, nexus: me, lun: lun0, tag: UInt64(tag), attribute: .simple)
        }
        _ = tasks.register(slot: 3, nexus: other, lun: lun0, tag: 100, attribute: .simple)
        tasks.setInBackend(slot: 1, true)
        #expect(tasks.markAborted(TaskScope(nexus: me, lun: lun0, tag: nil)) == 3)
        #expect(tasks.markAborted(TaskScope(nexus: me, lun: lun0, tag: nil)) == 0)  // already aborted
        #expect(tasks.abortedCount == 3)
        #expect(tasks.isAborted(slot: 1) == true)
        #expect(tasks.isAborted(slot: 3) == false)
        // Tasks outside the back-end are handed out now, exactly once.
        var handed: [Int] = []
        #expect(tasks.takeAborted { handed.append($0) } == 2)
        #expect(handed == [0, 2])
        #expect(tasks.takeAborted { handed.append($0) } == 0)
        // The one in the back-end completes, aborted, when its I/O returns.
        #expect(tasks.complete(slot: 1) == .aborted)
        #expect(tasks.complete(slot: 1) == .notActive)
        #expect(tasks.complete(slot: 0) == .notActive)
        #expect(tasks.complete(slot: 3) == .normal)
        #expect(tasks.count == 0 && tasks.abortedCount == 0)
    }

    @Test func queriesIgnoreAbortedTasks() {
        var tasks = TaskSet(capacity: 4)
        _ = tasks.register(slot: 0, nexus: me, lun: lun0, tag: 5, attribute: .simple)
        _ = tasks.register(slot: 1, nexus: me, lun: lun1, tag: 6, attribute: .simple)
        #expect(tasks.contains(TaskScope(nexus: me, lun: lun0, tag: 5)) == true)
        #expect(tasks.count(in: TaskScope(nexus: me, lun: nil, tag: nil)) == 2)
        tasks.markAborted(TaskScope(nexus: me, lun: lun0, tag: 5))
        #expect(tasks.contains(TaskScope(nexus: me, lun: lun0, tag: 5)) == false)
        #expect(tasks.count(in: TaskScope(nexus: me, lun: lun0, tag: 5), includingAborted: true) == 1)
        #expect(tasks.count(in: TaskScope(nexus: me, lun: nil, tag: nil)) == 1)
        #expect(tasks.count(in: TaskScope(nexus: nil, lun: nil, tag: nil), includingAborted: true) == 2)
    }

    /// The tag index against a dictionary model under random insertions and removals.
    @Test func tagIndexMatchesModel() {
        let capacity = 64
        var tasks = TaskSet(capacity: capacity)
        var model: [Int: (ITNexus, LogicalUnitNumber, UInt64)] = [:]
        var rng: UInt64 = 0x1234_5678
        func next() -> UInt64 {
            rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17
            return rng
        }
        for _ in 0..<20_000 {
            let slot = Int(next() % UInt64(capacity))
            if let entry = model[slot] {
                #expect(tasks.slot(nexus: entry.0, lun: entry.1, tag: entry.2) == slot)
                #expect(tasks.complete(slot: slot) == .normal)
                model[slot] = nil
            } else {
                let nexus = ITNexus(initiator: next() % 3)
                let lun = LogicalUnitNumber(Int(next() % 2))!
                let tag = next() % 40
                let clash = model.first { $0.value.0 == nexus && $0.value.1 == lun && $0.value.2 == tag }
                let result = tasks.register(slot: slot, nexus: nexus, lun: lun, tag: tag, attribute: .simple)
                if let clash {
                    #expect(result == .overlapped(existingSlot: clash.key))
                } else {
                    #expect(result == .registered)
                    model[slot] = (nexus, lun, tag)
                }
            }
        }
        for (slot, entry) in model { #expect(tasks.slot(nexus: entry.0, lun: entry.1, tag: entry.2) == slot) }
        #expect(tasks.count == model.count)
    }
}

@Suite("Task management functions")
struct TaskManagementFunctionTests {
    /// A task set with two tasks of `me` on LUN 0 (tags 1, 2), one of `me` on LUN 1 (tag 3) and one of
    /// `other` on LUN 0 (tag 1).
    private func populated() -> TaskSet {
        var tasks = TaskSet(capacity: 16)
        _ = tasks.register(slot: 0, nexus: me, lun: lun0, tag: 1, attribute: .simple)
        _ = tasks.register(slot: 1, nexus: me, lun: lun0, tag: 2, attribute: .simple)
        _ = tasks.register(slot: 2, nexus: me, lun: lun1, tag: 3, attribute: .simple)
        _ = tasks.register(slot: 3, nexus: other, lun: lun0, tag: 1, attribute: .simple)
        return tasks
    }

    private func aborted(_ tasks: borrowing TaskSet) -> [Int] { (0..<4).filter { tasks.isAborted(slot: $0) } }

    @Test(arguments: [
        // (function, tasks aborted, response)
        (TaskManagementFunction.abortTask(tag: 2), [1], TaskManagementResponse.functionComplete),
        (.abortTask(tag: 99), [], .functionComplete),
        (.abortTaskSet, [0, 1], .functionComplete),
        (.clearTaskSet, [0, 1, 3], .functionComplete),
        (.logicalUnitReset, [0, 1, 3], .functionComplete),
        (.itNexusReset, [0, 1, 2], .functionComplete),
        (.queryTask(tag: 1), [], .functionSucceeded),
        (.queryTask(tag: 3), [], .functionComplete),   // tag 3 is on LUN 1
        (.queryTaskSet, [], .functionSucceeded),
        (.clearACA, [], .functionRejected),
    ])
    func outcomes(function: TaskManagementFunction, abortedSlots: [Int], response: TaskManagementResponse) {
        let units = [makeUnit(lun0), makeUnit(lun1)]
        var tasks = populated()
        let plan = TaskManagementPlan.make(function, nexus: me, lun: lun0, unit: units[0], allUnits: units)
        let outcome = plan.apply(to: &tasks)
        #expect(aborted(tasks) == abortedSlots)
        #expect(outcome.abortedCount == abortedSlots.count)
        #expect(plan.response(queryMatched: outcome.queryMatched) == response)
        // Every aborted task completes exactly once with TASK ABORTED.
        var ends: [TaskEnd] = []
        for slot in 0..<4 { ends.append(tasks.complete(slot: slot)) }
        #expect(ends.filter { $0 == .aborted }.count == abortedSlots.count)
        #expect(ends.filter { $0 == .normal }.count == 4 - abortedSlots.count)
        for slot in 0..<4 { #expect(tasks.complete(slot: slot) == .notActive) }
    }

    @Test func queryTaskOfAnAbortedTaskIsComplete() {
        var tasks = populated()
        tasks.markAborted(TaskScope(nexus: me, lun: lun0, tag: 1))
        let unit = makeUnit(lun0)
        let plan = TaskManagementPlan.make(.queryTask(tag: 1), nexus: me, lun: lun0, unit: unit, allUnits: [unit])
        let outcome = plan.apply(to: &tasks)
        #expect(!outcome.queryMatched)
        #expect(plan.response(queryMatched: outcome.queryMatched) == .functionComplete)
    }

    @Test func queriesAcrossSeveralTaskSets() {
        var first = TaskSet(capacity: 4)
        var second = TaskSet(capacity: 4)
        _ = second.register(slot: 0, nexus: me, lun: lun0, tag: 42, attribute: .simple)
        let unit = makeUnit(lun0)
        let plan = TaskManagementPlan.make(.queryTask(tag: 42), nexus: me, lun: lun0, unit: unit, allUnits: [unit])
        var outcome = plan.apply(to: &first)
        #expect(!outcome.queryMatched)
        outcome.merge(plan.apply(to: &second))
        #expect(plan.response(queryMatched: outcome.queryMatched) == .functionSucceeded)
    }

    @Test(arguments: [TaskManagementFunction.abortTask(tag: 1), .abortTaskSet, .clearTaskSet, .logicalUnitReset,
                      .queryTask(tag: 1), .queryTaskSet, .queryAsyncEvent, .clearACA])
    func missingLogicalUnitIsIncorrectLUN(function: TaskManagementFunction) {
        var tasks = populated()
        let plan = TaskManagementPlan.make(function, nexus: me, lun: LogicalUnitNumber(9)!, unit: nil, allUnits: [])
        #expect(plan.response(queryMatched: false) == .incorrectLUN)
        #expect(plan.abortScopes.isEmpty)
        #expect(plan.apply(to: &tasks).abortedCount == 0)
        let undecodable = TaskManagementPlan.make(function, nexus: me, lun: nil, unit: nil, allUnits: [])
        #expect(undecodable.response(queryMatched: true) == .incorrectLUN)
    }

    @Test func logicalUnitResetSideEffects() throws {
        let unit = makeUnit(lun0)
        _ = unit.unitAttentions.takeNext(for: me)      // power-on consumed by me
        _ = unit.unitAttentions.takeNext(for: other)
        unit.unitAttentions.establish(.capacityDataHasChanged, for: .all)
        try unit.reservations.reserve(from: other)
        _ = TaskManagementPlan.make(.logicalUnitReset, nexus: me, lun: lun0, unit: unit, allUnits: [unit])
        #expect(unit.reservations.spc2Holder == nil)
        #expect(!unit.reservations.isReserved)
        #expect(unit.unitAttentions.pending(for: me) == [.busDeviceResetFunctionOccurred])
        #expect(unit.unitAttentions.pending(for: other) == [.busDeviceResetFunctionOccurred])
        // A nexus seen later still reports power-on first.
        #expect(unit.unitAttentions.takeNext(for: idle) == .powerOnResetOrBusDeviceReset)
    }

    @Test func logicalUnitResetKeepsPersistentReservations() throws {
        let unit = makeUnit(lun0)
        let cdb = CDB([0x5F, 0x00, 0, 0, 0, 0, 0, 0, 24, 0])
        let params: [UInt8] = [UInt8](repeating: 0, count: 15) + [0x01] + [UInt8](repeating: 0, count: 8)
        _ = try unit.reservations.persistentReserveOut(cdb, parameters: params, from: me)
        _ = try unit.reservations.persistentReserveOut(CDB([0x5F, 0x01, 0x01, 0, 0, 0, 0, 0, 24, 0]),
                                                       parameters: [0, 0, 0, 0, 0, 0, 0, 1] + [UInt8](repeating: 0, count: 16),
                                                       from: me)
        _ = TaskManagementPlan.make(.logicalUnitReset, nexus: other, lun: lun0, unit: unit, allUnits: [unit])
        #expect(unit.reservations.persistentReservation == PersistentReservation(holder: me, type: .writeExclusive))
    }

    @Test func itNexusResetSideEffects() throws {
        let units = [makeUnit(lun0), makeUnit(lun1)]
        for u in units {
            _ = u.unitAttentions.takeNext(for: me)
            _ = u.unitAttentions.takeNext(for: other)
        }
        try units[0].reservations.reserve(from: me)
        try units[1].reservations.reserve(from: other)
        let plan = TaskManagementPlan.make(.itNexusReset, nexus: me, lun: nil, unit: nil, allUnits: units)
        #expect(plan.response(queryMatched: false) == .functionComplete)
        #expect(plan.abortScopes == [TaskScope(nexus: me, lun: nil, tag: nil)])
        #expect(units[0].reservations.spc2Holder == nil)
        #expect(units[1].reservations.spc2Holder == other)
        for u in units {
            #expect(u.unitAttentions.pending(for: me) == [.iTNexusLossOccurred])
            #expect(u.unitAttentions.pending(for: other).isEmpty)
        }
    }

    @Test func clearTaskSetTellsOnlyOtherNexusesThatLostCommands() {
        let unit = makeUnit(lun0)
        for n in [me, other, idle] { _ = unit.unitAttentions.takeNext(for: n) }
        var tasks = populated()
        let plan = TaskManagementPlan.make(.clearTaskSet, nexus: me, lun: lun0, unit: unit, allUnits: [unit])
        let outcome = plan.apply(to: &tasks)
        #expect(outcome.otherNexusesAborted == [other])
        TaskManagementPlan.finish(plan, outcome, unit: unit)
        #expect(unit.unitAttentions.pending(for: other) == [.commandsClearedByAnotherInitiator])
        #expect(unit.unitAttentions.pending(for: me).isEmpty)
        #expect(unit.unitAttentions.pending(for: idle).isEmpty)
    }

    @Test func abortTaskSetRaisesNoUnitAttention() {
        let unit = makeUnit(lun0)
        for n in [me, other] { _ = unit.unitAttentions.takeNext(for: n) }
        var tasks = populated()
        let plan = TaskManagementPlan.make(.abortTaskSet, nexus: other, lun: lun0, unit: unit, allUnits: [unit])
        let outcome = plan.apply(to: &tasks)
        #expect(outcome.abortedCount == 1)
        TaskManagementPlan.finish(plan, outcome, unit: unit)
        #expect(unit.unitAttentions.pending(for: me).isEmpty)
    }

    @Test func queryAsyncEventReportsThePendingUnitAttention() {
        let unit = makeUnit(lun0)
        let first = TaskManagementPlan.make(.queryAsyncEvent, nexus: me, lun: lun0, unit: unit, allUnits: [unit])
        #expect(first.response(queryMatched: false) == .functionSucceeded)
        let info = first.additionalResponseInformation
        #expect(info.0 == 0x06 && info.1 == 0x29 && info.2 == 0x00)
        // The query does not consume it.
        #expect(unit.unitAttentions.takeNext(for: me) == .powerOnResetOrBusDeviceReset)
        let second = TaskManagementPlan.make(.queryAsyncEvent, nexus: me, lun: lun0, unit: unit, allUnits: [unit])
        #expect(second.response(queryMatched: false) == .functionComplete)
        let none = second.additionalResponseInformation
        #expect(none.0 == 0 && none.1 == 0 && none.2 == 0)
    }

    @Test func preemptAndAbortPlan() {
        var effects = ReservationEffects()
        effects.abortTasksOf = [other]
        var tasks = populated()
        let plan = TaskManagementPlan.preemptAndAbort(effects, lun: lun0, from: me)
        let outcome = plan.apply(to: &tasks)
        #expect(outcome.abortedCount == 1)
        #expect(tasks.isAborted(slot: 3) == true)
        #expect(outcome.otherNexusesAborted == [other])
    }

    @Test func unitAttentionsFromReservationEffects() {
        let unit = makeUnit(lun0)
        _ = unit.unitAttentions.takeNext(for: other)
        var effects = ReservationEffects()
        effects.unitAttentions = [(.registrationsPreempted, .only(other))]
        unit.unitAttentions.establish(effects)
        #expect(unit.unitAttentions.takeNext(for: other) == .registrationsPreempted)
    }
}
