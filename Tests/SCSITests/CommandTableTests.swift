import BlockIO
@testable import SCSI
import Testing

@Suite struct CommandTableTests {
    @Test func tableIsOrderedAndWellFormed() {
        let all = CommandTable.all
        for (a, b) in zip(all, all.dropFirst()) {
            #expect(a.opcode < b.opcode || (a.opcode == b.opcode && (a.serviceAction ?? 0) < (b.serviceAction ?? 0)))
        }
        for d in all {
            #expect(d.usage[0] == 0xFF)
            #expect(d.usage.last == 0, "CONTROL byte of \(d.opcode) must be fully reserved (NACA unsupported)")
            let group = d.opcode >> 5
            let expectedLength = [6, 10, 10, 0, 16, 12, 0, 0][Int(group)]
            #expect(d.cdbLength == expectedLength, "opcode \(d.opcode)")
            if d.serviceAction != nil { #expect(d.usage[1] & 0x1F == 0x1F) }
        }
    }

    @Test func lookupFindsServiceActions() {
        #expect(CommandTable.descriptor(for: CDB([0x9E, 0x10]))?.serviceAction == 0x10)
        #expect(CommandTable.descriptor(for: CDB([0x9E, 0x11])) == nil)
        #expect(CommandTable.descriptor(for: CDB([0x28]))?.cdbLength == 10)
        #expect(CommandTable.hasServiceActions(0x5F) && !CommandTable.hasServiceActions(0x28))
    }

    @Test func reservedBitCheckPointsAtTheHighestOffendingBit() {
        func check(_ bytes: [UInt8]) -> SCSIError? {
            do throws(SCSIError) {
                try CommandTable.checkReservedBits(CDB(bytes), [0xFF, 0x1A, 0xFF, 0x00])
                return nil
            } catch {
                return error
            }
        }
        #expect(check([0x28, 0x1A, 0xFF, 0x00]) == nil)
        #expect(check([0x28, 0x25, 0, 0]) == .invalidFieldInCDB(byte: 1, bit: 5))
        #expect(check([0x28, 0, 0, 0x81]) == .invalidFieldInCDB(byte: 3, bit: 7))
    }

    /// Every supported command, sent with NACA = 1, is refused with a field pointer at the CONTROL byte
    /// (before any command-specific processing).
    @Test func nacaIsRefusedForEveryCommand() {
        var h = Harness()
        for d in CommandTable.all {
            var cdb = [UInt8](repeating: 0, count: d.cdbLength)
            cdb[0] = d.opcode
            if let sa = d.serviceAction { cdb[1] = sa }
            cdb[d.cdbLength - 1] = 0x04
            let r = h.run(cdb, dataIn: 512)
            #expect(r.sense == invalidCDB(byte: UInt16(d.cdbLength - 1), bit: 2), "opcode \(d.opcode)")
            #expect(r.requests.isEmpty)
        }
    }
}
