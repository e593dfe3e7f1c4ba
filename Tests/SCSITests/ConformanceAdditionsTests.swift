import BlockIO
import Glibc
@testable import SCSI
import Testing

/// VERIFY(12), WRITE AND VERIFY(12), PRE-FETCH(10/16), READ DEFECT DATA(10/12).
@Suite struct TwelveByteVerifyTests {
    static func verify12(lba: UInt64, blocks: UInt64, flags: UInt8 = 0) -> [UInt8] {
        [0xAF, flags] + bytesBE32(lba) + bytesBE32(blocks) + [0, 0]
    }

    static func writeAndVerify12(lba: UInt64, blocks: UInt64, flags: UInt8 = 0) -> [UInt8] {
        [0xAE, flags] + bytesBE32(lba) + bytesBE32(blocks) + [0, 0]
    }

    @Test func verify12ReadsAndCompares() {
        var h = Harness()
        h.disk.bytes = pattern(h.disk.bytes.count)
        let plain = h.run(Self.verify12(lba: 4, blocks: 2))
        #expect(plain.status == .good && plain.ops == [.read])
        #expect(plain.requests[0].offset == 2048 && plain.requests[0].length == 1024)
        var expected = Array(h.disk.bytes[2048 ..< 3072])
        #expect(h.run(Self.verify12(lba: 4, blocks: 2, flags: 0x02), dataOut: expected).status == .good)
        expected[600] ^= 0x01
        #expect(h.run(Self.verify12(lba: 4, blocks: 2, flags: 0x02), dataOut: expected).sense
            == fixedFormatSense(0x0E, 0x1D, 0x00, information: 600))
        #expect(h.run(Self.verify12(lba: 4, blocks: 0)).requests.isEmpty)
        #expect(h.run(Self.verify12(lba: 63, blocks: 2)).sense == lbaOutOfRangeSense)
        #expect(h.run(Self.verify12(lba: 0, blocks: 1, flags: 0x04), dataOut: expected).sense == invalidCDB(byte: 1, bit: 2))
        #expect(h.run(Self.verify12(lba: 0, blocks: 1, flags: 0x20)).sense == invalidCDB(byte: 1, bit: 5))  // VRPROTECT
        #expect(h.run([0xAF, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0x20, 0]).sense == invalidCDB(byte: 10, bit: 5))
    }

    @Test func writeAndVerify12WritesThroughAndChecks() {
        var h = Harness()
        let data = pattern(1536, seed: 9)
        let o = h.run(Self.writeAndVerify12(lba: 3, blocks: 3, flags: 0x02), dataOut: data)
        #expect(o.status == .good)
        #expect(o.ops == [.write, .read])
        #expect(o.requests[0].offset == 1536 && o.requests[0].length == 1536 && o.requests[0].forceUnitAccess)
        #expect(Array(h.disk.bytes[1536 ..< 3072]) == data)
        let noCheck = h.run(Self.writeAndVerify12(lba: 0, blocks: 1), dataOut: pattern(512))
        #expect(noCheck.status == .good && noCheck.ops == [.write])
        #expect(h.run(Self.writeAndVerify12(lba: 62, blocks: 3), dataOut: pattern(1536)).sense == lbaOutOfRangeSense)
        #expect(h.run(Self.writeAndVerify12(lba: 0, blocks: 1, flags: 0x08), dataOut: pattern(512)).sense
            == invalidCDB(byte: 1, bit: 3))
        var readOnly = Harness(readOnly: true)
        #expect(readOnly.run(Self.writeAndVerify12(lba: 0, blocks: 1), dataOut: pattern(512)).sense == writeProtectedSense)
    }
}

@Suite struct PreFetchTests {
    static func preFetch10(lba: UInt64, blocks: Int, flags: UInt8 = 0, group: UInt8 = 0) -> [UInt8] {
        [0x34, flags] + bytesBE32(lba) + [group] + bytesBE16(blocks) + [0]
    }

