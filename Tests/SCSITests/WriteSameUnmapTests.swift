import BlockIO
@testable import SCSI
import Testing

@Suite struct WriteSameTests {
    static func writeSame10(lba: UInt64, blocks: Int, flags: UInt8 = 0) -> [UInt8] {
        [0x41, flags] + bytesBE32(lba) + [0] + bytesBE16(blocks) + [0]
    }

    static func writeSame16(lba: UInt64, blocks: UInt64, flags: UInt8 = 0) -> [UInt8] {
        [0x93, flags] + bytesBE64(lba) + bytesBE32(blocks) + [0, 0]
    }

    @Test func zeroBlockBecomesWriteZeroes() {
        var h = Harness()
        h.disk.bytes = pattern(h.disk.bytes.count)
        let o = h.run(Self.writeSame10(lba: 2, blocks: 3), dataOut: [UInt8](repeating: 0, count: 512))
        #expect(o.status == .good)
        #expect(o.ops == [.writeZeroes])
        #expect(o.requests[0].offset == 1024 && o.requests[0].length == 1536 && !o.requests[0].mayUnmap)
        #expect(h.disk.bytes[1024 ..< 2560].allSatisfy { $0 == 0 })
        #expect(h.disk.bytes[2560] != 0 || h.disk.bytes[2561] != 0)
        let unmap = h.run(Self.writeSame16(lba: 5, blocks: 2, flags: 0x08), dataOut: [UInt8](repeating: 0, count: 512))
        #expect(unmap.ops == [.writeZeroes] && unmap.requests[0].mayUnmap)
        let ndob = h.run(Self.writeSame16(lba: 5, blocks: 2, flags: 0x09))
        #expect(ndob.status == .good && ndob.ops == [.writeZeroes] && ndob.requests[0].mayUnmap)
    }

    @Test func patternIsReplicated() {
        var h = Harness()
        let block = pattern(512, seed: 4)
        let o = h.run(Self.writeSame10(lba: 1, blocks: 5), dataOut: block, segments: [200])
        #expect(o.status == .good)
        #expect(o.ops == [.write])
        for i in 1 ... 5 { #expect(Array(h.disk.bytes[i * 512 ..< (i + 1) * 512]) == block) }
        #expect(h.disk.bytes[0 ..< 512].allSatisfy { $0 == 0 })
        #expect(h.disk.bytes[3072 ..< 3584].allSatisfy { $0 == 0 })
    }

    @Test func largePatternGoesInChunks() {
        var h = Harness(blocks: 5000)
        let block = pattern(512, seed: 8)
        let o = h.run(Self.writeSame16(lba: 100, blocks: 4500), dataOut: block)
        #expect(o.status == .good)
        #expect(o.requests.map(\.length) == [1 << 20, 1 << 20, UInt64(4500 * 512 - 2 * (1 << 20))])
        #expect(Array(h.disk.bytes[4599 * 512 ..< 4600 * 512]) == block)
        #expect(h.disk.bytes[4600 * 512 ..< 4601 * 512].allSatisfy { $0 == 0 })
    }

    @Test func zeroesWithoutNativeWriteZeroesAreWritten() {
        var h = Harness(writeZeroes: false)
        h.disk.bytes = pattern(h.disk.bytes.count)
        let o = h.run(Self.writeSame16(lba: 0, blocks: 2, flags: 0x01))
        #expect(o.status == .good && o.ops == [.write])
        #expect(h.disk.bytes[0 ..< 1024].allSatisfy { $0 == 0 })
    }

    struct Case: Sendable, CustomStringConvertible {
        var name: String
        var cdb: [UInt8]
        var dataOut = 512
        var readOnly = false
        var discard = true
        var sense: [UInt8]
        var description: String { name }
    }

    static let cases: [Case] = [
        Case(name: "ANCHOR", cdb: writeSame10(lba: 0, blocks: 1, flags: 0x18), sense: invalidCDB(byte: 1, bit: 4)),
        Case(name: "ANCHOR 16", cdb: writeSame16(lba: 0, blocks: 1, flags: 0x10), sense: invalidCDB(byte: 1, bit: 4)),
        Case(name: "NDOB in WRITE SAME(10) is reserved", cdb: writeSame10(lba: 0, blocks: 1, flags: 0x01),
             sense: invalidCDB(byte: 1, bit: 0)),
        Case(name: "zero blocks (WSNZ)", cdb: writeSame10(lba: 0, blocks: 0), sense: invalidCDB(byte: 7)),
        Case(name: "above maximum write same length", cdb: writeSame16(lba: 0, blocks: 0x1_0000), sense: invalidCDB(byte: 10)),
        Case(name: "data-out of two blocks (10)", cdb: writeSame10(lba: 0, blocks: 1), dataOut: 1024, sense: invalidCDB(byte: 7)),
        Case(name: "data-out of two blocks (16)", cdb: writeSame16(lba: 0, blocks: 1, flags: 0x08), dataOut: 1024,
             sense: invalidCDB(byte: 10)),
        Case(name: "data-out of half a block (16)", cdb: writeSame16(lba: 0, blocks: 1), dataOut: 256,
             sense: invalidCDB(byte: 10)),
        Case(name: "past the end", cdb: writeSame10(lba: 60, blocks: 5), sense: lbaOutOfRangeSense),
        Case(name: "no data-out block", cdb: writeSame10(lba: 0, blocks: 1), dataOut: 100, sense: invalidCDB(byte: 7)),
        Case(name: "read-only", cdb: writeSame10(lba: 0, blocks: 1), readOnly: true, sense: writeProtectedSense),
        Case(name: "UNMAP without discard support", cdb: writeSame10(lba: 0, blocks: 1, flags: 0x08), discard: false,
             sense: invalidCDB(byte: 1, bit: 3)),
    ]

    @Test(arguments: cases)
    func rejects(_ c: Case) {
        var h = Harness(readOnly: c.readOnly, discard: c.discard)
        let o = h.run(c.cdb, dataOut: pattern(c.dataOut))
        #expect(o.sense == c.sense)
        #expect(o.requests.isEmpty)
    }
}

@Suite struct UnmapTests {
    static func unmap(_ list: [UInt8], length: Int? = nil, flags: UInt8 = 0) -> [UInt8] {
        [0x42, flags, 0, 0, 0, 0, 0] + bytesBE16(length ?? list.count) + [0]
    }

