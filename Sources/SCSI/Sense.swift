/// Which sense data format to build (SPC-4 4.5): chosen per LUN by the D_SENSE bit of the
/// control mode page.
public enum SenseFormat: Sendable {
    case fixed
    case descriptor
}

/// Sense-key specific information (SPC-4 4.5.2.4).
public enum SenseKeySpecific: Hashable, Sendable {
    /// ILLEGAL REQUEST field pointer: the byte (and optional bit) of the CDB or parameter list in error.
    case fieldPointer(inCDB: Bool, byte: UInt16, bit: UInt8?)
    /// Progress indication (NOT READY), 0...65535.
    case progress(UInt16)
    /// The three bytes as a remote device server sent them (SKSV is set on encoding).
    case raw(UInt8, UInt8, UInt8)

    /// The three SKS bytes with SKSV set.
    var bytes: (UInt8, UInt8, UInt8) {
        switch self {
        case let .fieldPointer(inCDB, byte, bit):
            var b0: UInt8 = 0x80
            if inCDB { b0 |= 0x40 }
            if let bit { b0 |= 0x08 | (bit & 0x07) }
            return (b0, UInt8(byte >> 8), UInt8(truncatingIfNeeded: byte))
        case let .progress(value):
            return (0x80, UInt8(value >> 8), UInt8(truncatingIfNeeded: value))
        case let .raw(b0, b1, b2):
            return (b0 | 0x80, b1, b2)
        }
    }
}

/// Sense data for a CHECK CONDITION, independent of its wire format.
public struct SenseData: Hashable, Sendable {
    public var key: SenseKey
    public var additional: AdditionalSense
    /// INFORMATION field (LBA in error, miscompare offset...); nil when not valid.
    public var information: UInt64?
    /// COMMAND-SPECIFIC INFORMATION field; nil when none.
    public var commandSpecific: UInt64?
    /// Sense-key specific bytes; nil when none (SKSV clear).
    public var senseKeySpecific: SenseKeySpecific?

    public init(key: SenseKey, _ additional: AdditionalSense, information: UInt64? = nil,
                commandSpecific: UInt64? = nil, senseKeySpecific: SenseKeySpecific? = nil) {
        self.key = key
        self.additional = additional
        self.information = information
        self.commandSpecific = commandSpecific
        self.senseKeySpecific = senseKeySpecific
    }

    /// Length of the encoded sense in `format`.
    public func encodedLength(_ format: SenseFormat) -> Int {
        switch format {
        case .fixed:
            return 18
        case .descriptor:
            var n = 8
            if information != nil { n += 12 }
            if commandSpecific != nil { n += 12 }
            if senseKeySpecific != nil { n += 8 }
            return n
        }
    }

    /// Encodes into `buffer`, truncating to its size; returns the bytes written.
    @discardableResult
    public func encode(_ format: SenseFormat, into buffer: UnsafeMutableRawBufferPointer) -> Int {
        var bytes = SenseBytes()
        let n = encode(format, into: &bytes)
        let count = min(n, buffer.count)
        var i = 0
        while i < count {
            buffer[i] = bytes[i]
            i += 1
        }
        return count
    }

    /// Encodes into an inline sense buffer and returns the length.
    @discardableResult
    public func encode(_ format: SenseFormat, into bytes: inout SenseBytes) -> Int {
        bytes.clear()
        switch format {
        case .fixed:
            let info = information ?? 0
            bytes[0] = 0x70 | ((information != nil && info <= UInt64(UInt32.max)) ? 0x80 : 0)
            bytes[2] = key.rawValue
            bytes.putBE32(UInt32(truncatingIfNeeded: info), at: 3)
            bytes[7] = 10
            bytes.putBE32(UInt32(truncatingIfNeeded: commandSpecific ?? 0), at: 8)
            bytes[12] = additional.code
            bytes[13] = additional.qualifier
            if let sks = senseKeySpecific?.bytes {
                bytes[15] = sks.0
                bytes[16] = sks.1
                bytes[17] = sks.2
            }
            bytes.length = 18
            return 18
        case .descriptor:
            bytes[0] = 0x72
            bytes[1] = key.rawValue
            bytes[2] = additional.code
            bytes[3] = additional.qualifier
            var at = 8
            if let information {
                bytes[at] = 0x00
                bytes[at + 1] = 0x0A
                bytes[at + 2] = 0x80
                bytes.putBE64(information, at: at + 4)
                at += 12
            }
            if let commandSpecific {
                bytes[at] = 0x01
                bytes[at + 1] = 0x0A
                bytes.putBE64(commandSpecific, at: at + 4)
                at += 12
            }
            if let sks = senseKeySpecific?.bytes {
                bytes[at] = 0x02
                bytes[at + 1] = 0x06
                bytes[at + 4] = sks.0
                bytes[at + 5] = sks.1
                bytes[at + 6] = sks.2
                at += 8
            }
            bytes[7] = UInt8(at - 8)
            bytes.length = at
            return at
        }
    }
}

