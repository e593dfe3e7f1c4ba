import TestSupport
import VirtioTestSupport
import VhostUserTestSupport
import BlockIO
import CSystem
import Foundation
import SCSI
import Testing
import VhostUser
import VirtioDevices
import Virtio
#if canImport(Glibc)
import Glibc
#endif

/// A hostile guest keeps every request queue full of maximum-size descriptor chains (indirect tables as long
/// as a request slot holds) against a back-end that holds every request, then lets them complete and
/// refills, round after round. The gateway's memory must stay bounded: its per-queue storage is allocated
/// when a ring starts and nothing grows per request or per round.
@Suite(.serialized) struct HostileMemoryTests {
    static func residentKiB() -> Int {
        guard let text = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8) else { return 0 }
        for line in text.split(separator: "\n") where line.hasPrefix("VmRSS:") {
            return Int(line.split(separator: " ").dropFirst().first ?? "0") ?? 0
        }
        return 0
    }

    struct Figures: CustomStringConvertible {
        var queues = 0, ringSize = 0, segments = 0
        var before = 0, started = 0, full = 0, afterRounds: [Int] = []
        var description: String {
            "\(queues) queue(s) x \(ringSize) chains of \(segments) segments: RSS before \(before) KiB, rings started \(started) KiB, "
                + "full \(full) KiB, after each refill round \(afterRounds) KiB"
        }
    }

    /// Runs `rounds` fill/hold/release rounds on `queues` request queues of `ringSize` entries.
    func measure(queues: Int, ringSize: Int, rounds: Int) throws -> Figures {
        var figures = Figures(queues: queues, ringSize: ringSize)
        figures.before = Self.residentKiB()
        let segments = ringSize + 8  // what a request slot holds (Server.startRing)
        figures.segments = segments
        let dataSegments = segments - 2
        let ram = TestGuestRAM(size: 32 << 20)
        let rings = (0 ..< 2 + queues).map { _ in TestSplitRing(ram: ram, size: ringSize) }
        // Each request: its own header (a tag unique on the nexus) in its own indirect table, then
        // `dataSegments` 512-byte data-out buffers (all the same guest page: a guest may alias) and the response.
        let blocks = dataSegments
        let page = ram.alloc(512)
        let response = ram.alloc(108)
        for (q, ring) in rings.dropFirst(2).enumerated() {
            for slot in 0 ..< ringSize {
                let header = ram.alloc(51)
                var bytes: [UInt8] = [1, 0, 0x40, 0, 0, 0, 0, 0]
                bytes.appendLE(UInt64(q * ringSize + slot))
                bytes += [0, 0, 0, 0x2A, 0, 0, 0, 0, 0, 0, UInt8(blocks >> 8), UInt8(blocks & 0xFF), 0] + [UInt8](repeating: 0, count: 22)
                ram.write(bytes, at: header)
                var buffers = [TestSplitRing.Buffer(gpa: header, length: 51, writable: false)]
                buffers += [TestSplitRing.Buffer](repeating: .init(gpa: page, length: 512, writable: false), count: dataSegments)
                buffers.append(.init(gpa: response, length: 108, writable: true))
                let table = ram.alloc(16 * buffers.count, align: 16)
                for (k, b) in buffers.enumerated() {
                    let d = ram.pointer(table) + 16 * k
                    d.storeBytes(of: b.gpa, as: UInt64.self)
                    d.storeBytes(of: b.length, toByteOffset: 8, as: UInt32.self)
                    d.storeBytes(of: (k == buffers.count - 1 ? 0 : 1) | (b.writable ? 2 : 0) as UInt16, toByteOffset: 12, as: UInt16.self)
                    d.storeBytes(of: UInt16(k + 1), toByteOffset: 14, as: UInt16.self)
                }
                ring.setDescriptor(slot, addr: table, len: UInt32(16 * buffers.count), flags: 4, next: 0)
            }
        }

        let target = SCSITarget(name: "hostile")
        try target.add(LogicalUnit(number: LogicalUnitNumber(0)!, identity: LogicalUnitIdentity(serial: "H0", naa: 0x5000_0000_0000_0001),
                                   geometry: BlockGeometry(logicalBlockSize: 512, physicalBlockSize: 512, blockCount: 4096), backendID: 0))
        let channel = MemoryChannel(bytes: 2 << 20)
        channel.hold.store(true, ordering: .releasing)
        let log = TestLog()
        let path = testSocketPath("hostile")
        let device = try VirtioSCSIDevice(target: target, options: VirtioSCSIOptions(requestQueues: queues, maxQueueSize: ringSize,
                                                                                     maxSegments: dataSegments, watchdogMilliseconds: 0),
                                          channelFactory: { _ in channel }, log: log.logger)
        let server = VhostUserServer(socketPath: path, device: device, log: log.logger)
        try server.start()
        defer {
            server.stop()
            device.shutdown()
        }
        let client = try #require(TestFrontEnd(path: path))
        let fds = client.setUp(ram: ram, rings: rings, features: VirtioFeature.version1 | VirtioFeature.ringIndirectDescriptors | vhostUserFeatureProtocolFeatures,
                               protocolFeatures: VhostUserProtocolFeature.replyAck | VhostUserProtocolFeature.multiQueue)
        defer { for f in fds { close(f.kick); close(f.call) } }
        figures.started = Self.residentKiB()
        let requestRings = Array(rings.dropFirst(2))
        let perRound = queues * ringSize
        for round in 1 ... rounds {
            channel.hold.store(true, ordering: .releasing)
            channel.operations.withLock { $0.removeAll(keepingCapacity: true) }
            for (q, ring) in requestRings.enumerated() {
                for slot in 0 ..< ringSize { ring.publish(UInt16(slot)) }
                _ = csys_eventfd_signal(fds[2 + q].kick, 1)
            }
            // Every request reached the back-end and is held there: every queue is full.
            // (In round 1 the nexus's first command gets the power-on unit attention instead.)
            let expected = perRound - (round == 1 ? 1 : 0)
            let submitted = waitFor(seconds: 60) { channel.operations.withLock { $0.count } >= expected }
            #expect(submitted, "round \(round): \(channel.operations.withLock { $0.count }) of \(expected) requests reached the back-end")
            if round == 1 { figures.full = Self.residentKiB() }
            channel.releaseHeld()
            let completed = waitFor(seconds: 60) { requestRings.allSatisfy { $0.usedIndex == UInt16(truncatingIfNeeded: ringSize * round) } }
            #expect(completed, "round \(round): not every request completed")
            figures.afterRounds.append(Self.residentKiB())
        }
        #expect(!log.contains("broken"))
        return figures
    }

    /// The bound: once the queues have been full once, further rounds of full queues add nothing that
    /// grows (a per-request leak of even 64 bytes would add several MiB over these rounds).
    @Test(arguments: [(1, 128), (64, 128)])
    func fullQueuesOfMaximumChainsStayBounded(_ queues: Int, _ ringSize: Int) throws {
        let f = try measure(queues: queues, ringSize: ringSize, rounds: 6)
        print("hostile-memory: \(f)")
        let growth = f.afterRounds.last! - f.afterRounds[1]
        #expect(growth < 8 * 1024, "RSS grew \(growth) KiB over \(f.afterRounds.count - 2) rounds of full queues: \(f)")
    }
}
