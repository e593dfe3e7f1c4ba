import BlockIO
import CSystem
import Testing
import VhostUser
import Virtio
#if canImport(Glibc)
import Glibc
#endif

/// Open file descriptors of this process.
private func processFDCount() -> Int {
    guard let dir = opendir("/proc/self/fd") else { return -1 }
    defer { closedir(dir) }
    var n = 0
    while readdir(dir) != nil { n += 1 }
    return n - 3  // ".", "..", and the directory's own fd
}

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
        let base = processFDCount()
        for cycle in 1...40 { try Self.connectWriteAndDrop(f, cycle: cycle) }
        // The last session's teardown runs on the server's thread: give it a moment.
        #expect(waitFor { processFDCount() <= base + 2 }, "fds grew from \(base) to \(processFDCount()) over 40 connections")
    }
}
