import PVSCSITestSupport
import TestSupport
import VfioUserTestSupport
import Backends
import BlockIO
import CSystem
import Foundation
import Gateway
import PVSCSI
import SCSI
import Synchronization
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Threads of this process (entries of /proc/self/task).
private func threadCount() -> Int {
    guard let dir = opendir("/proc/self/task") else { return -1 }
    defer { closedir(dir) }
    var n = 0
    while let entry = readdir(dir) {
        if entry.pointee.d_name.0 != UInt8(ascii: ".") { n += 1 }
    }
    return n
}

/// The gateway's bookkeeping in miniature: back-ends and their counters by id (read on the loop thread).
private final class BackendTable: Sendable {
    private let entries = Mutex<[Int: (AnyBlockBackend, LUNIOStatistics)]>([:])
    func add(_ id: Int, _ backend: AnyBlockBackend) -> LUNIOStatistics {
        let statistics = LUNIOStatistics(queues: 1)
        entries.withLock { $0[id] = (backend, statistics) }
        return statistics
    }
    func remove(_ id: Int) -> AnyBlockBackend? { entries.withLock { $0.removeValue(forKey: id)?.0 } }
    func channel(_ id: Int) -> AnyBlockChannel? {
        guard let backend = entries.withLock({ $0[id]?.0 }) else { return nil }
        return try? backend.makeChannel()
    }
    func counters(_ id: Int) -> IOCounters? { entries.withLock { $0[id]?.1 }?.counters(queue: 0) }
}

/// A file-backed PVSCSI controller driven by the in-test vfio-user client (real FileBackend through
/// AnyBlockChannel, real SCSI core).
private final class FileFixture {
    let dir: String
    let file: String
    let table = SCSITarget(name: "lifecycle")
    let backends = BackendTable()
    let controller: PVSCSIController<SCSITarget, AnyBlockChannel>
    let guest: TestGuest
    private let client: VfioUserTestClient

    init(tag: String) throws {
        dir = "/tmp/scsigate-pvscsi-\(tag)-\(getpid())"
        mkdir(dir, 0o700)
        file = dir + "/lun.img"
        let backends = self.backends
        controller = try PVSCSIController(socketPath: dir + "/pvscsi.sock", target: table,
                                          channelFactory: { id in backends.channel(id) },
                                          statistics: { id in backends.counters(id) }, log: TestLog.quiet)
        try controller.start()
        client = try VfioUserTestClient(path: dir + "/pvscsi.sock")
        guest = TestGuest(client: client)
        try guest.connect()
        try guest.linuxStartup()
    }

    /// Opens the backing file (creating it the first time) and adds it as LUN 0 with back-end `id`.
    /// Times `addLUN` found the file locked although this process had no descriptor on it left (a child
    /// process that another suite of this test process was starting still had a copy of the descriptor
    /// between its fork and its exec), and opened it on a retry.
    var lockedByAChild = 0

    @discardableResult
    func addLUN(id: Int) throws -> LUNIOStatistics {
        let spec = BackendSpec(kind: .file, path: file, size: 4 << 20, cache: .writeback, create: true)
        var attempt = 0
        var opened: AnyBlockBackend? = nil
        while opened == nil {
            let result: Result<AnyBlockBackend, BackendOpenError>
            do { result = .success(try AnyBlockBackend.open(spec)) } catch { result = .failure(error) }
            switch result {
            case .success(let backend): opened = backend
            case .failure(let error):
                // Ours all closed: only a forked child can hold the lock, until its exec closes the copy.
                guard case .lockConflict = error, attempt < 50, OpenDescriptors.count(on: file) == 0, openChannels == 0 else {
                    throw error
                }
                attempt += 1
                if attempt == 1 { lockedByAChild += 1 }
                usleep(2_000)
            }
        }
        let backend = opened!
        let statistics = backends.add(id, backend)
        try table.add(LogicalUnit(number: LogicalUnitNumber(0)!,
                                  identity: LogicalUnitIdentity(serial: "LC\(id)", naa: 0x5000_0000_0000_0100 + UInt64(id)),
                                  geometry: backend.geometry, backendID: id))
        return statistics
    }

