import TestSupport
import VirtioTestSupport
import VhostUserTestSupport
import Backends
import BlockIO
import CSystem
import Gateway
import SCSI
import Synchronization
import Testing
import VhostUser
import VirtioDevices
import Virtio
#if canImport(Glibc)
import Glibc
#endif

/// Threads of this process (/proc/self/task).
private func threadCount() -> Int { directoryEntryCount("/proc/self/task") }

private func directoryEntryCount(_ path: String) -> Int {
    guard let dir = opendir(path) else { return -1 }
    defer { closedir(dir) }
    var n = 0
    while let entry = readdir(dir) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        if name != "." && name != ".." { n += 1 }
    }
    return n
}

/// The gateway's bookkeeping in miniature: back-ends and their counters by back-end id.
private final class TestRegistry: @unchecked Sendable {
    struct Entry {
        var backend: AnyBlockBackend
        var statistics: LUNIOStatistics
    }
    private let state = Mutex<(entries: [Int: Entry], next: Int)>(([:], 1))
    let queues: Int
    init(queues: Int) { self.queues = queues }

    func register(_ backend: AnyBlockBackend) -> (id: Int, statistics: LUNIOStatistics) {
        let statistics = LUNIOStatistics(queues: queues)
        let id = state.withLock { s in
            let id = s.next
            s.next += 1
            s.entries[id] = Entry(backend: backend, statistics: statistics)
            return id
        }
        return (id, statistics)
    }
    func remove(_ id: Int) -> Entry? { state.withLock { $0.entries.removeValue(forKey: id) } }
    func entry(_ id: Int) -> Entry? { state.withLock { $0.entries[id] } }

    func makeChannel(_ id: Int) throws(BlockBackendError) -> AnyBlockChannel {
        guard let entry = entry(id) else { throw BlockBackendError("back-end \(id) is gone") }
        return try entry.backend.makeChannel()
    }
    func counters(_ id: Int, _ queue: Int) -> IOCounters? {
        guard let statistics = entry(id)?.statistics, queue < statistics.queueCount else { return nil }
        return statistics.counters(queue: queue)
    }
}

/// Channels of removed LUNs are closed (fds, worker threads and the file lock come back), and commands
/// are counted in the LUN's statistics.
@Suite(.serialized) struct LUNLifecycleTests {
    private static func identity(_ n: Int) -> LogicalUnitIdentity {
        LogicalUnitIdentity(serial: "LC\(n)", naa: 0x5000_0000_0000_1000 | UInt64(n))
    }

    /// Opens the file LUN once this process holds no descriptor on it (the caller waited for that). The
    /// flock belongs to the open file description: a child another suite of this test process forks at that
    /// moment (tgtd, qemu-img, the scsigate executable) holds a copy until its exec closes it (O_CLOEXEC), so
    /// a lock conflict is retried for a short while; a descriptor of this process still open is not.
    private static func openWhenUnlocked(_ spec: BackendSpec) throws(BackendOpenError) -> AnyBlockBackend {
        let deadline = clockSeconds() + 3
        while true {
            do throws(BackendOpenError) {
                return try AnyBlockBackend.open(spec)
            } catch {
                guard case .lockConflict = error, OpenDescriptors.count(on: spec.path) == 0, clockSeconds() < deadline else { throw error }
                usleep(2000)
            }
        }
    }

