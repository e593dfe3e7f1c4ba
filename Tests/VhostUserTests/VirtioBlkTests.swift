import TestSupport
import VirtioTestSupport
import VhostUserTestSupport
import BlockIO
import CSystem
import GuestMemoryMap
import Testing
import VhostUser
import VirtioDevices
import Virtio
#if canImport(Glibc)
import Glibc
#endif

/// A running virtio-blk server with one connected test front-end and ring 0 set up.
final class BlkFixture: @unchecked Sendable {
    let ram = TestGuestRAM()
    let ring: TestSplitRing
    let channel: MemoryChannel
    let device: VirtioBlkDevice<MemoryChannel>
    let server: VhostUserServer<VirtioBlkDevice<MemoryChannel>>
    let log = TestLog()
    var client: TestFrontEnd!
    var kick: Int32 = -1
    var call: Int32 = -1
    let path = testSocketPath("blk")

    init(features: UInt64 = VirtioFeature.version1 | VirtioFeature.ringIndirectDescriptors | vhostUserFeatureProtocolFeatures,
         queueSize: Int = 16, readOnly: Bool = false, drainTimeoutMilliseconds: Int32 = 30_000,
         watchdogMilliseconds: Int = 1000, extraProtocolFeatures: UInt64 = 0, synchronous: Bool = false) throws {
        channel = MemoryChannel(bytes: 1 << 20, synchronous: synchronous)
        ring = TestSplitRing(ram: ram, size: queueSize)
        let geometry = BlockGeometry(logicalBlockSize: 512, physicalBlockSize: 4096, blockCount: 2048, readOnly: readOnly)
        let ch = channel
        device = try VirtioBlkDevice(geometry: geometry, options: VirtioBlkOptions(queues: 2, serial: "SG-BLK-0001",
                                                                                   drainTimeoutMilliseconds: drainTimeoutMilliseconds,
                                                                                   watchdogMilliseconds: watchdogMilliseconds),
                                     channelFactory: { ch }, log: log.logger)
        server = VhostUserServer(socketPath: path, device: device, log: log.logger)
        try server.start()
        client = TestFrontEnd(path: path)
        let fds = client.setUp(ram: ram, rings: [ring], features: features,
                               protocolFeatures: VhostUserProtocolFeature.replyAck | VhostUserProtocolFeature.multiQueue
                                   | VhostUserProtocolFeature.config | extraProtocolFeatures)
        kick = fds[0].kick
        call = fds[0].call
    }

    deinit {
        client = nil
        server.stop()
        device.shutdown()
        close(kick)
        close(call)
    }

    /// Submits a request and waits for its used entry; returns (status, used length) or nil on timeout.
    func request(type: UInt32, sector: UInt64, out: [UInt8] = [], inLength: Int = 0, indirect: Bool = false) -> (UInt8, UInt32)? {
        var buffers = ram.blkRequestOut(type: type, sector: sector, out: out)
        if inLength > 0 {
            lastIn = ram.alloc(inLength)
            buffers.append(.init(gpa: lastIn, length: UInt32(inLength), writable: true))
        }
        let status = ram.alloc(1)
        ram.pointer(status).storeBytes(of: 0xFF, as: UInt8.self)
        buffers.append(.init(gpa: status, length: 1, writable: true))
        let before = ring.usedIndex
        let head = indirect ? ring.addIndirect(buffers) : ring.addChain(buffers)
        ring.publish(head)
        _ = csys_eventfd_signal(kick, 1)
        guard waitFor({ ring.usedIndex != before }) else { return nil }
        let e = ring.usedElement(before)
        #expect(e.id == UInt32(head))
        return (ram.pointer(status).load(as: UInt8.self), e.len)
    }

    var lastIn: UInt64 = 0
}