    static func list(_ ranges: [(UInt64, UInt32)]) -> [UInt8] {
        var l = bytesBE16(6 + 16 * ranges.count) + bytesBE16(16 * ranges.count) + [0, 0, 0, 0]
        for (lba, count) in ranges { l += bytesBE64(lba) + bytesBE32(UInt64(count)) + [0, 0, 0, 0] }
        return l
    }

    @Test func discardsEveryNonEmptyDescriptor() {
        var h = Harness()
        h.disk.bytes = [UInt8](repeating: 0xAB, count: h.disk.bytes.count)
        let l = Self.list([(2, 3), (10, 0), (20, 1)])
        let o = h.run(Self.unmap(l), dataOut: l)
        #expect(o.status == .good)
        #expect(o.ops == [.discard, .discard])
        #expect(o.requests.map(\.offset) == [1024, 10240] && o.requests.map(\.length) == [1536, 512])
        #expect(h.disk.bytes[1024 ..< 2560].allSatisfy { $0 == 0 } && h.disk.bytes[2560] == 0xAB)
        #expect(h.run(Self.unmap([], length: 0)).status == .good)
    }

    struct Case: Sendable, CustomStringConvertible {
        var name: String
        var cdb: [UInt8]
        var dataOut: [UInt8]
        var sense: [UInt8]
        var description: String { name }
    }

    static let oneRange = list([(0, 1)])
    static let cases: [Case] = [
        Case(name: "ANCHOR", cdb: unmap(oneRange, flags: 0x01), dataOut: oneRange, sense: invalidCDB(byte: 1, bit: 0)),
        Case(name: "list shorter than the header", cdb: unmap([0, 0, 0, 0, 0], length: 5), dataOut: [0, 0, 0, 0, 0],
             sense: parameterListLengthSense),
        Case(name: "data-out shorter than the list", cdb: unmap(oneRange), dataOut: Array(oneRange.prefix(12)),
             sense: parameterListLengthSense),
        Case(name: "descriptor length beyond the list", cdb: unmap(oneRange),
             dataOut: bytesBE16(22) + bytesBE16(32) + Array(oneRange[4...]), sense: parameterListLengthSense),
        Case(name: "too many descriptors", cdb: unmap(list(Array(repeating: (0, 1), count: 257))),
             dataOut: list(Array(repeating: (0, 1), count: 257)), sense: invalidParameter(byte: 2)),
        Case(name: "range past the end", cdb: unmap(list([(0, 1), (60, 5)])), dataOut: list([(0, 1), (60, 5)]),
             sense: lbaOutOfRangeSense),
        Case(name: "LBA overflow", cdb: unmap(list([(.max, 2)])), dataOut: list([(.max, 2)]), sense: lbaOutOfRangeSense),
        Case(name: "above maximum unmap LBA count", cdb: unmap(list([(0, 1), (0, 0x10_0001)])),
             dataOut: list([(0, 1), (0, 0x10_0001)]), sense: invalidParameter(byte: 32)),
    ]

    @Test(arguments: cases)
    func rejects(_ c: Case) {
        var h = Harness()
        let o = h.run(c.cdb, dataOut: c.dataOut)
        #expect(o.sense == c.sense)
        #expect(o.requests.isEmpty)
    }

    @Test func unsupportedOrReadOnly() {
        var noDiscard = Harness(discard: false)
        #expect(noDiscard.run(Self.unmap(Self.oneRange), dataOut: Self.oneRange).sense == invalidOpcodeSense)
        var ro = Harness(readOnly: true)
        #expect(ro.run(Self.unmap(Self.oneRange), dataOut: Self.oneRange).sense == writeProtectedSense)
    }

    @Test func discardFailureMapsToSense() {
        var h = Harness()
        h.disk.override = { _ in .failure(5) }
        let l = Self.list([(7, 1)])
        #expect(h.run(Self.unmap(l), dataOut: l).sense == fixedFormatSense(0x03, 0x0C, 0x00, information: 7))
    }
}
