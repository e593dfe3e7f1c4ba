import PVSCSITestSupport
import TestSupport
import VfioUserTestSupport
import Backends
import Gateway
import BlockIO
import CSystem
import PVSCSI
import SCSI
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The gateway's concrete channel enum drives the device directly (it is a BlockChannel).

/// PVSCSI in front of the real SCSI core and the real file back-end (AnyBlockChannel): data written by
/// the guest is byte-identical in the backing file.
@Suite(.serialized) struct FileBackendIntegrationTests {
    @Test func guestWritesLandByteIdenticalInTheBackingFile() throws {
        let dir = "/tmp/scsigate-pvscsi-file-\(getpid())"
        mkdir(dir, 0o700)
        let file = dir + "/lun0.img"
        let sock = dir + "/pvscsi.sock"
        defer { unlink(file); unlink(sock); rmdir(dir) }
        let backend = try AnyBlockBackend.open(BackendSpec(kind: .file, path: file, size: 4 << 20, cache: .writeback, create: true))
        defer { backend.close() }
        let table = SCSITarget(name: "file")
        try table.add(LogicalUnit(number: LogicalUnitNumber(0)!,
                                  identity: LogicalUnitIdentity(serial: "FILE0", naa: 0x5000_0000_0000_00F0),
                                  geometry: backend.geometry, backendID: 0))
        let controller = try PVSCSIController(socketPath: sock, target: table,
                                              channelFactory: { _ in try? backend.makeChannel() }, log: TestLog.quiet)
        try controller.start()
        defer { controller.stop() }
        let client = try VfioUserTestClient(path: sock)
        let g = TestGuest(client: client)
        try g.connect()
        try g.linuxStartup()
        let sense = g.address(page: TestGuest.sensePage)
        var n = 0
        while n < 4 {
            let t = try g.run([GuestRequest(context: 90 + UInt64(n), cdb: [0, 0, 0, 0, 0, 0], senseAddress: sense, senseLength: 96)])
            if t.first?.scsiStatus == 0 { break }
            n += 1
        }
        // 64 KiB from 16 scattered 4 KiB guest pages, FUA, at LBA 2048 (1 MiB).
        var elements: [(UInt64, UInt32, UInt32)] = []
        for i in 0..<16 {
            let page = TestGuest.dataPage + 40 - 2 * i
            let p = g.pointer(g.address(page: page))
            for k in 0..<4096 { p.storeBytes(of: UInt8(truncatingIfNeeded: k &* 31 &+ i &* 7 &+ 3), toByteOffset: k, as: UInt8.self) }
            elements.append((g.address(page: page), 4096, 0))
        }
        g.writeSG(page: TestGuest.sgPage, elements)
        var cdb = write10(lba: 2048, blocks: 128)
        cdb[1] = 0x08  // FUA
        let w = try g.run([GuestRequest(context: 1, cdb: cdb, flags: PVSCSI.flagDirectionToDevice | PVSCSI.flagSGList,
                                        dataAddress: g.address(page: TestGuest.sgPage), dataLength: 65536,
                                        senseAddress: sense, senseLength: 96)])
        #expect(w.first?.scsiStatus == 0 && w.first?.hostStatus == 0)
        let s = try g.run([GuestRequest(context: 2, cdb: [0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], senseAddress: sense, senseLength: 96)])
        #expect(s.first?.scsiStatus == 0)  // SYNCHRONIZE CACHE
        // Compare with the file.
        let fd = open(file, O_RDONLY)
        defer { close(fd) }
        var onDisk = [UInt8](repeating: 0, count: 65536)
        let got = onDisk.withUnsafeMutableBytes { pread(fd, $0.baseAddress, 65536, 1 << 20) }
        #expect(got == 65536)
        var expected: [UInt8] = []
        for e in elements { expected += Array(UnsafeRawBufferPointer(start: g.pointer(e.0), count: 4096)) }
        #expect(onDisk == expected)
        // And back through a read into one buffer.
        let dst = g.address(page: TestGuest.dataPage + 60)
        memset(g.pointer(dst), 0, 65536)
        let r = try g.run([GuestRequest(context: 3, cdb: read10(lba: 2048, blocks: 128), flags: PVSCSI.flagDirectionToHost,
                                        dataAddress: dst, dataLength: 65536, senseAddress: sense, senseLength: 96)])
        #expect(r.first?.dataLength == 65536)
        #expect(Array(UnsafeRawBufferPointer(start: g.pointer(dst), count: 65536)) == expected)
    }
}
