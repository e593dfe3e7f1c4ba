import VirtioTestSupport
import VhostUserTestSupport
import BlockIO
import CSystem
import SCSI
import Testing
import VhostUser
import VirtioDevices
import Virtio
#if canImport(Glibc)
import Glibc
#endif

/// A request ring stopped while the back-end still owns one of its requests (a slow remote target:
/// the drain gives up after its timeout), then started again with the same queue index: the late
/// completion is dropped (neither the abandoned ring nor the new one is written), the new ring's
/// requests are unaffected, and the abandoned slots are released once the completion came back.
@Suite(.serialized) struct RingRestartTests {
    /// Starts request ring 2 again on `ring` (fresh driver memory); returns its kick and call fds.
    static func restartRequestRing(_ f: SCSIFixture, _ ring: TestSplitRing) -> (kick: Int32, call: Int32) {
        let fds = f.client!.startRing(2, ring, ram: f.ram)
        ring.setUsedEvent(0xFFFF)
        return fds
    }

    /// Posts INQUIRY on `ring`; returns its head and the data-in address.
    static func postInquiry(_ f: SCSIFixture, _ ring: TestSplitRing, kick: Int32, tag: UInt64) -> (head: UInt16, data: UInt64) {
        let request = f.ram.scsiRequest(tag: tag, cdb: [0x12, 0, 0, 0, 96, 0], inLength: 96)
        let head = ring.addChain(request.buffers)
        ring.publish(head)
        _ = csys_eventfd_signal(kick, 1)
        return (head, request.dataIn)
    }

    @Test func replacingTheCallFDOfARunningRingSignalsTheNewOne() throws {
        let f = try SCSIFixture()
        f.clearUnitAttention()
        let call = csys_eventfd(0, 1)
        defer { close(call) }
        #expect(f.client.ack(.setVringCall, TestFrontEnd.u64(2), fds: [call]) == 0)
        // What was published before the switch may have been signalled on the old fd only.
        #expect(waitFor { csys_wait_readable(call, 0) == 1 })
        var v: UInt64 = 0
        #expect(csys_eventfd_drain(call, &v) >= 0 && v >= 1)
    }

    /// One stuck READ (tag 41) on ring 2, abandoned by GET_VRING_BASE, then ring 2 restarted on `next`.
    /// Returns the old request and the new ring's fds.
    static func abandonAndRestart(_ f: SCSIFixture, oldRing: TestSplitRing, next: TestSplitRing, kick: Int32)
        -> (old: (head: UInt16, resp: UInt64, data: UInt64), fds: (kick: Int32, call: Int32), base: UInt32?) {
        f.channel.hold.store(true, ordering: .releasing)
        let oldUsed = oldRing.usedIndex
        let request = f.ram.scsiRequest(tag: 41, cdb: [0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0], inLength: 4096)
        let (resp, data) = (request.response, request.dataIn)
        let head = oldRing.addChain(request.buffers)
        oldRing.publish(head)
        _ = csys_eventfd_signal(kick, 1)
        #expect(waitFor { f.channel.inFlight == 1 })
        let started = clockSeconds()
        let base = f.client.getVringBase(2)
        #expect(clockSeconds() - started >= 0.25, "GET_VRING_BASE waited for the drain")
        #expect(oldRing.usedIndex == oldUsed)
        let fds = restartRequestRing(f, next)
        return ((head, resp, data), fds, base)
    }

    @Test func lateSCSICompletionAfterRingRestartIsDroppedAndTheNewRingIsUnaffected() throws {
        let f = try SCSIFixture(drainTimeoutMilliseconds: 300)
        f.clearUnitAttention()
        // Sentinel so that a stray 4 KiB write of the dropped READ's data would show.
        f.channel.storage.storeBytes(of: 0xA5, toByteOffset: 0, as: UInt8.self)
        let oldUsed = f.rings[2].usedIndex
        var current = f.rings[2]
        var kick = f.fds[2].kick
        var opened: [Int32] = []
        defer { for fd in opened { close(fd) } }
        // Twice: the second restart needs the task slots the first abandoned ring released.
        for cycle in 0..<2 {
            let next = TestSplitRing(ram: f.ram, size: 32)
            let before = current.usedIndex
            let (old, fds, base) = Self.abandonAndRestart(f, oldRing: current, next: next, kick: kick)
            opened += [fds.kick, fds.call]
            #expect(base == UInt32(cycle == 0 ? oldUsed &+ 1 : 3), "the abandoned READ counts as taken (INQUIRY, READ, READ)")
            #expect(f.channel.abortedTokens.withLock { $0.count } == cycle + 1, "the back-end was asked to abort it")
            #expect(f.log.contains("abandoned"))
            // The new ring works while the old READ is still in the back-end, even with the same tag.
            let p = Self.postInquiry(f, next, kick: fds.kick, tag: 41)
            #expect(waitFor { next.usedIndex == 1 })
            #expect(next.usedElement(0).id == UInt32(p.head))
            let inquiry = f.ram.read(p.data, 8)
            #expect(inquiry[0] == 0 && inquiry[4] > 0, "standard INQUIRY data of a disk, not OVERLAPPED COMMANDS")
            // The back-end finally answers the old READ: dropped, nothing written to either ring.
            f.channel.releaseHeld()
            #expect(waitFor { f.channel.inFlight == 0 })
            usleep(100_000)
            #expect(next.usedIndex == 1, "the late completion was written into the new ring")
            #expect(current.usedIndex == before, "the late completion was written into the abandoned ring")
            #expect(f.ram.read(old.resp, 12) == [UInt8](repeating: 0, count: 12), "the abandoned response was written")
            // A READ on the new ring completes normally.
            let request = f.ram.scsiRequest(tag: 41, cdb: [0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], inLength: 512)
            let (resp, data) = (request.response, request.dataIn)
            let head = next.addChain(request.buffers)
            next.publish(head)
            _ = csys_eventfd_signal(fds.kick, 1)
            #expect(waitFor { next.usedIndex == 2 })
            #expect(next.usedElement(1).id == UInt32(head))
            #expect(f.ram.read(resp, 12)[10] == SCSIStatus.good.rawValue && f.ram.read(resp, 12)[11] == VirtioSCSI.Response.ok.rawValue)
            #expect(f.ram.read(data, 1) == [0xA5])
            current = next
            kick = fds.kick
        }
        #expect(!f.log.contains("no task slots"), "the abandoned ring's task slots were released")
    }