@Suite(.serialized) struct VirtioBlkTests {
    /// A synchronous back-end (no completion fd, like the null back-end) completes inline on commit.
    @Test func synchronousBackendCompletesInline() throws {
        let f = try BlkFixture(synchronous: true)
        let data = (0..<4096).map { UInt8(truncatingIfNeeded: $0 * 5 + 1) }
        for round in 0..<20 {
            let sector = UInt64(round * 8)
            #expect(f.request(type: VirtioBlk.typeOut, sector: sector, out: data)?.0 == VirtioBlk.statusOK)
            let r = f.request(type: VirtioBlk.typeIn, sector: sector, inLength: 4096)
            #expect(r?.0 == VirtioBlk.statusOK && r?.1 == 4097)
            #expect(f.ram.read(f.lastIn, 4096) == data)
        }
        #expect(f.channel.inFlight == 0)
    }

    @Test func writeReadRoundTripThroughGuestMemory() throws {
        let f = try BlkFixture()
        let data = (0..<4096).map { UInt8(truncatingIfNeeded: $0 * 7 + 3) }
        let w = f.request(type: VirtioBlk.typeOut, sector: 16, out: data)
        #expect(w?.0 == VirtioBlk.statusOK)
        #expect(w?.1 == 1)
        #expect(f.channel.bytes(16 * 512, 4096) == data)
        let r = f.request(type: VirtioBlk.typeIn, sector: 16, inLength: 4096, indirect: true)
        #expect(r?.0 == VirtioBlk.statusOK)
        #expect(r?.1 == 4097)
        #expect(f.ram.read(f.lastIn, 4096) == data)
        // The call eventfd was signalled for the completions.
        var v: UInt64 = 0
        #expect(csys_eventfd_drain(f.call, &v) == 0 && v >= 1)
    }

    @Test func requestsBeyondSegMaxFail() throws {
        // seg_max (126) is advertised in the virtio-blk config; a driver exceeding it gets IOERR.
        let f = try BlkFixture(queueSize: 256)
        let hdr = f.ram.alloc(16)
        var h = [UInt8]()
        h.appendLE(VirtioBlk.typeOut)
        h.appendLE(UInt32(0))
        h.appendLE(UInt64(64))
        f.ram.write(h, at: hdr)
        var buffers = [TestSplitRing.Buffer(gpa: hdr, length: 16, writable: false)]
        var expected = [UInt8]()
        for i in 0..<200 {
            let d = f.ram.alloc(512, align: 4096)
            let chunk = [UInt8](repeating: UInt8(truncatingIfNeeded: i), count: 512)
            f.ram.write(chunk, at: d)
            expected += chunk
            buffers.append(.init(gpa: d, length: 512, writable: false))
        }
        let st = f.ram.alloc(1)
        buffers.append(.init(gpa: st, length: 1, writable: true))
        let head = f.ring.addIndirect(buffers)
        f.ring.publish(head)
        _ = csys_eventfd_signal(f.kick, 1)
        #expect(waitFor { f.ring.usedIndex == 1 })
        #expect(f.ram.read(st, 1) == [VirtioBlk.statusIOError])
        #expect(f.channel.bytes(64 * 512, 512).allSatisfy { $0 == 0 })
        _ = expected
    }

