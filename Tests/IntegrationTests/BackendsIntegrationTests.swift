import TestSupport
import VirtioTestSupport
import VhostUserTestSupport
import Backends
import Gateway
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


/// The devices instantiated as the gateway does: over `AnyBlockChannel` with a real file back-end.
@Suite(.serialized) struct BackendsIntegrationTests {
    private func fileBackend(_ name: String) throws -> (AnyBlockBackend, String) {
        let path = "/tmp/sg-vhost-\(name)-\(getpid()).img"
        unlink(path)
        let backend = try AnyBlockBackend.open(BackendSpec(kind: .file, path: path, size: 4 << 20, cache: .writeback, create: true))
        return (backend, path)
    }

    private func readFile(_ path: String, offset: Int, count: Int) -> [UInt8] {
        let fd = open(path, O_RDONLY)
        defer { close(fd) }
        var out = [UInt8](repeating: 0, count: count)
        _ = out.withUnsafeMutableBytes { pread(fd, $0.baseAddress, count, off_t(offset)) }
        return out
    }

    @Test func virtioBlkOverFileBackend() throws {
        let (backend, path) = try fileBackend("blk")
        defer { backend.close(); unlink(path) }
        let log = TestLog()
        let sock = testSocketPath("blkfile")
        let controller = VhostUserBlkController(socketPath: sock, device: try VirtioBlkDevice(geometry: backend.geometry,
                                                    options: VirtioBlkOptions(queues: 1, serial: "FILE"),
                                                    channelFactory: { try backend.makeChannel() }, log: log.logger), log: log.logger)
        try controller.start()
        defer { controller.stop() }
        let ram = TestGuestRAM()
        let ring = TestSplitRing(ram: ram, size: 16)
        let client = try #require(TestFrontEnd(path: sock))
        let fds = client.setUp(ram: ram, rings: [ring], features: VirtioFeature.version1 | vhostUserFeatureProtocolFeatures,
                               protocolFeatures: VhostUserProtocolFeature.replyAck)
        defer { close(fds[0].kick); close(fds[0].call) }
        func request(_ type: UInt32, sector: UInt64, out: [UInt8] = [], inLength: Int = 0) -> (UInt8, UInt64)? {
            let hdr = ram.alloc(16)
            var h = [UInt8]()
            h.appendLE(type); h.appendLE(UInt32(0)); h.appendLE(sector)
            ram.write(h, at: hdr)
            var buffers = [TestSplitRing.Buffer(gpa: hdr, length: 16, writable: false)]
            if !out.isEmpty {
                let d = ram.alloc(out.count, align: 4096)
                ram.write(out, at: d)
                buffers.append(.init(gpa: d, length: UInt32(out.count), writable: false))
            }
            var data: UInt64 = 0
            if inLength > 0 {
                data = ram.alloc(inLength, align: 4096)
                buffers.append(.init(gpa: data, length: UInt32(inLength), writable: true))
            }
            let st = ram.alloc(1)
            buffers.append(.init(gpa: st, length: 1, writable: true))
            let before = ring.usedIndex
            ring.publish(ring.addChain(buffers))
            _ = csys_eventfd_signal(fds[0].kick, 1)
            guard waitFor({ ring.usedIndex != before }) else { return nil }
            return (ram.read(st, 1)[0], data)
        }
        let pattern = (0..<8192).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ 1) }
        #expect(request(VirtioBlk.typeOut, sector: 24, out: pattern)?.0 == VirtioBlk.statusOK)
        #expect(request(VirtioBlk.typeFlush, sector: 0)?.0 == VirtioBlk.statusOK)
        #expect(readFile(path, offset: 24 * 512, count: 8192) == pattern)
        let r = try #require(request(VirtioBlk.typeIn, sector: 24, inLength: 8192))
        #expect(r.0 == VirtioBlk.statusOK)
        #expect(ram.read(r.1, 8192) == pattern)
        var wz = [UInt8]()
        wz.appendLE(UInt64(24)); wz.appendLE(UInt32(8)); wz.appendLE(UInt32(1))
        #expect(request(VirtioBlk.typeWriteZeroes, sector: 0, out: wz)?.0 == VirtioBlk.statusOK)
        #expect(readFile(path, offset: 24 * 512, count: 4096).allSatisfy { $0 == 0 })
        #expect(readFile(path, offset: 32 * 512, count: 4096) == Array(pattern[4096...]))
    }

    @Test func virtioSCSIOverFileBackend() throws {
        let (backend, path) = try fileBackend("scsi")
        defer { backend.close(); unlink(path) }
        let target = SCSITarget(name: "file")
        try target.add(LogicalUnit(number: LogicalUnitNumber(0)!, identity: LogicalUnitIdentity(serial: "F0", naa: 0x5000_0000_0000_00F0),
                                   geometry: backend.geometry, backendID: 7))
        let log = TestLog()
        let sock = testSocketPath("scsifile")
        let controller = VhostUserSCSIController(socketPath: sock, device: try VirtioSCSIDevice(target: target, options: VirtioSCSIOptions(requestQueues: 1),
                                                     channelFactory: { id in
                                                         guard id == 7 else { throw BlockBackendError("no back-end \(id)") }
                                                         return try backend.makeChannel()
                                                     }, log: log.logger), log: log.logger)
        try controller.start()
        defer { controller.stop() }
        let ram = TestGuestRAM()
        let rings = (0..<3).map { _ in TestSplitRing(ram: ram, size: 32) }
        let client = try #require(TestFrontEnd(path: sock))
        let fds = client.setUp(ram: ram, rings: rings, features: VirtioFeature.version1 | vhostUserFeatureProtocolFeatures,
                               protocolFeatures: VhostUserProtocolFeature.replyAck)
        defer { for f in fds { close(f.kick); close(f.call) } }
        func command(_ cdb: [UInt8], out: [UInt8] = [], inLength: Int = 0) -> (status: UInt8, response: UInt8, data: [UInt8])? {
            let request = ram.scsiRequest(tag: 1, cdb: cdb, out: out, inLength: inLength, dataAlign: 4096)
            let (resp, data) = (request.response, request.dataIn)
            let before = rings[2].usedIndex
            rings[2].publish(rings[2].addChain(request.buffers))
            _ = csys_eventfd_signal(fds[2].kick, 1)
            guard waitFor({ rings[2].usedIndex != before }) else { return nil }
            let h = ram.read(resp, 12)
            return (h[10], h[11], inLength > 0 ? ram.read(data, inLength) : [])
        }
        _ = command([0x00, 0, 0, 0, 0, 0])  // consume the power-on unit attention
        let pattern = (0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) }
        let w = try #require(command([0x2A, 0x08, 0, 0, 0, 40, 0, 0, 8, 0], out: pattern))  // WRITE(10) FUA
        #expect(w.status == 0 && w.response == VirtioSCSI.Response.ok.rawValue)
        #expect(readFile(path, offset: 40 * 512, count: 4096) == pattern)
        let r = try #require(command([0x28, 0, 0, 0, 0, 40, 0, 0, 8, 0], inLength: 4096))
        #expect(r.status == 0 && r.data == pattern)
        #expect(command([0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0])?.status == 0)  // SYNCHRONIZE CACHE(10)
    }
}
