import BlockIO
import CLibISCSI
import CSystem
#if canImport(Glibc)
import Glibc
#endif

// Task management on the remote: ABORT TASK, LOGICAL UNIT RESET, and the local cancels they lead to.

extension ISCSIChannel {
    /// Aborts the request submitted with `token` (the core's ABORT TASK). A request not yet sent
    /// completes with ECANCELED at once; one in flight gets an ABORT TASK on the remote and
    /// completes with ECANCELED when the remote confirms (or with its real result if it finished
    /// first: a write reported successful did reach the remote). Returns false if no such request.
    @discardableResult
    public func abort(token: UInt64) -> Bool {
        for i in 0..<capacity {
            let slot = slots + i
            guard slot.pointee.token == token, slot.pointee.phase == .queued || slot.pointee.phase == .inFlight else { continue }
            if slot.pointee.phase == .queued {
                complete(Int32(i), .failure(ECANCELED))
            } else if !slot.pointee.aborting, let context, let task = slot.pointee.task {
                slot.pointee.aborting = true
                // Cannot send the TMF: the session is dropped; the aborted command then completes ECANCELED.
                sentTaskManagement("ABORT TASK", iscsi_task_mgmt_abort_task_async(
                    context, task, iscsiTrampoline, UnsafeMutableRawPointer(tags + capacity + 3 + i)))
                return true
            }
            afterTaskManagement()
            return true
        }
        return false
    }

    /// Resets the remote LUN (the core's LOGICAL UNIT RESET): requests not yet sent complete with
    /// ECANCELED at once; the ones in flight complete with ECANCELED once the remote answers the
    /// LUN RESET (or with their real result if they finished first). Returns 0, or ENOTCONN when
    /// the session is down (all outstanding requests are then cancelled locally).
    @discardableResult
    public func resetLogicalUnit() -> Bool { resetLUN() == 0 }

    /// Resets the remote LUN; see ``resetLogicalUnit()``. Returns 0 or ENOTCONN.
    @discardableResult
    public func resetLUN() -> Int32 {
        var inFlightCount = 0
        for i in 0..<capacity {
            let slot = slots + i
            switch slot.pointee.phase {
            case .queued:
                complete(Int32(i), .failure(ECANCELED))
            case .inFlight:
                slot.pointee.aborting = true
                inFlightCount += 1
            default:
                break
            }
        }
        guard phase == .online, let context else { return ENOTCONN }
        sentTaskManagement("LUN RESET", iscsi_task_mgmt_lun_reset_async(context, UInt32(config.url.lun), iscsiTrampoline,
                                                                       UnsafeMutableRawPointer(tags + capacity + 2)))
        return 0
    }

    /// Counts a task management function libiscsi queued (`rc` 0), or drops the session when it could not.
    private func sentTaskManagement(_ name: String, _ rc: Int32) {
        if rc == 0 {
            pendingTaskManagement += 1
        } else {
            failureReason = "cannot send \(name): \(lastLibraryError())"
            lostConnection = true
        }
        afterTaskManagement()
    }

    private func afterTaskManagement() {
        afterLibraryCall(now: monotonicNanoseconds())
        syncRegistration()
    }

    func taskManagementDone(slot target: Int32?, status: Int32, response: UnsafeMutableRawPointer?) {
        pendingTaskManagement = max(0, pendingTaskManagement - 1)
        guard status == Int32(bitPattern: SCSI_STATUS_GOOD.rawValue) else {
            lastTaskManagementResponse = -1
            return   // session lost: aborting commands complete ECANCELED through the cancellation
        }
        lastTaskManagementResponse = response.map { Int32(bitPattern: $0.load(as: UInt32.self)) } ?? 0
        statistics.taskManagementResponses += 1
        // Whatever the remote still had is gone; commands it answered before this response have
        // already completed. Cancel the local side of the rest (deferred: we are inside iscsi_service).
        for i in 0..<capacity {
            let slot = slots + i
            guard slot.pointee.phase == .inFlight, slot.pointee.aborting, slot.pointee.task != nil else { continue }
            if let target, Int(target) != i { continue }
            slot.pointee.cancelRequested = true
            cancelsPending = true
        }
    }

    /// Cancels the local libiscsi tasks the remote no longer has. Only while libiscsi is not in the
    /// middle of writing a PDU (no POLLOUT wanted): a partly sent PDU must not be freed under it.
    /// Until then the commands may still go out and complete with their real result.
    func performRequestedCancels() {
        guard let context else { cancelsPending = false; return }
        if iscsi_which_events(context) & Int32(POLLOUT) != 0 { return }
        cancelsPending = false
        for i in 0..<capacity {
            let slot = slots + i
            guard slot.pointee.cancelRequested else { continue }
            slot.pointee.cancelRequested = false
            if let task = slot.pointee.task, slot.pointee.phase == .inFlight {
                // Invokes the command callback with SCSI_STATUS_CANCELLED -> ECANCELED.
                _ = iscsi_scsi_cancel_task(context, task)
            }
        }
    }
}