    /// Removes LUN 0 as the gateway does: from the target, then closes its back-end.
    func removeLUN(id: Int) throws {
        _ = try table.remove(LogicalUnitNumber(0)!)
        backends.remove(id)?.close()
    }

    /// TEST UNIT READY until GOOD (the new LUN reports its unit attention first).
    func waitReady(context: UInt64) throws -> Bool {
        let sense = guest.address(page: TestGuest.sensePage)
        for i in 0..<4 {
            let t = try guest.run([GuestRequest(context: context + UInt64(i), cdb: [0, 0, 0, 0, 0, 0],
                                                senseAddress: sense, senseLength: 96)])
            if t.first?.scsiStatus == 0 && t.first?.hostStatus == 0 { return true }
        }
        return false
    }

    var openChannels: Int {
        let device = controller.device
        return controller.sync { device.openChannelCount }
    }

    func stop() {
        controller.stop()
        unlink(file)
        unlink(dir + "/pvscsi.sock")
        rmdir(dir)
    }
}

@Suite(.serialized) struct ChannelLifecycleTests {
    /// 50 hotplug cycles of the same file with I/O in between (some of it still in flight when the LUN is
    /// removed): every cycle re-opens the file (the lock is free again), completions in flight at the
    /// removal are delivered, and descriptors and threads come back to where they started.
    @Test func removedLUNsReleaseTheirChannelFileLockDescriptorsAndThreads() throws {
        let f = try FileFixture(tag: "cycles")
        defer { f.stop() }
        let g = f.guest
        let threadsBefore = threadCount()
        var maxChannels = 0
        var writesVerified = 0
        for cycle in 1...50 {
            try f.addLUN(id: cycle)  // throws "lock held" if the previous cycle's channel still held the file
            #expect(g.waitInterrupt())
            _ = g.takeMessages()
            #expect(try f.waitReady(context: UInt64(cycle) * 100))
            // Write 8 distinct 4 KiB blocks and leave them in flight while the LUN is removed.
            for i in 0..<8 {
                let p = g.pointer(g.address(page: TestGuest.dataPage + i))
                memset(p, Int32(truncatingIfNeeded: cycle &* 8 &+ i), 4096)
                g.place(GuestRequest(context: UInt64(cycle) * 100 + 10 + UInt64(i),
                                     cdb: write10(lba: UInt32(i * 8), blocks: 8), flags: PVSCSI.flagDirectionToDevice,
                                     dataAddress: g.address(page: TestGuest.dataPage + i), dataLength: 4096))
            }
            try g.kick()
            maxChannels = max(maxChannels, f.openChannels)
            try f.removeLUN(id: cycle)
            #expect(f.openChannels == 0)
            #expect(OpenDescriptors.count(on: f.file) == 0)
            var done: [GuestCompletion] = g.takeCompletions()
            while done.count < 8, g.waitInterrupt(milliseconds: 2000) { done += g.takeCompletions() }
            #expect(done.count == 8)
            // Those that reached the back-end before the removal are GOOD; the rest are refused.
            for c in done where c.hostStatus == 0 && c.scsiStatus == 0 {
                let i = Int(c.context % 100) - 10
                var block = [UInt8](repeating: 0, count: 4096)
                let fd = open(f.file, O_RDONLY)
                let n = block.withUnsafeMutableBytes { pread(fd, $0.baseAddress, 4096, off_t(i * 4096)) }
                close(fd)
                #expect(n == 4096 && block.allSatisfy { $0 == UInt8(truncatingIfNeeded: cycle &* 8 &+ i) })
                writesVerified += 1
            }
            _ = g.takeMessages()
        }
        #expect(maxChannels == 1)
        #expect(writesVerified > 0)
        // Same file once more, then back to the start.
        let statistics = try f.addLUN(id: 51)
        _ = g.takeMessages()
        #expect(try f.waitReady(context: 9000))
        #expect(statistics.snapshot().commands >= 1)
        try f.removeLUN(id: 51)
        _ = g.takeMessages()
        // Descriptors: only those this test owns are counted, the ones on its LUN's file (none after every
        // removal, above, and at the end, below), not the process's total, which the other suites of this
        // process change concurrently. Threads are only exact when this test runs alone (`--filter
        // removedLUNsRelease`: equal before and after): give them time to settle, then require less growth
        // than one per cycle (the leak this guards against kept 2 worker threads per cycle: over 100 here).
        var threadsAfter = threadCount()
        for _ in 0..<40 where threadsAfter > threadsBefore {
            usleep(50_000)
            threadsAfter = threadCount()
        }
        print("pvscsi lifecycle: descriptors on the LUN's file 0, threads \(threadsBefore) -> \(threadsAfter) after 51 add/remove cycles (\(f.lockedByAChild) re-add(s) waited for a forked child); \(writesVerified) of 400 writes issued just before each removal verified in the file")
        #expect(f.lockedByAChild <= 5)
        #expect(threadsAfter - threadsBefore < 50)
        #expect(OpenDescriptors.count(on: f.file) == 0)
    }

