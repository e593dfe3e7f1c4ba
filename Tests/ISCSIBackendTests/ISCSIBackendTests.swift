import BlockIO
import EventLoop
import Synchronization
import Foundation
@testable import ISCSIBackend
import TestSupport
import Testing

let testInitiator = "iqn.2026-11.test.scsigate:initiator"

/// Tests against a real tgtd on 127.0.0.1 (started per test by Tests/RealClients/tgt/tgtd.sh).
@Suite(.serialized, .enabled(if: TgtTarget.availability.ok, "tgtd cannot be started on this machine (see stderr)"))
struct ISCSIBackendTargetTests {
    func config(_ target: TgtTarget, timeout: Int = 30, log: TestLog? = nil) throws -> ISCSIBackendConfig {
        try ISCSIBackendConfig(url: target.url, initiatorName: testInitiator, timeoutSeconds: timeout,
                               reconnectBackoff: ISCSIReconnectBackoff(initialMilliseconds: 50, maximumMilliseconds: 400),
                               queueDepth: 32, log: log?.logger)
    }

    @Test func readsGeometryFromTarget() throws {
        let target = try TgtTarget(sizeMiB: 16)
        let backend = try ISCSIBackend.open(config: config(target), waitMilliseconds: 5000)
        let g = backend.geometry
        #expect(backend.isGeometryKnown)
        #expect(backend.status != .online) // the probe session is closed again; no channel is logged in
        #expect(g.logicalBlockSize == 512)
        #expect(g.blockCount == 16 * 2048)
        #expect(g.physicalBlockSize == 4096) // tgt reports LBPPBE 3
        #expect(g.supportsDiscard) // thin_provisioning=1: LBPME + LBPU
        #expect(g.supportsWriteZeroes)
        #expect(!g.readOnly)
        #expect(g.volatileWriteCache) // tgt's caching mode page has WCE set
        #expect(backend.geometryGeneration >= 1)
    }