    static func preFetch16(lba: UInt64, blocks: UInt64, flags: UInt8 = 0, group: UInt8 = 0) -> [UInt8] {
        [0x90, flags] + bytesBE64(lba) + bytesBE32(blocks) + [group, 0]
    }

    @Test func rangeIsCheckedAndNothingIsSubmitted() {
        var h = Harness()
        for cdb in [Self.preFetch10(lba: 0, blocks: 64), Self.preFetch10(lba: 63, blocks: 1, flags: 0x02, group: 3),
                    Self.preFetch10(lba: 10, blocks: 0), Self.preFetch16(lba: 60, blocks: 4, flags: 0x02, group: 3)] {
            let o = h.run(cdb)
            #expect(o.status == .good && o.sense.isEmpty && o.requests.isEmpty)
        }
        #expect(h.run(Self.preFetch10(lba: 63, blocks: 2)).sense == lbaOutOfRangeSense)
        #expect(h.run(Self.preFetch16(lba: 65, blocks: 0)).sense == lbaOutOfRangeSense)
        #expect(h.run(Self.preFetch16(lba: .max, blocks: 2)).sense == lbaOutOfRangeSense)
        #expect(h.run(Self.preFetch10(lba: 0, blocks: 1, flags: 0x01)).sense == invalidCDB(byte: 1, bit: 0))
        #expect(h.run(Self.preFetch16(lba: 0, blocks: 1, group: 0x20)).sense == invalidCDB(byte: 14, bit: 5))
    }
}

@Suite struct ReadDefectDataTests {
    @Test func emptyListsInTheRequestedFormat() {
        var h = Harness()
        // (10): REQ_PLIST + REQ_GLIST, short block format.
        let ten = h.run([0x37, 0, 0x18, 0, 0, 0, 0, 0, 32, 0], dataIn: 32)
        #expect(ten.status == .good && ten.data == [0, 0x18, 0, 0])
        #expect(h.run([0x37, 0, 0x05, 0, 0, 0, 0, 0, 32, 0], dataIn: 32).data == [0, 0x05, 0, 0])
        #expect(h.run([0x37, 0, 0x00, 0, 0, 0, 0, 0, 2, 0], dataIn: 32).data == [0, 0])
        // (12): GLIST only, long block format; 8-byte header.
        let twelve = h.run([0xB7, 0x0B, 0, 0, 0, 0] + bytesBE32(64) + [0, 0], dataIn: 64)
        #expect(twelve.status == .good && twelve.data == [0, 0x0B, 0, 0, 0, 0, 0, 0])
        #expect(h.run([0x37, 0, 0x07, 0, 0, 0, 0, 0, 32, 0], dataIn: 32).sense == invalidCDB(byte: 2, bit: 2))
        #expect(h.run([0xB7, 0x07, 0, 0, 0, 0] + bytesBE32(64) + [0, 0], dataIn: 64).sense == invalidCDB(byte: 1, bit: 2))
        #expect(h.run([0x37, 0, 0x20, 0, 0, 0, 0, 0, 32, 0], dataIn: 32).sense == invalidCDB(byte: 2, bit: 5))
    }
}

/// GET LBA STATUS with a back-end allocation query.
@Suite struct GetLBAStatusTests {
    static func getLBAStatus(lba: UInt64, allocation: UInt64 = 24) -> [UInt8] {
        [0x9E, 0x12] + bytesBE64(lba) + bytesBE32(allocation) + [0, 0]
    }

    static func descriptor(_ lba: UInt64, _ blocks: UInt64, _ state: UInt8) -> [UInt8] {
        bytesBE64(lba) + bytesBE32(blocks) + [state, 0, 0, 0]
    }