    @Test func lateBlkCompletionAfterRingRestartIsDroppedAndTheNewRingIsUnaffected() throws {
        let f = try BlkFixture(drainTimeoutMilliseconds: 300)
        f.channel.hold.store(true, ordering: .releasing)
        // A WRITE of sector 0 that the back-end keeps.
        let hdr = f.ram.alloc(16)
        f.ram.write([1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], at: hdr)
        let data = f.ram.alloc(512)
        f.ram.write([UInt8](repeating: 0x5A, count: 512), at: data)
        let st = f.ram.alloc(1)
        f.ram.pointer(st).storeBytes(of: 0xFF, as: UInt8.self)
        let head = f.ring.addChain([.init(gpa: hdr, length: 16, writable: false), .init(gpa: data, length: 512, writable: false),
                                    .init(gpa: st, length: 1, writable: true)])
        f.ring.publish(head)
        _ = csys_eventfd_signal(f.kick, 1)
        #expect(waitFor { f.channel.inFlight == 1 })
        let started = clockSeconds()
        #expect(f.client.getVringBase(0) == 1)
        #expect(clockSeconds() - started >= 0.25)
        #expect(f.channel.abortedTokens.withLock { $0.count } == 1)
        // Ring 0 starts again on new driver memory.
        let next = TestSplitRing(ram: f.ram, size: 16)
        let (kick, call) = f.client!.startRing(0, next, ram: f.ram)
        defer { close(kick); close(call) }
        // GET_ID on the new ring while the old WRITE is still held.
        func post(_ type: UInt32, inLength: Int) -> (head: UInt16, status: UInt64, data: UInt64) {
            let h = f.ram.alloc(16)
            var b = [UInt8]()
            b.appendLE(type)
            b.appendLE(UInt32(0))
            b.appendLE(UInt64(0))
            f.ram.write(b, at: h)
            let d = f.ram.alloc(inLength)
            let s = f.ram.alloc(1)
            f.ram.pointer(s).storeBytes(of: 0xFF, as: UInt8.self)
            let id = next.addChain([.init(gpa: h, length: 16, writable: false), .init(gpa: d, length: UInt32(inLength), writable: true),
                                    .init(gpa: s, length: 1, writable: true)])
            next.publish(id)
            _ = csys_eventfd_signal(kick, 1)
            return (id, s, d)
        }
        let id = post(VirtioBlk.typeGetID, inLength: 20)
        #expect(waitFor { next.usedIndex == 1 })
        #expect(next.usedElement(0).id == UInt32(id.head))
        #expect(f.ram.read(id.data, 11) == Array("SG-BLK-0001".utf8))
        f.channel.releaseHeld()
        #expect(waitFor { f.channel.inFlight == 0 })
        usleep(100_000)
        #expect(next.usedIndex == 1, "the late completion was written into the new ring")
        #expect(f.ring.usedIndex == 0, "the late completion was written into the abandoned ring")
        #expect(f.ram.pointer(st).load(as: UInt8.self) == 0xFF, "the abandoned status byte was written")
        // A READ of sector 0 on the new ring.
        let read = post(VirtioBlk.typeIn, inLength: 512)
        #expect(waitFor { next.usedIndex == 2 })
        #expect(next.usedElement(1).id == UInt32(read.head))
        #expect(f.ram.pointer(read.status).load(as: UInt8.self) == VirtioBlk.statusOK)
        #expect(f.ram.read(read.data, 4) == [0x5A, 0x5A, 0x5A, 0x5A])
        // The abandoned ring drained: stopping the new ring is immediate.
        let t = clockSeconds()
        #expect(f.client.getVringBase(0) == 2)
        #expect(clockSeconds() - t < 0.25)
    }
}
