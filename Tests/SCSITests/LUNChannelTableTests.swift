import BlockIO
import Testing
@testable import SCSI

/// A channel that holds what is submitted until `finish` and records how it is closed.
private final class ScriptedChannel: BlockChannel {
    let backendID: Int
    let completionFD: Int32
    var queued: [UInt64] = []
    var ready: [UInt64] = []
    var commits = 0
    var closes = 0
    init(backendID: Int, completionFD: Int32) {
        self.backendID = backendID
        self.completionFD = completionFD
    }
    func submit(_ request: BlockRequest, token: UInt64) -> Int32 {
        queued.append(token)
        return 0
    }
    func commit() { commits += 1 }
    /// Completes every queued request.
    func finish() {
        ready += queued
        queued.removeAll()
    }
    func reap(_ handler: (UInt64, BlockResult) -> Void) -> Int {
        let done = ready
        ready.removeAll()
        for t in done { handler(t, .success(512)) }
        return done.count
    }
    var inFlight: Int { queued.count + ready.count }
    func close() { closes += 1 }
}

private struct OpenFailure: Error {}

/// The per-thread LUN channel table the device models share (virtio-scsi per queue group, PVSCSI per adapter).
@Suite struct LUNChannelTableTests {
    /// A table over scripted channels: back-end ids in `failing` cannot be opened; ids >= 100 have no fd.
    final class Rig {
        var opened: [Int] = []
        fileprivate var made: [ScriptedChannel] = []
        var countersAsked: [(Int, Int)] = []
        var watched: [(Int32, Int)] = []
        var unwatched: [Int32] = []
        var failures: [Int] = []
        var failing: Set<Int> = []
        fileprivate var table: LUNChannelTable<ScriptedChannel>!

        init(queues: Int = 1) {
            table = LUNChannelTable(queues: queues, open: { [unowned self] id in
                self.opened.append(id)
                if self.failing.contains(id) { throw OpenFailure() }
                let c = ScriptedChannel(backendID: id, completionFD: id >= 100 ? -1 : Int32(1000 + id))
                self.made.append(c)
                return c
            }, counters: { [unowned self] id, queue in
                self.countersAsked.append((id, queue))
                return nil
            })
            table.watch = { [unowned self] fd, use in self.watched.append((fd, use)) }
            table.unwatch = { [unowned self] fd in self.unwatched.append(fd) }
            table.openFailed = { [unowned self] id, _ in self.failures.append(id) }
        }

        /// Begins a command on `backendID` and submits one request for it (as a device does).
        func submit(_ backendID: Int, token: UInt64) -> Int {
            let use = table.use(for: backendID)
            table.beginTask(use)
            let c = table.channel(use)!
            #expect(c.submit(BlockRequest(operation: .flush, offset: 0, length: 0), token: token) == 0)
            table.submitted(use)
            return use
        }

        /// Reaps everything and answers each command.
        func reapAll() -> [UInt64] {
            var got: [UInt64] = []
            _ = table.deliver(polling: false) { use, token, _ in
                got.append(token)
                table.endTask(use)
            }
            return got
        }
    }

    /// A map naming LUN n -> back-end id for each pair.
    func view(_ backends: [(Int, Int)]) -> LUNMapView {
        let target = SCSITarget(name: "t")
        for (lun, id) in backends {
            try! target.add(LogicalUnit(number: LogicalUnitNumber(lun)!, identity: LogicalUnitIdentity(serial: "S\(lun)", naa: 1),
                                        geometry: BlockGeometry(logicalBlockSize: 512, physicalBlockSize: 512, blockCount: 8), backendID: id))
        }
        var v = LUNMapView()
        target.refresh(&v)
        return v
    }

    @Test func opensTheChannelOnFirstIOOnlyAndOnce() {
        let rig = Rig(queues: 3)
        let use = rig.table.use(for: 4)
        // Creating the use looks its counters up (one per queue) but opens nothing.
        #expect(rig.opened.isEmpty)
        #expect(rig.countersAsked.map(\.1) == [0, 1, 2])
        #expect(rig.table.existingUse(4) == use)
        #expect(rig.table.existingUse(5) == -1)
        #expect(rig.table.openedChannel(use) == nil)
        let first = rig.table.channel(use)
        let again = rig.table.channel(use)
        #expect(rig.opened == [4])
        #expect(first === again)
        #expect(rig.watched.count == 1 && rig.watched[0].0 == 1004 && rig.watched[0].1 == use)
        #expect(rig.table.use(for: 4) == use)
        #expect(rig.table.openChannelCount == 1)
        // A channel without a completion fd is not watched.
        _ = rig.table.channel(rig.table.use(for: 100))
        #expect(rig.watched.count == 1)
        #expect(rig.table.use(for: -1) == -1 && rig.table.use(for: 1 << 16) == -1)
    }