    @Test func getIDFlushDiscardWriteZeroes() throws {
        let f = try BlkFixture()
        let id = f.request(type: VirtioBlk.typeGetID, sector: 0, inLength: 20)
        #expect(id?.0 == VirtioBlk.statusOK)
        #expect(Array(f.ram.read(f.lastIn, 11)) == Array("SG-BLK-0001".utf8))
        #expect(f.request(type: VirtioBlk.typeFlush, sector: 0)?.0 == VirtioBlk.statusOK)
        _ = f.request(type: VirtioBlk.typeOut, sector: 0, out: [UInt8](repeating: 0xAB, count: 8192))
        var seg = [UInt8]()
        seg.appendLE(UInt64(8))
        seg.appendLE(UInt32(8))
        seg.appendLE(UInt32(0))
        #expect(f.request(type: VirtioBlk.typeDiscard, sector: 0, out: seg)?.0 == VirtioBlk.statusOK)
        #expect(f.channel.bytes(8 * 512, 4096).allSatisfy { $0 == 0 })
        #expect(f.channel.bytes(0, 4096).allSatisfy { $0 == 0xAB })
        var wz = [UInt8]()
        wz.appendLE(UInt64(0))
        wz.appendLE(UInt32(8))
        wz.appendLE(UInt32(1))  // unmap
        #expect(f.request(type: VirtioBlk.typeWriteZeroes, sector: 0, out: wz)?.0 == VirtioBlk.statusOK)
        #expect(f.channel.bytes(0, 4096).allSatisfy { $0 == 0 })
        #expect(f.channel.operations.withLock { $0.contains(.flush) && $0.contains(.discard) && $0.contains(.writeZeroes) })
        // Discard with the unmap flag and reserved flags are unsupported.
        var bad = [UInt8]()
        bad.appendLE(UInt64(0))
        bad.appendLE(UInt32(8))
        bad.appendLE(UInt32(1))
        #expect(f.request(type: VirtioBlk.typeDiscard, sector: 0, out: bad)?.0 == VirtioBlk.statusUnsupported)
    }

    @Test func outOfRangeMisalignedAndUnknownRequestsFail() throws {
        let f = try BlkFixture()
        #expect(f.request(type: VirtioBlk.typeIn, sector: 2047, inLength: 1024)?.0 == VirtioBlk.statusIOError)
        #expect(f.request(type: VirtioBlk.typeIn, sector: UInt64.max - 1, inLength: 512)?.0 == VirtioBlk.statusIOError)
        #expect(f.request(type: VirtioBlk.typeOut, sector: 0, out: [1, 2, 3])?.0 == VirtioBlk.statusIOError)
        #expect(f.request(type: 99, sector: 0)?.0 == VirtioBlk.statusUnsupported)
        // Still serving.
        #expect(f.request(type: VirtioBlk.typeIn, sector: 0, inLength: 512)?.0 == VirtioBlk.statusOK)
    }

    @Test func readOnlyDeviceRefusesWrites() throws {
        let f = try BlkFixture(readOnly: true)
        #expect(f.device.offeredFeatures & VirtioBlk.featureReadOnly != 0)
        #expect(f.request(type: VirtioBlk.typeOut, sector: 0, out: [UInt8](repeating: 1, count: 512))?.0 == VirtioBlk.statusIOError)
        #expect(f.channel.bytes(0, 512).allSatisfy { $0 == 0 })
    }

    @Test func configSpaceAndWritebackToggle() throws {
        let f = try BlkFixture()
        var req = [UInt8]()
        req.appendLE(UInt32(0))
        req.appendLE(UInt32(60))
        req.appendLE(UInt32(0))
        req += [UInt8](repeating: 0, count: 60)
        f.client.send(.getConfig, req)
        let r = f.client.receive()
        #expect(r?.payload.count == 72)
        let cfg = Array(r?.payload.dropFirst(12) ?? [])
        #expect(cfg.readLE(UInt64.self, at: 0) == 2048)  // capacity in sectors
        #expect(cfg.readLE(UInt32.self, at: 20) == 512)  // blk_size
        #expect(cfg.first.map { _ in cfg[24] } == 3)  // physical_block_exp: 4096 = 512 << 3
        #expect(cfg.readLE(UInt16.self, at: 34) == 2)  // num_queues
        #expect(cfg[32] == 1)
        var set = [UInt8]()
        set.appendLE(UInt32(32))
        set.appendLE(UInt32(1))
        set.appendLE(UInt32(0))
        set.append(0)
        #expect(f.client.ack(.setConfig, set) == 0)
        #expect(f.device.readConfig()[32] == 0)
        // Capacity is read-only.
        var bad = [UInt8]()
        bad.appendLE(UInt32(0))
        bad.appendLE(UInt32(8))
        bad.appendLE(UInt32(0))
        bad += [UInt8](repeating: 0xFF, count: 8)
        #expect(f.client.ack(.setConfig, bad) == 1)
        // Out-of-range GET_CONFIG answers with an empty config.
        var big = [UInt8]()
        big.appendLE(UInt32(250))
        big.appendLE(UInt32(20))
        big.appendLE(UInt32(0))
        big += [UInt8](repeating: 0, count: 20)
        f.client.send(.getConfig, big)
        #expect(f.client.receive()?.payload.count == 12)
    }

