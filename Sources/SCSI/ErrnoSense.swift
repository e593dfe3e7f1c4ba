import BlockIO
#if canImport(Glibc)
import Glibc
#endif

extension AdditionalSense {
    /// LOGICAL UNIT IS IN PROCESS OF BECOMING READY (04h/01h): initiators retry after a delay.
    public static let logicalUnitBecomingReady = AdditionalSense(0x04, 0x01)
}

/// Maps a back-end failure to the SCSI status and sense the initiator sees. The one place where
/// errno values become sense data.
///
/// | errno | result |
/// |---|---|
/// | EIO, EILSEQ, EBADMSG | MEDIUM ERROR: reads 11h/00h UNRECOVERED READ ERROR, writes/flush/discard 0Ch/00h WRITE ERROR |
/// | ENOSPC, EDQUOT | DATA PROTECT 27h/07h SPACE ALLOCATION FAILED WRITE PROTECT |
/// | EROFS | DATA PROTECT 27h/00h WRITE PROTECTED |
/// | ENOMEM, EAGAIN, EBUSY, ENOBUFS | BUSY status, no sense (the initiator retries) |
/// | ETIMEDOUT, ENOTCONN, ECONNRESET, ECONNREFUSED, ECONNABORTED, EPIPE, EHOSTUNREACH, ENETUNREACH, ENETDOWN, ESHUTDOWN | NOT READY 04h/01h LOGICAL UNIT IS IN PROCESS OF BECOMING READY (a remote back-end is reconnecting; initiators retry after a delay) |
/// | ECANCELED | TASK ABORTED status |
/// | EOPNOTSUPP (discard, write-zeroes) | ILLEGAL REQUEST 24h/00h INVALID FIELD IN CDB (initiators then stop sending UNMAP / WRITE SAME with UNMAP) |
/// | anything else | HARDWARE ERROR 44h/00h INTERNAL TARGET FAILURE |
public enum BackendErrorMapping {
    /// The error for `errno` from a request of kind `operation`.
    public static func error(errno code: Int32, operation: BlockOperation) -> SCSIError {
        switch code {
        case EIO, EILSEQ, EBADMSG:
            return .check(.mediumError, operation == .read ? .unrecoveredReadError : .writeError)
        case ENOSPC, EDQUOT:
            return .check(.dataProtect, .spaceAllocationFailedWriteProtect)
        case EROFS:
            return .writeProtected
        case ENOMEM, EAGAIN, EBUSY, ENOBUFS:
            return SCSIError(status: .busy, sense: nil)
        case ETIMEDOUT, ENOTCONN, ECONNRESET, ECONNREFUSED, ECONNABORTED, EPIPE, EHOSTUNREACH, ENETUNREACH,
             ENETDOWN, ESHUTDOWN:
            return .check(.notReady, .logicalUnitBecomingReady)
        case ECANCELED:
            return SCSIError(status: .taskAborted, sense: nil)
        case EOPNOTSUPP where operation == .discard || operation == .writeZeroes:
            return .check(.illegalRequest, .invalidFieldInCDB)
        default:
            return .check(.hardwareError, .internalTargetFailure)
        }
    }
}
