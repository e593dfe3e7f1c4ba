import BlockIO
import Glibc
@testable import SCSI
import Testing

@Suite struct ReadWriteTests {
    @Test func writeThenReadRoundTripsAcrossSegments() {
        var h = Harness()
        let data = pattern(1024)
        let w = h.run(write10(lba: 3, blocks: 2), dataOut: data, segments: [100, 700])
        #expect(w.status == .good)
        #expect(w.sense.isEmpty)
        #expect(w.ops == [.write])
        #expect(w.requests[0].offset == 1536 && w.requests[0].length == 1024 && !w.requests[0].forceUnitAccess)
        #expect(Array(h.disk.bytes[1536 ..< 2560]) == data)
        let r = h.run(read10(lba: 3, blocks: 2), dataIn: 1024, segments: [1, 511, 13])
        #expect(r.status == .good)
        #expect(r.data == data)
        #expect(r.dataInLength == 1024 && r.residual == 0)
    }

    @Test func readAndWriteUseTheTaskBuffersThemselves() {
        let h = Harness()
        var view = LUNMapView()
        let inBuffer = IOBuffer(size: 4096, segments: [512])
        var task = SCSITask(nexus: Harness.nexus, lun: LogicalUnitNumber(0), tag: 9, cdb: CDB(read10(lba: 8, blocks: 8)),
                            dataIn: inBuffer.list)
        guard case let .submit(request) = h.target.execute(&task, view: &view) else {
            Issue.record("READ did not submit")
            return
        }
        #expect(request.buffers.base == inBuffer.iovecs && request.buffers.count == inBuffer.segmentCount)
        #expect(request.operation == .read && request.offset == 4096 && request.length == 4096)
        #expect(task.backendID == 7)
        guard case .complete = h.target.resume(&task, with: .success(4096)) else {
            Issue.record("READ did not complete")
            return
        }
        #expect(task.status == .good && task.dataInLength == 4096)

        let outBuffer = IOBuffer(size: 512)
        var write = SCSITask(nexus: Harness.nexus, lun: LogicalUnitNumber(0), tag: 10,
                             cdb: CDB(write10(lba: 1, blocks: 1, flags: 0x08)), dataOut: outBuffer.list)
        guard case let .submit(wr) = h.target.execute(&write, view: &view) else {
            Issue.record("WRITE did not submit")
            return
        }
        #expect(wr.buffers.base == outBuffer.iovecs && wr.forceUnitAccess && wr.operation == .write)
        withExtendedLifetime((inBuffer, outBuffer)) {}
    }

    struct DecodeCase: Sendable, CustomStringConvertible {
        var name: String
        var cdb: [UInt8]
        var blocks: Int
        var offset: UInt64
        var length: UInt64
        var description: String { name }
    }

    static let decodeCases: [DecodeCase] = [
        DecodeCase(name: "READ(6) LBA 21 bits", cdb: [0x08, 0x01, 0x02, 0x03, 0x03, 0x00], blocks: 0x10203 + 3,
                   offset: 0x10203 * 512, length: 3 * 512),
        DecodeCase(name: "READ(6) length 0 means 256", cdb: [0x08, 0x00, 0x00, 0x10, 0x00, 0x00], blocks: 300,
                   offset: 16 * 512, length: 256 * 512),
        DecodeCase(name: "READ(10)", cdb: read10(lba: 5, blocks: 2, flags: 0x18), blocks: 64, offset: 2560, length: 1024),
        DecodeCase(name: "READ(12)", cdb: [0xA8, 0x02, 0, 0, 0, 9, 0, 0, 0, 3, 0, 0], blocks: 64, offset: 9 * 512, length: 1536),
        DecodeCase(name: "READ(16)", cdb: read16(lba: 0x1_0000_0001, blocks: 1), blocks: 0x1_0000_0002,
                   offset: 0x1_0000_0001 * 512, length: 512),
    ]

    @Test(arguments: decodeCases)
    func readDecodesLBAAndLength(_ c: DecodeCase) {
        let h = Harness(blocks: UInt64(c.blocks))
        var view = LUNMapView()
        let inBuffer = IOBuffer(size: 256 * 512)
        var task = SCSITask(nexus: Harness.nexus, lun: LogicalUnitNumber(0), tag: 1, cdb: CDB(c.cdb), dataIn: inBuffer.list)
        guard case let .submit(r) = h.target.execute(&task, view: &view) else {
            Issue.record("no submit: sense \(task.sense.array)")
            return
        }
        #expect(r.offset == c.offset && r.length == c.length)
        withExtendedLifetime(inBuffer) {}
    }

