/// An I_T nexus: one initiator port talking to one target port.
///
/// Front-ends choose the identifiers (a vhost-user connection, a PVSCSI adapter instance); the
/// core only compares them. Unit attentions and reservations are kept per nexus.
public struct ITNexus: Hashable, Sendable, CustomStringConvertible {
    /// Identifies the initiator port (unique within the target).
    public var initiator: UInt64
    /// Relative target port identifier (1-based per SPC; 1 when there is one port).
    public var targetPort: UInt16

    public init(initiator: UInt64, targetPort: UInt16 = 1) {
        self.initiator = initiator
        self.targetPort = targetPort
    }

    public var description: String { "I\(initiator)-T\(targetPort)" }
}

/// A logical unit number in the flat space 0...16383 (SAM-5 single-level, peripheral or flat addressing).
public struct LogicalUnitNumber: Hashable, Comparable, Sendable, CustomStringConvertible {
    /// The LUN value, 0...16383.
    public let value: UInt16

    /// Largest LUN the flat (14-bit) address method can carry.
    public static let maximum: UInt16 = 16383

    /// Creates a LUN, or nil if `value` is out of the 14-bit flat range.
    public init?(_ value: Int) {
        guard value >= 0 && value <= Int(Self.maximum) else { return nil }
        self.value = UInt16(value)
    }

    /// The 8-byte SAM LUN structure as REPORT LUNS lists it: peripheral device addressing for
    /// LUNs below 256, flat space addressing (01b) above.
    public var samEncoding: UInt64 {
        if value < 256 { return UInt64(value) << 48 }
        return (UInt64(0x4000 | value)) << 48
    }

    /// Decodes the first level of an 8-byte SAM LUN (peripheral or flat addressing); nil for other methods
    /// or when the lower levels are not zero.
    public init?(samEncoding raw: UInt64) {
        guard raw & 0x0000_FFFF_FFFF_FFFF == 0 else { return nil }
        let first = UInt16(truncatingIfNeeded: raw >> 48)
        switch first >> 14 {
        case 0b00:
            guard first & 0x3F00 == 0 else { return nil }  // bus identifier must be 0
            self.value = first & 0xFF
        case 0b01:
            self.value = first & 0x3FFF
        default:
            return nil
        }
    }

    public static func < (a: Self, b: Self) -> Bool { a.value < b.value }
    public var description: String { "LUN \(value)" }
}

/// SAM task attribute of a command.
public enum TaskAttribute: UInt8, Sendable {
    case simple = 0
    case headOfQueue = 1
    case ordered = 2
    case aca = 4
}
