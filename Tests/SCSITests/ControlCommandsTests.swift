import BlockIO
@testable import SCSI
import Testing

func makeTestUnit(_ lun: Int, blocks: UInt64 = 64) -> LogicalUnit {
    LogicalUnit(number: LogicalUnitNumber(lun)!, identity: LogicalUnitIdentity(serial: "S\(lun)", naa: UInt64(lun)),
                geometry: BlockGeometry(logicalBlockSize: 512, physicalBlockSize: 512, blockCount: blocks), backendID: lun)
}

@Suite struct ReportLUNsTests {
    static func reportLUNs(select: UInt8 = 0, allocation: UInt64 = 4096) -> [UInt8] {
        [0xA0, 0, select, 0, 0, 0] + bytesBE32(allocation) + [0, 0]
    }

    static let threeLUNs: [UInt8] = [0, 0, 0, 24, 0, 0, 0, 0,
                                     0x00, 0x00, 0, 0, 0, 0, 0, 0,
                                     0x00, 0x03, 0, 0, 0, 0, 0, 0,
                                     0x41, 0x2C, 0, 0, 0, 0, 0, 0]

    struct Case: Sendable, CustomStringConvertible {
        var name: String
        var cdb: [UInt8]
        var lun = 0
        var data: [UInt8]? = nil
        var sense: [UInt8]? = nil
        var description: String { name }
    }

    static let cases: [Case] = [
        Case(name: "all LUNs", cdb: reportLUNs(), data: threeLUNs),
        Case(name: "select 02h", cdb: reportLUNs(select: 2), data: threeLUNs),
        Case(name: "well-known only", cdb: reportLUNs(select: 1), data: [0, 0, 0, 0, 0, 0, 0, 0]),
        Case(name: "truncated keeps the full list length", cdb: reportLUNs(allocation: 16), data: Array(threeLUNs.prefix(16))),
        Case(name: "through an absent LUN", cdb: reportLUNs(), lun: 9, data: threeLUNs),
        Case(name: "allocation length below 16", cdb: reportLUNs(allocation: 15), sense: invalidCDB(byte: 6)),
        Case(name: "select report 03h", cdb: reportLUNs(select: 3), sense: invalidCDB(byte: 2)),
        Case(name: "reserved byte 1", cdb: [0xA0, 0x01, 0, 0, 0, 0] + bytesBE32(64) + [0, 0], sense: invalidCDB(byte: 1, bit: 0)),
    ]

    @Test(arguments: cases)
    func reportLUNs(_ c: Case) throws {
        var h = Harness()
        try h.target.add(makeTestUnit(3))
        try h.target.add(makeTestUnit(300))
        let o = h.run(c.cdb, dataIn: 4096, lun: c.lun)
        if let data = c.data {
            #expect(o.status == .good)
            #expect(o.data == data)
        }
        if let sense = c.sense { #expect(o.sense == sense) }
    }

    @Test func reportLUNsListsAnyNumberOfLUNs() throws {
        var h = Harness()
        for lun in 1 ..< 600 { try h.target.add(makeTestUnit(lun * 27 % 16384)) }
        let o = h.run(Self.reportLUNs(allocation: 8192), dataIn: 8192)
        #expect(o.status == .good)
        #expect(Array(o.data.prefix(4)) == bytesBE32(600 * 8))
        #expect(o.data.count == 8 + 600 * 8)
        let expected = ([0] + (1 ..< 600).map { $0 * 27 % 16384 }).sorted()
        let listed = (0 ..< 600).map { i in LogicalUnitNumber(samEncoding: Array(o.data[8 + 8 * i ..< 16 + 8 * i]).reduce(0) { $0 << 8 | UInt64($1) })!.value }
        #expect(listed.map(Int.init) == expected)
        let short = h.run(Self.reportLUNs(allocation: 1000), dataIn: 8192)
        #expect(short.dataInLength == 1000 && Array(short.data.prefix(4)) == bytesBE32(600 * 8))
    }

    @Test func reportLUNsClearsReportedLUNsDataChanged() throws {
        var h = Harness()
        try h.target.add(makeTestUnit(1))
        let tur: [UInt8] = [0, 0, 0, 0, 0, 0]
        #expect(h.run(Self.reportLUNs(), dataIn: 64).status == .good)
        #expect(h.run(tur).status == .good)
        try h.target.add(makeTestUnit(2))
        #expect(h.run(Self.reportLUNs(), dataIn: 64, nexus: Harness.other).status == .good)
        #expect(h.run(tur, nexus: Harness.other).status == .good)
        #expect(h.run(tur).sense == fixedFormatSense(0x06, 0x3F, 0x0E))
    }
}

@Suite struct ControlCommandsTests {
    @Test func testUnitReady() {
        var h = Harness()
        #expect(h.run([0, 0, 0, 0, 0, 0]).status == .good)
        #expect(h.run([0, 0, 0, 1, 0, 0]).sense == invalidCDB(byte: 3, bit: 0))
    }