    /// A 64-block unit whose back-end reports data in bytes [0, 4096) and [8192, 8800), holes elsewhere.
    static func unit(discard: Bool = true) -> (SCSITarget, LogicalUnit) {
        let target = SCSITarget(name: "lbas")
        let geometry = BlockGeometry(logicalBlockSize: 512, physicalBlockSize: 4096, blockCount: 64, readOnly: false,
                                     supportsDiscard: discard, supportsWriteZeroes: true, discardReadsZeroes: true,
                                     volatileWriteCache: true, maxTransferBytes: 0)
        let data: [Range<UInt64>] = [0 ..< 4096, 8192 ..< 8800]
        let unit = LogicalUnit(number: LogicalUnitNumber(0)!, identity: LogicalUnitIdentity(serial: "L", naa: 1),
                               geometry: geometry, backendID: 7, allocationQuery: { offset, length in
            let end = offset + length
            if let r = data.first(where: { $0.contains(offset) }) {
                return AllocationExtent(state: .mapped, length: min(r.upperBound, end) - offset)
            }
            let next = data.map(\.lowerBound).filter { $0 > offset }.min() ?? end
            return AllocationExtent(state: .deallocated, length: min(next, end) - offset)
        })
        try! target.add(unit)
        unit.unitAttentions.clear(for: Harness.nexus)
        return (target, unit)
    }

    static func run(_ target: SCSITarget, _ cdb: [UInt8], dataIn: Int) -> (SCSIStatus, [UInt8], [UInt8]) {
        let buffer = IOBuffer(size: dataIn)
        var view = LUNMapView()
        var task = SCSITask(nexus: Harness.nexus, lun: LogicalUnitNumber(0), tag: 1, cdb: CDB(cdb),
                            dataOut: .empty, dataIn: buffer.list)
        let d = target.execute(&task, view: &view)
        if case .submit = d { Issue.record("GET LBA STATUS must not submit I/O") }
        return (task.status, task.sense.array, buffer.bytes(task.dataInLength))
    }

    @Test func reportsMappedAndDeallocatedExtentsFromTheStartingLBA() {
        let (target, _) = Self.unit()
        let (status, _, data) = Self.run(target, Self.getLBAStatus(lba: 3, allocation: 200), dataIn: 200)
        #expect(status == .good)
        // Blocks 3-7 mapped, 8-15 deallocated, 16-17 mapped (block 17 is partly data), 18-63 deallocated.
        #expect(data == [0, 0, 0, 68, 0, 0, 0, 0] + Self.descriptor(3, 5, 0) + Self.descriptor(8, 8, 1)
                + Self.descriptor(16, 2, 0) + Self.descriptor(18, 46, 1))
        // The allocation length limits the descriptors; the first starts at the requested LBA.
        let (_, _, one) = Self.run(target, Self.getLBAStatus(lba: 9), dataIn: 24)
        #expect(one == [0, 0, 0, 20, 0, 0, 0, 0] + Self.descriptor(9, 7, 1))
        let (_, _, two) = Self.run(target, Self.getLBAStatus(lba: 17, allocation: 40), dataIn: 40)
        #expect(two == [0, 0, 0, 36, 0, 0, 0, 0] + Self.descriptor(17, 1, 0) + Self.descriptor(18, 46, 1))
        let (_, _, cut) = Self.run(target, Self.getLBAStatus(lba: 17, allocation: 30), dataIn: 40)
        #expect(cut == [0, 0, 0, 20, 0, 0, 0, 0] + Self.descriptor(17, 1, 0))
    }

    @Test func fullyProvisionedUnitIsMappedOrUnknown() {
        let (target, _) = Self.unit(discard: false)
        let (_, _, data) = Self.run(target, Self.getLBAStatus(lba: 9, allocation: 100), dataIn: 100)
        #expect(data == [0, 0, 0, 20, 0, 0, 0, 0] + Self.descriptor(9, 55, 0))
        let (_, sense, _) = Self.run(target, Self.getLBAStatus(lba: 64), dataIn: 24)
        #expect(sense == lbaOutOfRangeSense)
    }
}

@Suite struct OrWriteTests {
    static func orWrite16(lba: UInt64, blocks: UInt64, flags: UInt8 = 0) -> [UInt8] {
        [0x8B, flags] + bytesBE64(lba) + bytesBE32(blocks) + [0, 0]
    }

