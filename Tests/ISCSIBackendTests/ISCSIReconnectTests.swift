import BlockIO
import Foundation
import Synchronization
@testable import ISCSIBackend
import TestSupport
import Testing

/// Connection loss, outage timeout and offline start-up against a real tgtd.
@Suite(.serialized, .enabled(if: TgtTarget.availability.ok, "tgtd cannot be started on this machine (see stderr)"))
struct ISCSIReconnectTests {
    func config(url: String, timeout: Int, log: TestLog) throws -> ISCSIBackendConfig {
        try ISCSIBackendConfig(url: url, initiatorName: testInitiator, timeoutSeconds: timeout,
                               reconnectBackoff: ISCSIReconnectBackoff(initialMilliseconds: 50, maximumMilliseconds: 500),
                               queueDepth: 64, log: log.logger)
    }

    @Test func survivesTargetKillAndRestartDuringIO() throws {
        let target = try TgtTarget(sizeMiB: 16)
        let log = TestLog()
        let backend = try ISCSIBackend.open(config: config(url: target.url, timeout: 30, log: log))
        let channel = try backend.makeChannel()
        let driver = ChannelDriver(channel)
        #expect(driver.waitOnline(seconds: 5))

        let size = 16 * 1024
        var buffers: [TestBuffers] = []
        func submitWrite(_ i: Int) {
            let b = TestBuffers(length: size, pieces: 2)
            b.bytes = TestBuffers.pattern(size, seed: UInt8(truncatingIfNeeded: i))
            buffers.append(b)
            #expect(channel.submit(BlockRequest(operation: .write, offset: UInt64(i * size), length: UInt64(size), buffers: b.list),
                                   token: UInt64(i)) == 0)
        }
        // Writes before the outage.
        for i in 0..<8 { submitWrite(i) }
        driver.pump(seconds: 10) { driver.results.count == 8 }
        #expect(driver.results.count == 8)

        // Freeze tgtd so that the next writes are sent but unanswered (truly in flight), then kill it.
        #expect(target.signal(SIGSTOP))
        for i in 8..<16 { submitWrite(i) }
        driver.pump(seconds: 0.3) { false }
        #expect(driver.results.count == 8, "target frozen: nothing may complete")
        #expect(channel.inFlight == 8)
        target.stop(hard: true)
        let outageStart = Date()
        for i in 16..<40 { submitWrite(i) }
        driver.pump(seconds: 2) { false } // outage of ~2 s while the channel keeps retrying
        #expect(!channel.isOnline)
        if case .offline = backend.status {} else { Issue.record("backend should report offline during the outage") }
        let completedDuringOutage = driver.results.filter { $0.key >= 16 }
        #expect(completedDuringOutage.isEmpty, "writes completed while the target was down: \(completedDuringOutage)")

        try target.start()
        driver.pump(seconds: 20) { driver.results.count == 40 }
        let recovery = Date().timeIntervalSince(outageStart)
        #expect(driver.results.count == 40)
        for i in 0..<40 {
            #expect(driver.results[UInt64(i)]?.0 == .success(UInt64(size)), "write \(i): \(String(describing: driver.results[UInt64(i)]))")
        }
        #expect(recovery < 30)
        #expect(channel.isOnline)
        #expect(backend.status == .online)
        // Every acknowledged write is in the backing file (a mismatch is described in one line: printing two
        // 16 KiB arrays took Swift Testing minutes).
        for i in 0..<40 {
            let got = target.readBacking(offset: i * size, count: size)
            let want = TestBuffers.pattern(size, seed: UInt8(truncatingIfNeeded: i))
            if got != want {
                let first = (0..<min(got.count, want.count)).first { got[$0] != want[$0] } ?? min(got.count, want.count)
                Issue.record("""
                    write \(i) (offset \(i * size), \(size) bytes, result \(String(describing: driver.results[UInt64(i)]))) not in the \
                    backing file: \(got.count) bytes read, first difference at byte \(first), \(got.filter { $0 == 0 }.count) zero bytes
                    """)
            }
        }
        #expect(log.all.contains { $0.contains("lost") || $0.contains("cannot connect") })
        #expect(log.all.contains { $0.contains("back after") })
        // Reads work after the recovery too.
        let r = TestBuffers(length: size, pieces: 3)
        #expect(driver.perform(BlockRequest(operation: .read, offset: UInt64(33 * size), length: UInt64(size), buffers: r.list),
                               token: 1000) == .success(UInt64(size)))
        #expect(r.bytes == TestBuffers.pattern(size, seed: 33))
    }

    @Test func outageLongerThanTimeoutFailsWithRetryableErrorAndNeverAcknowledges() throws {
        let target = try TgtTarget(sizeMiB: 4)
        let log = TestLog()
        let backend = try ISCSIBackend.open(config: config(url: target.url, timeout: 2, log: log))
        let channel = try backend.makeChannel()
        let driver = ChannelDriver(channel)
        #expect(driver.waitOnline(seconds: 5))
        target.stop(hard: true)
        let b = TestBuffers(length: 4096, pieces: 1)
        b.bytes = [UInt8](repeating: 0x42, count: 4096)
        let start = Date()
        let result = driver.perform(BlockRequest(operation: .write, offset: 0, length: 4096, buffers: b.list), token: 1, seconds: 10)
        let elapsed = Date().timeIntervalSince(start)
        #expect(result == .failure(ETIMEDOUT))
        #expect(elapsed >= 1.9 && elapsed < 8, "completed after \(elapsed) s")
        #expect(target.readBacking(offset: 0, count: 4096) == [UInt8](repeating: 0, count: 4096))

        // The target comes back: new requests succeed on the same channel.
        try target.start()
        #expect(driver.waitOnline(seconds: 10))
        #expect(driver.perform(BlockRequest(operation: .write, offset: 0, length: 4096, buffers: b.list), token: 2) == .success(4096))
        #expect(target.readBacking(offset: 0, count: 4096) == [UInt8](repeating: 0x42, count: 4096))
    }

    @Test func unresponsiveTargetIsDetectedAndReconnected() throws {
        let target = try TgtTarget(sizeMiB: 4)
        let log = TestLog()
        let backend = try ISCSIBackend.open(config: config(url: target.url, timeout: 3, log: log))
        let channel = try backend.makeChannel()
        let driver = ChannelDriver(channel)
        #expect(driver.waitOnline(seconds: 5))
        let b = TestBuffers(length: 4096, pieces: 1)
        b.bytes = [UInt8](repeating: 0x5C, count: 4096)

        // A freeze shorter than the timeout: the guest sees no error.
        #expect(target.signal(SIGSTOP))
        #expect(channel.submit(BlockRequest(operation: .write, offset: 0, length: 4096, buffers: b.list), token: 1) == 0)
        driver.pump(seconds: 1) { false }
        #expect(driver.results[1] == nil)
        #expect(target.signal(SIGCONT))
        driver.pump(seconds: 5) { driver.results[1] != nil }
        #expect(driver.results[1]?.0 == .success(4096))

        // A freeze longer than the timeout: the connection is declared dead, the request fails
        // with ETIMEDOUT (retryable), and the channel reconnects once the target answers again.
        #expect(target.signal(SIGSTOP))
        let start = Date()
        #expect(channel.submit(BlockRequest(operation: .write, offset: 4096, length: 4096, buffers: b.list), token: 2) == 0)
        driver.pump(seconds: 10) { driver.results[2] != nil }
        #expect(driver.results[2]?.0 == .failure(ETIMEDOUT))
        #expect(Date().timeIntervalSince(start) >= 2.9)
        #expect(log.all.contains { $0.contains("did not answer commands within 3 s") }, "\(log.all)")
        #expect(target.signal(SIGCONT))
        driver.pump(seconds: 10) { channel.isOnline }
        #expect(channel.isOnline)
        #expect(driver.perform(BlockRequest(operation: .read, offset: 0, length: 4096, buffers: b.list), token: 3) == .success(4096))
        #expect(b.bytes == [UInt8](repeating: 0x5C, count: 4096))
    }

    @Test func startsOfflineAndComesOnlineWhenTargetAppears() throws {
        let target = try TgtTarget(sizeMiB: 8)
        target.stop(hard: false)
        let log = TestLog()
        let cfg = try config(url: target.url, timeout: 30, log: log)
        let began = Date()
        // Without allowOffline the open fails fast with a clear error.
        #expect {
            try ISCSIBackend.open(config: cfg, waitMilliseconds: 3000)
        } throws: { error in
            (error as? BlockBackendError)?.message.contains("cannot connect to 127.0.0.1:\(target.port)") == true
        }
        let backend = try ISCSIBackend.open(config: cfg, waitMilliseconds: 3000, allowOffline: true)
        #expect(Date().timeIntervalSince(began) < 3)
        #expect(!backend.isGeometryKnown)
        #expect(backend.geometry.blockCount == 0)
        if case .offline(let reason) = backend.status {
            #expect(reason.contains("cannot connect"))
        } else {
            Issue.record("expected offline")
        }
        #expect(log.all.contains { $0.contains("OFFLINE at start-up") })

        let channel = try backend.makeChannel()
        let driver = ChannelDriver(channel)
        let b = TestBuffers(length: 4096, pieces: 1)
        b.bytes = TestBuffers.pattern(4096, seed: 5)
        #expect(channel.submit(BlockRequest(operation: .write, offset: 8192, length: 4096, buffers: b.list), token: 7) == 0)
        driver.pump(seconds: 1) { false }
        #expect(driver.results.isEmpty)
        let generation = backend.geometryGeneration

        try target.start()
        driver.pump(seconds: 10) { driver.results[7] != nil }
        #expect(driver.results[7]?.0 == .success(4096))
        #expect(backend.isGeometryKnown)
        #expect(backend.geometry.blockCount == 8 * 2048)
        #expect(backend.geometryGeneration > generation)
        #expect(backend.status == .online)
        #expect(target.readBacking(offset: 8192, count: 4096) == TestBuffers.pattern(4096, seed: 5))
    }

    @Test func remoteUnitAttentionIsRetriedTransparently() throws {
        let target = try TgtTarget(sizeMiB: 4)
        let log = TestLog()
        let backend = try ISCSIBackend.open(config: config(url: target.url, timeout: 30, log: log))
        let channel = try backend.makeChannel()
        let driver = ChannelDriver(channel)
        #expect(driver.waitOnline(seconds: 5))
        let before = channel.statistics.unitAttentionsRetried
        // Adding a LUN makes tgtd queue REPORTED LUNS DATA HAS CHANGED for our session.
        let second = target.dir + "/lun2.img"
        _ = FileManager.default.createFile(atPath: second, contents: Data(count: 1 << 20))
        try TgtTarget.run(["addlun", "\(target.controlPort)", "1", "2", second])
        let b = TestBuffers(length: 4096, pieces: 2)
        b.bytes = TestBuffers.pattern(4096, seed: 61)
        #expect(driver.perform(BlockRequest(operation: .write, offset: 4096, length: 4096, buffers: b.list), token: 1) == .success(4096))
        #expect(channel.statistics.unitAttentionsRetried == before + 1)
        #expect(target.readBacking(offset: 4096, count: 4096) == TestBuffers.pattern(4096, seed: 61))
    }

    @Test func capacityChangeIsReportedAsGeometryChange() throws {
        let target = try TgtTarget(sizeMiB: 4)
        let log = TestLog()
        let changes = Mutex<[UInt64]>([])
        let backend = try ISCSIBackend.open(config: config(url: target.url, timeout: 30, log: log)) { g in
            changes.withLock { $0.append(g.blockCount) }
        }
        let channel = try backend.makeChannel()
        let driver = ChannelDriver(channel)
        #expect(driver.waitOnline(seconds: 5))
        let generation = backend.geometryGeneration
        // tgtd reads the size when the LUN is created: grow the file and recreate the target.
        target.stop(hard: true)
        let fh = try FileHandle(forWritingTo: URL(fileURLWithPath: target.backingFile))
        try fh.truncate(atOffset: 6 << 20)
        try fh.close()
        try target.start()
        let b = TestBuffers(length: 4096, pieces: 1)
        b.bytes = TestBuffers.pattern(4096, seed: 62)
        // A write beyond the old end is accepted once the new geometry is known.
        driver.pump(seconds: 10) { channel.isOnline && channel.currentGeometry?.blockCount == 6 * 2048 }
        #expect(channel.currentGeometry?.blockCount == 6 * 2048)
        #expect(driver.perform(BlockRequest(operation: .write, offset: 5 << 20, length: 4096, buffers: b.list), token: 1) == .success(4096))
        #expect(backend.geometry.blockCount == 6 * 2048)
        #expect(backend.geometryGeneration > generation)
        #expect(changes.withLock { $0 }.last == 6 * 2048)
        #expect(log.all.contains { $0.contains("capacity changed from 4194304 to 6291456 bytes") }, "\(log.all)")
        #expect(target.readBacking(offset: 5 << 20, count: 4096) == TestBuffers.pattern(4096, seed: 62))
    }

    /// A verify workload (random 4 KiB writes and reads, queue depth 16) while tgtd is killed and
    /// restarted twice: no request fails, every read returns the last acknowledged write, and the
    /// backing file ends up equal to the model.
    @Test func verifyWorkloadSurvivesRepeatedTargetRestarts() throws {
        let target = try TgtTarget(sizeMiB: 4)
        let log = TestLog()
        let backend = try ISCSIBackend.open(config: config(url: target.url, timeout: 30, log: log))
        let channel = try backend.makeChannel()
        let driver = ChannelDriver(channel)
        #expect(driver.waitOnline(seconds: 5))

        let blockSize = 4096, blocks = 1024, depth = 16
        func pattern(_ block: Int, _ version: Int) -> [UInt8] {
            version == 0 ? [UInt8](repeating: 0, count: blockSize)
                : (0..<blockSize).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ block &* 13 &+ version &* 101) }
        }
        var model = [Int](repeating: 0, count: blocks)       // acknowledged version per block
        var busy = Set<Int>()
        struct Op { var block: Int; var version: Int; var isWrite: Bool }
        var ops: [UInt64: Op] = [:]
        let buffers = (0..<depth).map { _ in TestBuffers(length: blockSize, pieces: 2) }
        var freeBuffers = Array(0..<depth)
        var bufferOf: [UInt64: Int] = [:]
        var nextToken: UInt64 = 1
        var rng = SystemRandomNumberGenerator()
        var completed = 0, failures: [String] = [], mismatches = 0

        func issue() {
            while let slot = freeBuffers.popLast() {
                var block = Int.random(in: 0..<blocks, using: &rng)
                while busy.contains(block) { block = Int.random(in: 0..<blocks, using: &rng) }
                let isWrite = Bool.random(using: &rng)
                let version = isWrite ? model[block] + 1 : model[block]
                if isWrite { buffers[slot].bytes = pattern(block, version) }
                let token = nextToken
                nextToken += 1
                let rc = channel.submit(BlockRequest(operation: isWrite ? .write : .read, offset: UInt64(block * blockSize),
                                                     length: UInt64(blockSize), buffers: buffers[slot].list), token: token)
                guard rc == 0 else { failures.append("submit \(rc)"); freeBuffers.append(slot); return }
                busy.insert(block)
                ops[token] = Op(block: block, version: version, isWrite: isWrite)
                bufferOf[token] = slot
            }
            channel.commit()
        }
        func drain() {
            _ = channel.reapDetailed { token, result, sense in
                guard let op = ops.removeValue(forKey: token), let slot = bufferOf.removeValue(forKey: token) else { return }
                busy.remove(op.block)
                completed += 1
                if result != .success(UInt64(blockSize)) {
                    failures.append("\(op.isWrite ? "write" : "read") block \(op.block): \(result) \(sense)")
                } else if op.isWrite {
                    model[op.block] = op.version
                } else if buffers[slot].bytes != pattern(op.block, op.version) {
                    mismatches += 1
                }
                freeBuffers.append(slot)
            }
        }
        /// Keeps the workload going for `seconds`, or until `done` holds.
        func run(seconds: Double, until done: () -> Bool = { false }) {
            let end = Date().addingTimeInterval(seconds)
            while Date() < end && !done() {
                issue()
                channel.runOnce(timeoutMilliseconds: 10)
                drain()
            }
        }
        run(seconds: 1.5)
        for restart in 1...2 {
            target.stop(hard: true)
            run(seconds: 1.0)
            try target.start()
            // The channel logs in again before the next outage (its reconnect backoff may outlast a fixed
            // pause on a loaded machine; two outages then look like one).
            run(seconds: 20, until: { channel.statistics.logins >= 1 + restart })
            run(seconds: 1.5)
        }
        // Let everything in flight finish.
        let end = Date().addingTimeInterval(15)
        while !ops.isEmpty && Date() < end {
            channel.runOnce(timeoutMilliseconds: 10)
            drain()
        }
        #expect(ops.isEmpty)
        #expect(failures.isEmpty, "\(failures.prefix(5))")
        #expect(mismatches == 0)
        #expect(completed > 200, "only \(completed) requests completed")
        #expect(channel.statistics.connectionLosses == 2)
        #expect(channel.statistics.logins == 3)
        for block in 0..<blocks where model[block] > 0 {
            if target.readBacking(offset: block * blockSize, count: blockSize) != pattern(block, model[block]) {
                Issue.record("block \(block): backing file lacks acknowledged version \(model[block])")
            }
        }
    }
}
