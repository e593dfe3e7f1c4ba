import BlockIO
import CSystem
import SCSI
import Synchronization
import Virtio
#if canImport(Glibc)
import Glibc
#endif

/// virtio-scsi wire constants (virtio 1.2 section 5.6).
public enum VirtioSCSI {
    public static let featureInOut: UInt64 = 1 << 0
    public static let featureHotplug: UInt64 = 1 << 1
    public static let featureChange: UInt64 = 1 << 2

    /// Virtqueue indices: control, event, then request queues.
    public static let controlQueue = 0
    public static let eventQueue = 1
    public static let firstRequestQueue = 2

    // Response codes.
    public static let responseOK: UInt8 = 0
    public static let responseOverrun: UInt8 = 1
    public static let responseAborted: UInt8 = 2
    public static let responseBadTarget: UInt8 = 3
    public static let responseReset: UInt8 = 4
    public static let responseBusy: UInt8 = 5
    public static let responseTransportFailure: UInt8 = 6
    public static let responseTargetFailure: UInt8 = 7
    public static let responseNexusFailure: UInt8 = 8
    public static let responseFailure: UInt8 = 9
    public static let responseFunctionSucceeded: UInt8 = 10
    public static let responseFunctionRejected: UInt8 = 11
    public static let responseIncorrectLUN: UInt8 = 12

    // Control queue request types.
    public static let typeTMF: UInt32 = 0
    public static let typeANQuery: UInt32 = 1
    public static let typeANSubscribe: UInt32 = 2

    // TMF subtypes.
    public static let tmfAbortTask: UInt32 = 0
    public static let tmfAbortTaskSet: UInt32 = 1
    public static let tmfClearACA: UInt32 = 2
    public static let tmfClearTaskSet: UInt32 = 3
    public static let tmfITNexusReset: UInt32 = 4
    public static let tmfLogicalUnitReset: UInt32 = 5
    public static let tmfQueryTask: UInt32 = 6
    public static let tmfQueryTaskSet: UInt32 = 7

    // Events.
    public static let eventNone: UInt32 = 0
    public static let eventTransportReset: UInt32 = 1
    public static let eventParamChange: UInt32 = 3
    public static let eventsMissed: UInt32 = 0x8000_0000
    public static let resetRescan: UInt32 = 1
    public static let resetRemoved: UInt32 = 2

    /// Size of a virtio_scsi_event.
    public static let eventSize = 16
    /// Request header bytes before the CDB (lun, tag, task_attr, prio, crn).
    public static let requestHeaderSize = 19
    /// Response header bytes before the sense (sense_len, resid, status_qualifier, status, response).
    public static let responseHeaderSize = 12
    /// Config space offsets of the writable fields.
    public static let configSenseSizeOffset = 20
    public static let configCDBSizeOffset = 24

    /// The LUN a virtio-scsi 8-byte address names: `.badTarget` when byte 0 is not 1 or the target is
    /// not 0, `.incorrectLUN` when bytes 2-3 are not a single-level flat or peripheral LUN or bytes 4-7 are set.
    public enum Address: Equatable, Sendable {
        case lun(LogicalUnitNumber)
        case badTarget
        case incorrectLUN
    }

    /// Decodes an 8-byte virtio-scsi LUN field.
    public static func decodeAddress(_ b: (UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8)) -> Address {
        guard b.0 == 1, b.1 == 0 else { return .badTarget }
        guard b.4 == 0, b.5 == 0, b.6 == 0, b.7 == 0 else { return .incorrectLUN }
        let value: Int
        switch b.2 >> 6 {
        case 1: value = Int(b.2 & 0x3F) << 8 | Int(b.3)
        case 0 where b.2 == 0: value = Int(b.3)
        default: return .incorrectLUN
        }
        guard let lun = LogicalUnitNumber(value) else { return .incorrectLUN }
        return .lun(lun)
    }

    /// The 8-byte address of `lun` on target 0, with bytes 2-3 in the same SAM encoding as REPORT LUNS
    /// (`LogicalUnitNumber.samEncoding`): single-level peripheral addressing below 256, flat (01b) above, as
    /// QEMU does. Linux turns bytes 2-3 into its LUN number with `scsilun_to_int` (`(lun[2] << 8) | lun[3]`),
    /// so an event must use the encoding the guest's scan saw, or LUN 2 announced as flat `0x4002` would become
    /// a second device, 16386, for the same LUN.
    public static func encodeAddress(_ lun: LogicalUnitNumber) -> [UInt8] {
        let first = UInt16(truncatingIfNeeded: lun.samEncoding >> 48)
        return [1, 0, UInt8(first >> 8), UInt8(truncatingIfNeeded: first), 0, 0, 0, 0]
    }
}