    @Test func shortDataInBufferTransfersWholeBlocksAndReportsResidual() {
        var h = Harness()
        h.disk.bytes = pattern(h.disk.bytes.count)
        let r = h.run(read10(lba: 0, blocks: 4), dataIn: 1792)
        #expect(r.status == .good)
        #expect(r.dataInLength == 1536 && r.residual == 256)
        #expect(r.requests[0].length == 1536)
        #expect(r.data == Array(h.disk.bytes[0 ..< 1536]))
        let big = h.run(read10(lba: 1, blocks: 1), dataIn: 1024)
        #expect(big.dataInLength == 512 && big.residual == 512)
        let tiny = h.run(read10(lba: 1, blocks: 1), dataIn: 100)
        #expect(tiny.status == .good && tiny.dataInLength == 0 && tiny.residual == 100 && tiny.requests.isEmpty)
    }

    struct ErrorCase: Sendable, CustomStringConvertible {
        var name: String
        var cdb: [UInt8]
        var dataOut: Int = 0
        var readOnly = false
        var sense: [UInt8]
        var description: String { name }
    }

    static let errorCases: [ErrorCase] = [
        ErrorCase(name: "READ(10) past the end", cdb: read10(lba: 63, blocks: 2), sense: lbaOutOfRangeSense),
        ErrorCase(name: "READ(10) zero blocks past the end", cdb: read10(lba: 65, blocks: 0), sense: lbaOutOfRangeSense),
        ErrorCase(name: "READ(16) LBA + length overflows", cdb: read16(lba: .max, blocks: 2), sense: lbaOutOfRangeSense),
        ErrorCase(name: "WRITE(16) LBA + length overflows", cdb: write16(lba: .max - 1, blocks: 4), dataOut: 2048,
                  sense: lbaOutOfRangeSense),
        ErrorCase(name: "READ(6) past the end", cdb: [0x08, 0, 0, 63, 2, 0], sense: lbaOutOfRangeSense),
        ErrorCase(name: "RDPROTECT", cdb: read10(lba: 0, blocks: 1, flags: 0x20), sense: invalidCDB(byte: 1, bit: 5)),
        ErrorCase(name: "WRPROTECT", cdb: write10(lba: 0, blocks: 1, flags: 0xE0), dataOut: 512, sense: invalidCDB(byte: 1, bit: 7)),
        ErrorCase(name: "READ(10) reserved bit 2", cdb: read10(lba: 0, blocks: 1, flags: 0x04), sense: invalidCDB(byte: 1, bit: 2)),
        ErrorCase(name: "NACA", cdb: read10(lba: 0, blocks: 1, control: 0x04), sense: invalidCDB(byte: 9, bit: 2)),
        ErrorCase(name: "READ(6) NACA", cdb: [0x08, 0, 0, 0, 1, 0x04], sense: invalidCDB(byte: 5, bit: 2)),
        ErrorCase(name: "group number reserved bits", cdb: [0x28, 0, 0, 0, 0, 0, 0x20, 0, 1, 0], sense: invalidCDB(byte: 6, bit: 5)),
        ErrorCase(name: "WRITE(10) data-out shorter than the transfer", cdb: write10(lba: 0, blocks: 2), dataOut: 512,
                  sense: invalidCDB(byte: 7)),
        ErrorCase(name: "WRITE(6) data-out missing", cdb: [0x0A, 0, 0, 0, 1, 0], sense: invalidCDB(byte: 4)),
        ErrorCase(name: "WRITE(10) read-only", cdb: write10(lba: 0, blocks: 1), dataOut: 512, readOnly: true, sense: writeProtectedSense),
        ErrorCase(name: "WRITE(6) read-only", cdb: [0x0A, 0, 0, 0, 1, 0], dataOut: 512, readOnly: true, sense: writeProtectedSense),
        ErrorCase(name: "WRITE(12) read-only", cdb: [0xAA, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0], dataOut: 512, readOnly: true,
                  sense: writeProtectedSense),
        ErrorCase(name: "WRITE(16) read-only", cdb: write16(lba: 0, blocks: 1), dataOut: 512, readOnly: true, sense: writeProtectedSense),
    ]