    @Test func requestSenseNoSenseInBothFormats() {
        var h = Harness()
        let fixed = h.run([0x03, 0, 0, 0, 252, 0], dataIn: 252)
        #expect(fixed.status == .good)
        #expect(fixed.data == [0x70, 0, 0, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
        let descriptor = h.run([0x03, 1, 0, 0, 252, 0], dataIn: 252)
        #expect(descriptor.data == [0x72, 0, 0, 0, 0, 0, 0, 0])
        let truncated = h.run([0x03, 0, 0, 0, 8, 0], dataIn: 252)
        #expect(truncated.data == [0x70, 0, 0, 0, 0, 0, 0, 10])
    }

    @Test func requestSenseToAbsentLUNReportsNotSupportedAsData() {
        var h = Harness()
        let o = h.run([0x03, 0, 0, 0, 252, 0], dataIn: 252, lun: 4)
        #expect(o.status == .good)
        #expect(o.data == fixedFormatSense(0x05, 0x25, 0x00))
    }

    @Test func readCapacity10() {
        var h = Harness()
        #expect(h.run([0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], dataIn: 8).data == [0, 0, 0, 63, 0, 0, 2, 0])
        #expect(h.run([0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0], dataIn: 8).sense == invalidCDB(byte: 2))
        #expect(h.run([0x25, 0, 0, 0, 0, 1, 0, 0, 1, 0], dataIn: 8).status == .good)
        var big = Harness(blocks: 0x1_0000_0001)
        #expect(big.run([0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], dataIn: 8).data == [0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 2, 0])
        var exact = Harness(blocks: 0xFFFF_FFFF)
        #expect(exact.run([0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], dataIn: 8).data == [0xFF, 0xFF, 0xFF, 0xFE, 0, 0, 2, 0])
    }

    @Test func readCapacity16() {
        var h = Harness()
        let cdb: [UInt8] = [0x9E, 0x10] + bytesBE64(0) + bytesBE32(32) + [0, 0]
        #expect(h.run(cdb, dataIn: 32).data == bytesBE64(63) + bytesBE32(512) + [0, 0, 0xC0, 0] + [UInt8](repeating: 0, count: 16))
        #expect(h.run([0x9E, 0x10] + bytesBE64(0) + bytesBE32(12) + [0, 0], dataIn: 32).data == bytesBE64(63) + bytesBE32(512))
        #expect(h.run([0x9E, 0x10] + bytesBE64(0) + bytesBE32(0) + [0, 0], dataIn: 32).dataInLength == 0)
        #expect(h.run([0x9E, 0x10] + bytesBE64(5) + bytesBE32(32) + [0, 0], dataIn: 32).sense == invalidCDB(byte: 2))
        var h2 = Harness(blocks: 0x1_0000_0001, physicalBlockSize: 4096, discard: false)
        #expect(h2.run(cdb, dataIn: 32).data == bytesBE64(0x1_0000_0000) + bytesBE32(512) + [0, 3, 0, 0] + [UInt8](repeating: 0, count: 16))
        var h3 = Harness(readsZeroes: false)
        #expect(h3.run(cdb, dataIn: 32).data[14] == 0x80)
    }

    @Test func getLBAStatus() {
        var h = Harness()
        let o = h.run([0x9E, 0x12] + bytesBE64(10) + bytesBE32(24) + [0, 0], dataIn: 24)
        #expect(o.data == [0, 0, 0, 20, 0, 0, 0, 0] + bytesBE64(10) + bytesBE32(54) + [0, 0, 0, 0])
        #expect(h.run([0x9E, 0x12] + bytesBE64(64) + bytesBE32(24) + [0, 0], dataIn: 24).sense == lbaOutOfRangeSense)
        #expect(h.run([0x9E, 0x12] + bytesBE64(0) + bytesBE32(8) + [0, 0], dataIn: 24).data == [0, 0, 0, 20, 0, 0, 0, 0])
    }

    @Test func startStopAndPreventAllowMediumRemoval() {
        var h = Harness()
        #expect(h.run([0x1B, 0x01, 0, 0, 0x01, 0]).status == .good)
        #expect(h.run([0x1B, 0, 0, 0, 0x00, 0]).status == .good)
        #expect(h.run([0x1E, 0, 0, 0, 0x01, 0]).status == .good)
        #expect(h.run([0x1B, 0, 0, 0, 0x02, 0]).sense == fixedFormatSense(0x05, 0x53, 0x02))
        #expect(h.run([0x1B, 0, 0, 0, 0x03, 0]).status == .good)  // load is fine
        #expect(h.run([0x1E, 0, 0, 0, 0x00, 0]).status == .good)
        #expect(h.run([0x1B, 0, 0, 0, 0x02, 0]).status == .good)
        #expect(h.run([0x1E, 0, 0, 0, 0x02, 0]).sense == invalidCDB(byte: 4, bit: 1))
        #expect(h.run([0x1B, 0, 0, 0, 0x08, 0]).sense == invalidCDB(byte: 4, bit: 3))
    }

