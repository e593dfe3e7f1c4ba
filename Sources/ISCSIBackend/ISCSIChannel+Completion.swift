import BlockIO
import CLibISCSI
import CSystem
#if canImport(Glibc)
import Glibc
#endif

// Command completions: the remote's status and sense turned into success, retry (UNIT ATTENTION,
// BUSY, NOT READY becoming ready, capacity change) or failure, and the next part of a split transfer.

extension ISCSIChannel {
    func commandDone(_ index: Int32, status: Int32, task: UnsafeMutablePointer<scsi_task>?) {
        let slot = slots + Int(index)
        guard let mine = slot.pointee.task, task == nil || task == mine else { return }
        slot.pointee.task = nil
        defer { scsi_free_scsi_task(mine) }
        guard slot.pointee.phase == .inFlight else { return }
        let now = monotonicNanoseconds()
        if slot.pointee.aborting && status != Int32(bitPattern: SCSI_STATUS_GOOD.rawValue)
            && status != Int32(bitPattern: SCSI_STATUS_CONDITION_MET.rawValue) {
            // Aborted on the guest's behalf (ABORT TASK / LUN RESET): never retried or resubmitted,
            // whatever came back (cancellation, the reset's UNIT ATTENTION, a lost session).
            complete(index, .failure(ECANCELED))
            return
        }
        switch status {
        case Int32(bitPattern: SCSI_STATUS_GOOD.rawValue), Int32(bitPattern: SCSI_STATUS_CONDITION_MET.rawValue):
            commandSucceeded(index, task: mine)
        case Int32(bitPattern: SCSI_STATUS_CHECK_CONDITION.rawValue):
            let key = UInt8(truncatingIfNeeded: mine.pointee.sense.key.rawValue)
            let code = UInt16(truncatingIfNeeded: mine.pointee.sense.ascq)
            let sense = ISCSIRemoteSense(status: ISCSIRemoteSense.statusCheckCondition, key: key,
                                         asc: UInt8(code >> 8), ascq: UInt8(code & 0xff))
            slot.pointee.sense = sense
            slot.pointee.remote = Self.remoteStatus(of: mine, sense: sense)
            switch key {
            case ISCSIRemoteSense.keyUnitAttention where code == 0x2a09:
                // The remote's capacity changed: re-read it, then send this command again; its result
                // carries the new block count (the SCSI core turns it into its resize event).
                capacityChanged()
                statistics.unitAttentionsRetried += 1
                slot.pointee.awaitingGeometry = true
                slot.pointee.reportBlockCount = true
                retryOrFail(index, sense: sense, delayNanoseconds: 0, limit: 16, now: now)
            case ISCSIRemoteSense.keyUnitAttention where slot.pointee.request.passThrough.isPresent
                    && sense.asc == 0x2a && (0x03...0x05).contains(sense.ascq):
                // Reservations/registrations preempted or released on the remote: the guest that
                // passes PERSISTENT RESERVE through must learn it (the command did not execute).
                complete(index, .failure(sense.errno))
            case ISCSIRemoteSense.keyUnitAttention:
                statistics.unitAttentionsRetried += 1
                retryOrFail(index, sense: sense, delayNanoseconds: 0, limit: 16, now: now)
            case ISCSIRemoteSense.keyNotReady where sense.asc == 0x04 && (sense.ascq == 0x01 || sense.ascq == 0x0a):
                statistics.busyRetries += 1
                retryOrFail(index, sense: sense, delayNanoseconds: 100_000_000, limit: 1000, now: now)
            case ISCSIRemoteSense.keyAbortedCommand:
                statistics.busyRetries += 1
                retryOrFail(index, sense: sense, delayNanoseconds: 10_000_000, limit: 8, now: now)
            default:
                complete(index, .failure(sense.errno))
            }
        case Int32(bitPattern: SCSI_STATUS_BUSY.rawValue), Int32(bitPattern: SCSI_STATUS_TASK_SET_FULL.rawValue), Int32(bitPattern: SCSI_STATUS_TASK_ABORTED.rawValue):
            let sense = ISCSIRemoteSense(status: UInt8(truncatingIfNeeded: status))
            slot.pointee.sense = sense
            slot.pointee.remote = RemoteSCSIStatus(status: sense.status)
            statistics.busyRetries += 1
            let backoff = min(UInt64(1) << min(UInt64(slot.pointee.retries), 7), 100) * 1_000_000
            retryOrFail(index, sense: sense, delayNanoseconds: backoff, limit: 10_000, now: now)
        case Int32(bitPattern: SCSI_STATUS_RESERVATION_CONFLICT.rawValue):
            let sense = ISCSIRemoteSense(status: ISCSIRemoteSense.statusReservationConflict)
            slot.pointee.sense = sense
            slot.pointee.remote = RemoteSCSIStatus(status: sense.status)
            complete(index, .failure(sense.errno))
        default:
            // CANCELLED (session torn down), ERROR (protocol error), TIMEOUT: the command did not
            // complete on the remote as far as we know; send it again on the next session.
            if status != Int32(bitPattern: SCSI_STATUS_CANCELLED.rawValue) {
                failureReason = "command failed on the transport: \(lastLibraryError())"
            } else if failureReason.isEmpty {
                failureReason = "connection to \(config.url.portal) lost"
            }
            lostConnection = true
            statistics.commandsResubmitted += 1
            requeue(index, delayNanoseconds: 0)
        }
    }

