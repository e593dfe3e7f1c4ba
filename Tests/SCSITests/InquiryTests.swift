import BlockIO
@testable import SCSI
import Testing

@Suite struct InquiryTests {
    static func ascii(_ s: String) -> [UInt8] { Array(s.utf8) }

    static let standard: [UInt8] = {
        var d: [UInt8] = [0x00, 0x00, 0x06, 0x12, 91, 0x00, 0x00, 0x02]
        d += ascii("SCSIGATE") + ascii("VIRTUAL-DISK    ") + ascii("0001")
        d += [UInt8](repeating: 0, count: 22)
        d += [0x00, 0xA0, 0x04, 0x60, 0x04, 0xC0]
        d += [UInt8](repeating: 0, count: 96 - 64)
        return d
    }()

    static func inquiry(evpd: Bool = false, page: UInt8 = 0, allocation: Int = 255, flags: UInt8 = 0) -> [UInt8] {
        [0x12, (evpd ? 0x01 : 0) | flags, page] + bytesBE16(allocation) + [0]
    }

    static let limits: [UInt8] = {
        var b = [UInt8](repeating: 0, count: 64)
        b[0] = 0; b[1] = 0xB0; b[3] = 0x3C
        b[4] = 0x01; b[5] = 128; b[7] = 1
        b[21] = 0x10                  // max unmap LBA count 0x00100000 (libiscsi: at most 1 Mi)
        b[26] = 0x01                  // max unmap descriptors 256
        b[31] = 0x01                  // optimal unmap granularity 1
        b[32] = 0x80                  // UGAVALID
        b[42] = 0xFF; b[43] = 0xFF    // max write same length 0xFFFF
        return b
    }()

    struct PageCase: Sendable, CustomStringConvertible {
        var page: UInt8
        var discard = true
        var expected: [UInt8]
        var description: String { String(page, radix: 16) + (discard ? "" : " no discard") }
    }

    static let pages: [PageCase] = [
        PageCase(page: 0x00, expected: [0, 0x00, 0, 7, 0x00, 0x80, 0x83, 0x86, 0xB0, 0xB1, 0xB2]),
        PageCase(page: 0x80, expected: [0, 0x80, 0, 6] + ascii("SN0001")),
        PageCase(page: 0x83, expected: [0, 0x83, 0, 38,
                                        0x01, 0x03, 0x00, 0x08, 0x50, 0x01, 0x40, 0x51, 0x23, 0x45, 0x67, 0x89,
                                        0x02, 0x01, 0x00, 14] + ascii("SCSIGATESN0001") +
                                       [0x01, 0x14, 0x00, 0x04, 0x00, 0x00, 0x00, 0x01]),
        PageCase(page: 0x86, expected: [0, 0x86, 0, 0x3C, 0x00, 0x07, 0x01] + [UInt8](repeating: 0, count: 57)),
        PageCase(page: 0xB0, expected: limits),
        PageCase(page: 0xB1, expected: [0, 0xB1, 0, 0x3C, 0x00, 0x01] + [UInt8](repeating: 0, count: 58)),
        PageCase(page: 0xB2, expected: [0, 0xB2, 0, 4, 0x00, 0xE4, 0x02, 0x00]),
        PageCase(page: 0xB2, discard: false, expected: [0, 0xB2, 0, 4, 0, 0, 0, 0]),
    ]

    @Test func standardData() {
        var h = Harness()
        let o = h.run(Self.inquiry(), dataIn: 255)
        #expect(o.status == .good)
        #expect(o.data == Self.standard)
        #expect(o.residual == 255 - 96)
    }

    @Test(arguments: pages)
    func vitalProductDataPages(_ c: PageCase) {
        var h = Harness(discard: c.discard)
        let o = h.run(Self.inquiry(evpd: true, page: c.page), dataIn: 255)
        #expect(o.status == .good)
        #expect(o.data == c.expected)
    }

    @Test func blockLimitsReportMaximumTransferAndGranularity() {
        var h = Harness(blockSize: 512, physicalBlockSize: 4096, discard: false, maxTransferBytes: 1 << 20)
        let o = h.run(Self.inquiry(evpd: true, page: 0xB0), dataIn: 64)
        var expected = [UInt8](repeating: 0, count: 64)
        expected[1] = 0xB0; expected[3] = 0x3C; expected[4] = 1; expected[5] = 128
        expected[7] = 8                              // 4096 / 512
        expected[10] = 0x08                          // max transfer 2048 blocks
        expected[14] = 0x08                          // optimal transfer 2048 blocks
        expected[42] = 0xFF; expected[43] = 0xFF     // max write same length 0xFFFF
        #expect(o.data == expected)
    }

    @Test func allocationLengthIsHonoured() {
        var h = Harness()
        let zero = h.run(Self.inquiry(allocation: 0), dataIn: 96)
        #expect(zero.status == .good && zero.dataInLength == 0 && zero.residual == 96)
        let five = h.run(Self.inquiry(allocation: 5), dataIn: 96)
        #expect(five.data == Array(Self.standard.prefix(5)))
        let smallBuffer = h.run(Self.inquiry(allocation: 96), dataIn: 36)
        #expect(smallBuffer.data == Array(Self.standard.prefix(36)))
        let page = h.run(Self.inquiry(evpd: true, page: 0x83, allocation: 4), dataIn: 96)
        #expect(page.data == [0, 0x83, 0, 38])
    }

    @Test func invalidFields() {
        var h = Harness()
        #expect(h.run(Self.inquiry(page: 0x80), dataIn: 96).sense == invalidCDB(byte: 2))
        #expect(h.run(Self.inquiry(evpd: true, page: 0x99), dataIn: 96).sense == invalidCDB(byte: 2))
        #expect(h.run(Self.inquiry(flags: 0x02), dataIn: 96).sense == invalidCDB(byte: 1, bit: 1))
        #expect(h.run([0x12, 0, 0, 0, 96, 0x04], dataIn: 96).sense == invalidCDB(byte: 5, bit: 2))
    }

    @Test func absentLUNAnswersPeripheralQualifier3() {
        var h = Harness()
        let o = h.run(Self.inquiry(), dataIn: 96, lun: 5)
        var expected = Self.standard
        expected[0] = 0x7F
        #expect(o.status == .good)
        #expect(o.data == expected)
        let vpd = h.run(Self.inquiry(evpd: true, page: 0), dataIn: 96, lun: 5)
        #expect(vpd.sense == fixedFormatSense(0x05, 0x25, 0x00))
    }

    @Test func identityStringsArePaddedAndSanitised() {
        let d = InquiryData.standard(identity: LogicalUnitIdentity(vendor: "AB\u{7}", product: "disk-product-name-too-long",
                                                                   revision: "1", serial: "x", naa: 0), geometry: nil)
        #expect(Array(d[8 ..< 16]) == Self.ascii("AB      "))
        #expect(Array(d[16 ..< 32]) == Self.ascii("disk-product-nam"))
        #expect(Array(d[32 ..< 36]) == Self.ascii("1   "))
    }
}
