import BlockIO
import CSystem
import SCSI
import Synchronization
import Virtio
#if canImport(Glibc)
import Glibc
#endif

extension SCSIGroupHandler {
    // MARK: Control queue

    func handleControl(_ chain: DescriptorChain, on queue: RunningQueue) {
        let head = chain.head
        let entries = chain.ringEntries
        var request = (UInt64(0), UInt64(0), UInt64(0))
        let got = withUnsafeMutableBytes(of: &request) { chain.readable.gather(from: 0, into: $0) }
        guard got >= 4, let response = chain.writable.base?[0].iov_base, chain.writable.base![0].iov_len >= 1 else {
            queue.complete(head: head, ringEntries: entries, length: 0)
            return
        }
        func answer(_ code: VirtioSCSI.Response) {
            response.storeBytes(of: code.rawValue, as: UInt8.self)
            queue.complete(head: head, ringEntries: entries, length: 1)
        }
        switch VirtioSCSI.ControlType(rawValue: UInt32(truncatingIfNeeded: request.0.littleEndian)) {
        case .taskManagement?:
            guard got >= 24 else {
                answer(.failure)
                return
            }
            let subtype = UInt32(truncatingIfNeeded: request.0.littleEndian >> 32)
            let l = request.1
            let lunBytes = (UInt8(truncatingIfNeeded: l), UInt8(truncatingIfNeeded: l >> 8), UInt8(truncatingIfNeeded: l >> 16),
                            UInt8(truncatingIfNeeded: l >> 24), UInt8(truncatingIfNeeded: l >> 32), UInt8(truncatingIfNeeded: l >> 40),
                            UInt8(truncatingIfNeeded: l >> 48), UInt8(truncatingIfNeeded: l >> 56))
            let tag = request.2.littleEndian
            let lun: LogicalUnitNumber?
            switch VirtioSCSI.decodeAddress(lunBytes) {
            case .badTarget:
                answer(.badTarget)
                return
            case .incorrectLUN:
                lun = nil
            case let .lun(value):
                lun = value
            }
            let function: TaskManagementFunction
            switch VirtioSCSI.TMF(rawValue: subtype) {
            case .abortTask?: function = .abortTask(tag: tag)
            case .abortTaskSet?: function = .abortTaskSet
            case .clearACA?: function = .clearACA
            case .clearTaskSet?: function = .clearTaskSet
            case .itNexusReset?: function = .itNexusReset
            case .logicalUnitReset?: function = .logicalUnitReset
            case .queryTask?: function = .queryTask(tag: tag)
            case .queryTaskSet?: function = .queryTaskSet
            case nil:
                answer(.functionRejected)
                return
            }
            let device = self.device!
            let plan = device.target.planTaskManagement(function, nexus: device.nexus, lun: lun)
            let pending = PendingControl(head: head, entries: entries, response: response)
            let pendingBox = UncheckedBox(pending)
            device.runTaskManagement(plan) { [queue] outcome in
                // On the control group's loop; the control queue cannot finish draining before this runs.
                device.target.finishTaskManagement(plan, outcome)
                let q = queue
                let code: VirtioSCSI.Response
                switch plan.response(queryMatched: outcome.queryMatched) {
                case .functionComplete: code = .ok
                case .functionSucceeded: code = .functionSucceeded
                case .functionRejected: code = .functionRejected
                case .incorrectLUN: code = .incorrectLUN
                case .serviceDeliveryFailure: code = .failure
                }
                let p = pendingBox.value
                p.response.storeBytes(of: code.rawValue, as: UInt8.self)
                q.complete(head: p.head, ringEntries: p.entries, length: 1)
            }
        case .asyncNotificationQuery?, .asyncNotificationSubscribe?:
            // No asynchronous notification classes are supported: event_actual = 0, response OK.
            guard got >= 16, chain.writableBytes >= 5 else {
                answer(.failure)
                return
            }
            let reply: [UInt8] = [0, 0, 0, 0, VirtioSCSI.Response.ok.rawValue]
            _ = reply.withUnsafeBytes { chain.writable.scatter(at: 0, from: $0) }
            queue.complete(head: head, ringEntries: entries, length: 5)
        case nil:
            answer(.failure)
        }
    }

    /// Applies a TMF plan to this group's task set; `report` runs once the tasks it aborted completed.
    func applyTaskManagement(_ plan: TaskManagementPlan, report: @escaping @Sendable (TaskManagementOutcome) -> Void) {
        let outcome = plan.apply(to: &taskSet)
        abortInBackend(logicalUnitReset: plan.function == .logicalUnitReset)
        taskSet.takeAborted { slot in
            // Aborted tasks the back-end does not own: answer them now.
            for case let q? in queues where slot >= q.taskSetBase && slot < q.taskSetBase + q.size {
                let head = UInt16(slot - q.taskSetBase)
                q.tasks[Int(head)].status = .taskAborted
                respondAborted(q, head)
            }
        }
        if taskSet.abortedCount == 0 {
            report(outcome)
        } else {
            abortWaiters.append(report)
            abortOutcomes.append(outcome)
        }
    }

    /// Asks the back-ends to abort the aborted tasks whose I/O they own (once per submission); for
    /// LOGICAL UNIT RESET, each back-end channel holding such a task is asked to reset its logical unit
    /// instead, falling back to per-task aborts when it cannot. The tasks complete through `reap`
    /// (answered VIRTIO_SCSI_S_ABORTED), and the TMF answers once they all have. Control path only.
    private func abortInBackend(logicalUnitReset: Bool) {
        guard taskSet.abortedCount > 0 else { return }
        var resetUses: [(use: Int, done: Bool)] = []
        for case let q? in queues {
            for h in 0..<q.size where q.inBackend[h] && !q.abortRequested[h] && taskSet.isAborted(slot: q.taskSetBase + h) {
                let index = Int(q.uses[h])
                guard let c = channels.openedChannel(index) else { continue }
                q.abortRequested[h] = true
                if logicalUnitReset {
                    if let r = resetUses.first(where: { $0.use == index }) {
                        if r.done { continue }
                    } else {
                        let done = c.resetLogicalUnit()
                        resetUses.append((index, done))
                        if done { continue }
                    }
                }
                _ = c.abort(token: q.token(UInt16(h)))
            }
        }
    }

    func respondAborted(_ q: SCSIQueueSlots, _ head: UInt16) {
        endTask(q, head)
        respondTransport(q, head, .aborted)
    }

    func finishAbortWaiters() {
        let waiters = abortWaiters
        let outcomes = abortOutcomes
        abortWaiters.removeAll()
        abortOutcomes.removeAll()
        for (w, o) in zip(waiters, outcomes) { w(o) }
    }
}