    func retryOrFail(_ index: Int32, sense: ISCSIRemoteSense, delayNanoseconds: UInt64, limit: UInt16, now: UInt64) {
        let slot = slots + Int(index)
        if slot.pointee.retries >= limit || now &+ delayNanoseconds >= slot.pointee.deadline {
            complete(index, .failure(sense.errno))
            return
        }
        slot.pointee.retries += 1
        requeue(index, delayNanoseconds: delayNanoseconds)
    }

    func commandSucceeded(_ index: Int32, task: UnsafeMutablePointer<scsi_task>) {
        let slot = slots + Int(index)
        let request = slot.pointee.request
        switch request.operation {
        case .read, .write:
            if request.passThrough.isPresent {
                var bytes = request.length
                if task.pointee.residual_status == SCSI_RESIDUAL_UNDERFLOW { bytes -= min(UInt64(task.pointee.residual), bytes) }
                complete(index, .success(bytes))
                return
            }
            var bytes = slot.pointee.chunk
            if task.pointee.residual_status == SCSI_RESIDUAL_UNDERFLOW {
                bytes -= min(UInt64(task.pointee.residual), bytes)
            }
            let short = bytes < slot.pointee.chunk
            slot.pointee.done += bytes
            slot.pointee.chunk = 0
            slot.pointee.retries = 0
            if short || slot.pointee.done >= request.length {
                complete(index, .success(slot.pointee.done))
            } else {
                statistics.splitParts += 1
                requeue(index, delayNanoseconds: 0)
            }
        case .flush:
            complete(index, .success(0))
        case .discard, .writeZeroes:
            slot.pointee.done += slot.pointee.chunk
            slot.pointee.chunk = 0
            slot.pointee.retries = 0
            if slot.pointee.done >= request.length {
                complete(index, .success(request.length))
            } else {
                requeue(index, delayNanoseconds: 0)
            }
        }
    }


    /// The remote's status and sense for a CHECK CONDITION: the raw sense libiscsi keeps in `datain`
    /// (2-byte length, then the sense bytes) gives INFORMATION and the sense-key specific bytes.
    static func remoteStatus(of task: UnsafeMutablePointer<scsi_task>, sense: ISCSIRemoteSense) -> RemoteSCSIStatus {
        var remote = RemoteSCSIStatus(status: sense.status, senseKey: sense.key, additionalSenseCode: sense.asc,
                                      additionalSenseCodeQualifier: sense.ascq)
        if let data = task.pointee.datain.data, task.pointee.datain.size > 2 {
            let declared = Int(data[0]) << 8 | Int(data[1])
            let n = min(declared, Int(task.pointee.datain.size) - 2)
            if n > 0, let parsed = RemoteSCSIStatus.checkCondition(sense: UnsafeRawBufferPointer(start: data + 2, count: n)),
               parsed.senseKey == sense.key {
                remote.information = parsed.information
                remote.hasInformation = parsed.hasInformation
                remote.senseKeySpecific = parsed.senseKeySpecific
            }
        }
        return remote
    }
}
