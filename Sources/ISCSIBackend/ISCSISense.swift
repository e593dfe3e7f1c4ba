#if canImport(Glibc)
import Glibc
#endif

/// The remote target's verdict on a failed command: SCSI status and, for CHECK CONDITION, the
/// sense key and additional sense code/qualifier. The SCSI core can pass it to the guest unchanged
/// (see `ISCSIChannel.reapDetailed`).
public struct ISCSIRemoteSense: Sendable, Equatable, CustomStringConvertible {
    /// SCSI status byte (0x02 CHECK CONDITION, 0x08 BUSY, 0x18 RESERVATION CONFLICT, ...); 0 when the
    /// failure was local (timeout, connection), see `isLocal`.
    public var status: UInt8
    /// Sense key (CHECK CONDITION only).
    public var key: UInt8
    /// Additional sense code.
    public var asc: UInt8
    /// Additional sense code qualifier.
    public var ascq: UInt8

    /// Creates a sense triple.
    public init(status: UInt8, key: UInt8 = 0, asc: UInt8 = 0, ascq: UInt8 = 0) {
        self.status = status
        self.key = key
        self.asc = asc
        self.ascq = ascq
    }

    /// No remote sense (success, or a failure produced by this back-end).
    public static let none = ISCSIRemoteSense(status: 0)

    /// Whether the remote returned nothing (local failure or success).
    public var isLocal: Bool { status == 0 }

    public var description: String {
        func hex(_ v: UInt8) -> String {
            let s = String(v, radix: 16)
            return s.count == 1 ? "0\(s)" : s
        }
        return "status 0x\(hex(status)) key 0x\(hex(key)) asc/ascq 0x\(hex(asc))/0x\(hex(ascq))"
    }

    /// SCSI status values.
    public static let statusCheckCondition: UInt8 = 0x02
    public static let statusBusy: UInt8 = 0x08
    public static let statusReservationConflict: UInt8 = 0x18
    public static let statusTaskSetFull: UInt8 = 0x28
    public static let statusTaskAborted: UInt8 = 0x40

    /// Sense keys.
    public static let keyNotReady: UInt8 = 0x02
    public static let keyMediumError: UInt8 = 0x03
    public static let keyHardwareError: UInt8 = 0x04
    public static let keyIllegalRequest: UInt8 = 0x05
    public static let keyUnitAttention: UInt8 = 0x06
    public static let keyDataProtect: UInt8 = 0x07
    public static let keyAbortedCommand: UInt8 = 0x0b
    public static let keyMiscompare: UInt8 = 0x0e

    /// The errno a `BlockResult` carries for this remote failure:
    ///
    /// | remote                                   | errno      |
    /// |------------------------------------------|------------|
    /// | MEDIUM ERROR, HARDWARE ERROR, other keys | EIO        |
    /// | ILLEGAL REQUEST (bad CDB field, LBA out of range, unsupported opcode) | EINVAL (invalid opcode 0x20/0x00: EOPNOTSUPP) |
    /// | DATA PROTECT, space allocation failed (27h/07h) | ENOSPC |
    /// | DATA PROTECT, other (write protected)     | EROFS      |
    /// | NOT READY                                 | EAGAIN     |
    /// | ABORTED COMMAND                           | EAGAIN     |
    /// | MISCOMPARE                                | EILSEQ     |
    /// | RESERVATION CONFLICT status               | EBADE      |
    /// | BUSY, TASK SET FULL (after the timeout)   | EBUSY      |
    ///
    /// UNIT ATTENTION, BUSY, TASK SET FULL and TASK ABORTED are retried by the channel within the
    /// timeout and only reach the caller once it expires. Exceptions: CAPACITY DATA HAS CHANGED (2Ah/09h)
    /// makes the channel re-read the capacity before retrying, and the result then carries the new block
    /// count (`BlockResult.remoteBlockCount`, the SCSI core's resize event); RESERVATIONS PREEMPTED /
    /// RELEASED and REGISTRATIONS PREEMPTED (2Ah/03h-05h) on a pass-through command (PERSISTENT RESERVE,
    /// COMPARE AND WRITE) complete it at once so the guest learns it.
    ///
    /// Every failure the remote answered also travels in `BlockResult.remote` (status, key, ASC/ASCQ,
    /// INFORMATION, sense-key specific), which the SCSI core reports to the guest unchanged.
    public var errno: Int32 {
        switch status {
        case Self.statusReservationConflict: return EBADE
        case Self.statusBusy, Self.statusTaskSetFull: return EBUSY
        case Self.statusTaskAborted: return EAGAIN
        case Self.statusCheckCondition: break
        default: return EIO
        }
        switch key {
        case Self.keyIllegalRequest:
            return asc == 0x20 && ascq == 0x00 ? EOPNOTSUPP : EINVAL
        case Self.keyDataProtect:
            return asc == 0x27 && ascq == 0x07 ? ENOSPC : EROFS
        case Self.keyNotReady, Self.keyAbortedCommand, Self.keyUnitAttention: return EAGAIN
        case Self.keyMiscompare: return EILSEQ
        default: return EIO
        }
    }
}