    @Test func aFailedOpenIsReportedAndRetriedOnTheNextIO() {
        let rig = Rig()
        rig.failing = [3]
        let use = rig.table.use(for: 3)
        #expect(rig.table.channel(use) == nil)
        #expect(rig.failures == [3])
        rig.failing = []
        #expect(rig.table.channel(use) != nil)
        #expect(rig.opened == [3, 3])
    }

    @Test func countsRequestsInFlightAndCommitsEachChannelOnce() {
        let rig = Rig()
        let a = rig.submit(1, token: 10)
        _ = rig.submit(1, token: 11)
        let b = rig.submit(2, token: 20)
        #expect(rig.table.inFlight(a) == 2 && rig.table.tasks(a) == 2)
        #expect(rig.table.inFlight(b) == 1)
        #expect(rig.table.commit() == false)  // both have a completion fd: nothing completes on commit
        #expect(rig.made.map(\.commits) == [1, 1])
        #expect(rig.table.commit() == false)  // nothing submitted since: nothing committed
        #expect(rig.made.map(\.commits) == [1, 1])
        rig.made[0].finish()
        #expect(rig.reapAll() == [10, 11])
        #expect(rig.table.inFlight(a) == 0 && rig.table.tasks(a) == 0)
        #expect(rig.table.inFlight(b) == 1)
        // A channel without a completion fd says so on commit.
        _ = rig.submit(100, token: 30)
        #expect(rig.table.commit() == true)
    }

    @Test func removalRetiresTheChannelAndClosesItOnceItsIOHasCompleted() {
        let rig = Rig()
        let kept = rig.submit(1, token: 1)
        let removed = rig.submit(2, token: 2)
        _ = rig.table.commit()
        // LUN 1 (back-end 2) leaves the map while its request is in flight.
        var closed: [Int] = []
        rig.table.retireUnmapped(view([(0, 1)])) { closed.append($0) }
        #expect(closed.isEmpty)
        #expect(rig.table.retiredCount == 1)
        #expect(rig.made[1].closes == 0)
        // New commands no longer find it, but its channel still serves what is in flight.
        #expect(rig.table.existingUse(2) == -1)
        #expect(rig.table.openedChannel(removed) === rig.made[1])
        rig.made[1].finish()
        #expect(rig.reapAll() == [2])
        rig.table.closeIdleRetired { closed.append($0) }
        #expect(closed == [2])
        #expect(rig.made[1].closes == 1)
        #expect(rig.unwatched == [1002])
        #expect(rig.table.retiredCount == 0)
        #expect(rig.table.openChannelCount == 1)
        #expect(rig.table.openedChannel(kept) === rig.made[0])
        // The freed entry is reused by the next back-end; a LUN added again opens a new channel.
        let again = rig.table.use(for: 2)
        #expect(again == removed)
        #expect(rig.table.channel(again) !== rig.made[1])
        #expect(rig.opened == [1, 2, 2])
    }

    @Test func aRetiredChannelWaitsForItsLastAnswerNotOnlyItsLastRequest() {
        let rig = Rig()
        let use = rig.submit(5, token: 1)
        _ = rig.table.commit()
        rig.table.retireUnmapped(view([]))
        rig.made[0].finish()
        _ = rig.table.deliver(polling: false) { _, _, _ in }  // reaped, command not answered yet
        rig.table.closeIdleRetired()
        #expect(rig.made[0].closes == 0)
        rig.table.endTask(use)
        rig.table.closeIdleRetired()
        #expect(rig.made[0].closes == 1)
    }

    @Test func anIdleUseOfARemovedLUNClosesAtOnceAndAnUnopenedOneNeverOpens() {
        let rig = Rig()
        let idle = rig.table.use(for: 1)
        _ = rig.table.channel(idle)
        let unopened = rig.table.use(for: 2)
        rig.table.beginTask(unopened)
        var closed: [Int] = []
        rig.table.retireUnmapped(view([])) { closed.append($0) }
        #expect(closed == [1])
        #expect(rig.made[0].closes == 1)
        // Retired before its channel opened: a later step of its command gets none.
        #expect(rig.table.channel(unopened) == nil)
        #expect(rig.opened == [1])
        rig.table.endTask(unopened)
        rig.table.closeIdleRetired { closed.append($0) }
        #expect(closed == [1, 2])
    }

    @Test func shutdownClosesEveryChannelOnce() {
        let rig = Rig()
        _ = rig.submit(1, token: 1)
        _ = rig.submit(2, token: 2)
        _ = rig.submit(100, token: 3)
        rig.table.retireUnmapped(view([(0, 1), (1, 100)]))
        #expect(rig.table.retiredCount == 1)
        rig.table.closeAll()
        #expect(rig.made.map(\.closes) == [1, 1, 1])
        #expect(Set(rig.unwatched) == [1001, 1002])
        #expect(rig.table.openChannelCount == 0)
        #expect(rig.table.retiredCount == 0)
        #expect(rig.table.existingUse(1) == -1)
        // Usable again afterwards (a restarted loop).
        #expect(rig.table.channel(rig.table.use(for: 1)) != nil)
        #expect(rig.opened == [1, 2, 100, 1])
    }
}
