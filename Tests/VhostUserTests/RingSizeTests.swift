import TestSupport
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

/// Ring sizes the driver chooses (virtio-mmio: up to the transport's 1024, whatever the controller's
/// `queue_size`): every size the virtio spec allows is accepted up to the limit, the rest refused.
@Suite(.serialized) struct RingSizeTests {
    /// A virtio-scsi device as the gateway builds it for `queue_size = 128`, and a client that has
    /// negotiated `features` and its memory but started no ring.
    private func connect(features: UInt64) throws -> (SCSIFixtureServer, TestFrontEnd) {
        let s = try SCSIFixtureServer()
        let c = try #require(TestFrontEnd(path: s.path))
        c.send(.setFeatures, TestFrontEnd.u64(features))
        c.send(.setProtocolFeatures, TestFrontEnd.u64(VhostUserProtocolFeature.replyAck))
        c.send(.setOwner)
        return (s, c)
    }

    @Test func splitRingsTakeEveryPowerOfTwoUpTo1024() throws {
        let (s, c) = try connect(features: VirtioFeature.version1 | vhostUserFeatureProtocolFeatures)
        for size: UInt32 in [1, 2, 64, 128, 256, 512, 1024] {
            #expect(c.ack(.setVringNum, TestFrontEnd.state(2, size)) == 0, "split ring size \(size)")
        }
        for size: UInt32 in [0, 3, 100, 129, 1000, 1023, 1025, 2048, 32768, 65535] {
            #expect(c.ack(.setVringNum, TestFrontEnd.state(2, size)) == 1, "split ring size \(size)")
        }
        #expect(s.log.contains("ring 2 size 1000 of a split ring is not a power of 2"))
        #expect(s.log.contains("ring 2 size 2048 outside 1...1024"))
        // The connection still works after the refusals.
        #expect(c.ack(.setVringNum, TestFrontEnd.state(0, 1024)) == 0)
    }

    @Test func packedRingsTakeAnySizeUpTo1024() throws {
        let (s, c) = try connect(features: VirtioFeature.version1 | VirtioFeature.ringPacked | vhostUserFeatureProtocolFeatures)
        defer { withExtendedLifetime(s) {} }
        for size: UInt32 in [1, 3, 100, 129, 1000, 1023, 1024] {
            #expect(c.ack(.setVringNum, TestFrontEnd.state(2, size)) == 0, "packed ring size \(size)")
        }
        for size: UInt32 in [0, 1025, 4096, 32768] {
            #expect(c.ack(.setVringNum, TestFrontEnd.state(2, size)) == 1, "packed ring size \(size)")
        }
    }

    /// A 1024-entry ring on a controller laid out for 128: the task slots grow when the ring starts, and
    /// more than 128 commands are in flight at once (held in the back-end), all completing exactly once.
    @Test func aRingLargerThanQueueSizeCarriesMoreThanQueueSizeCommands() throws {
        let f = try SCSIFixture(ringSize: 1024, maxQueueSize: 1024, expectedQueueSize: 128)
        f.clearUnitAttention()
        f.channel.hold.store(true, ordering: .releasing)
        let count = 300
        let before = f.rings[2].usedIndex
        var posted: [(head: UInt16, resp: UInt64)] = []
        for i in 0..<count {
            let lba = UInt8(i % 200)
            let p = f.post(tag: UInt64(100 + i), cdb: [0x2A, 0, 0, 0, 0, lba, 0, 0, 1, 0],
                           out: [UInt8](repeating: UInt8(truncatingIfNeeded: i), count: 512))
            posted.append((p.head, p.resp))
        }
        #expect(waitFor { f.channel.operations.withLock { $0.count } >= count })
        #expect(f.rings[2].usedIndex == before)  // all held in the back-end
        f.channel.releaseHeld()
        f.channel.hold.store(false, ordering: .releasing)
        #expect(waitFor { f.rings[2].usedIndex == before &+ UInt16(count) })
        var heads = Set<UInt32>()
        for i in 0..<count { heads.insert(f.rings[2].usedElement(before &+ UInt16(i)).id) }
        #expect(heads == Set(posted.map { UInt32($0.head) }))
        for p in posted { #expect(f.ram.read(p.resp + 10, 2) == [SCSIStatus.good.rawValue, VirtioSCSI.Response.ok.rawValue]) }
        #expect(!f.log.contains("broken"))
    }
}

/// A LUN added before any driver negotiated (a gateway restarted under a running guest; the CLI was faster than
/// QEMU's reconnect): the guest's first event buffer reports missed events, so that it rescans.
@Test func aLUNEventBeforeAnyDriverIsReportedAsMissed() throws {
    let s = try SCSIFixtureServer()
    try s.target.add(SCSIFixture.unit(3, blocks: 64))
    let ram = TestGuestRAM()
    let rings = (0..<3).map { _ in TestSplitRing(ram: ram, size: 32) }
    let c = try #require(TestFrontEnd(path: s.path))
    let fds = c.setUp(ram: ram, rings: rings, features: VirtioFeature.version1 | vhostUserFeatureProtocolFeatures | VirtioSCSI.featureHotplug,
                      protocolFeatures: VhostUserProtocolFeature.replyAck)
    defer { for f in fds { close(f.kick); close(f.call) } }
    let b = ram.alloc(16)
    rings[1].publish(rings[1].addChain([.init(gpa: b, length: 16, writable: true)]))
    _ = csys_eventfd_signal(fds[1].kick, 1)
    #expect(waitFor { rings[1].usedIndex == 1 })
    #expect(ram.read(b, 16).readLE(UInt32.self, at: 0) == VirtioSCSI.Event.noEvent.rawValue | VirtioSCSI.Event.missedFlag)
}

/// A virtio-scsi device with the gateway's ring-size settings for `queue_size = 128`, serving a socket.
final class SCSIFixtureServer: @unchecked Sendable {
    let target = SCSITarget(name: "vscsi")
    let device: VirtioSCSIDevice<MemoryChannel>
    let server: VhostUserServer<VirtioSCSIDevice<MemoryChannel>>
    let log = TestLog()
    let path = testSocketPath("ringsize")

    init() throws {
        let ch = MemoryChannel(bytes: 1 << 20)
        device = try VirtioSCSIDevice(target: target, options: VirtioSCSIOptions(requestQueues: 1, maxQueueSize: VhostUserWire.maxQueueSize,
                                                                                 expectedQueueSize: 128),
                                      channelFactory: { _ in ch }, log: log.logger)
        server = VhostUserServer(socketPath: path, device: device, log: log.logger)
        try server.start()
    }

    deinit {
        server.stop()
        device.shutdown()
    }
}
