import VirtioTestSupport
import CSystem
import VhostUser
import VirtioDevices
import Virtio
#if canImport(Glibc)
import Glibc
#endif

/// A virtio-scsi guest driver in miniature: the control, event and request queues of a connected test front-end.
public final class TestSCSIGuest {
    public let ram: TestGuestRAM
    public let rings: [TestSplitRing]
    public let fds: [(kick: Int32, call: Int32)]
    public let client: TestFrontEnd
    private var nextTag: UInt64 = 0

    public init?(socket: String, requestQueues: Int) {
        let ram = TestGuestRAM(size: 32 << 20)
        self.ram = ram
        rings = (0..<(2 + requestQueues)).map { _ in TestSplitRing(ram: ram, size: 32) }
        guard let client = TestFrontEnd(path: socket) else { return nil }
        self.client = client
        fds = client.setUp(ram: ram, rings: rings, features: VirtioFeature.version1 | vhostUserFeatureProtocolFeatures,
                           protocolFeatures: VhostUserProtocolFeature.replyAck)
    }

    deinit { for f in fds { close(f.kick); close(f.call) } }

    public struct Pending {
        public var ring: Int
        public var usedBefore: UInt16
        public var response: UInt64
        public var data: UInt64
        public var inLength: Int
    }

    /// Publishes a command on request queue `queue` (0-based) and kicks it.
    public func send(_ cdb: [UInt8], lun: Int, queue: Int, out: [UInt8] = [], inLength: Int = 0) -> Pending {
        let ringIndex = 2 + queue
        let ring = rings[ringIndex]
        nextTag += 1
        let request = ram.scsiRequest(lun: [1, 0, 0x40, UInt8(lun), 0, 0, 0, 0], tag: nextTag, cdb: cdb, out: out,
                                      inLength: inLength, dataAlign: 4096)
        let before = ring.usedIndex
        ring.publish(ring.addChain(request.buffers))
        _ = csys_eventfd_signal(fds[ringIndex].kick, 1)
        return Pending(ring: ringIndex, usedBefore: before, response: request.response, data: request.dataIn, inLength: inLength)
    }

    /// Waits for the answer of `p`: (SCSI status, virtio response, sense key, data-in).
    public func wait(_ p: Pending) -> (status: UInt8, response: UInt8, senseKey: UInt8, data: [UInt8])? {
        guard waitFor({ rings[p.ring].usedIndex != p.usedBefore }) else { return nil }
        let h = ram.read(p.response, 15)
        return (h[10], h[11], h[12 + 2] & 0x0F, p.inLength > 0 ? ram.read(p.data, p.inLength) : [])
    }

    public func command(_ cdb: [UInt8], lun: Int, queue: Int, out: [UInt8] = [], inLength: Int = 0)
        -> (status: UInt8, response: UInt8, senseKey: UInt8, data: [UInt8])? {
        wait(send(cdb, lun: lun, queue: queue, out: out, inLength: inLength))
    }
}
