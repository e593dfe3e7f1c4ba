import BlockIO
@testable import SCSI
import Testing

@Suite struct ModePagesTests {
    static let errorRecovery: [UInt8] = [0x01, 0x0A, 0xC0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    static let caching: [UInt8] = [0x08, 0x12, 0x04] + [UInt8](repeating: 0, count: 17)
    static let control: [UInt8] = [0x0A, 0x0A, 0x02, 0x10, 0x00, 0x40, 0, 0, 0, 0, 0, 0]
    static let exceptions: [UInt8] = [0x1C, 0x0A, 0x08, 0x00, 0, 0, 0, 0, 0, 0, 0, 0]
    static let shortDescriptor: [UInt8] = [0, 0, 0, 64, 0, 0, 2, 0]
    static let longDescriptor: [UInt8] = bytesBE64(64) + [0, 0, 0, 0] + bytesBE32(512)

    static func sense6(page: UInt8, pc: UInt8 = 0, dbd: Bool = false, subpage: UInt8 = 0, allocation: UInt8 = 255) -> [UInt8] {
        [0x1A, dbd ? 0x08 : 0, pc << 6 | page, subpage, allocation, 0]
    }

    static func sense10(page: UInt8, pc: UInt8 = 0, dbd: Bool = false, llbaa: Bool = false) -> [UInt8] {
        [0x5A, (dbd ? 0x08 : 0) | (llbaa ? 0x10 : 0), pc << 6 | page, 0, 0, 0, 0] + bytesBE16(1024) + [0]
    }

    struct SenseCase: Sendable, CustomStringConvertible {
        var name: String
        var cdb: [UInt8]
        var readOnly = false
        var data: [UInt8]? = nil
        var sense: [UInt8]? = nil
        var description: String { name }
    }

    static let senseCases: [SenseCase] = [
        SenseCase(name: "6: all pages with block descriptor", cdb: sense6(page: 0x3F),
                  data: [67, 0, 0x10, 8] + shortDescriptor + errorRecovery + caching + control + exceptions),
        SenseCase(name: "6: all pages and subpages", cdb: sense6(page: 0x3F, subpage: 0xFF),
                  data: [67, 0, 0x10, 8] + shortDescriptor + errorRecovery + caching + control + exceptions),
        SenseCase(name: "6: caching without block descriptor", cdb: sense6(page: 0x08, dbd: true),
                  data: [23, 0, 0x10, 0] + caching),
        SenseCase(name: "6: read-only sets WP", cdb: sense6(page: 0x1C, dbd: true), readOnly: true,
                  data: [15, 0, 0x90, 0] + exceptions),
        SenseCase(name: "6: changeable caching", cdb: sense6(page: 0x08, pc: 1, dbd: true),
                  data: [23, 0, 0x10, 0, 0x08, 0x12, 0x05] + [UInt8](repeating: 0, count: 17)),
        SenseCase(name: "6: changeable control", cdb: sense6(page: 0x0A, pc: 1, dbd: true),
                  data: [15, 0, 0x10, 0, 0x0A, 0x0A, 0x04, 0xF0, 0, 0, 0, 0, 0, 0, 0, 0]),
        SenseCase(name: "6: changeable informational exceptions", cdb: sense6(page: 0x1C, pc: 1, dbd: true),
                  data: [15, 0, 0x10, 0, 0x1C, 0x0A, 0x08, 0x0F, 0, 0, 0, 0, 0, 0, 0, 0]),
        SenseCase(name: "6: default control", cdb: sense6(page: 0x0A, pc: 2, dbd: true), data: [15, 0, 0x10, 0] + control),
        SenseCase(name: "6: allocation length 4", cdb: sense6(page: 0x3F, allocation: 4), data: [67, 0, 0x10, 8]),
        SenseCase(name: "10: long LBA descriptor", cdb: sense10(page: 0x0A, llbaa: true),
                  data: [0, 34, 0, 0x10, 0x01, 0, 0, 16] + longDescriptor + control),
        SenseCase(name: "10: short descriptor", cdb: sense10(page: 0x01),
                  data: [0, 26, 0, 0x10, 0, 0, 0, 8] + shortDescriptor + errorRecovery),
        SenseCase(name: "10: DBD with LLBAA", cdb: sense10(page: 0x01, dbd: true, llbaa: true),
                  data: [0, 18, 0, 0x10, 0, 0, 0, 0] + errorRecovery),
        SenseCase(name: "saved values", cdb: sense6(page: 0x08, pc: 3), sense: fixedFormatSense(0x05, 0x39, 0x00)),
        SenseCase(name: "unknown page", cdb: sense6(page: 0x19), sense: invalidCDB(byte: 2, bit: 5)),
        SenseCase(name: "unknown subpage", cdb: sense6(page: 0x08, subpage: 0x01), sense: invalidCDB(byte: 3)),
        SenseCase(name: "6: LLBAA is reserved", cdb: [0x1A, 0x10, 0x3F, 0, 255, 0], sense: invalidCDB(byte: 1, bit: 4)),
    ]

    @Test(arguments: senseCases)
    func modeSense(_ c: SenseCase) {
        var h = Harness(readOnly: c.readOnly)
        let o = h.run(c.cdb, dataIn: 1024)
        if let data = c.data {
            #expect(o.status == .good)
            #expect(o.data == data)
        }
        if let sense = c.sense { #expect(o.sense == sense) }
    }

    static func select6(_ list: [UInt8], flags: UInt8 = 0x10) -> [UInt8] { [0x15, flags, 0, 0, UInt8(list.count), 0] }
    static let noWriteCache: [UInt8] = [0x08, 0x12, 0x00] + [UInt8](repeating: 0, count: 17)

    @Test func modeSelectChangesWriteCacheAndNotifiesOtherNexuses() {
        var h = Harness()
        let list: [UInt8] = [0, 0, 0, 0] + Self.noWriteCache
        let o = h.run(Self.select6(list), dataOut: list)
        #expect(o.status == .good)
        #expect(!h.unit.mode.writeCacheEnabled)
        #expect(h.unit.writeThrough)
        #expect(h.run(Self.sense6(page: 0x08, dbd: true), dataIn: 64).data == [23, 0, 0x10, 0] + Self.noWriteCache)
        #expect(h.run(ControlCommandsTestsTUR.cdb).status == .good)
        #expect(h.run(ControlCommandsTestsTUR.cdb, nexus: Harness.other).sense == fixedFormatSense(0x06, 0x2A, 0x01))
        // Selecting the same values again changes nothing and raises nothing.
        #expect(h.run(Self.select6(list), dataOut: list).status == .good)
        #expect(h.run(ControlCommandsTestsTUR.cdb, nexus: Harness.other).status == .good)
    }

    @Test func modeSelectDescriptorSenseWithBlockDescriptor() {
        var h = Harness()
        var control = Self.control
        control[2] |= 0x04
        let list: [UInt8] = [0, 0, 0, 8] + Self.shortDescriptor + control
        #expect(h.run(Self.select6(list), dataOut: list).status == .good)
        #expect(h.unit.senseFormat == .descriptor)
        #expect(h.run(read10(lba: 100, blocks: 1), dataIn: 512).sense == [0x72, 0x05, 0x21, 0x00, 0, 0, 0, 0])
    }

    @Test func modeSelect10WithLongDescriptor() {
        var h = Harness()
        let page: [UInt8] = [0x01, 0x0A, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        let list: [UInt8] = [0, 0, 0, 0, 0x01, 0, 0, 16] + Self.longDescriptor + page
        let o = h.run([0x55, 0x10, 0, 0, 0, 0, 0] + bytesBE16(list.count) + [0], dataOut: list)
        #expect(o.status == .good)
        #expect(!h.unit.mode.automaticReadReallocation && !h.unit.mode.automaticWriteReallocation)
    }

    struct SelectCase: Sendable, CustomStringConvertible {
        var name: String
        var cdb: [UInt8]? = nil
        var list: [UInt8]
        var dataOut: Int? = nil
        var sense: [UInt8]
        var description: String { name }
    }

    static let selectCases: [SelectCase] = [
        SelectCase(name: "PF = 0", cdb: select6([0, 0, 0, 0] + noWriteCache, flags: 0x00), list: [0, 0, 0, 0] + noWriteCache,
                   sense: invalidCDB(byte: 1, bit: 4)),
        SelectCase(name: "SP = 1", cdb: select6([0, 0, 0, 0] + noWriteCache, flags: 0x11), list: [0, 0, 0, 0] + noWriteCache,
                   sense: invalidCDB(byte: 1, bit: 0)),
        SelectCase(name: "block length differs", list: [0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0x10, 0], sense: invalidParameter(byte: 9)),
        SelectCase(name: "block count differs", list: [0, 0, 0, 8, 0, 0, 0, 65, 0, 0, 2, 0], sense: invalidParameter(byte: 4)),
        SelectCase(name: "block descriptor length 6", list: [0, 0, 0, 6, 0, 0, 0, 0, 0, 0], sense: invalidParameter(byte: 3)),
        SelectCase(name: "medium type", list: [0, 1, 0, 0] + noWriteCache, sense: invalidParameter(byte: 1)),
        SelectCase(name: "non-changeable bit (IC)", list: [0, 0, 0, 0, 0x08, 0x12, 0x80] + [UInt8](repeating: 0, count: 17),
                   sense: invalidParameter(byte: 6, bit: 7)),
        SelectCase(name: "non-changeable field (busy timeout)",
                   list: [0, 0, 0, 0, 0x0A, 0x0A, 0x02, 0x10, 0x00, 0x40, 0, 0, 0x01, 0, 0, 0],
                   sense: invalidParameter(byte: 12, bit: 0)),
        SelectCase(name: "page length", list: [0, 0, 0, 0, 0x08, 0x10] + [UInt8](repeating: 0, count: 16),
                   sense: invalidParameter(byte: 5)),
        SelectCase(name: "unknown page", list: [0, 0, 0, 0, 0x19, 0x02, 0, 0], sense: invalidParameter(byte: 4, bit: 5)),
        SelectCase(name: "subpage format", list: [0, 0, 0, 0, 0x48, 0x12] + [UInt8](repeating: 0, count: 18),
                   sense: invalidParameter(byte: 4, bit: 6)),
        SelectCase(name: "QAM 2", list: [0, 0, 0, 0, 0x0A, 0x0A, 0x02, 0x20, 0x00, 0x40, 0, 0, 0, 0, 0, 0],
                   sense: invalidParameter(byte: 7, bit: 5)),
        SelectCase(name: "MRIE 7", list: [0, 0, 0, 0, 0x1C, 0x0A, 0x08, 0x07, 0, 0, 0, 0, 0, 0, 0, 0],
                   sense: invalidParameter(byte: 7, bit: 3)),
        SelectCase(name: "page truncated by the list length", list: [0, 0, 0, 0, 0x08, 0x12, 0x04],
                   sense: parameterListLengthSense),
        SelectCase(name: "data-out shorter than the list", list: [0, 0, 0, 0] + noWriteCache, dataOut: 10,
                   sense: parameterListLengthSense),
    ]

    @Test(arguments: selectCases)
    func modeSelectRejects(_ c: SelectCase) {
        var h = Harness()
        let before = h.unit.mode
        let o = h.run(c.cdb ?? Self.select6(c.list), dataOut: Array(c.list.prefix(c.dataOut ?? c.list.count)))
        #expect(o.status == .checkCondition)
        #expect(o.sense == c.sense)
        #expect(h.unit.mode == before)
    }

    @Test func modeSelectWithEmptyListDoesNothing() {
        var h = Harness()
        #expect(h.run([0x15, 0x10, 0, 0, 0, 0]).status == .good)
        #expect(h.run([0x55, 0x10, 0, 0, 0, 0, 0, 0, 0, 0]).status == .good)
    }

    @Test func writeCacheIsNotChangeableWithoutAVolatileCache() {
        var h = Harness(volatileCache: false)
        #expect(h.run(Self.sense6(page: 0x08, dbd: true), dataIn: 64).data == [23, 0, 0x10, 0] + Self.noWriteCache)
        let list: [UInt8] = [0, 0, 0, 0] + Self.caching
        #expect(h.run(Self.select6(list), dataOut: list).sense == invalidParameter(byte: 6, bit: 2))
    }
}
