import BlockIO
import CSystem
import SCSI
import Testing
import VhostUser
import Virtio
#if canImport(Glibc)
import Glibc
#endif

/// A request ring stopped while the back-end still owns one of its requests (a slow remote target:
/// the drain gives up after 30 s), then started again by the next front-end with the same queue
/// index: the late completion must go to the old ring, never to the new one.
@Suite(.serialized) struct RingRestartTests {
    /// Starts request ring 2 again on `ring` (fresh driver memory); returns its kick and call fds.
    static func restartRequestRing(_ f: SCSIFixture, _ ring: TestSplitRing) -> (kick: Int32, call: Int32) {
        let c = f.client!
        c.send(.setVringNum, TestFrontEnd.state(2, UInt32(ring.size)))
        c.send(.setVringBase, TestFrontEnd.state(2, 0))
        var addr = [UInt8]()
        addr.appendLE(UInt32(2))
        addr.appendLE(UInt32(0))
        addr.appendLE(f.ram.user(ring.desc))
        addr.appendLE(f.ram.user(ring.used))
        addr.appendLE(f.ram.user(ring.avail))
        addr.appendLE(UInt64(0))
        c.send(.setVringAddr, addr)
        let kick = csys_eventfd(0, 1)
        let call = csys_eventfd(0, 1)
        c.send(.setVringCall, TestFrontEnd.u64(2), fds: [call])
        #expect(c.ack(.setVringKick, TestFrontEnd.u64(2), fds: [kick]) == 0)
        #expect(c.ack(.setVringEnable, TestFrontEnd.state(2, 1)) == 0)
        ring.setUsedEvent(0xFFFF)
        return (kick, call)
    }

    /// Posts INQUIRY on `ring`; returns its head and the data-in address.
    static func postInquiry(_ f: SCSIFixture, _ ring: TestSplitRing, kick: Int32, tag: UInt64) -> (head: UInt16, data: UInt64) {
        var req: [UInt8] = [1, 0, 0x40, 0, 0, 0, 0, 0]
        req.appendLE(tag)
        req += [0, 0, 0]
        req += [0x12, 0, 0, 0, 96, 0] + [UInt8](repeating: 0, count: 26)
        let r = f.ram.alloc(req.count)
        f.ram.write(req, at: r)
        let resp = f.ram.alloc(108)
        let data = f.ram.alloc(96)
        let head = ring.addChain([.init(gpa: r, length: UInt32(req.count), writable: false),
                                  .init(gpa: resp, length: 108, writable: true),
                                  .init(gpa: data, length: 96, writable: true)])
        ring.publish(head)
        _ = csys_eventfd_signal(kick, 1)
        return (head, data)
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
}
