import BlockIO
import CLibISCSI
import CSystem
#if canImport(Glibc)
import Glibc
#endif

// The slot table: one slot per admitted request, the submit queue, deadlines and completions.

extension ISCSIChannel {
    enum SlotPhase: UInt8 {
        case free, queued, inFlight, completed
    }

    struct Slot {
        var phase: SlotPhase = .free
        var inQueue = false
        var token: UInt64 = 0
        var request = BlockRequest(operation: .flush, offset: 0, length: 0)
        var deadline: UInt64 = 0
        var notBefore: UInt64 = 0
        var task: UnsafeMutablePointer<scsi_task>?
        var done: UInt64 = 0
        var chunk: UInt64 = 0
        var retries: UInt16 = 0
        var result = BlockResult.success(0)
        var sense = ISCSIRemoteSense.none
        /// The remote's full status and sense (INFORMATION, sense-key specific) for the result.
        var remote = RemoteSCSIStatus.none
        /// Answered by the remote with CAPACITY DATA HAS CHANGED: held until the capacity is re-read,
        /// then sent again; its result carries the new block count (the core's resize event).
        var awaitingGeometry = false
        var reportBlockCount = false
        var unmap = unmap_list(lba: 0, num: 0)
        /// The guest (via the core) asked to abort it: a cancellation completes it with ECANCELED.
        var aborting = false
        /// The remote confirmed the abort: cancel the local libiscsi task after `iscsi_service` returns.
        var cancelRequested = false
    }

    func enqueue(_ index: Int32) {
        let slot = slots + Int(index)
        guard !slot.pointee.inQueue else { return }
        slot.pointee.inQueue = true
        submitQueue.push(index)
    }

    func requeue(_ index: Int32, delayNanoseconds: UInt64) {
        let slot = slots + Int(index)
        slot.pointee.phase = .queued
        slot.pointee.notBefore = delayNanoseconds == 0 ? 0 : monotonicNanoseconds() &+ delayNanoseconds
        enqueue(index)
    }

    func complete(_ index: Int32, _ result: BlockResult) {
        let slot = slots + Int(index)
        slot.pointee.phase = .completed
        var result = result
        if result.succeeded {
            slot.pointee.sense = .none
            slot.pointee.remote = .none
        } else if result.errno != ECANCELED && result.errno != ETIMEDOUT && slot.pointee.remote.isPresent {
            // The remote's verdict (kept when a BUSY/UA that recurred until the deadline ends the request).
            result.remote = slot.pointee.remote
        }
        if slot.pointee.reportBlockCount && geometryKnown { result.remoteBlockCount = geometry.blockCount }
        slot.pointee.awaitingGeometry = false
        slot.pointee.reportBlockCount = false
        slot.pointee.result = result
        completions.push(index)
    }

    func expireRequests(now: UInt64) {
        guard inFlight > 0 else { return }
        var stuck = false
        for i in 0..<capacity {
            let slot = slots + i
            guard now >= slot.pointee.deadline else { continue }
            switch slot.pointee.phase {
            case .queued:
                let sense = slot.pointee.sense
                // Still waiting for the remote after the whole timeout: retryable failure.
                // A remote BUSY/UA that kept recurring keeps its own sense and errno.
                if sense.isLocal { statistics.timeouts += 1 }
                complete(Int32(i), .failure(sense.isLocal ? ETIMEDOUT : sense.errno))
            case .inFlight:
                stuck = true
            default:
                break
            }
        }
        if stuck && context != nil {
            failureReason = "remote did not answer commands within \(config.timeoutSeconds) s"
            dropConnection(now: now)
            expireRequests(now: now)
        }
    }

    func issueQueued(now: UInt64) {
        guard phase == .online, let context else { return }
        var remaining = submitQueue.count
        while remaining > 0, let index = submitQueue.pop() {
            remaining -= 1
            let slot = slots + Int(index)
            guard slot.pointee.phase == .queued else { slot.pointee.inQueue = false; continue }
            if slot.pointee.notBefore > now || slot.pointee.awaitingGeometry {
                submitQueue.push(index)
                continue
            }
            slot.pointee.inQueue = false
            issue(index, context: context)
            if lostConnection { break }
        }
    }
}