    /// Counters of a file-backed LUN: commands by class, bytes, errors by sense key, nothing left in flight.
    @Test func statisticsCountCommandsBytesAndErrors() throws {
        let f = try FileFixture(tag: "stats")
        defer { f.stop() }
        let g = f.guest
        let statistics = try f.addLUN(id: 1)
        _ = g.takeMessages()
        #expect(try f.waitReady(context: 10))
        let before = statistics.snapshot()
        #expect(before.commands >= 1 && before.started == before.commands)
        let sense = g.address(page: TestGuest.sensePage)
        let data = g.address(page: TestGuest.dataPage)
        memset(g.pointer(data), 0x5A, 65536)
        let w = try g.run([GuestRequest(context: 1, cdb: write10(lba: 64, blocks: 128), flags: PVSCSI.flagDirectionToDevice,
                                        dataAddress: data, dataLength: 65536, senseAddress: sense, senseLength: 96)])
        #expect(w.first?.scsiStatus == 0 && w.first?.hostStatus == 0)
        let r = try g.run([GuestRequest(context: 2, cdb: read10(lba: 64, blocks: 64), flags: PVSCSI.flagDirectionToHost,
                                        dataAddress: data, dataLength: 32768, senseAddress: sense, senseLength: 96)])
        #expect(r.first?.dataLength == 32768)
        let s = try g.run([GuestRequest(context: 3, cdb: [0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], senseAddress: sense, senseLength: 96)])
        #expect(s.first?.scsiStatus == 0)
        // READ beyond the 4 MiB capacity (8192 blocks): CHECK CONDITION, ILLEGAL REQUEST.
        let bad = try g.run([GuestRequest(context: 4, cdb: read10(lba: 9000, blocks: 1), flags: PVSCSI.flagDirectionToHost,
                                          dataAddress: data, dataLength: 512, senseAddress: sense, senseLength: 96)])
        #expect(bad.first?.scsiStatus == UInt16(SCSIStatus.checkCondition.rawValue))
        let inquiry = try g.run([GuestRequest(context: 5, cdb: inquiryCDB, flags: PVSCSI.flagDirectionToHost,
                                              dataAddress: data, dataLength: 36, senseAddress: sense, senseLength: 96)])
        #expect(inquiry.first?.scsiStatus == 0)
        let after = statistics.snapshot()
        #expect(after.commands - before.commands == 5)
        #expect(after.started == after.commands)
        #expect(after.inFlight == 0)
        #expect(after.commands(.write) - before.commands(.write) == 1)
        #expect(after.commands(.read) - before.commands(.read) == 2)
        #expect(after.commands(.flush) - before.commands(.flush) == 1)
        #expect(after.commands(.other) - before.commands(.other) == 1)
        #expect(after.writeBytes - before.writeBytes == 65536)
        #expect(after.readBytes - before.readBytes == 32768)
        #expect(after.errors(senseKey: Int(SenseKey.illegalRequest.rawValue)) - before.errors(senseKey: Int(SenseKey.illegalRequest.rawValue)) == 1)
        #expect(after.latencySumNanos > before.latencySumNanos)
        let buckets = (0..<LatencyHistogram.bucketCount).reduce(UInt64(0)) { $0 + after.latencyBucket($1) }
        #expect(buckets == after.commands)
        try f.removeLUN(id: 1)
    }
}

