import Testing
import Synchronization
@testable import SCSI

#if canImport(Glibc)
import Glibc
#endif

private let a = ITNexus(initiator: 0xA)
private let b = ITNexus(initiator: 0xB)
private let c = ITNexus(initiator: 0xC)

/// Drains every pending condition of `nexus`, in reporting order.
private func drain(_ board: UnitAttentionBoard, _ nexus: ITNexus) -> [AdditionalSense] {
    var out: [AdditionalSense] = []
    while let next = board.takeNext(for: nexus) { out.append(next) }
    return out
}

@Suite("Unit attentions")
struct UnitAttentionTests {
    @Test func firstCommandOfEachNexusSeesPowerOnOnce() {
        let board = UnitAttentionBoard()
        #expect(board.mayHavePending(for: a))
        #expect(board.peekNext(for: a) == .powerOnResetOrBusDeviceReset)
        #expect(board.takeNext(for: a) == .powerOnResetOrBusDeviceReset)
        #expect(board.takeNext(for: a) == nil)
        #expect(!board.mayHavePending(for: a))
        // Another nexus, seen later, still gets its own.
        #expect(board.mayHavePending(for: b))
        #expect(drain(board, b) == [.powerOnResetOrBusDeviceReset])
        #expect(!board.mayHavePending(for: b))
    }

    @Test func withoutPowerOnNewNexusHasNothing() {
        let board = UnitAttentionBoard(establishPowerOn: false)
        #expect(board.pendingForNewNexuses.isEmpty)
        #expect(board.takeNext(for: a) == nil)
        #expect(!board.mayHavePending(for: a))
    }

    @Test func resetClassIsReportedFirstAndClearsOlderConditions() {
        let board = UnitAttentionBoard()
        _ = drain(board, a)
        board.establish(.capacityDataHasChanged, for: .all)
        board.establish(.modeParametersChanged, for: .all)
        board.establish(.busDeviceResetFunctionOccurred, for: .all)   // clears the two above
        board.establish(.reportedLUNsDataHasChanged, for: .all)       // after the reset: kept, reported after it
        #expect(board.pending(for: a) == [.busDeviceResetFunctionOccurred, .reportedLUNsDataHasChanged])
        #expect(drain(board, a) == [.busDeviceResetFunctionOccurred, .reportedLUNsDataHasChanged])
    }

    @Test func secondResetConditionIsNotQueuedWhileOneIsPending() {
        let board = UnitAttentionBoard()
        board.establish(.busDeviceResetFunctionOccurred, for: .all)
        board.establish(.iTNexusLossOccurred, for: .only(a))
        #expect(drain(board, a) == [.powerOnResetOrBusDeviceReset])
        board.establish(.busDeviceResetFunctionOccurred, for: .all)
        #expect(drain(board, a) == [.busDeviceResetFunctionOccurred])
    }

    @Test func otherConditionsAreReportedOldestFirstWithoutDuplicates() {
        let board = UnitAttentionBoard()
        _ = drain(board, a)
        board.establish(.reportedLUNsDataHasChanged, for: .all)
        board.establish(.capacityDataHasChanged, for: .all)
        board.establish(.reportedLUNsDataHasChanged, for: .all)
        board.establish(.modeParametersChanged, for: .only(a))
        board.establish(.capacityDataHasChanged, for: .only(a))
        #expect(drain(board, a) == [.reportedLUNsDataHasChanged, .capacityDataHasChanged, .modeParametersChanged])
    }

    @Test(arguments: [
        // (scope, expected for a, for b, for a nexus c first seen afterwards)
        (UnitAttentionScope.all, [AdditionalSense.capacityDataHasChanged], [AdditionalSense.capacityDataHasChanged],
         [AdditionalSense.powerOnResetOrBusDeviceReset, .capacityDataHasChanged]),
        (.allExcept(a), [], [.capacityDataHasChanged], [.powerOnResetOrBusDeviceReset, .capacityDataHasChanged]),
        (.only(b), [], [.capacityDataHasChanged], [.powerOnResetOrBusDeviceReset]),
    ])
    func scopes(scope: UnitAttentionScope, forA: [AdditionalSense], forB: [AdditionalSense], forC: [AdditionalSense]) {
        let board = UnitAttentionBoard()
        _ = drain(board, a)
        _ = drain(board, b)
        board.establish(.capacityDataHasChanged, for: scope)
        #expect(drain(board, a) == forA)
        #expect(drain(board, b) == forB)
        #expect(drain(board, c) == forC)
    }

    @Test func scopeNamingAnUnseenNexusGivesItItsInitialConditionsToo() {
        let board = UnitAttentionBoard()
        board.establish(.reservationsPreempted, for: .only(c))
        #expect(drain(board, c) == [.powerOnResetOrBusDeviceReset, .reservationsPreempted])
        board.establish(.modeParametersChanged, for: .allExcept(b))  // b unseen: gets power-on only
        #expect(drain(board, b) == [.powerOnResetOrBusDeviceReset])
    }

    @Test func overflowKeepsTheMostImportant() {
        let board = UnitAttentionBoard(establishPowerOn: false)
        let filler = (0..<UInt8(UnitAttentionBoard.queueCapacity)).map { AdditionalSense(0x3F, 0x10 + $0) }
        for f in filler { board.establish(f, for: .only(a)) }
        #expect(board.pending(for: a) == filler)
        // A more important condition evicts the oldest least important one.
        board.establish(.reservationsReleased, for: .only(a))
        #expect(board.pending(for: a) == Array(filler.dropFirst()) + [.reservationsReleased])
        // Fill with important ones: a new ordinary condition is dropped.
        let board2 = UnitAttentionBoard(establishPowerOn: false)
        let important = (0..<UInt8(UnitAttentionBoard.queueCapacity)).map { AdditionalSense(0x2F, $0) }
        for f in important { board2.establish(f, for: .only(a)) }
        board2.establish(.capacityDataHasChanged, for: .only(a))
        #expect(board2.pending(for: a) == important)
        // A reset-class condition always gets in (and clears the rest).
        board2.establish(.busDeviceResetFunctionOccurred, for: .only(a))
        #expect(board2.pending(for: a) == [.busDeviceResetFunctionOccurred])
    }