    @Test func resizeSendsConfigChangeOnBackendChannel() throws {
        let f = try BlkFixture()
        var pair: [Int32] = [-1, -1]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &pair) == 0)
        defer { close(pair[0]) }
        f.client.send(.setProtocolFeatures, TestFrontEnd.u64(VhostUserProtocolFeature.replyAck | VhostUserProtocolFeature.config
                                                                  | VhostUserProtocolFeature.backendRequest))
        #expect(f.client.ack(.setBackendReqFD, fds: [pair[1]]) == 0)
        close(pair[1])
        f.device.resize(blockCount: 4096)
        var header = [UInt8](repeating: 0, count: 12)
        var tv = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(pair[0], SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        let n = header.withUnsafeMutableBytes { recv(pair[0], $0.baseAddress, 12, Int32(MSG_WAITALL)) }
        #expect(n == 12)
        #expect(header.readLE(UInt32.self, at: 0) == VhostUserBackendRequest.configChange.rawValue)
        #expect(f.device.readConfig().readLE(UInt64.self, at: 0) == 4096)
    }

    @Test func getVringBaseStopsRingAndReportsIndex() throws {
        let f = try BlkFixture()
        for _ in 0..<3 { _ = f.request(type: VirtioBlk.typeFlush, sector: 0) }
        #expect(f.client.getVringBase(0) == 3)
        // A request published after the stop is not processed.
        let hdr = f.ram.alloc(16)
        let st = f.ram.alloc(1)
        let head = f.ring.addChain([.init(gpa: hdr, length: 16, writable: false), .init(gpa: st, length: 1, writable: true)])
        f.ring.publish(head)
        _ = csys_eventfd_signal(f.kick, 1)
        usleep(50_000)
        #expect(f.ring.usedIndex == 3)
    }

    @Test func getVringBaseWaitsForInFlightRequests() throws {
        let f = try BlkFixture()
        f.channel.hold.store(true, ordering: .releasing)
        let hdr = f.ram.alloc(16)
        f.ram.write([1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], at: hdr)
        let data = f.ram.alloc(512)
        let st = f.ram.alloc(1)
        let head = f.ring.addChain([.init(gpa: hdr, length: 16, writable: false), .init(gpa: data, length: 512, writable: false),
                                    .init(gpa: st, length: 1, writable: true)])
        f.ring.publish(head)
        _ = csys_eventfd_signal(f.kick, 1)
        usleep(50_000)
        #expect(f.ring.usedIndex == 0)
        let releaser = Thread { usleep(200_000); f.channel.releaseHeld() }
        releaser.start()
        let start = clockSeconds()
        #expect(f.client.getVringBase(0) == 1)
        #expect(clockSeconds() - start >= 0.1)
        #expect(f.ring.usedIndex == 1)
        releaser.join()
    }
}

/// Minimal joinable thread for tests.
final class Thread: @unchecked Sendable {
    let body: @Sendable () -> Void
    var handle = pthread_t()
    init(_ body: @escaping @Sendable () -> Void) { self.body = body }
    func start() {
        let box = Unmanaged.passRetained(self).toOpaque()
        pthread_create(&handle, nil, { arg in
            let t = Unmanaged<Thread>.fromOpaque(arg!).takeRetainedValue()
            t.body()
            return nil
        }, box)
    }
    func join() { pthread_join(handle, nil) }
}

