/// Operation codes of the commands this device server implements.
enum Opcode {
    static let testUnitReady: UInt8 = 0x00
    static let requestSense: UInt8 = 0x03
    static let read6: UInt8 = 0x08
    static let write6: UInt8 = 0x0A
    static let inquiry: UInt8 = 0x12
    static let modeSelect6: UInt8 = 0x15
    static let reserve6: UInt8 = 0x16
    static let release6: UInt8 = 0x17
    static let modeSense6: UInt8 = 0x1A
    static let startStopUnit: UInt8 = 0x1B
    static let preventAllowMediumRemoval: UInt8 = 0x1E
    static let readCapacity10: UInt8 = 0x25
    static let read10: UInt8 = 0x28
    static let write10: UInt8 = 0x2A
    static let writeAndVerify10: UInt8 = 0x2E
    static let verify10: UInt8 = 0x2F
    static let preFetch10: UInt8 = 0x34
    static let synchronizeCache10: UInt8 = 0x35
    static let readDefectData10: UInt8 = 0x37
    static let writeSame10: UInt8 = 0x41
    static let unmap: UInt8 = 0x42
    static let modeSelect10: UInt8 = 0x55
    static let reserve10: UInt8 = 0x56
    static let release10: UInt8 = 0x57
    static let modeSense10: UInt8 = 0x5A
    static let persistentReserveIn: UInt8 = 0x5E
    static let persistentReserveOut: UInt8 = 0x5F
    static let read16: UInt8 = 0x88
    static let compareAndWrite: UInt8 = 0x89
    static let write16: UInt8 = 0x8A
    static let orWrite16: UInt8 = 0x8B
    static let writeAndVerify16: UInt8 = 0x8E
    static let verify16: UInt8 = 0x8F
    static let preFetch16: UInt8 = 0x90
    static let synchronizeCache16: UInt8 = 0x91
    static let writeSame16: UInt8 = 0x93
    static let serviceActionIn16: UInt8 = 0x9E
    static let reportLUNs: UInt8 = 0xA0
    static let maintenanceIn: UInt8 = 0xA3
    static let read12: UInt8 = 0xA8
    static let write12: UInt8 = 0xAA
    static let writeAndVerify12: UInt8 = 0xAE
    static let verify12: UInt8 = 0xAF
    static let readDefectData12: UInt8 = 0xB7

    /// SERVICE ACTION IN(16) service actions.
    static let readCapacity16: UInt8 = 0x10
    static let getLBAStatus: UInt8 = 0x12
    /// MAINTENANCE IN service action.
    static let reportSupportedOperationCodes: UInt8 = 0x0C
}

/// One supported command: its CDB layout as REPORT SUPPORTED OPERATION CODES describes it.
///
/// The CDB usage mask has a 1 for every bit the device server looks at; every other bit is reserved
/// (or an unsupported feature such as RDPROTECT) and must be zero: `execute` rejects a CDB with such a
/// bit set with INVALID FIELD IN CDB pointing at it. The CONTROL byte mask is 0, so NACA = 1 is rejected.
struct CommandDescriptor: Sendable {
    /// Operation code.
    let opcode: UInt8
    /// Service action (in byte 1, bits 4-0), or nil when the opcode has none.
    let serviceAction: UInt8?
    /// Bit usage per CDB byte (its count is the CDB length).
    let usage: [UInt8]
    /// Nominal command timeout in seconds (RCTD timeouts descriptor).
    let nominalTimeout: UInt32
    /// Recommended command timeout in seconds.
    let recommendedTimeout: UInt32

    init(_ opcode: UInt8, _ serviceAction: UInt8? = nil, _ usage: [UInt8], timeout: UInt32 = 30) {
        self.opcode = opcode
        self.serviceAction = serviceAction
        self.usage = usage
        self.nominalTimeout = 1
        self.recommendedTimeout = timeout
    }

    var cdbLength: Int { usage.count }
}

