/// Side effects a reservation command asks of the target beyond its own state.
public struct ReservationEffects: Sendable {
    /// Unit attentions to establish (on the same logical unit).
    public var unitAttentions: [(AdditionalSense, UnitAttentionScope)] = []
    /// PREEMPT AND ABORT: abort tasks of these nexuses on the LUN.
    public var abortTasksOf: [ITNexus] = []
    public init() {}
}

/// SPC-4 persistent reservation types (PERSISTENT RESERVE OUT TYPE field).
public enum PersistentReservationType: UInt8, Sendable, CaseIterable {
    case writeExclusive = 0x1
    case exclusiveAccess = 0x3
    case writeExclusiveRegistrantsOnly = 0x5
    case exclusiveAccessRegistrantsOnly = 0x6
    case writeExclusiveAllRegistrants = 0x7
    case exclusiveAccessAllRegistrants = 0x8

    /// Every registrant is a reservation holder (WE-AR, EA-AR).
    public var allRegistrantsHold: Bool { self == .writeExclusiveAllRegistrants || self == .exclusiveAccessAllRegistrants }
    /// Registrants that do not hold the reservation still have full access (RO and AR types).
    public var registrantsHaveAccess: Bool { rawValue >= 0x5 }
    /// Non-privileged nexuses may not read (the EA family).
    public var excludesReads: Bool {
        self == .exclusiveAccess || self == .exclusiveAccessRegistrantsOnly || self == .exclusiveAccessAllRegistrants
    }
}

/// How a command is treated in the presence of a reservation held by another I_T nexus.
public enum ReservationAccess: Sendable, Equatable {
    /// Never conflicts (INQUIRY, REPORT LUNS, REQUEST SENSE, READ CAPACITY...).
    case unrestricted
    /// Reads the medium or device state: allowed by Write Exclusive types, refused by Exclusive Access types.
    case read
    /// Changes the medium or device state: conflicts.
    case write
    /// PERSISTENT RESERVE IN.
    case persistentReserveIn
    /// PERSISTENT RESERVE OUT (checked by `persistentReserveOut` itself under a persistent reservation).
    case persistentReserveOut
    /// RESERVE(6)/(10).
    case reserve
    /// RELEASE(6)/(10).
    case release
    /// TEST UNIT READY: allowed under persistent reservations (SPC-3 onwards), conflicts with an SPC-2 one.
    case testUnitReady

    /// Classifies a CDB (SPC-4 table "SPC commands that are allowed in the presence of various
    /// reservations" and the SBC-3 table for direct-access commands). Unknown operation codes are
    /// `.write` (conflict by default).
    public static func of(_ cdb: CDB) -> ReservationAccess {
        switch cdb.opcode {
        case 0x00: return .testUnitReady
        case 0x03, 0x12, 0xA0, 0x4D, 0x25, 0xAB:  // REQUEST SENSE, INQUIRY, REPORT LUNS, LOG SENSE, READ CAPACITY(10), READ MEDIA SERIAL
            return .unrestricted
        case 0x5E: return .persistentReserveIn
        case 0x5F: return .persistentReserveOut
        case 0x16, 0x56: return .reserve
        case 0x17, 0x57: return .release
        case 0x9E:
            switch cdb[1] & 0x1F {
            case 0x10: return .unrestricted  // READ CAPACITY(16)
            case 0x11, 0x12: return .read    // READ LONG(16), GET LBA STATUS
            default: return .write
            }
        case 0xA3:  // MAINTENANCE IN
            switch cdb[1] & 0x1F {
            case 0x0C, 0x0D: return .read    // REPORT SUPPORTED OPERATION CODES / TMFs
            case 0x05, 0x0A, 0x0B, 0x0E, 0x0F: return .unrestricted  // identifying info, target port groups, aliases, priority, timestamp
            default: return .write
            }
        case 0x08, 0x28, 0xA8, 0x88,        // READ
             0x2F, 0xAF, 0x8F,              // VERIFY
             0x1A, 0x5A,                    // MODE SENSE
             0x3C, 0x1C,                    // READ BUFFER, RECEIVE DIAGNOSTIC RESULTS
             0x37, 0xB7, 0x3E,              // READ DEFECT DATA, READ LONG(10)
             0x8C, 0x34, 0x90:              // READ ATTRIBUTE, PRE-FETCH
            return .read
        case 0x1E:  // PREVENT ALLOW MEDIUM REMOVAL: allowed when PREVENT = 0
            return cdb[4] & 0x03 == 0 ? .unrestricted : .write
        case 0x1B:  // START STOP UNIT: allowed when START = 1 and POWER CONDITION = 0
            return (cdb[4] & 0x01 == 1 && cdb[4] >> 4 == 0) ? .unrestricted : .write
        default:
            return .write
        }
    }
}

/// One persistent reservation registration (SPC-4 5.13.7).
public struct PersistentRegistration: Sendable, Equatable {
    /// The I_T nexus the registration was made through.
    public var nexus: ITNexus
    /// The registered reservation key (never 0).
    public var key: UInt64
    /// Registered with ALL_TG_PT = 1: covers the initiator port through every target port.
    public var allTargetPorts: Bool

    /// Whether this registration covers `other`.
    public func covers(_ other: ITNexus) -> Bool {
        nexus.initiator == other.initiator && (allTargetPorts || nexus.targetPort == other.targetPort)
    }
}

/// A persistent reservation in force.
public struct PersistentReservation: Sendable, Equatable {
    /// The holder's registration (for all-registrants types: the one that reserved; every registrant holds it).
    public var holder: ITNexus
    public var type: PersistentReservationType
}

extension ReservationEffects {
    /// The task scopes PREEMPT AND ABORT asks front-ends to abort on `lun` (see `TaskManagementPlan`).
    public func abortScopes(on lun: LogicalUnitNumber) -> [TaskScope] {
        abortTasksOf.map { TaskScope(nexus: $0, lun: lun, tag: nil) }
    }
}

extension UnitAttentionBoard {
    /// Establishes the unit attentions a reservation command asked for.
    public func establish(_ effects: ReservationEffects) {
        for (condition, scope) in effects.unitAttentions { establish(condition, for: scope) }
    }
}