/// virtio-blk whose LUN is removed while the guest runs.
@Suite(.serialized) struct VirtioBlkDetachTests {
    @Test func removingTheLUNClosesTheChannelAfterItsLastRequestAndFailsNewOnes() throws {
        let f = try BlkFixture()
        var pair: [Int32] = [-1, -1]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &pair) == 0)
        defer { close(pair[0]) }
        f.client.send(.setProtocolFeatures, TestFrontEnd.u64(VhostUserProtocolFeature.replyAck | VhostUserProtocolFeature.config
                                                                  | VhostUserProtocolFeature.backendRequest))
        #expect(f.client.ack(.setBackendReqFD, fds: [pair[1]]) == 0)
        close(pair[1])
        #expect(f.request(type: VirtioBlk.typeOut, sector: 8, out: [UInt8](repeating: 0x77, count: 512))?.0 == VirtioBlk.statusOK)
        // A WRITE still in the back-end when the LUN goes away.
        f.channel.hold.store(true, ordering: .releasing)
        let hdr = f.ram.alloc(16)
        f.ram.write([1, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0, 0, 0, 0, 0, 0], at: hdr)
        let data = f.ram.alloc(512)
        f.ram.write([UInt8](repeating: 0x66, count: 512), at: data)
        let st = f.ram.alloc(1)
        let head = f.ring.addChain([.init(gpa: hdr, length: 16, writable: false), .init(gpa: data, length: 512, writable: false),
                                    .init(gpa: st, length: 1, writable: true)])
        f.ring.publish(head)
        _ = csys_eventfd_signal(f.kick, 1)
        #expect(waitFor { f.channel.inFlight == 1 })
        let used = f.ring.usedIndex
        f.device.detachBackend()
        #expect(f.device.backendDetached)
        // Capacity 0, announced with a config-change message.
        var header = [UInt8](repeating: 0, count: 12)
        var tv = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(pair[0], SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        let n = header.withUnsafeMutableBytes { recv(pair[0], $0.baseAddress, 12, Int32(MSG_WAITALL)) }
        #expect(n == 12)
        #expect(header.readLE(UInt32.self, at: 0) == VhostUserBackendRequest.configChange.rawValue)
        #expect(f.device.readConfig().readLE(UInt64.self, at: 0) == 0)
        #expect(f.device.geometry.blockCount == 0)
        // The channel stays open while its request is in the back-end.
        usleep(100_000)
        #expect(f.channel.closeCount.load(ordering: .relaxed) == 0)
        f.channel.releaseHeld()
        #expect(waitFor { f.ring.usedIndex == used &+ 1 })
        #expect(f.ram.pointer(st).load(as: UInt8.self) == VirtioBlk.statusOK, "the in-flight WRITE completes")
        // Both threads' channels (one shared test channel, two groups) are closed once idle.
        #expect(waitFor { f.channel.closeCount.load(ordering: .relaxed) >= 1 })
        let operations = f.channel.operations.withLock { $0.count }
        // New requests fail with IOERR and never reach the back-end.
        #expect(f.request(type: VirtioBlk.typeIn, sector: 0, inLength: 512)?.0 == VirtioBlk.statusIOError)
        #expect(f.request(type: VirtioBlk.typeOut, sector: 0, out: [UInt8](repeating: 1, count: 512))?.0 == VirtioBlk.statusIOError)
        #expect(f.request(type: VirtioBlk.typeFlush, sector: 0)?.0 == VirtioBlk.statusIOError)
        #expect(f.channel.operations.withLock { $0.count } == operations)
        // A second detach is a no-op.
        f.device.detachBackend()
        usleep(50_000)
        #expect(f.channel.closeCount.load(ordering: .relaxed) == 1, "closed once")
    }
}