/// The commands this device server supports, ascending by opcode then service action.
enum CommandTable {
    static let all: [CommandDescriptor] = [
        CommandDescriptor(Opcode.testUnitReady, nil, [0xFF, 0, 0, 0, 0, 0]),
        CommandDescriptor(Opcode.requestSense, nil, [0xFF, 0x01, 0, 0, 0xFF, 0]),
        CommandDescriptor(Opcode.read6, nil, [0xFF, 0x1F, 0xFF, 0xFF, 0xFF, 0]),
        CommandDescriptor(Opcode.write6, nil, [0xFF, 0x1F, 0xFF, 0xFF, 0xFF, 0]),
        CommandDescriptor(Opcode.inquiry, nil, [0xFF, 0x01, 0xFF, 0xFF, 0xFF, 0]),
        CommandDescriptor(Opcode.modeSelect6, nil, [0xFF, 0x11, 0, 0, 0xFF, 0]),
        CommandDescriptor(Opcode.reserve6, nil, [0xFF, 0, 0, 0, 0, 0]),
        CommandDescriptor(Opcode.release6, nil, [0xFF, 0, 0, 0, 0, 0]),
        CommandDescriptor(Opcode.modeSense6, nil, [0xFF, 0x08, 0xFF, 0xFF, 0xFF, 0]),
        CommandDescriptor(Opcode.startStopUnit, nil, [0xFF, 0x01, 0, 0x0F, 0xF7, 0]),
        CommandDescriptor(Opcode.preventAllowMediumRemoval, nil, [0xFF, 0, 0, 0, 0x03, 0]),
        CommandDescriptor(Opcode.readCapacity10, nil, [0xFF, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0x01, 0]),
        CommandDescriptor(Opcode.read10, nil, [0xFF, 0x1A, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0]),
        CommandDescriptor(Opcode.write10, nil, [0xFF, 0x1A, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0]),
        CommandDescriptor(Opcode.writeAndVerify10, nil, [0xFF, 0x12, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0]),
        CommandDescriptor(Opcode.verify10, nil, [0xFF, 0x16, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0], timeout: 120),
        CommandDescriptor(Opcode.preFetch10, nil, [0xFF, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0]),
        CommandDescriptor(Opcode.synchronizeCache10, nil, [0xFF, 0x06, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0], timeout: 120),
        CommandDescriptor(Opcode.readDefectData10, nil, [0xFF, 0, 0x1F, 0, 0, 0, 0, 0xFF, 0xFF, 0]),
        CommandDescriptor(Opcode.writeSame10, nil, [0xFF, 0x08, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0], timeout: 120),
        CommandDescriptor(Opcode.unmap, nil, [0xFF, 0, 0, 0, 0, 0, 0x1F, 0xFF, 0xFF, 0], timeout: 120),
        CommandDescriptor(Opcode.modeSelect10, nil, [0xFF, 0x11, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0]),
        CommandDescriptor(Opcode.reserve10, nil, [0xFF, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
        CommandDescriptor(Opcode.release10, nil, [0xFF, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
        CommandDescriptor(Opcode.modeSense10, nil, [0xFF, 0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0]),
        CommandDescriptor(Opcode.persistentReserveIn, 0x00, [0xFF, 0x1F, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0]),
        CommandDescriptor(Opcode.persistentReserveIn, 0x01, [0xFF, 0x1F, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0]),
        CommandDescriptor(Opcode.persistentReserveIn, 0x02, [0xFF, 0x1F, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0]),
        CommandDescriptor(Opcode.persistentReserveIn, 0x03, [0xFF, 0x1F, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0]),
        CommandDescriptor(Opcode.persistentReserveOut, 0x00, [0xFF, 0x1F, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0]),
        CommandDescriptor(Opcode.persistentReserveOut, 0x01, [0xFF, 0x1F, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0]),
        CommandDescriptor(Opcode.persistentReserveOut, 0x02, [0xFF, 0x1F, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0]),
        CommandDescriptor(Opcode.persistentReserveOut, 0x03, [0xFF, 0x1F, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0]),
        CommandDescriptor(Opcode.persistentReserveOut, 0x04, [0xFF, 0x1F, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0]),
        CommandDescriptor(Opcode.persistentReserveOut, 0x05, [0xFF, 0x1F, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0]),
        CommandDescriptor(Opcode.persistentReserveOut, 0x06, [0xFF, 0x1F, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0]),
        CommandDescriptor(Opcode.persistentReserveOut, 0x07, [0xFF, 0x1F, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0]),
        CommandDescriptor(Opcode.read16, nil, sixteen(byte1: 0x1A)),
        CommandDescriptor(Opcode.compareAndWrite, nil,
                          [0xFF, 0x1A, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0x1F, 0]),
        CommandDescriptor(Opcode.write16, nil, sixteen(byte1: 0x1A)),
        CommandDescriptor(Opcode.orWrite16, nil, sixteen(byte1: 0x18)),
        CommandDescriptor(Opcode.writeAndVerify16, nil, sixteen(byte1: 0x12)),
        CommandDescriptor(Opcode.verify16, nil, sixteen(byte1: 0x16), timeout: 120),
        CommandDescriptor(Opcode.preFetch16, nil, sixteen(byte1: 0x02)),
        CommandDescriptor(Opcode.synchronizeCache16, nil, sixteen(byte1: 0x06), timeout: 120),
        CommandDescriptor(Opcode.writeSame16, nil, sixteen(byte1: 0x09), timeout: 120),
        CommandDescriptor(Opcode.serviceActionIn16, Opcode.readCapacity16,
                          [0xFF, 0x1F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01, 0]),
        CommandDescriptor(Opcode.serviceActionIn16, Opcode.getLBAStatus,
                          [0xFF, 0x1F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0]),
        CommandDescriptor(Opcode.reportLUNs, nil, [0xFF, 0, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0]),
        CommandDescriptor(Opcode.maintenanceIn, Opcode.reportSupportedOperationCodes,
                          [0xFF, 0x1F, 0x87, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0]),
        CommandDescriptor(Opcode.read12, nil, [0xFF, 0x1A, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0]),
        CommandDescriptor(Opcode.write12, nil, [0xFF, 0x1A, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0]),
        CommandDescriptor(Opcode.writeAndVerify12, nil, [0xFF, 0x12, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0]),
        CommandDescriptor(Opcode.verify12, nil, [0xFF, 0x16, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0],
                          timeout: 120),
        CommandDescriptor(Opcode.readDefectData12, nil, [0xFF, 0x1F, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0]),
    ]

    private static func sixteen(byte1: UInt8) -> [UInt8] {
        [0xFF, byte1, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0]
    }

    /// Index into `all` per opcode for opcodes without service actions (-1: none or has service actions).
    static let indexByOpcode: [Int16] = {
        var table = [Int16](repeating: -1, count: 256)
        for (i, d) in all.enumerated() where d.serviceAction == nil { table[Int(d.opcode)] = Int16(i) }
        return table
    }()

    /// Whether some supported command uses `opcode` with service actions.
    static func hasServiceActions(_ opcode: UInt8) -> Bool {
        all.contains { $0.opcode == opcode && $0.serviceAction != nil }
    }

    /// The descriptor for a CDB (service action taken from byte 1 where the opcode has them).
    static func descriptor(for cdb: CDB) -> CommandDescriptor? {
        let opcode = cdb.opcode
        let i = indexByOpcode[Int(opcode)]
        if i >= 0 { return all[Int(i)] }
        let action = cdb[1] & 0x1F
        for d in all where d.opcode == opcode && d.serviceAction == action { return d }
        return nil
    }

    /// Checks every CDB bit against the usage mask: a set bit outside it is INVALID FIELD IN CDB,
    /// pointing at the most significant offending bit.
    @inline(__always)
    static func checkReservedBits(_ cdb: CDB, _ usage: [UInt8]) throws(SCSIError) {
        var i = 0
        let n = usage.count
        while i < n {
            let bad = cdb[i] & ~usage[i]
            if bad != 0 {
                throw .invalidFieldInCDB(byte: i, bit: 7 - bad.leadingZeroBitCount)
            }
            i += 1
        }
    }
}