    @Test func removeAndClear() {
        let board = UnitAttentionBoard()
        _ = drain(board, a)
        board.establish(.reportedLUNsDataHasChanged, for: .all)
        board.establish(.capacityDataHasChanged, for: .all)
        #expect(board.remove(.reportedLUNsDataHasChanged, for: a))
        #expect(!board.remove(.reportedLUNsDataHasChanged, for: a))
        #expect(board.pending(for: a) == [.capacityDataHasChanged])
        #expect(board.mayHavePending(for: a))
        board.clear(for: a)
        #expect(!board.mayHavePending(for: a))
        #expect(board.takeNext(for: a) == nil)
        // clear() of an unseen nexus consumes its initial conditions.
        board.clear(for: c)
        #expect(board.takeNext(for: c) == nil)
    }

    @Test func fastPathIsExactForTableNexusesAndConservativeBeyond() {
        let board = UnitAttentionBoard()
        let nexuses = (0..<100).map { ITNexus(initiator: UInt64($0) &* 7919, targetPort: UInt16($0 % 3 + 1)) }
        for n in nexuses { #expect(drain(board, n) == [.powerOnResetOrBusDeviceReset]) }
        let quiet = nexuses.filter { !board.mayHavePending(for: $0) }.count
        #expect(quiet == UnitAttentionBoard.tableSize)
        board.establish(.capacityDataHasChanged, for: .all)
        #expect(nexuses.allSatisfy { board.mayHavePending(for: $0) })
        for n in nexuses { #expect(drain(board, n) == [.capacityDataHasChanged]) }
    }

    @Test func forgottenNexusesFreeTheirStateAndTableSlots() {
        let board = UnitAttentionBoard()
        // Far more short-lived nexuses than table slots: each is seen, drained and forgotten.
        for i in 0..<1000 {
            let n = ITNexus(initiator: UInt64(5000 + i))
            #expect(drain(board, n) == [.powerOnResetOrBusDeviceReset])
            #expect(!board.mayHavePending(for: n))  // still gets a table slot: the fast path works
            board.forget(n)
            #expect(board.mayHavePending(for: n))   // unknown again
        }
        #expect(board.knownNexusCount == 0)
        // A returning nexus is new again.
        #expect(drain(board, ITNexus(initiator: 5000)) == [.powerOnResetOrBusDeviceReset])
        board.forget(c)  // never seen: no effect
        #expect(board.knownNexusCount == 1)
    }

    @Test func concurrentEstablishAndTakeLoseNothing() {
        let board = UnitAttentionBoard(establishPowerOn: false)
        let taken = Atomic<Int>(0)
        let threads = 4
        let rounds = 2000
        // Each thread owns a nexus: it establishes a condition for itself and takes it back, while the
        // others do the same, all through the same board.
        var ids: [pthread_t] = []
        final class Box: @unchecked Sendable {
            let body: () -> Void
            init(_ body: @escaping () -> Void) { self.body = body }
        }
        for t in 0..<threads {
            let nexus = ITNexus(initiator: UInt64(100 + t))
            let box = Box {
                var got = 0
                for r in 0..<rounds {
                    let condition = AdditionalSense(0x3F, UInt8(r % 4))
                    board.establish(condition, for: .only(nexus))
                    if board.mayHavePending(for: nexus), board.takeNext(for: nexus) == condition { got += 1 }
                }
                taken.add(got, ordering: .relaxed)
            }
            var id = pthread_t()
            let arg = Unmanaged.passRetained(box).toOpaque()
            pthread_create(&id, nil, { raw in
                let box = Unmanaged<Box>.fromOpaque(raw!).takeRetainedValue()
                box.body()
                return nil
            }, arg)
            ids.append(id)
        }
        for id in ids { pthread_join(id, nil) }
        #expect(taken.load(ordering: .relaxed) == threads * rounds)
    }
}

@Suite("Unit attention check before a command")
struct UnitAttentionCheckTests {
    @Test(arguments: [
        ([UInt8(0x12), 0, 0, 0, 36, 0], true),                       // INQUIRY
        ([0xA0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0], true),          // REPORT LUNS
        ([0x03, 0, 0, 0, 18, 0], true),                              // REQUEST SENSE
        ([0x00, 0, 0, 0, 0, 0], false),                              // TEST UNIT READY
        ([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], false),                  // READ(10)
        ([0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], false),                  // READ CAPACITY(10)
    ])
    func exemptCommandsRunAndOthersReportTheCondition(cdb: [UInt8], exempt: Bool) {
        let board = UnitAttentionBoard()
        #expect(UnitAttentionBoard.isExempt(CDB(cdb)) == exempt)
        let error = board.check(CDB(cdb), from: a)
        if exempt {
            #expect(error == nil)
            #expect(board.pending(for: a) == [.powerOnResetOrBusDeviceReset])
        } else {
            var sense = SenseBytes()
            error?.sense?.encode(.fixed, into: &sense)
            #expect(error?.status == .checkCondition)
            #expect(sense.array == [0x70, 0, 0x06, 0, 0, 0, 0, 0x0A, 0, 0, 0, 0, 0x29, 0x00, 0, 0, 0, 0])
            #expect(board.check(CDB(cdb), from: a) == nil)  // reported once
        }
    }
}
