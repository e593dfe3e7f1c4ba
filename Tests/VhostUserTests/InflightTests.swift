import TestSupport
import VirtioTestSupport
import VhostUserTestSupport
import BlockIO
import CSystem
import Testing
import VhostUser
import VirtioDevices
import Virtio
#if canImport(Glibc)
import Glibc
#endif

/// The process's open in-flight region memfds (the server names them "scsigate-inflight"): the only
/// descriptors these tests own, counted by name (OpenDescriptors), not as all fds.
private func inflightFDCount() -> Int { OpenDescriptors.count { $0.hasPrefix("/memfd:scsigate-inflight") } }

/// In-flight tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD): the regions' lifetime and layouts.
@Suite(.serialized) struct InflightTests {
    /// One front-end connection as QEMU makes it with INFLIGHT_SHMFD: rings set up, GET_INFLIGHT_FD,
    /// SET_INFLIGHT_FD with the region, ring 0 restarted on it, one WRITE, then the connection drops.
    static func connectWriteAndDrop(_ f: BlkFixture, cycle: Int) throws {
        let client = try #require(TestFrontEnd(path: f.path))
        let ring = TestSplitRing(ram: f.ram, size: 16)
        let fds = client.setUp(ram: f.ram, rings: [ring], features: VirtioFeature.version1 | vhostUserFeatureProtocolFeatures,
                               protocolFeatures: VhostUserProtocolFeature.replyAck | VhostUserProtocolFeature.inflightSharedMemory)
        defer { close(fds[0].kick); close(fds[0].call) }
        var req = [UInt8]()
        req.appendLE(UInt64(0))
        req.appendLE(UInt64(0))
        req.appendLE(UInt16(2))
        req.appendLE(UInt16(16))
        req.appendLE(UInt32(0))
        client.send(.getInflightFD, req)
        let reply = try #require(client.receive())
        try #require(reply.fds.count == 1)
        let inflightFD = reply.fds[0]
        #expect(client.ack(.setInflightFD, reply.payload, fds: [inflightFD]) == 0)
        close(inflightFD)  // the server holds its own copies
        _ = client.getVringBase(0)
        client.send(.setVringBase, TestFrontEnd.state(0, UInt32(ring.availIdx)))
        let kick = csys_eventfd(0, 1)
        defer { close(kick) }
        #expect(client.ack(.setVringKick, TestFrontEnd.u64(0), fds: [kick]) == 0)
        #expect(client.ack(.setVringEnable, TestFrontEnd.state(0, 1)) == 0)
        let hdr = f.ram.alloc(16)
        var hb = [UInt8]()
        hb.appendLE(VirtioBlk.typeOut)
        hb.appendLE(UInt32(0))
        hb.appendLE(UInt64(cycle % 64))
        f.ram.write(hb, at: hdr)
        let data = f.ram.alloc(512)
        let st = f.ram.alloc(1)
        let head = ring.addChain([.init(gpa: hdr, length: 16, writable: false), .init(gpa: data, length: 512, writable: false),
                                  .init(gpa: st, length: 1, writable: true)])
        ring.publish(head)
        _ = csys_eventfd_signal(kick, 1)
        #expect(waitFor { ring.usedIndex == 1 })
        // Dropping `client` closes the connection.
    }

    @Test func inflightRegionsDoNotLeakFileDescriptorsAcrossConnections() throws {
        let f = try BlkFixture(queueSize: 16)
        f.client = nil
        try Self.connectWriteAndDrop(f, cycle: 0)
        usleep(100_000)
        let base = inflightFDCount()
        for cycle in 1...40 { try Self.connectWriteAndDrop(f, cycle: cycle) }
        // The last session's teardown runs on the server's thread: give it a moment.
        #expect(waitFor { inflightFDCount() <= base + 2 }, "in-flight memfds grew from \(base) to \(inflightFDCount()) over 40 connections")
    }
}

extension InflightTests {
    /// Connects a front-end that negotiates packed rings and INFLIGHT_SHMFD, hands over `inflightFD`
    /// (GET_INFLIGHT_FD first when it is -1) and starts ring 0 with `base`. Returns the client, the
    /// in-flight fd and the ring's kick/call fds.
    /// `waitForRing`: false sends the ring start without asking for replies (a start the server holds).
    static func connectPacked(path: String, ram: TestGuestRAM, ring: TestPackedRing, base: UInt32, inflightFD: Int32,
                              waitForRing: Bool = true) throws
        -> (client: TestFrontEnd, inflightFD: Int32, kick: Int32, call: Int32) {
        let c = try #require(TestFrontEnd(path: path))
        let features = VirtioFeature.version1 | VirtioFeature.ringPacked | vhostUserFeatureProtocolFeatures
        #expect((c.getU64(.getFeatures) ?? 0) & features == features)
        c.send(.setFeatures, TestFrontEnd.u64(features))
        _ = c.getU64(.getProtocolFeatures)
        c.send(.setProtocolFeatures, TestFrontEnd.u64(VhostUserProtocolFeature.replyAck | VhostUserProtocolFeature.inflightSharedMemory))
        c.send(.setOwner)
        var table = [UInt8]()
        table.appendLE(UInt32(1))
        table.appendLE(UInt32(0))
        table += ram.regionPayload
        #expect(c.ack(.setMemTable, table, fds: [ram.fd]) == 0)
        var fd = inflightFD
        var info = [UInt8]()
        info.appendLE(UInt64(0))
        info.appendLE(UInt64(0))
        info.appendLE(UInt16(1))
        info.appendLE(UInt16(ring.size))
        info.appendLE(UInt32(0))
        if fd < 0 {
            c.send(.getInflightFD, info)
            let reply = try #require(c.receive())
            try #require(reply.fds.count == 1)
            fd = reply.fds[0]
            info = reply.payload
        } else {
            var size = UInt64(0)
            var st = stat()
            if fstat(fd, &st) == 0 { size = UInt64(st.st_size) }
            info.replaceSubrange(0..<8, with: TestFrontEnd.u64(size))
        }
        #expect(c.ack(.setInflightFD, info, fds: [fd]) == 0)
        c.send(.setVringNum, TestFrontEnd.state(0, UInt32(ring.size)))
        c.send(.setVringBase, TestFrontEnd.state(0, base))
        var addr = [UInt8]()
        addr.appendLE(UInt32(0))
        addr.appendLE(UInt32(0))
        addr.appendLE(ram.user(ring.desc))
        addr.appendLE(ram.user(ring.deviceEvent))
        addr.appendLE(ram.user(ring.driverEvent))
        addr.appendLE(UInt64(0))
        c.send(.setVringAddr, addr)
        let kick = csys_eventfd(0, 1)
        let call = csys_eventfd(0, 1)
        c.send(.setVringCall, TestFrontEnd.u64(0), fds: [call])
        if waitForRing {
            #expect(c.ack(.setVringKick, TestFrontEnd.u64(0), fds: [kick]) == 0)
            #expect(c.ack(.setVringEnable, TestFrontEnd.state(0, 1)) == 0)
        } else {
            c.send(.setVringKick, TestFrontEnd.u64(0), fds: [kick])
            c.send(.setVringEnable, TestFrontEnd.state(0, 1))
        }
        return (c, fd, kick, call)
    }