    @Test func preventionIsPerNexusAndClearedByNexusLossOrReset() {
        var h = Harness()
        #expect(h.run([0x1E, 0, 0, 0, 0x01, 0]).status == .good)
        #expect(h.run([0x1E, 0, 0, 0, 0x01, 0], nexus: Harness.other).status == .good)
        h.unit.clearMediumRemovalPrevention(for: Harness.nexus)
        #expect(h.unit.isMediumRemovalPrevented)
        #expect(h.run([0x1B, 0, 0, 0, 0x02, 0]).sense == fixedFormatSense(0x05, 0x53, 0x02))
        h.unit.clearMediumRemovalPrevention(for: nil)
        #expect(!h.unit.isMediumRemovalPrevented)
        #expect(h.run([0x1B, 0, 0, 0, 0x02, 0]).status == .good)
    }

    @Test func reportSupportedOperationCodesOneCommand() {
        var h = Harness()
        func rsoc(_ options: UInt8, _ opcode: UInt8, _ action: Int = 0) -> [UInt8] {
            [0xA3, 0x0C, options, opcode] + bytesBE16(action) + bytesBE32(512) + [0, 0]
        }
        #expect(h.run(rsoc(1, 0x28), dataIn: 512).data ==
                [0, 0x03, 0, 10, 0x28, 0x1A, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0x00])
        #expect(h.run(rsoc(2, 0x9E, 0x10), dataIn: 512).data ==
                [0, 0x03, 0, 16, 0x9E, 0x10] + [UInt8](repeating: 0xFF, count: 12) + [0x01, 0x00])
        #expect(h.run(rsoc(3, 0x9E, 0x12), dataIn: 512).data ==
                [0, 0x03, 0, 16, 0x9E, 0x12] + [UInt8](repeating: 0xFF, count: 12) + [0x00, 0x00])
        #expect(h.run(rsoc(0x81, 0x00), dataIn: 512).data ==
                [0, 0x83, 0, 6, 0, 0, 0, 0, 0, 0, 0x00, 0x0A, 0, 0, 0, 0, 0, 1, 0, 0, 0, 30])
        #expect(h.run(rsoc(1, 0xC0), dataIn: 512).data == [0, 0x01, 0, 0])
        #expect(h.run(rsoc(2, 0x9E, 0x11), dataIn: 512).data == [0, 0x01, 0, 0])
        #expect(h.run(rsoc(1, 0x9E), dataIn: 512).sense == invalidCDB(byte: 2))
        #expect(h.run(rsoc(2, 0x28), dataIn: 512).sense == invalidCDB(byte: 2))
        #expect(h.run(rsoc(4, 0x28), dataIn: 512).sense == invalidCDB(byte: 2))
        #expect(h.run(rsoc(0x41, 0x28), dataIn: 512).sense == invalidCDB(byte: 2, bit: 6))
    }

    @Test func reportSupportedOperationCodesAll() {
        var h = Harness()
        let o = h.run([0xA3, 0x0C, 0, 0, 0, 0] + bytesBE32(4096) + [0, 0], dataIn: 4096)
        let n = CommandTable.all.count
        #expect(o.data.count == 4 + 8 * n)
        #expect(Array(o.data.prefix(4)) == bytesBE32(UInt64(8 * n)))
        #expect(Array(o.data[4 ..< 12]) == [0x00, 0, 0, 0, 0, 0x00, 0, 6])            // TEST UNIT READY
        // PERSISTENT RESERVE IN, READ KEYS has a service action.
        let prIn = (0 ..< n).map { 4 + 8 * $0 }.first { o.data[$0] == 0x5E }!
        #expect(Array(o.data[prIn ..< prIn + 8]) == [0x5E, 0, 0, 0, 0, 0x01, 0, 10])
        let timed = h.run([0xA3, 0x0C, 0x80, 0, 0, 0] + bytesBE32(4096) + [0, 0], dataIn: 4096)
        #expect(timed.data.count == 4 + 20 * n)
        #expect(Array(timed.data[4 ..< 24]) == [0, 0, 0, 0, 0, 0x02, 0, 6, 0, 0x0A, 0, 0, 0, 0, 0, 1, 0, 0, 0, 30])
    }
}
