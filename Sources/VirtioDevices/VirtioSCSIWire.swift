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

    /// The `response` byte of a command's `virtio_scsi_cmd_resp` and of a TMF's `virtio_scsi_ctrl_tmf_resp`
    /// (virtio 1.2 5.6.6.1, 5.6.6.2): how the transport delivered the request; a command's SCSI status is apart.
    public enum Response: UInt8, Sendable {
        /// VIRTIO_SCSI_S_OK: the command completed (its status tells how); for a TMF, FUNCTION COMPLETE.
        case ok = 0
        /// VIRTIO_SCSI_S_OVERRUN: the data-in buffers were too small for the data.
        case overrun = 1
        /// VIRTIO_SCSI_S_ABORTED: a task management function aborted the command.
        case aborted = 2
        /// VIRTIO_SCSI_S_BAD_TARGET: the LUN field names no target of this device (byte 0 not 1, target not 0).
        case badTarget = 3
        /// VIRTIO_SCSI_S_RESET: a reset ended the command.
        case reset = 4
        /// VIRTIO_SCSI_S_BUSY: no room for the command now (no free task slot); the driver retries.
        case busy = 5
        /// VIRTIO_SCSI_S_TRANSPORT_FAILURE: the request failed in the transport; another path may work.
        case transportFailure = 6
        /// VIRTIO_SCSI_S_TARGET_FAILURE: the target failed; retrying on another path will not help.
        case targetFailure = 7
        /// VIRTIO_SCSI_S_NEXUS_FAILURE: the I_T nexus failed.
        case nexusFailure = 8
        /// VIRTIO_SCSI_S_FAILURE: any other failure, here a malformed request (short header, no room for the
        /// response, data in both directions without VIRTIO_SCSI_F_INOUT).
        case failure = 9
        /// VIRTIO_SCSI_S_FUNCTION_SUCCEEDED: a QUERY TASK / QUERY TASK SET found what it asked about.
        case functionSucceeded = 10
        /// VIRTIO_SCSI_S_FUNCTION_REJECTED: the TMF is not supported or not allowed.
        case functionRejected = 11
        /// VIRTIO_SCSI_S_INCORRECT_LUN: the LUN field is not an address this device decodes.
        case incorrectLUN = 12
    }

    /// The `type` of a control queue request (virtio 1.2 5.6.6.2).
    public enum ControlType: UInt32, Sendable {
        /// VIRTIO_SCSI_T_TMF: a task management function (`TMF` subtype).
        case taskManagement = 0
        /// VIRTIO_SCSI_T_AN_QUERY: which asynchronous notifications the device supports.
        case asyncNotificationQuery = 1
        /// VIRTIO_SCSI_T_AN_SUBSCRIBE: subscribes to asynchronous notifications.
        case asyncNotificationSubscribe = 2
    }

    /// The `subtype` of a task management request (VIRTIO_SCSI_T_TMF_*; SAM-5 task management functions).
    public enum TMF: UInt32, Sendable {
        case abortTask = 0
        case abortTaskSet = 1
        case clearACA = 2
        case clearTaskSet = 3
        case itNexusReset = 4
        case logicalUnitReset = 5
        case queryTask = 6
        case queryTaskSet = 7
    }

    /// The `event` of a `virtio_scsi_event` on the event queue (virtio 1.2 5.6.6.3).
    public enum Event: UInt32, Sendable {
        /// VIRTIO_SCSI_T_NO_EVENT (with `missedFlag`: events were dropped, the driver rescans).
        case noEvent = 0
        /// VIRTIO_SCSI_T_TRANSPORT_RESET: a LUN appeared or went away (`ResetReason`).
        case transportReset = 1
        /// VIRTIO_SCSI_T_ASYNC_NOTIFY: an asynchronous notification (not sent by this device).
        case asyncNotification = 2
        /// VIRTIO_SCSI_T_PARAM_CHANGE: a LUN's parameters changed; `reason` carries ASC | ASCQ << 8.
        case parameterChange = 3

        /// VIRTIO_SCSI_T_EVENTS_MISSED: OR-ed into `event` when events were lost for want of buffers.
        public static let missedFlag: UInt32 = 0x8000_0000
    }

    /// The `reason` of a VIRTIO_SCSI_T_TRANSPORT_RESET event.
    public enum ResetReason: UInt32, Sendable {
        /// VIRTIO_SCSI_EVT_RESET_RESCAN: the LUN appeared; the driver scans it.
        case rescan = 1
        /// VIRTIO_SCSI_EVT_RESET_REMOVED: the LUN went away; the driver removes its device.
        case removed = 2
    }

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
