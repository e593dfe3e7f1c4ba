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

/// Hostile front-ends and guests: every case must fail the request, break the queue or close the
/// connection, and the server must keep serving (a new connection works afterwards).
@Suite(.serialized) struct MalformedInputTests {
    /// Publishes a raw chain already written into descriptors starting at `head`.
    private func publishRaw(_ f: BlkFixture, head: UInt16) -> UInt16 {
        let before = f.ring.usedIndex
        f.ring.publish(head)
        _ = csys_eventfd_signal(f.kick, 1)
        return before
    }

    private func header(_ f: BlkFixture, type: UInt32 = VirtioBlk.typeIn) -> UInt64 {
        let h = f.ram.alloc(16)
        var b = [UInt8]()
        b.appendLE(type)
        b.appendLE(UInt32(0))
        b.appendLE(UInt64(0))
        f.ram.write(b, at: h)
        return h
    }

    @Test func descriptorLoopFailsTheRequestOnly() throws {
        let f = try BlkFixture()
        let h = header(f)
        f.ring.setDescriptor(0, addr: h, len: 16, flags: 1, next: 1)
        f.ring.setDescriptor(1, addr: f.ram.alloc(512), len: 512, flags: 1, next: 0)  // back to 0: a loop
        f.ring.nextFree = 2
        let before = publishRaw(f, head: 0)
        #expect(waitFor { f.ring.usedIndex != before })
        #expect(f.ring.usedElement(before) == (0, 0))
        #expect(f.log.contains("loop"))
        // The queue still works.
        #expect(f.request(type: VirtioBlk.typeFlush, sector: 0)?.0 == VirtioBlk.statusOK)
    }

    @Test func indirectLoopAndChainLongerThanItsTable() throws {
        let f = try BlkFixture()
        let table = f.ram.alloc(16 * 2, align: 16)
        let h = header(f)
        let t = f.ram.pointer(table)
        t.storeBytes(of: h, as: UInt64.self)
        t.storeBytes(of: UInt32(16), toByteOffset: 8, as: UInt32.self)
        t.storeBytes(of: UInt16(1), toByteOffset: 12, as: UInt16.self)
        t.storeBytes(of: UInt16(1), toByteOffset: 14, as: UInt16.self)
        (t + 16).storeBytes(of: f.ram.alloc(1), as: UInt64.self)
        (t + 16).storeBytes(of: UInt32(1), toByteOffset: 8, as: UInt32.self)
        (t + 16).storeBytes(of: UInt16(1 | 2), toByteOffset: 12, as: UInt16.self)
        (t + 16).storeBytes(of: UInt16(0), toByteOffset: 14, as: UInt16.self)
        f.ring.setDescriptor(0, addr: table, len: 32, flags: 4, next: 0)
        f.ring.nextFree = 1
        let before = publishRaw(f, head: 0)
        #expect(waitFor { f.ring.usedIndex != before })
        #expect(f.ring.usedElement(before).len == 0)
        // Indirect table entry pointing past its table.
        (t + 16).storeBytes(of: UInt16(1), toByteOffset: 12, as: UInt16.self)
        (t + 16).storeBytes(of: UInt16(5), toByteOffset: 14, as: UInt16.self)
        f.ring.setDescriptor(1, addr: table, len: 32, flags: 4, next: 0)
        f.ring.nextFree = 2
        let b2 = publishRaw(f, head: 1)
        #expect(waitFor { f.ring.usedIndex != b2 })
        #expect(f.ring.usedElement(b2).len == 0)
        // Indirect table with a length that is not a multiple of 16.
        f.ring.setDescriptor(2, addr: table, len: 20, flags: 4, next: 0)
        f.ring.nextFree = 3
        let b3 = publishRaw(f, head: 2)
        #expect(waitFor { f.ring.usedIndex != b3 })
        #expect(f.ring.usedElement(b3).len == 0)
        #expect(f.request(type: VirtioBlk.typeFlush, sector: 0)?.0 == VirtioBlk.statusOK)
    }

