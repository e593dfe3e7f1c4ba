import BlockIO
@testable import SCSI
import Testing

@Suite struct VerifyTests {
    static func verify10(lba: UInt64, blocks: Int, byteCheck: UInt8) -> [UInt8] {
        [0x2F, byteCheck << 1] + bytesBE32(lba) + [0] + bytesBE16(blocks) + [0]
    }

    static func miscompare(_ offset: UInt32) -> [UInt8] { fixedFormatSense(0x0E, 0x1D, 0x00, information: offset) }

    @Test func verifyWithoutByteCheckReadsTheRange() {
        var h = Harness()
        let o = h.run(Self.verify10(lba: 2, blocks: 3, byteCheck: 0))
        #expect(o.status == .good)
        #expect(o.ops == [.read])
        #expect(o.requests[0].offset == 1024 && o.requests[0].length == 1536)
        #expect(h.run(Self.verify10(lba: 62, blocks: 3, byteCheck: 0)).sense == lbaOutOfRangeSense)
        #expect(h.run(Self.verify10(lba: 2, blocks: 0, byteCheck: 0)).requests.isEmpty)
    }

    @Test func verifyByteCheckComparesWithDataOut() {
        var h = Harness()
        h.disk.bytes = pattern(h.disk.bytes.count)
        let expected = Array(h.disk.bytes[1024 ..< 2560])
        #expect(h.run(Self.verify10(lba: 2, blocks: 3, byteCheck: 1), dataOut: expected).status == .good)
        var wrong = expected
        wrong[700] ^= 0xFF
        let o = h.run(Self.verify10(lba: 2, blocks: 3, byteCheck: 1), dataOut: wrong, segments: [100, 1000])
        #expect(o.status == .checkCondition)
        #expect(o.sense == Self.miscompare(700))
        let short = h.run(Self.verify10(lba: 2, blocks: 3, byteCheck: 1), dataOut: Array(expected.prefix(1000)))
        #expect(short.sense == invalidCDB(byte: 7))
        #expect(short.requests.isEmpty)
        #expect(h.run(Self.verify10(lba: 2, blocks: 3, byteCheck: 2), dataOut: expected).sense == invalidCDB(byte: 1, bit: 2))
        #expect(h.run([0x2F, 0x20] + bytesBE32(0) + [0, 0, 1, 0]).sense == invalidCDB(byte: 1, bit: 5))  // VRPROTECT
    }

    @Test func verifySingleBlockAgainstEveryBlock() {
        var h = Harness()
        let block = pattern(512, seed: 3)
        for i in 0 ..< 4 { h.disk.bytes.replaceSubrange((10 + i) * 512 ..< (11 + i) * 512, with: block) }
        #expect(h.run(Self.verify10(lba: 10, blocks: 4, byteCheck: 3), dataOut: block).status == .good)
        h.disk.bytes[12 * 512 + 5] ^= 1
        #expect(h.run(Self.verify10(lba: 10, blocks: 4, byteCheck: 3), dataOut: block).sense == Self.miscompare(1024 + 5))
    }

    @Test func verify16SpansSeveralScratchChunks() {
        var h = Harness(blocks: 5000)
        h.disk.bytes = pattern(h.disk.bytes.count)
        var expected = h.disk.bytes
        let cdb: [UInt8] = [0x8F, 0x02] + bytesBE64(0) + bytesBE32(5000) + [0, 0]
        let good = h.run(cdb, dataOut: expected)
        #expect(good.status == .good)
        #expect(good.requests.map(\.length) == [1 << 20, 1 << 20, UInt64(5000 * 512 - 2 * (1 << 20))])
        expected[2 * (1 << 20) + 3] ^= 0x55
        #expect(h.run(cdb, dataOut: expected).sense == Self.miscompare(UInt32(2 * (1 << 20) + 3)))
    }

    @Test func verifyMediumErrorReportsTheChunkLBA() {
        var h = Harness()
        h.disk.override = { _ in .failure(5) }
        #expect(h.run(Self.verify10(lba: 7, blocks: 2, byteCheck: 0)).sense == fixedFormatSense(0x03, 0x11, 0x00, information: 7))
    }

    @Test func writeAndVerify() {
        var h = Harness()
        let data = pattern(1024, seed: 9)
        let plain = h.run([0x2E, 0x00] + bytesBE32(4) + [0] + bytesBE16(2) + [0], dataOut: data)
        #expect(plain.status == .good)
        #expect(plain.ops == [.write] && plain.requests[0].forceUnitAccess)
        #expect(Array(h.disk.bytes[2048 ..< 3072]) == data)
        let checked = h.run([0x8E, 0x02] + bytesBE64(6) + bytesBE32(2) + [0, 0], dataOut: data)
        #expect(checked.status == .good)
        #expect(checked.ops == [.write, .read])
        // A medium that returns something else than what was written fails the verification.
        h.disk.override = { r in
            guard r.operation == .read else { return nil }
            r.buffers.zero(from: 0, length: Int(r.length))
            return .success(r.length)
        }
        let bad = h.run([0x2E, 0x02] + bytesBE32(8) + [0] + bytesBE16(2) + [0], dataOut: data)
        #expect(bad.sense == Self.miscompare(0))
        var ro = Harness(readOnly: true)
        #expect(ro.run([0x2E, 0x00] + bytesBE32(4) + [0] + bytesBE16(2) + [0], dataOut: data).sense == writeProtectedSense)
        #expect(h.run([0x2E, 0x04] + bytesBE32(4) + [0] + bytesBE16(2) + [0], dataOut: data).sense == invalidCDB(byte: 1, bit: 2))
    }