    @Test func writesLandInBackingFileAndReadsComeBack() throws {
        let target = try TgtTarget(sizeMiB: 16)
        let backend = try ISCSIBackend.open(config: config(target))
        let channel = try backend.makeChannel()
        let driver = ChannelDriver(channel)
        #expect(driver.waitOnline(seconds: 5))
        #expect(backend.status == .online)

        // Several writes in one batch, scattered over three iovecs each.
        let offsets = [0, 128 * 1024, 1 << 20, 15 << 20]
        var buffers: [TestBuffers] = []
        for (i, off) in offsets.enumerated() {
            let b = TestBuffers(length: 64 * 1024, pieces: 3)
            b.bytes = TestBuffers.pattern(64 * 1024, seed: UInt8(i + 1))
            buffers.append(b)
            #expect(channel.submit(BlockRequest(operation: .write, offset: UInt64(off), length: 64 * 1024, buffers: b.list),
                                   token: UInt64(i)) == 0)
        }
        #expect(channel.inFlight == 4)
        driver.pump(seconds: 10) { driver.results.count == offsets.count }
        for i in offsets.indices {
            #expect(driver.results[UInt64(i)]?.0 == .success(64 * 1024))
        }
        for (i, off) in offsets.enumerated() {
            #expect(target.readBacking(offset: off, count: 64 * 1024) == TestBuffers.pattern(64 * 1024, seed: UInt8(i + 1)),
                    "backing file differs at \(off)")
        }
        // Read back through iSCSI what the host wrote directly into the file.
        let hostBytes = TestBuffers.pattern(32 * 1024, seed: 77)
        target.writeBacking(offset: 8 << 20, bytes: hostBytes)
        let readBuffer = TestBuffers(length: 32 * 1024, pieces: 4, fill: 0xAA)
        let r = driver.perform(BlockRequest(operation: .read, offset: 8 << 20, length: 32 * 1024, buffers: readBuffer.list), token: 100)
        #expect(r == .success(32 * 1024))
        #expect(readBuffer.bytes == hostBytes)
        // And what we wrote at 1 MiB reads back identically.
        let again = TestBuffers(length: 64 * 1024, pieces: 2)
        #expect(driver.perform(BlockRequest(operation: .read, offset: 1 << 20, length: 64 * 1024, buffers: again.list), token: 101)
                == .success(64 * 1024))
        #expect(again.bytes == TestBuffers.pattern(64 * 1024, seed: 3))
        channel.close()
    }

    @Test func fuaWriteAndFlushSucceed() throws {
        let target = try TgtTarget(sizeMiB: 8)
        let backend = try ISCSIBackend.open(config: config(target))
        let channel = try backend.makeChannel()
        let driver = ChannelDriver(channel)
        #expect(driver.waitOnline(seconds: 5))
        let b = TestBuffers(length: 8192, pieces: 2)
        b.bytes = TestBuffers.pattern(8192, seed: 9)
        #expect(driver.perform(BlockRequest(operation: .write, offset: 512 * 100, length: 8192, buffers: b.list,
                                            forceUnitAccess: true), token: 1) == .success(8192))
        #expect(target.readBacking(offset: 512 * 100, count: 8192) == TestBuffers.pattern(8192, seed: 9))
        #expect(driver.perform(BlockRequest(operation: .flush, offset: 0, length: 0), token: 2) == .success(0))
    }

    @Test func unmapAndWriteSamePassThrough() throws {
        let target = try TgtTarget(sizeMiB: 8)
        let backend = try ISCSIBackend.open(config: config(target))
        let channel = try backend.makeChannel()
        let driver = ChannelDriver(channel)
        #expect(driver.waitOnline(seconds: 5))
        let region = 256 * 1024
        let nonZero = [UInt8](repeating: 0x5A, count: region * 3)
        target.writeBacking(offset: 1 << 20, bytes: nonZero)

        // UNMAP the first region (thin provisioning punches a hole: zeroes in the file).
        #expect(driver.perform(BlockRequest(operation: .discard, offset: 1 << 20, length: UInt64(region)), token: 1)
                == .success(UInt64(region)))
        #expect(target.readBacking(offset: 1 << 20, count: region) == [UInt8](repeating: 0, count: region))
        // WRITE SAME(16) of zeroes, without and with UNMAP.
        #expect(driver.perform(BlockRequest(operation: .writeZeroes, offset: UInt64((1 << 20) + region), length: UInt64(region)),
                               token: 2) == .success(UInt64(region)))
        #expect(target.readBacking(offset: (1 << 20) + region, count: region) == [UInt8](repeating: 0, count: region))
        #expect(driver.perform(BlockRequest(operation: .writeZeroes, offset: UInt64((1 << 20) + 2 * region),
                                            length: UInt64(region), mayUnmap: true), token: 3) == .success(UInt64(region)))
        #expect(target.readBacking(offset: (1 << 20) + 2 * region, count: region) == [UInt8](repeating: 0, count: region))
        // Neighbours untouched.
        #expect(target.readBacking(offset: (1 << 20) + 3 * region, count: 512) == [UInt8](repeating: 0, count: 512))
        #expect(target.readBacking(offset: (1 << 20) - 512, count: 512) == [UInt8](repeating: 0, count: 512))
        // And via iSCSI the discarded range reads zeroes.
        let r = TestBuffers(length: 4096, pieces: 1, fill: 0xFF)
        #expect(driver.perform(BlockRequest(operation: .read, offset: 1 << 20, length: 4096, buffers: r.list), token: 4) == .success(4096))
        #expect(r.bytes == [UInt8](repeating: 0, count: 4096))
    }

    @Test func largeDiscardAndWriteZeroesAreSplitIntoSeveralCommands() throws {
        let target = try TgtTarget(sizeMiB: 8)
        let backend = try ISCSIBackend.open(config: config(target))
        let channel = try backend.makeChannel()
        let driver = ChannelDriver(channel)
        #expect(driver.waitOnline(seconds: 5))
        // Pretend the target's VPD B0h limits are small so that one request needs many commands.
        channel.maxUnmapBlocks = 256        // 128 KiB per UNMAP
        channel.maxWriteSameBlocks = 100    // uneven: 50 KiB per WRITE SAME
        let start = 2 << 20
        target.writeBacking(offset: start - 4096, bytes: [UInt8](repeating: 0x77, count: (2 << 20) + 8192))
        #expect(driver.perform(BlockRequest(operation: .discard, offset: UInt64(start), length: 1 << 20), token: 1)
                == .success(1 << 20))
        #expect(driver.perform(BlockRequest(operation: .writeZeroes, offset: UInt64(start + (1 << 20)), length: 1 << 20),
                               token: 2) == .success(1 << 20))
        #expect(target.readBacking(offset: start, count: 2 << 20) == [UInt8](repeating: 0, count: 2 << 20))
        #expect(target.readBacking(offset: start - 4096, count: 4096) == [UInt8](repeating: 0x77, count: 4096))
        #expect(target.readBacking(offset: start + (2 << 20), count: 4096) == [UInt8](repeating: 0x77, count: 4096))
    }

    @Test func hostNameIsResolvedOnTheControlPath() throws {
        let target = try TgtTarget(sizeMiB: 4)
        let config = try ISCSIBackendConfig(url: "iscsi://localhost:\(target.port)/\(target.iqn)/1", initiatorName: testInitiator)
        let backend = try ISCSIBackend.open(config: config)
        #expect(backend.portal == "127.0.0.1:\(target.port)" || backend.portal == "[::1]:\(target.port)")
        #expect(backend.geometry.blockCount == 4 * 2048)
    }

    @Test func crc32cHeaderDigestIsNegotiated() throws {
        let target = try TgtTarget(sizeMiB: 4)
        let config = try ISCSIBackendConfig(url: target.url, initiatorName: testInitiator, headerDigest: "crc32c")
        let backend = try ISCSIBackend.open(config: config)
        let channel = try backend.makeChannel()
        let driver = ChannelDriver(channel)
        #expect(driver.waitOnline(seconds: 5))
        let b = TestBuffers(length: 65536, pieces: 4)
        b.bytes = TestBuffers.pattern(65536, seed: 44)
        #expect(driver.perform(BlockRequest(operation: .write, offset: 0, length: 65536, buffers: b.list), token: 1) == .success(65536))
        let r = TestBuffers(length: 65536, pieces: 3)
        #expect(driver.perform(BlockRequest(operation: .read, offset: 0, length: 65536, buffers: r.list), token: 2) == .success(65536))
        #expect(r.bytes == TestBuffers.pattern(65536, seed: 44))
        #expect(target.readBacking(offset: 0, count: 65536) == TestBuffers.pattern(65536, seed: 44))
    }

    @Test func remoteCheckConditionMapsToErrnoAndKeepsSense() throws {
        let target = try TgtTarget(sizeMiB: 4)
        let backend = try ISCSIBackend.open(config: config(target))
        let channel = try backend.makeChannel()
        let driver = ChannelDriver(channel)
        #expect(driver.waitOnline(seconds: 5))
        try TgtTarget.run(["luparam", "\(target.controlPort)", "1", "1", "readonly=1"])
        let b = TestBuffers(length: 4096, pieces: 1)
        b.bytes = [UInt8](repeating: 0x99, count: 4096)
        #expect(channel.submit(BlockRequest(operation: .write, offset: 0, length: 4096, buffers: b.list), token: 1) == 0)
        driver.pump(seconds: 5) { driver.results[1] != nil }
        let (result, sense) = try #require(driver.results[1])
        #expect(result.errno == EROFS && result.bytesTransferred == 0)
        // The same verdict rides in the result for the SCSI core (reported to the guest unchanged).
        #expect(result.remote == RemoteSCSIStatus(status: 0x02, senseKey: 0x07, additionalSenseCode: 0x27, additionalSenseCodeQualifier: 0))
        #expect(sense.status == ISCSIRemoteSense.statusCheckCondition)
        #expect(sense.key == ISCSIRemoteSense.keyDataProtect)
        #expect(sense.asc == 0x27)
        #expect(target.readBacking(offset: 0, count: 4096) == [UInt8](repeating: 0, count: 4096))
        // Reads still work on the read-only LUN.
        #expect(driver.perform(BlockRequest(operation: .read, offset: 0, length: 4096, buffers: b.list), token: 2) == .success(4096))
        #expect(b.bytes == [UInt8](repeating: 0, count: 4096))
        // A new session reads the write-protect bit (MODE SENSE) and refuses writes locally.
        let again = try ISCSIBackend.open(config: config(target))
        #expect(again.geometry.readOnly)
        let second = try again.makeChannel()
        let driver2 = ChannelDriver(second)
        #expect(driver2.waitOnline(seconds: 5))
        #expect(second.submit(BlockRequest(operation: .write, offset: 0, length: 4096, buffers: b.list), token: 3) == EROFS)
    }

    @Test func largeScatteredTransfersRoundTrip() throws {
        let target = try TgtTarget(sizeMiB: 16)
        let backend = try ISCSIBackend.open(config: config(target))
        let channel = try backend.makeChannel()
        let driver = ChannelDriver(channel)
        #expect(driver.waitOnline(seconds: 5))
        let size = 4 << 20
        let w = TestBuffers(length: size, pieces: 37)
        w.bytes = TestBuffers.pattern(size, seed: 7)
        #expect(driver.perform(BlockRequest(operation: .write, offset: 3 << 20, length: UInt64(size), buffers: w.list,
                                            forceUnitAccess: true), token: 1) == .success(UInt64(size)))
        #expect(target.readBacking(offset: 3 << 20, count: size) == TestBuffers.pattern(size, seed: 7))
        let r = TestBuffers(length: size, pieces: 53)
        #expect(driver.perform(BlockRequest(operation: .read, offset: 3 << 20, length: UInt64(size), buffers: r.list), token: 2)
                == .success(UInt64(size)))
        #expect(r.bytes == TestBuffers.pattern(size, seed: 7))
    }

    @Test func rejectsMisalignedAndOutOfRangeRequestsLocally() throws {
        let target = try TgtTarget(sizeMiB: 4)
        let backend = try ISCSIBackend.open(config: config(target))
        let channel = try backend.makeChannel()
        let driver = ChannelDriver(channel)
        #expect(driver.waitOnline(seconds: 5))
        let b = TestBuffers(length: 4096, pieces: 1)
        #expect(channel.submit(BlockRequest(operation: .read, offset: 100, length: 4096, buffers: b.list), token: 1) == EINVAL)
        #expect(channel.submit(BlockRequest(operation: .read, offset: 4 << 20, length: 4096, buffers: b.list), token: 2) == EINVAL)
        #expect(channel.submit(BlockRequest(operation: .read, offset: 0, length: 8192, buffers: b.list), token: 3) == EINVAL)
        #expect(channel.submit(BlockRequest(operation: .read, offset: UInt64.max - 511, length: 4096, buffers: b.list), token: 4) == EINVAL)
        #expect(channel.inFlight == 0)
    }

    @Test func chapAcceptsRightSecretAndRefusesWrongOne() throws {
        let target = try TgtTarget(sizeMiB: 4, chap: (user: "scsigate", secret: "right-secret-0123"))
        let secretFile = target.dir + "/chap-secret"
        try "right-secret-0123\n".write(toFile: secretFile, atomically: true, encoding: .utf8)
        let good = try ISCSIBackendConfig(url: target.url, initiatorName: testInitiator, chapUser: "scsigate",
                                          chapSecretSource: .file(secretFile))
        let backend = try ISCSIBackend.open(config: good, waitMilliseconds: 5000)
        #expect(backend.geometry.blockCount == 4 * 2048)

        setenv("SCSIGATE_TEST_WRONG_CHAP", "wrong-secret-0123", 1)
        let log = TestLog()
        let bad = try ISCSIBackendConfig(url: target.url, initiatorName: testInitiator, chapUser: "scsigate",
                                         chapSecretSource: .environment("SCSIGATE_TEST_WRONG_CHAP"), log: log.logger)
        var message = ""
        do {
            _ = try ISCSIBackend.open(config: bad, waitMilliseconds: 5000)
        } catch {
            message = error.message
        }
        #expect(message.contains("CHAP authentication failed"), "got: \(message)")
        #expect(!message.contains("wrong-secret"))
        // In offline mode the refusal is logged once, clearly, and the secret never appears.
        let offline = try ISCSIBackend.open(config: bad, waitMilliseconds: 5000, allowOffline: true)
        #expect(offline.status != .online)
        let lines = log.all
        #expect(lines.contains { $0.contains("OFFLINE") && $0.contains("CHAP authentication failed") }, "\(lines)")
        #expect(!lines.contains { $0.contains("wrong-secret") })

        // Without CHAP credentials the target refuses too.
        let none = try ISCSIBackendConfig(url: target.url, initiatorName: testInitiator)
        #expect(throws: BlockBackendError.self) { try ISCSIBackend.open(config: none, waitMilliseconds: 5000) }
    }
}