    @Test func aRestartedGatewayResubmitsAPackedRequestTheGuestStillWaitsFor() throws {
        let ram = TestGuestRAM()
        let ring = TestPackedRing(ram: ram, size: 16)
        let geometry = BlockGeometry(logicalBlockSize: 512, physicalBlockSize: 512, blockCount: 2048)
        let log = TestLog()
        // First gateway: a FLUSH completes, then a WRITE stays in the back-end when it goes away.
        let first = MemoryChannel(bytes: 1 << 20)
        let pathA = testSocketPath("blk-packed-a")
        let deviceA = try VirtioBlkDevice(geometry: geometry, options: VirtioBlkOptions(queues: 1, serial: "SG-PACKED",
                                                                                     drainTimeoutMilliseconds: 200),
                                          channelFactory: { first }, log: log.logger)
        let serverA = VhostUserServer(socketPath: pathA, device: deviceA, log: log.logger)
        try serverA.start()
        let a = try Self.connectPacked(path: pathA, ram: ram, ring: ring, base: 0x8000, inflightFD: -1)
        defer { close(a.inflightFD) }
        let flush = ram.blkRequest(type: VirtioBlk.typeFlush, sector: 0)
        ring.add(id: 1, flush.buffers)
        _ = csys_eventfd_signal(a.kick, 1)
        #expect(waitFor { ring.isUsed(at: 0, wrap: true) })
        #expect(ring.used(at: 0).id == 1)
        first.hold.store(true, ordering: .releasing)
        let write = ram.blkRequest(type: VirtioBlk.typeOut, sector: 7, out: [UInt8](repeating: 0x5A, count: 512))
        #expect(ring.add(id: 3, write.buffers) == 2)  // the FLUSH took positions 0-1
        _ = csys_eventfd_signal(a.kick, 1)
        #expect(waitFor { first.inFlight == 1 })
        serverA.stop()
        deviceA.shutdown()
        close(a.kick)
        close(a.call)
        #expect(!ring.isUsed(at: 2, wrap: true), "the first gateway never answered the WRITE")
        #expect(ram.pointer(write.status).load(as: UInt8.self) == 0xFF)
        // Second gateway, same guest memory and in-flight fd; the VMM's ring base is stale.
        let second = MemoryChannel(bytes: 1 << 20)
        let pathB = testSocketPath("blk-packed-b")
        let deviceB = try VirtioBlkDevice(geometry: geometry, options: VirtioBlkOptions(queues: 1, serial: "SG-PACKED"),
                                          channelFactory: { second }, log: log.logger)
        let serverB = VhostUserServer(socketPath: pathB, device: deviceB, log: log.logger)
        try serverB.start()
        defer { serverB.stop(); deviceB.shutdown() }
        let b = try Self.connectPacked(path: pathB, ram: ram, ring: ring, base: 0x8000, inflightFD: a.inflightFD)
        defer { close(b.kick); close(b.call) }
        // The WRITE is resubmitted from the region and answered at the used position after the FLUSH's.
        #expect(waitFor { ring.isUsed(at: 2, wrap: true) })
        #expect(ring.used(at: 2).id == 3)
        #expect(ram.pointer(write.status).load(as: UInt8.self) == VirtioBlk.statusOK)
        #expect(second.bytes(7 * 512, 512) == [UInt8](repeating: 0x5A, count: 512))
        #expect(log.contains("resubmitting 1 in-flight request"))
        // New requests continue at the driver's position (after the 2 + 3 descriptors posted).
        let getID = ram.blkRequest(type: VirtioBlk.typeGetID, sector: 0, inLength: 20)
        #expect(ring.add(id: 4, getID.buffers) == 5)
        _ = csys_eventfd_signal(b.kick, 1)
        #expect(waitFor { ring.isUsed(at: 5, wrap: true) })
        #expect(ring.used(at: 5).id == 4)
        #expect(ram.read(getID.buffers[1].gpa, 9) == Array("SG-PACKED".utf8))
        first.releaseHeld()
    }
}