    @Test func orsTheDataIntoTheMedium() {
        var h = Harness()
        h.disk.bytes.replaceSubrange(1024 ..< 2048, with: [UInt8](repeating: 0xA5, count: 1024))
        let o = h.run(Self.orWrite16(lba: 2, blocks: 2), dataOut: [UInt8](repeating: 0x5A, count: 1024), segments: [300])
        #expect(o.status == .good && o.sense.isEmpty)
        #expect(o.ops == [.read, .write])
        #expect(o.requests[1].offset == 1024 && o.requests[1].length == 1024 && !o.requests[1].forceUnitAccess)
        #expect(h.disk.bytes[1024 ..< 2048].allSatisfy { $0 == 0xFF })
        #expect(h.disk.bytes[2048] == 0 && h.disk.bytes[1023] == 0)
        let varied = pattern(512, seed: 3)
        let fua = h.run(Self.orWrite16(lba: 10, blocks: 1, flags: 0x18), dataOut: varied)
        #expect(fua.status == .good && fua.requests[1].forceUnitAccess)
        #expect(Array(h.disk.bytes[5120 ..< 5632]) == varied)
        // The unit's COMPARE AND WRITE exclusion is released: a COMPARE AND WRITE runs afterwards.
        let caw: [UInt8] = [0x89, 0] + bytesBE64(10) + [0, 0, 0, 1, 0, 0]
        #expect(h.run(caw, dataOut: varied + pattern(512, seed: 4)).status == .good)
    }

    @Test func largeTransfersGoInChunks() {
        var h = Harness(blocks: 5000)
        h.disk.bytes = [UInt8](repeating: 0x0F, count: h.disk.bytes.count)
        let o = h.run(Self.orWrite16(lba: 100, blocks: 4500), dataOut: [UInt8](repeating: 0xF0, count: 4500 * 512))
        #expect(o.status == .good)
        let tail = UInt64(4500 * 512 - 2 * (1 << 20))
        #expect(o.ops == [.read, .write, .read, .write, .read, .write])
        #expect(o.requests.map(\.length) == [1 << 20, 1 << 20, 1 << 20, 1 << 20, tail, tail])
        #expect(h.disk.bytes[100 * 512 ..< 4600 * 512].allSatisfy { $0 == 0xFF })
        #expect(h.disk.bytes[99 * 512] == 0x0F && h.disk.bytes[4600 * 512] == 0x0F)
    }

    @Test func errors() {
        var h = Harness()
        #expect(h.run(Self.orWrite16(lba: 63, blocks: 2), dataOut: pattern(1024)).sense == lbaOutOfRangeSense)
        #expect(h.run(Self.orWrite16(lba: .max, blocks: 1), dataOut: pattern(512)).sense == lbaOutOfRangeSense)
        #expect(h.run(Self.orWrite16(lba: 0, blocks: 0)).requests.isEmpty)
        #expect(h.run(Self.orWrite16(lba: 0, blocks: 1, flags: 0x20), dataOut: pattern(512)).sense
            == invalidCDB(byte: 1, bit: 5))  // ORPROTECT
        #expect(h.run(Self.orWrite16(lba: 0, blocks: 2), dataOut: pattern(512)).sense == invalidCDB(byte: 10))
        var ro = Harness(readOnly: true)
        #expect(ro.run(Self.orWrite16(lba: 0, blocks: 1), dataOut: pattern(512)).sense == writeProtectedSense)
        var limited = Harness(maxTransferBytes: 4096)
        #expect(limited.run(Self.orWrite16(lba: 0, blocks: 9), dataOut: pattern(9 * 512)).sense == invalidCDB(byte: 10))
        // A failing read releases the exclusion and reports a medium error at the LBA.
        var failing = Harness()
        failing.disk.override = { $0.operation == .read ? .failure(EIO) : nil }
        let o = failing.run(Self.orWrite16(lba: 5, blocks: 1), dataOut: pattern(512))
        #expect(o.sense == fixedFormatSense(0x03, 0x11, 0x00, information: 5) && o.ops == [.read])
        failing.disk.override = nil
        #expect(failing.run(Self.orWrite16(lba: 5, blocks: 1), dataOut: pattern(512)).status == .good)
    }
}