    static func compareAndWrite(lba: UInt64, blocks: UInt8, flags: UInt8 = 0) -> [UInt8] {
        [0x89, flags] + bytesBE64(lba) + [0, 0, 0, blocks, 0, 0]
    }

    @Test func compareAndWriteWritesWhenEqual() {
        var h = Harness()
        let old = pattern(512, seed: 1)
        let new = pattern(512, seed: 2)
        h.disk.bytes.replaceSubrange(4 * 512 ..< 5 * 512, with: old)
        let o = h.run(Self.compareAndWrite(lba: 4, blocks: 1), dataOut: old + new, segments: [300])
        #expect(o.status == .good)
        #expect(o.ops == [.read, .write])
        #expect(!o.requests[1].forceUnitAccess)
        #expect(Array(h.disk.bytes[4 * 512 ..< 5 * 512]) == new)
        let fua = h.run(Self.compareAndWrite(lba: 4, blocks: 1, flags: 0x08), dataOut: new + old)
        #expect(fua.status == .good && fua.requests[1].forceUnitAccess)
    }

    @Test func compareAndWriteMiscompareReportsTheOffset() {
        var h = Harness()
        let old = pattern(1024, seed: 1)
        h.disk.bytes.replaceSubrange(10 * 512 ..< 12 * 512, with: old)
        var compare = old
        compare[600] ^= 0x10
        let o = h.run(Self.compareAndWrite(lba: 10, blocks: 2), dataOut: compare + pattern(1024, seed: 5))
        #expect(o.status == .checkCondition)
        #expect(o.sense == [0xF0, 0, 0x0E, 0, 0, 0x02, 0x58, 10, 0, 0, 0, 0, 0x1D, 0x00, 0, 0, 0, 0])
        #expect(o.ops == [.read])
        #expect(Array(h.disk.bytes[10 * 512 ..< 12 * 512]) == old)
    }

    @Test func compareAndWritesOfOneUnitAreSerialised() {
        let h = Harness()
        var view = LUNMapView()
        let data = IOBuffer(size: 1024, fill: 0)
        func start() -> (SCSITask, TaskDisposition) {
            var task = SCSITask(nexus: Harness.nexus, lun: LogicalUnitNumber(0), tag: 1,
                                cdb: CDB(Self.compareAndWrite(lba: 0, blocks: 1)), dataOut: data.list)
            let d = h.target.execute(&task, view: &view)
            return (task, d)
        }
        var (first, d1) = start()
        guard case let .submit(read) = d1 else {
            Issue.record("no read")
            return
        }
        var (second, d2) = start()
        guard case .complete = d2 else {
            Issue.record("second COMPARE AND WRITE was not refused")
            return
        }
        #expect(second.status == .busy && second.sense.length == 0)
        // The first one finishes (compare equal on a zeroed disk, then write): the next one may run.
        d1 = h.target.resume(&first, with: h.disk.perform(read))
        guard case let .submit(write) = d1 else {
            Issue.record("no write")
            return
        }
        guard case .complete = h.target.resume(&first, with: h.disk.perform(write)) else {
            Issue.record("no completion")
            return
        }
        #expect(first.status == .good)
        (second, d2) = start()
        guard case let .submit(again) = d2 else {
            Issue.record("third COMPARE AND WRITE did not start")
            return
        }
        // A failing read releases the exclusion too.
        _ = h.target.resume(&second, with: .failure(5))
        #expect(second.sense.array == fixedFormatSense(0x03, 0x11, 0x00, information: 0))
        #expect(again.operation == .read)
        var (third, d3) = start()
        if case .submit = d3 { _ = h.target.resume(&third, with: .failure(5)) } else { Issue.record("exclusion leaked") }
        withExtendedLifetime(data) {}
    }

    @Test func compareAndWriteFieldChecks() {
        var h = Harness()
        #expect(h.run(Self.compareAndWrite(lba: 0, blocks: 129), dataOut: pattern(129 * 1024)).sense == invalidCDB(byte: 13))
        #expect(h.run(Self.compareAndWrite(lba: 0, blocks: 2), dataOut: pattern(1536)).sense == invalidCDB(byte: 13))
        #expect(h.run(Self.compareAndWrite(lba: 63, blocks: 2), dataOut: pattern(2048)).sense == lbaOutOfRangeSense)
        #expect(h.run(Self.compareAndWrite(lba: 0, blocks: 0)).requests.isEmpty)
        #expect(h.run(Self.compareAndWrite(lba: 0, blocks: 1, flags: 0x20), dataOut: pattern(1024)).sense ==
                invalidCDB(byte: 1, bit: 5))
        var ro = Harness(readOnly: true)
        #expect(ro.run(Self.compareAndWrite(lba: 0, blocks: 1), dataOut: pattern(1024)).sense == writeProtectedSense)
    }
}