/// Inline storage for encoded sense data (up to 96 bytes, enough for every sense this target builds);
/// lives inside a task slot so completing a command never allocates.
public struct SenseBytes: Sendable {
    /// Capacity in bytes.
    public static let capacity = 96
    private var storage: InlineArray<96, UInt8> = .init(repeating: 0)
    /// Valid bytes.
    public var length: Int = 0

    public init() {}

    public subscript(i: Int) -> UInt8 {
        get { storage[i] }
        set { storage[i] = newValue }
    }

    /// Zeroes the buffer and sets its length to 0.
    public mutating func clear() {
        for i in 0..<Self.capacity { storage[i] = 0 }
        length = 0
    }

    mutating func putBE32(_ v: UInt32, at i: Int) {
        storage[i] = UInt8(v >> 24); storage[i + 1] = UInt8(truncatingIfNeeded: v >> 16)
        storage[i + 2] = UInt8(truncatingIfNeeded: v >> 8); storage[i + 3] = UInt8(truncatingIfNeeded: v)
    }

    mutating func putBE64(_ v: UInt64, at i: Int) {
        putBE32(UInt32(v >> 32), at: i)
        putBE32(UInt32(truncatingIfNeeded: v), at: i + 4)
    }

    /// The valid bytes as an array (for tests and logging; allocates).
    public var array: [UInt8] { (0..<length).map { storage[$0] } }

    /// Copies the valid bytes (truncated to the destination) into `destination`; returns the count.
    @discardableResult
    public func copy(into destination: UnsafeMutableRawBufferPointer) -> Int {
        let n = min(length, destination.count)
        for i in 0..<n { destination[i] = storage[i] }
        return n
    }
}

/// A command failure: CHECK CONDITION with sense, or another non-GOOD status.
/// Thrown (typed) by command handlers.
public struct SCSIError: Error, Hashable, Sendable {
    public var status: SCSIStatus
    public var sense: SenseData?

    public init(status: SCSIStatus = .checkCondition, sense: SenseData?) {
        self.status = status
        self.sense = sense
    }

    /// CHECK CONDITION with the given sense.
    public static func check(_ key: SenseKey, _ asc: AdditionalSense, information: UInt64? = nil,
                             senseKeySpecific: SenseKeySpecific? = nil) -> SCSIError {
        SCSIError(sense: SenseData(key: key, asc, information: information, senseKeySpecific: senseKeySpecific))
    }

    /// ILLEGAL REQUEST, INVALID FIELD IN CDB with a field pointer.
    public static func invalidFieldInCDB(byte: Int, bit: Int? = nil) -> SCSIError {
        check(.illegalRequest, .invalidFieldInCDB,
              senseKeySpecific: .fieldPointer(inCDB: true, byte: UInt16(byte), bit: bit.map { UInt8($0) }))
    }

    /// ILLEGAL REQUEST, INVALID FIELD IN PARAMETER LIST with a field pointer.
    public static func invalidFieldInParameterList(byte: Int, bit: Int? = nil) -> SCSIError {
        check(.illegalRequest, .invalidFieldInParameterList,
              senseKeySpecific: .fieldPointer(inCDB: false, byte: UInt16(byte), bit: bit.map { UInt8($0) }))
    }

    /// ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE.
    public static let invalidOpcode = check(.illegalRequest, .invalidCommandOperationCode,
                                            senseKeySpecific: .fieldPointer(inCDB: true, byte: 0, bit: nil))
    /// ILLEGAL REQUEST, LOGICAL BLOCK ADDRESS OUT OF RANGE.
    public static let lbaOutOfRange = check(.illegalRequest, .lbaOutOfRange)
    /// ILLEGAL REQUEST, LOGICAL UNIT NOT SUPPORTED.
    public static let logicalUnitNotSupported = check(.illegalRequest, .logicalUnitNotSupported)
    /// DATA PROTECT, WRITE PROTECTED.
    public static let writeProtected = check(.dataProtect, .writeProtected)
    /// RESERVATION CONFLICT status (no sense).
    public static let reservationConflict = SCSIError(status: .reservationConflict, sense: nil)
}