    @Test(arguments: errorCases)
    func errorPaths(_ c: ErrorCase) {
        var h = Harness(readOnly: c.readOnly)
        let o = h.run(c.cdb, dataOut: pattern(c.dataOut), dataIn: 4096)
        #expect(o.status == .checkCondition)
        #expect(o.sense == c.sense)
        #expect(o.requests.isEmpty)
        #expect(o.dataInLength == 0)
    }

    @Test func zeroLengthTransfersCompleteWithoutIO() {
        var h = Harness()
        for cdb in [read10(lba: 64, blocks: 0), write10(lba: 3, blocks: 0), read16(lba: 0, blocks: 0)] {
            let o = h.run(cdb, dataIn: 512)
            #expect(o.status == .good && o.requests.isEmpty && o.dataInLength == 0)
        }
    }

    @Test func readOnlyUnitStillReads() {
        var h = Harness(readOnly: true)
        let o = h.run(read10(lba: 0, blocks: 1), dataIn: 512)
        #expect(o.status == .good && o.dataInLength == 512)
    }

    @Test func fuaAndWriteCacheDisabledForceUnitAccess() {
        var h = Harness()
        #expect(h.run(write10(lba: 0, blocks: 1, flags: 0x08), dataOut: pattern(512)).requests[0].forceUnitAccess)
        #expect(!h.run(write10(lba: 0, blocks: 1, flags: 0x10), dataOut: pattern(512)).requests[0].forceUnitAccess)
        #expect(h.run(write16(lba: 0, blocks: 1, flags: 0x08), dataOut: pattern(512)).requests[0].forceUnitAccess)
        var mode = h.unit.mode
        mode.writeCacheEnabled = false
        h.unit.setMode(mode)
        #expect(h.run(write10(lba: 0, blocks: 1), dataOut: pattern(512)).requests[0].forceUnitAccess)
        #expect(h.run([0x0A, 0, 0, 0, 1, 0], dataOut: pattern(512)).requests[0].forceUnitAccess)
        // A back-end without a volatile cache never needs FUA forced.
        var plain = Harness(volatileCache: false)
        #expect(!plain.run(write10(lba: 0, blocks: 1), dataOut: pattern(512)).requests[0].forceUnitAccess)
    }

    @Test func maximumTransferLengthIsEnforced() {
        var h = Harness(maxTransferBytes: 4096)
        let o = h.run(read10(lba: 0, blocks: 9), dataIn: 9 * 512)
        #expect(o.sense == invalidCDB(byte: 7))
        #expect(h.run(read10(lba: 0, blocks: 8), dataIn: 8 * 512).status == .good)
    }

    @Test func synchronizeCacheFlushes() {
        var h = Harness()
        let ten = h.run([0x35, 0x02, 0, 0, 0, 0, 0, 0, 0, 0])
        #expect(ten.status == .good && ten.ops == [.flush])
        let sixteen = h.run([0x91, 0] + bytesBE64(10) + bytesBE32(54) + [0, 0])
        #expect(sixteen.status == .good && sixteen.ops == [.flush])
        let beyond = h.run([0x91, 0] + bytesBE64(10) + bytesBE32(55) + [0, 0])
        #expect(beyond.sense == lbaOutOfRangeSense && beyond.requests.isEmpty)
        let reserved = h.run([0x35, 0x01, 0, 0, 0, 0, 0, 0, 0, 0])
        #expect(reserved.sense == invalidCDB(byte: 1, bit: 0))
    }

    @Test func shortReadFromTheBackEndIsLBAOutOfRange() {
        var h = Harness()
        h.disk.override = { r in r.operation == .read ? .success(512) : nil }
        let o = h.run(read10(lba: 10, blocks: 2), dataIn: 1024)
        #expect(o.status == .checkCondition)
        #expect(o.sense == fixedFormatSense(0x05, 0x21, 0x00, information: 11))
        #expect(o.dataInLength == 512)
    }

    @Test func shortWriteIsNeverGood() {
        var h = Harness()
        h.disk.override = { r in r.operation == .write ? .success(512) : nil }
        let o = h.run(write10(lba: 10, blocks: 2), dataOut: pattern(1024))
        #expect(o.status == .checkCondition)
        #expect(o.sense == fixedFormatSense(0x03, 0x0C, 0x00, information: 11))
    }
}