/// Set by the thread that removed a LUN once `SCSITarget.remove` returned.
private final class RemovalFlag: Sendable {
    private let value = Atomic<Bool>(false)
    func set() { value.store(true, ordering: .releasing) }
    var isSet: Bool { value.load(ordering: .acquiring) }
}

/// Removal and statistics with a held in-memory channel: in-flight completions first, then the close.
@Suite(.serialized) struct ChannelRetirementTests {
    @Test func channelOfARemovedLUNClosesAfterItsLastCompletion() throws {
        let stats = LUNIOStatistics(queues: 1)
        let f = try Fixture(luns: [0, 1], statistics: [1: stats])
        let g = f.guest!
        let data = g.address(page: TestGuest.dataPage)
        _ = try g.run([GuestRequest(context: 1, target: 1, cdb: read10(lba: 0, blocks: 1), flags: PVSCSI.flagDirectionToHost,
                                    dataAddress: data, dataLength: 512)])
        let ch = try #require(f.channels.made(1))
        ch.hold.store(true, ordering: .releasing)
        g.drainInterrupts()
        g.place(GuestRequest(context: 2, target: 1, cdb: write10(lba: 3, blocks: 2), flags: PVSCSI.flagDirectionToDevice,
                             dataAddress: data, dataLength: 1024))
        try g.kick()
        #expect(g.noCompletion(milliseconds: 100))
        #expect(stats.inFlight == 1)
        let removed = RemovalFlag()
        let table = f.table
        let remover = Thread { _ = try? table.remove(LogicalUnitNumber(1)!); removed.set() }
        remover.start()
        usleep(200_000)
        // The removal waits for the held write; the channel stays open meanwhile.
        #expect(!removed.isSet)
        let closedWhileHeld = ch.closed.load(ordering: .acquiring)
        #expect(!closedWhileHeld)
        f.onLoop { ch.release() }
        var completions: [GuestCompletion] = []
        for _ in 0..<50 where completions.isEmpty {
            _ = g.waitInterrupt(milliseconds: 100)
            completions += g.takeCompletions()
        }
        for _ in 0..<100 where !removed.isSet { usleep(20_000) }
        #expect(removed.isSet)
        #expect(completions.first?.context == 2 && completions.first?.hostStatus == 0 && completions.first?.scsiStatus == 0)
        let closedAfter = ch.closed.load(ordering: .acquiring)
        #expect(closedAfter)
        #expect(f.logLines.contains("back-end 1 of a removed LUN: channel closed"))
        #expect(stats.inFlight == 0)
        #expect(stats.snapshot().writeBytes == 1024)
        // LUN 0's channel is untouched.
        #expect(f.channels.made(0).map { !$0.closed.load(ordering: .acquiring) } ?? true)
        let device = f.controller.device
        #expect(f.controller.sync { device.openChannelCount } <= 1)
    }

    @Test func abortedCommandsAreCountedAsTaskAborted() throws {
        let stats = LUNIOStatistics(queues: 1)
        let f = try Fixture(statistics: [0: stats])
        let g = f.guest!
        _ = try g.run([GuestRequest(context: 1, cdb: read10(lba: 0, blocks: 1), flags: PVSCSI.flagDirectionToHost,
                                    dataAddress: g.address(page: TestGuest.dataPage), dataLength: 512)])
        let ch = try #require(f.channels.made(0))
        ch.hold.store(true, ordering: .releasing)
        g.drainInterrupts()
        g.place(GuestRequest(context: 42, cdb: read10(lba: 1, blocks: 1), flags: PVSCSI.flagDirectionToHost,
                             dataAddress: g.address(page: TestGuest.dataPage), dataLength: 512))
        try g.kick()
        #expect(g.noCompletion(milliseconds: 100))
        #expect(stats.inFlight == 1)
        #expect(try g.command(.abortCommand, TestGuest.words([42], pairs: true) + [0, 0]) == 0)
        f.onLoop { ch.release() }
        #expect(g.waitInterrupt())
        #expect(g.takeCompletions().first?.hostStatus == HostAdapterStatus.abortQueue.rawValue)
        let s = stats.snapshot()
        #expect(s.inFlight == 0)
        #expect(s.commands == 2)
        #expect(s.taskAborted == 1)
        #expect(s.commands(.read) == 2)
        #expect(s.readBytes == 512)
    }
}