/// The channel driven by the project's epoll `EventLoop` on its own thread, exactly as the gateway
/// drives a libaio channel: `completionFD` registered once for readable, `reap` in the handler.
@Suite(.serialized, .enabled(if: TgtTarget.availability.ok, "tgtd cannot be started on this machine (see stderr)"))
struct ISCSIEventLoopTests {
    final class Box: @unchecked Sendable {
        let channel: ISCSIChannel
        let buffers: [TestBuffers]
        init(channel: ISCSIChannel, buffers: [TestBuffers]) {
            self.channel = channel
            self.buffers = buffers
        }
    }

    @Test func eventLoopDrivesChannelThroughCompletionFD() throws {
        let target = try TgtTarget(sizeMiB: 8)
        let config = try ISCSIBackendConfig(url: target.url, initiatorName: testInitiator,
                                            reconnectBackoff: ISCSIReconnectBackoff(initialMilliseconds: 50, maximumMilliseconds: 300))
        let backend = try ISCSIBackend.open(config: config)
        let channel = try backend.makeChannel()
        let fd = channel.completionFD
        let buffers = (0..<16).map { i -> TestBuffers in
            let b = TestBuffers(length: 8192, pieces: 2)
            b.bytes = TestBuffers.pattern(8192, seed: UInt8(100 + i))
            return b
        }
        let box = Box(channel: channel, buffers: buffers)
        let results = Mutex<[UInt64: BlockResult]>([:])
        let loop = try EventLoop(name: "iscsi-test", pollBudgetNanoseconds: 0)
        let thread = Thread { loop.run() }
        thread.start()
        defer { loop.stop() }

        loop.execute {
            do {
                try loop.register(fd: fd, events: .readable) { _ in
                    _ = box.channel.reap { token, result in results.withLock { $0[token] = result } }
                }
            } catch {
                Issue.record("register failed: \(error)")
            }
            // Submitted before the session is up: held, then sent on login.
            for (i, b) in box.buffers.enumerated() {
                _ = box.channel.submit(BlockRequest(operation: .write, offset: UInt64(i * 8192), length: 8192, buffers: b.list,
                                                    forceUnitAccess: i % 2 == 0), token: UInt64(i))
            }
            box.channel.commit()
        }
        let deadline = Date().addingTimeInterval(10)
        while results.withLock({ $0.count }) < 16 && Date() < deadline { usleep(10_000) }
        let final = results.withLock { $0 }
        #expect(final.count == 16)
        for i in 0..<16 {
            #expect(final[UInt64(i)] == .success(8192))
            #expect(target.readBacking(offset: i * 8192, count: 8192) == TestBuffers.pattern(8192, seed: UInt8(100 + i)))
        }
        // Kill and restart the target: the loop keeps driving the same completionFD through the reconnect.
        target.stop(hard: true)
        usleep(300_000)
        let more = TestBuffers(length: 4096, pieces: 1)
        more.bytes = [UInt8](repeating: 0xC3, count: 4096)
        let box2 = Box(channel: channel, buffers: [more])
        loop.execute {
            _ = box2.channel.submit(BlockRequest(operation: .write, offset: 1 << 20, length: 4096, buffers: box2.buffers[0].list),
                                    token: 99)
            box2.channel.commit()
        }
        usleep(500_000)
        #expect(results.withLock { $0[99] } == nil)
        try target.start()
        let deadline2 = Date().addingTimeInterval(10)
        while results.withLock({ $0[99] }) == nil && Date() < deadline2 { usleep(10_000) }
        #expect(results.withLock { $0[99] } == .success(4096))
        #expect(target.readBacking(offset: 1 << 20, count: 4096) == [UInt8](repeating: 0xC3, count: 4096))
        let done = Mutex(false)
        loop.execute {
            loop.unregister(fd: fd)
            box.channel.close()
            done.withLock { $0 = true }
        }
        while !done.withLock({ $0 }) { usleep(1000) }
    }
}