    @Test func removedLUNsReleaseTheirChannelsAndTheFileLock() throws {
        let path = "/tmp/sg-vhost-lifecycle-\(getpid()).img"
        unlink(path)
        defer { unlink(path) }
        let spec = BackendSpec(kind: .file, path: path, size: 4 << 20, cache: .writeback, create: true)
        // Create the file once, so that every cycle below opens (and locks) the same existing file.
        try AnyBlockBackend.open(spec).close()
        let registry = TestRegistry(queues: 2)
        let target = SCSITarget(name: "lifecycle")
        // LUN 0 stays for the whole test; LUN 1 comes and goes.
        let keep = try AnyBlockBackend.open(BackendSpec(kind: .null, path: "", size: 4 << 20))
        let kept = registry.register(keep)
        defer { keep.close() }
        try target.add(LogicalUnit(number: LogicalUnitNumber(0)!, identity: Self.identity(0), geometry: keep.geometry,
                                   backendID: kept.id))
        let log = TestLog()
        let sock = testSocketPath("lifecycle")
        let controller = VhostUserSCSIController<AnyBlockChannel>(socketPath: sock, device: try VirtioSCSIDevice(target: target, options: VirtioSCSIOptions(requestQueues: 2, threads: 2),
            channelFactory: { id throws(BlockBackendError) in try registry.makeChannel(id) },
            counters: { id, queue in registry.counters(id, queue) }, log: log.logger), log: log.logger)
        try controller.start()
        defer { controller.stop() }
        let guest = try #require(TestSCSIGuest(socket: sock, requestQueues: 2))
        // Both threads have opened LUN 0's channel before the baseline is taken.
        for queue in 0..<2 {
            _ = guest.command([0x00, 0, 0, 0, 0, 0], lun: 0, queue: queue)
            #expect(guest.command([0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0], lun: 0, queue: queue, inLength: 4096)?.status == 0)
        }
        let startThreads = threadCount()
        #expect(OpenDescriptors.count(on: path) == 0)

        let cycles = 50
        var inFlightAtRemove = 0
        for cycle in 0..<cycles {
            // Opening the same file again fails with EWOULDBLOCK while an earlier channel holds it.
            let backend = try Self.openWhenUnlocked(spec)
            let (id, statistics) = registry.register(backend)
            try target.add(LogicalUnit(number: LogicalUnitNumber(1)!, identity: Self.identity(1), geometry: backend.geometry,
                                       backendID: id))
            _ = guest.command([0x00, 0, 0, 0, 0, 0], lun: 1, queue: 0)  // POWER ON RESET unit attention
            let pattern = (0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 5 &+ cycle) }
            let lba = UInt8(cycle % 30)  // blocks lba*8 ... lba*8+15
            let w = guest.command([0x2A, 0x08, 0, 0, 0, lba &* 8, 0, 0, 8, 0], lun: 1, queue: 0, out: pattern)
            #expect(w?.status == 0 && w?.response == VirtioSCSI.Response.ok.rawValue)
            let r = guest.command([0x28, 0, 0, 0, 0, lba &* 8, 0, 0, 8, 0], lun: 1, queue: 1, inLength: 4096)
            #expect(r?.status == 0 && r?.data == pattern)
            // Every other cycle a write has just started (counted as begun) when the LUN goes.
            var pending: TestSCSIGuest.Pending?
            if cycle % 2 == 1 {
                let begun = statistics.snapshot().started
                pending = guest.send([0x2A, 0x08, 0, 0, 0, lba &* 8 &+ 8, 0, 0, 8, 0], lun: 1, queue: cycle % 4 == 1 ? 0 : 1,
                                     out: pattern)
                #expect(waitFor { statistics.snapshot().started > begun })
                if statistics.inFlight > 0 { inFlightAtRemove += 1 }
            }
            try target.remove(LogicalUnitNumber(1)!)
            if let pending {
                // Not lost: it completes against the unit it holds, and its data is on the file.
                let answer = try #require(guest.wait(pending))
                #expect(answer.response == VirtioSCSI.Response.ok.rawValue && answer.status == 0)
                let check = try #require(guest.command([0x00, 0, 0, 0, 0, 0], lun: 1, queue: 0))
                #expect(check.status == 2 && check.senseKey == 5)  // the LUN itself is gone
            }
            registry.remove(id)?.backend.close()
            // Both threads close their channel: the file is released without the controller stopping.
            #expect(waitFor(seconds: 10) { OpenDescriptors.count(on: path) == 0 }, "cycle \(cycle): file still open")
            let s = statistics.snapshot()
            #expect(s.inFlight == 0 && s.commands == s.started)
        }
        // LUN 0 (whose channels stay) still works, after its REPORTED LUNS DATA HAS CHANGED attention.
        let attention = guest.command([0x00, 0, 0, 0, 0, 0], lun: 0, queue: 1)
        #expect(attention?.status == 2 && attention?.senseKey == 6)
        #expect(guest.command([0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0], lun: 0, queue: 1, inLength: 4096)?.status == 0)
        // Descriptors: only the ones this test owns are counted (those on its LUN's file: none after each
        // removal, checked above, and none now), not the process's total, which the other suites of this
        // process change concurrently. Threads: run alone, the count comes back exactly; with other suites
        // running allow that noise, far below one leaked channel per cycle (1 worker thread: +50).
        #expect(OpenDescriptors.count(on: path) == 0)
        let exact = waitFor(seconds: 10) { threadCount() == startThreads }
        let endThreads = threadCount()
        print("LUN add/remove x\(cycles): descriptors on the LUN's file 0, threads \(startThreads) -> \(endThreads)"
              + "\(exact ? "" : " (other tests running)"), writes still in flight at remove: \(inFlightAtRemove)/\(cycles / 2)")
        #expect(endThreads - startThreads < cycles / 5)
        // The same file can be added again: the lock was released.
        let again = try Self.openWhenUnlocked(spec)
        again.close()
        #expect(!log.contains("no channel"))
    }

    @Test func channelOfARemovedLUNClosesAfterItsLastCompletion() throws {
        let held = MemoryChannel(bytes: 1 << 20)
        held.hold.store(true, ordering: .releasing)
        let fresh = MemoryChannel(bytes: 1 << 20)
        let target = SCSITarget(name: "inflight")
        let geometry = BlockGeometry(logicalBlockSize: 512, physicalBlockSize: 512, blockCount: 2048)
        try target.add(LogicalUnit(number: LogicalUnitNumber(1)!, identity: Self.identity(1), geometry: geometry, backendID: 10))
        let statistics = LUNIOStatistics(queues: 1)
        let log = TestLog()
        let sock = testSocketPath("inflight")
        let controller = VhostUserSCSIController<MemoryChannel>(socketPath: sock, device: try VirtioSCSIDevice(target: target, options: VirtioSCSIOptions(requestQueues: 1),
            channelFactory: { id in
                switch id {
                case 10: return held
                case 11: return fresh
                default: throw BlockBackendError("no back-end \(id)")
                }
            },
            counters: { id, queue in id == 10 ? statistics.counters(queue: queue) : nil }, log: log.logger), log: log.logger)
        try controller.start()
        defer { controller.stop() }
        let guest = try #require(TestSCSIGuest(socket: sock, requestQueues: 1))
        _ = guest.command([0x00, 0, 0, 0, 0, 0], lun: 1, queue: 0)
        let pattern = [UInt8](repeating: 0x3C, count: 4096)
        let pending = guest.send([0x2A, 0, 0, 0, 0, 8, 0, 0, 8, 0], lun: 1, queue: 0, out: pattern)
        #expect(waitFor { held.operations.withLock { $0.contains(.write) } })
        #expect(statistics.inFlight == 1)
        try target.remove(LogicalUnitNumber(1)!)
        // A new command to the removed LUN fails at once; the held write keeps the channel open.
        let refused = guest.command([0x00, 0, 0, 0, 0, 0], lun: 1, queue: 0)
        #expect(refused?.status == 2 && refused?.senseKey == 5)
        usleep(50_000)
        #expect(held.closeCount.load(ordering: .relaxed) == 0)
        #expect(guest.rings[2].usedIndex == pending.usedBefore &+ 1)  // only the refused command answered
        held.releaseHeld()
        let answer = try #require(guest.wait(pending))
        #expect(answer.status == 0 && answer.response == VirtioSCSI.Response.ok.rawValue)
        #expect(held.bytes(8 * 512, 4096) == pattern)
        #expect(waitFor { held.closeCount.load(ordering: .relaxed) == 1 })
        #expect(statistics.inFlight == 0 && statistics.snapshot().commands(.write) == 1)
        // Added again under a new back-end id: a fresh channel serves it.
        try target.add(LogicalUnit(number: LogicalUnitNumber(1)!, identity: Self.identity(1), geometry: geometry, backendID: 11))
        _ = guest.command([0x00, 0, 0, 0, 0, 0], lun: 1, queue: 0)
        #expect(guest.command([0x2A, 0, 0, 0, 0, 8, 0, 0, 8, 0], lun: 1, queue: 0, out: pattern)?.status == 0)
        #expect(fresh.bytes(8 * 512, 4096) == pattern)
        #expect(held.closeCount.load(ordering: .relaxed) == 1 && fresh.closeCount.load(ordering: .relaxed) == 0)
        controller.stop()
        #expect(fresh.closeCount.load(ordering: .relaxed) == 1)
    }

    @Test func virtioSCSICountsCommandsAndBytesPerLUNAndQueue() throws {
        let path = "/tmp/sg-vhost-stats-\(getpid()).img"
        unlink(path)
        defer { unlink(path) }
        let backend = try AnyBlockBackend.open(BackendSpec(kind: .file, path: path, size: 4 << 20, cache: .writeback, create: true))
        defer { backend.close() }
        let registry = TestRegistry(queues: 2)
        let (id, statistics) = registry.register(backend)
        let target = SCSITarget(name: "stats")
        try target.add(LogicalUnit(number: LogicalUnitNumber(0)!, identity: Self.identity(0), geometry: backend.geometry,
                                   backendID: id))
        let log = TestLog()
        let sock = testSocketPath("scsistats")
        let controller = VhostUserSCSIController<AnyBlockChannel>(socketPath: sock, device: try VirtioSCSIDevice(target: target, options: VirtioSCSIOptions(requestQueues: 2, threads: 2),
            channelFactory: { id throws(BlockBackendError) in try registry.makeChannel(id) },
            counters: { id, queue in registry.counters(id, queue) }, log: log.logger), log: log.logger)
        try controller.start()
        defer { controller.stop() }
        let guest = try #require(TestSCSIGuest(socket: sock, requestQueues: 2))
        let tur = guest.command([0x00, 0, 0, 0, 0, 0], lun: 0, queue: 0)  // unit attention
        #expect(tur?.status == 2 && tur?.senseKey == 6)
        let pattern = [UInt8](repeating: 0xA5, count: 8192)
        #expect(guest.command([0x2A, 0, 0, 0, 0, 16, 0, 0, 16, 0], lun: 0, queue: 0, out: pattern)?.status == 0)
        #expect(guest.command([0x28, 0, 0, 0, 0, 16, 0, 0, 8, 0], lun: 0, queue: 1, inLength: 4096)?.status == 0)
        #expect(guest.command([0x28, 0, 0, 0, 0, 24, 0, 0, 8, 0], lun: 0, queue: 1, inLength: 4096)?.status == 0)
        #expect(guest.command([0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], lun: 0, queue: 0)?.status == 0)
        // READ beyond the capacity: CHECK CONDITION, ILLEGAL REQUEST.
        let bad = guest.command([0x28, 0, 0xFF, 0xFF, 0, 0, 0, 0, 8, 0], lun: 0, queue: 1, inLength: 4096)
        #expect(bad?.status == 2 && bad?.senseKey == 5)
        let q0 = statistics.snapshot(queue: 0)
        let q1 = statistics.snapshot(queue: 1)
        #expect(q0.commands == 3 && q0.started == 3)
        #expect(q0.commands(.write) == 1 && q0.writeBytes == 8192)
        #expect(q0.commands(.flush) == 1 && q0.commands(.other) == 1)
        #expect(q0.errors(senseKey: 6) == 1)
        #expect(q1.commands == 3 && q1.commands(.read) == 3)
        #expect(q1.readBytes == 8192)
        #expect(q1.errors(senseKey: 5) == 1)
        let total = statistics.snapshot()
        #expect(total.commands == 6 && total.inFlight == 0)
        let buckets = (0..<LatencyHistogram.bucketCount).reduce(UInt64(0)) { $0 + total.latencyBucket($1) }
        #expect(buckets == 6 && total.latencySumNanos > 0)
        // Commands to an absent LUN are counted nowhere.
        #expect(guest.command([0x00, 0, 0, 0, 0, 0], lun: 5, queue: 0)?.status == 2)
        #expect(statistics.snapshot().commands == 6)
    }

    @Test func virtioBlkCountsCommandsAndBytes() throws {
        let path = "/tmp/sg-vhost-blkstats-\(getpid()).img"
        unlink(path)
        defer { unlink(path) }
        let backend = try AnyBlockBackend.open(BackendSpec(kind: .file, path: path, size: 4 << 20, cache: .writeback, create: true))
        defer { backend.close() }
        let statistics = LUNIOStatistics(queues: 1)
        let log = TestLog()
        let sock = testSocketPath("blkstats")
        let controller = VhostUserBlkController<AnyBlockChannel>(socketPath: sock, device: try VirtioBlkDevice(geometry: backend.geometry, options: VirtioBlkOptions(queues: 1, serial: "STATS"),
            channelFactory: { () throws(BlockBackendError) -> AnyBlockChannel in try backend.makeChannel() },
            counters: { queue in statistics.counters(queue: queue) }, log: log.logger), log: log.logger)
        try controller.start()
        let ram = TestGuestRAM()
        let ring = TestSplitRing(ram: ram, size: 16)
        let client = try #require(TestFrontEnd(path: sock))
        let fds = client.setUp(ram: ram, rings: [ring], features: VirtioFeature.version1 | vhostUserFeatureProtocolFeatures,
                               protocolFeatures: VhostUserProtocolFeature.replyAck)
        defer { close(fds[0].kick); close(fds[0].call) }
        func request(_ type: UInt32, sector: UInt64, out: [UInt8] = [], inLength: Int = 0) -> UInt8? {
            let hdr = ram.alloc(16)
            var h = [UInt8]()
            h.appendLE(type); h.appendLE(UInt32(0)); h.appendLE(sector)
            ram.write(h, at: hdr)
            var buffers = [TestSplitRing.Buffer(gpa: hdr, length: 16, writable: false)]
            if !out.isEmpty {
                let d = ram.alloc(out.count, align: 4096)
                ram.write(out, at: d)
                buffers.append(.init(gpa: d, length: UInt32(out.count), writable: false))
            }
            if inLength > 0 {
                buffers.append(.init(gpa: ram.alloc(inLength, align: 4096), length: UInt32(inLength), writable: true))
            }
            let st = ram.alloc(1)
            buffers.append(.init(gpa: st, length: 1, writable: true))
            let before = ring.usedIndex
            ring.publish(ring.addChain(buffers))
            _ = csys_eventfd_signal(fds[0].kick, 1)
            guard waitFor({ ring.usedIndex != before }) else { return nil }
            return ram.read(st, 1)[0]
        }
        #expect(request(VirtioBlk.typeOut, sector: 8, out: [UInt8](repeating: 7, count: 4096)) == VirtioBlk.statusOK)
        #expect(request(VirtioBlk.typeIn, sector: 8, inLength: 8192) == VirtioBlk.statusOK)
        #expect(request(VirtioBlk.typeFlush, sector: 0) == VirtioBlk.statusOK)
        #expect(request(99, sector: 0) == VirtioBlk.statusUnsupported)
        #expect(request(VirtioBlk.typeIn, sector: 1 << 40, inLength: 512) == VirtioBlk.statusIOError)
        let s = statistics.snapshot()
        #expect(s.commands == 5 && s.started == 5 && s.inFlight == 0)
        #expect(s.commands(.write) == 1 && s.writeBytes == 4096)
        #expect(s.commands(.read) == 2 && s.readBytes == 8192)
        #expect(s.commands(.flush) == 1 && s.commands(.other) == 1)
        #expect(s.errors(senseKey: 5) == 1 && s.errors(senseKey: 3) == 1)
        // Stopping the controller closes its channels: the file is no longer held open by them.
        controller.stop()
        backend.close()  // (its deferred close is then a no-op)
        #expect(OpenDescriptors.count(on: path) == 0)
    }
}