    @Test func zeroLengthOutOfMemoryAndOutOfTableBuffersFail() throws {
        let f = try BlkFixture()
        let h = header(f)
        // Zero-length data buffer.
        f.ring.setDescriptor(0, addr: h, len: 16, flags: 1, next: 1)
        f.ring.setDescriptor(1, addr: f.ram.alloc(16), len: 0, flags: 1 | 2, next: 2)
        f.ring.setDescriptor(2, addr: f.ram.alloc(1), len: 1, flags: 2, next: 0)
        // Buffer outside guest memory (and one straddling its end).
        f.ring.setDescriptor(3, addr: h, len: 16, flags: 1, next: 4)
        f.ring.setDescriptor(4, addr: 0x10, len: 512, flags: 2, next: 0)
        f.ring.setDescriptor(5, addr: f.ram.gpaBase + UInt64(f.ram.size) - 8, len: 16, flags: 2, next: 0)
        // Next index past the table.
        f.ring.setDescriptor(6, addr: h, len: 16, flags: 1, next: 200)
        // Readable after writable.
        f.ring.setDescriptor(7, addr: f.ram.alloc(1), len: 1, flags: 1 | 2, next: 8)
        f.ring.setDescriptor(8, addr: h, len: 16, flags: 0, next: 0)
        // Address overflow.
        f.ring.setDescriptor(9, addr: UInt64.max - 4, len: 64, flags: 2, next: 0)
        f.ring.nextFree = 10
        let before = f.ring.usedIndex
        for head: UInt16 in [0, 3, 5, 6, 7, 9] { f.ring.publish(head) }
        _ = csys_eventfd_signal(f.kick, 1)
        #expect(waitFor { f.ring.usedIndex == before &+ 6 })
        for i in 0..<6 { #expect(f.ring.usedElement(before &+ UInt16(i)).len == 0) }
        #expect(f.request(type: VirtioBlk.typeFlush, sector: 0)?.0 == VirtioBlk.statusOK)
    }

    @Test func availIndexJumpBreaksTheQueueButNotTheServer() throws {
        let f = try BlkFixture()
        f.ring.setAvailIndex(f.ring.availIdx &+ UInt16(f.ring.size + 1))
        _ = csys_eventfd_signal(f.kick, 1)
        #expect(waitFor { f.log.contains("avail index jumped") })
        // The control path still answers and the ring can be stopped and restarted.
        #expect(f.client.getVringBase(0) == 0)
        #expect(f.client.getU64(.getQueueNum) == 2)
    }

    @Test func availEntryPastTheTableBreaksTheQueue() throws {
        let f = try BlkFixture()
        let a = f.ram.pointer(f.ring.avail)
        a.storeBytes(of: UInt16(500), toByteOffset: 4, as: UInt16.self)
        f.ring.setAvailIndex(1)
        _ = csys_eventfd_signal(f.kick, 1)
        #expect(waitFor { f.log.contains("past the descriptor table") })
        #expect(f.ring.usedIndex == 0)
    }

    @Test func reusedInFlightHeadBreaksTheQueue() throws {
        let f = try BlkFixture()
        f.channel.hold.store(true, ordering: .releasing)
        let h = header(f, type: VirtioBlk.typeFlush)
        let st = f.ram.alloc(1)
        let head = f.ring.addChain([.init(gpa: h, length: 16, writable: false), .init(gpa: st, length: 1, writable: true)])
        f.ring.publish(head)
        f.ring.publish(head)  // the same head again while in flight
        _ = csys_eventfd_signal(f.kick, 1)
        #expect(waitFor { f.log.contains("still in flight") })
        f.channel.releaseHeld()
    }

    @Test func badMessageSizesGetErrorRepliesOrClose() throws {
        let f = try BlkFixture()
        // SET_VRING_NUM with a 4-byte payload and need-reply: failure ack, connection stays.
        f.client.send(VhostUserRequest.setVringNum.rawValue, [0, 0, 0, 0], needReply: true)
        #expect(f.client.receive()?.payload.readLE(UInt64.self, at: 0) == 1)
        #expect(f.client.getU64(.getQueueNum) == 2)
        // Ring index out of range, ring size out of range.
        #expect(f.client.ack(.setVringNum, TestFrontEnd.state(7, 16)) == 1)
        #expect(f.client.ack(.setVringNum, TestFrontEnd.state(1, 4096)) == 1)
        #expect(f.client.ack(.setVringNum, TestFrontEnd.state(1, 0)) == 1)
        // Features not offered.
        #expect(f.client.ack(.setFeatures, TestFrontEnd.u64(1 << 63)) == 1)
        // Without need-reply, a malformed message closes the connection.
        f.client.send(VhostUserRequest.setVringBase.rawValue, [1, 2, 3])
        #expect(f.client.isClosed())
        // A payload size beyond the limit closes at once.
        let c2 = try #require(TestFrontEnd(path: f.path))
        c2.send(VhostUserRequest.getFeatures.rawValue, [], sizeOverride: 1 << 20)
        #expect(c2.isClosed())
        let c3 = try #require(TestFrontEnd(path: f.path))
        #expect(c3.getU64(.getQueueNum) == 2)
        #expect(f.log.contains("payload size"))
    }

    @Test func tooManyFileDescriptorsCloseTheConnection() throws {
        let f = try BlkFixture()
        f.client = nil
        let c = try #require(TestFrontEnd(path: f.path))
        let fds = (0..<12).map { _ in csys_eventfd(0, 1) }
        defer { for fd in fds { close(fd) } }
        c.send(VhostUserRequest.setVringCall.rawValue, TestFrontEnd.u64(0), fds: fds)
        #expect(c.isClosed())
        #expect(f.log.contains("too many file descriptors"))
        // Surplus fds on a message that takes one: refused with an error ack.
        let c2 = try #require(TestFrontEnd(path: f.path))
        c2.send(.setProtocolFeatures, TestFrontEnd.u64(VhostUserProtocolFeature.replyAck))
        #expect(c2.ack(.setVringCall, TestFrontEnd.u64(0), fds: [fds[0], fds[1]]) == 1)
        #expect(c2.ack(.setVringKick, TestFrontEnd.u64(0x100)) == 1)  // polling mode is refused
        #expect(c2.getU64(.getQueueNum) == 2)
    }

    @Test func unknownRequestClosesAndServerAcceptsAgain() throws {
        let f = try BlkFixture()
        f.client.send(999, [])
        #expect(f.client.isClosed())
        #expect(f.log.contains("unknown request 999"))
        let c = try #require(TestFrontEnd(path: f.path))
        #expect(c.getU64(.getQueueNum) == 2)
        // A bad protocol version also closes.
        var bytes = [UInt8]()
        bytes.appendLE(UInt32(1))
        bytes.appendLE(UInt32(2))
        bytes.appendLE(UInt32(0))
        _ = bytes.withUnsafeBytes { send(c.fd, $0.baseAddress, $0.count, 0) }
        #expect(c.isClosed())
        #expect(f.server.connectionCount >= 2)
    }

    @Test func badMemoryTablesAreRefused() throws {
        let f = try BlkFixture()
        func table(_ regions: [(UInt64, UInt64, UInt64, UInt64)]) -> [UInt8] {
            var p = [UInt8]()
            p.appendLE(UInt32(regions.count))
            p.appendLE(UInt32(0))
            for r in regions { p.appendLE(r.0); p.appendLE(r.1); p.appendLE(r.2); p.appendLE(r.3) }
            return p
        }
        let size = UInt64(f.ram.size)
        // Region larger than its fd.
        #expect(f.client.ack(.setMemTable, table([(0, size * 2, 0x1000, 0)]), fds: [f.ram.fd]) == 1)
        // Offset + size beyond the fd.
        #expect(f.client.ack(.setMemTable, table([(0, size, 0x1000, 4096)]), fds: [f.ram.fd]) == 1)
        // Zero size.
        #expect(f.client.ack(.setMemTable, table([(0, 0, 0x1000, 0)]), fds: [f.ram.fd]) == 1)
        // Guest address overflow.
        #expect(f.client.ack(.setMemTable, table([(UInt64.max - 10, 4096, 0x1000, 0)]), fds: [f.ram.fd]) == 1)
        // Overlapping regions.
        #expect(f.client.ack(.setMemTable, table([(0, 4096, 0x1000, 0), (2048, 4096, 0x9000, 0)]), fds: [f.ram.fd, f.ram.fd]) == 1)
        // Region count and fd count disagree; too many regions.
        #expect(f.client.ack(.setMemTable, table([(0, 4096, 0x1000, 0)]), fds: []) == 1)
        let nine = (0..<9).map { i in (UInt64(i) << 20, UInt64(4096), UInt64(i) << 32, UInt64(0)) }
        #expect(f.client.ack(.setMemTable, table(nine), fds: [f.ram.fd]) == 1)
        // Not a mappable fd.
        var pipeFDs: [Int32] = [-1, -1]
        _ = pipe(&pipeFDs)
        #expect(f.client.ack(.setMemTable, table([(0, 4096, 0x1000, 0)]), fds: [pipeFDs[0]]) == 1)
        close(pipeFDs[0]); close(pipeFDs[1])
        // The old table is still in use: I/O works.
        #expect(f.request(type: VirtioBlk.typeFlush, sector: 0)?.0 == VirtioBlk.statusOK)
        // Ring addresses outside memory: starting the ring fails.
        var addr = [UInt8]()
        addr.appendLE(UInt32(1))
        addr.appendLE(UInt32(0))
        addr.appendLE(UInt64(0x10))
        addr.appendLE(UInt64(0x20))
        addr.appendLE(UInt64(0x30))
        addr.appendLE(UInt64(0))
        f.client.send(.setVringNum, TestFrontEnd.state(1, 16))
        f.client.send(.setVringAddr, addr)
        let kick = csys_eventfd(0, 1)
        defer { close(kick) }
        #expect(f.client.ack(.setVringKick, TestFrontEnd.u64(1), fds: [kick]) == 1)
        #expect(f.log.contains("outside guest memory"))
    }

    @Test func memorySlotsAddAndRemove() throws {
        let f = try BlkFixture()
        #expect(f.client.getU64(.getMaxMemSlots) == 32)
        let extra = TestGuestRAM(size: 1 << 20)
        var reg = [UInt8]()
        reg.appendLE(UInt64(0))
        reg.appendLE(UInt64(0x2_0000_0000))
        reg.appendLE(UInt64(1 << 20))
        reg.appendLE(UInt64(0x6000_0000_0000))
        reg.appendLE(UInt64(0))
        #expect(f.client.ack(.addMemReg, reg, fds: [extra.fd]) == 0)
        // Adding it twice overlaps.
        #expect(f.client.ack(.addMemReg, reg, fds: [extra.fd]) == 1)
        // A request whose data lives in the new region.
        let h = f.ram.alloc(16)
        var b = [UInt8]()
        b.appendLE(VirtioBlk.typeGetID)
        b.appendLE(UInt32(0))
        b.appendLE(UInt64(0))
        f.ram.write(b, at: h)
        let st = f.ram.alloc(1)
        let head = f.ring.addChain([.init(gpa: h, length: 16, writable: false), .init(gpa: 0x2_0000_0000, length: 20, writable: true),
                                    .init(gpa: st, length: 1, writable: true)])
        let before = f.ring.usedIndex
        f.ring.publish(head)
        _ = csys_eventfd_signal(f.kick, 1)
        #expect(waitFor { f.ring.usedIndex != before })
        #expect(Array((0..<11).map { extra.host.load(fromByteOffset: $0, as: UInt8.self) }) == Array("SG-BLK-0001".utf8))
        #expect(f.client.ack(.remMemReg, reg) == 0)
        #expect(f.client.ack(.remMemReg, reg) == 1)
    }

    @Test func inflightRegionResubmitsAfterReconnect() throws {
        let f = try BlkFixture()
        var req = [UInt8]()
        req.appendLE(UInt64(0))
        req.appendLE(UInt64(0))
        req.appendLE(UInt16(2))
        req.appendLE(UInt16(16))
        req.appendLE(UInt32(0))
        // Needs INFLIGHT_SHMFD negotiated by the test front-end.
        f.client.send(.setProtocolFeatures, TestFrontEnd.u64(VhostUserProtocolFeature.replyAck | VhostUserProtocolFeature.inflightSharedMemory))
        f.client.send(.getInflightFD, req)
        let reply = try #require(f.client.receive())
        #expect(reply.fds.count == 1)
        let inflightFD = reply.fds[0]
        defer { close(inflightFD) }
        let size = reply.payload.readLE(UInt64.self, at: 0)!
        #expect(size >= 2 * (16 + 16 * 16))
        let set = reply.payload
        #expect(f.client.ack(.setInflightFD, set, fds: [inflightFD]) == 0)
        // Restart ring 0 so that it picks up the region, then leave a write in flight and drop the connection.
        _ = f.client.getVringBase(0)
        f.client.send(.setVringBase, TestFrontEnd.state(0, UInt32(f.ring.availIdx)))
        let kick2 = csys_eventfd(0, 1)
        #expect(f.client.ack(.setVringKick, TestFrontEnd.u64(0), fds: [kick2]) == 0)
        #expect(f.client.ack(.setVringEnable, TestFrontEnd.state(0, 1)) == 0)
        f.channel.hold.store(true, ordering: .releasing)
        let hdr = f.ram.alloc(16)
        var hb = [UInt8]()
        hb.appendLE(VirtioBlk.typeOut)
        hb.appendLE(UInt32(0))
        hb.appendLE(UInt64(40))
        f.ram.write(hb, at: hdr)
        let data = f.ram.alloc(512)
        f.ram.write([UInt8](repeating: 0x5A, count: 512), at: data)
        let st = f.ram.alloc(1)
        let head = f.ring.addChain([.init(gpa: hdr, length: 16, writable: false), .init(gpa: data, length: 512, writable: false),
                                    .init(gpa: st, length: 1, writable: true)])
        f.ring.publish(head)
        _ = csys_eventfd_signal(kick2, 1)
        usleep(50_000)
        #expect(f.ring.usedIndex == 0)
        // The region marks the head in flight.
        let p = mmap(nil, Int(size), PROT_READ, MAP_SHARED, inflightFD, 0)!
        defer { munmap(p, Int(size)) }
        #expect(p.load(fromByteOffset: 16 + 16 * Int(head), as: UInt8.self) == 1)
        // Once the write completes and its used entry is published, the mark is cleared.
        f.channel.releaseHeld()
        #expect(waitFor { f.ring.usedIndex == 1 })
        #expect(waitFor { p.load(fromByteOffset: 16 + 16 * Int(head), as: UInt8.self) == 0 })
        #expect(p.load(fromByteOffset: 14, as: UInt16.self) == 1)  // used_idx recorded
        #expect(f.channel.bytes(40 * 512, 512) == [UInt8](repeating: 0x5A, count: 512))
        close(kick2)
    }
}
