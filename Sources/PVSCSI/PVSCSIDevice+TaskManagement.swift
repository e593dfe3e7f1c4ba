import BlockIO
import CSystem
import EventLoop
import SCSI
import VfioUser
#if canImport(Glibc)
import Glibc
#endif

/// Task management: ABORT_CMD (ABORT TASK) and RESET_DEVICE / RESET_BUS (LOGICAL UNIT RESET) through the
/// core; the marked tasks' back-ends abort or reset them, and their requests complete with BTSTAT_ABORTQUEUE
/// or BTSTAT_BUSRESET when their I/O returns.
extension PVSCSIDevice {
    /// ABORT_CMD: ABORT TASK through the core for the request `context` of `targetID`. The request completes
    /// with BTSTAT_ABORTQUEUE; its back-end is asked to abort it (a remote iSCSI back-end sends ABORT TASK and
    /// completes it with ECANCELED; local I/O just finishes, and the command takes no further back-end step).
    func abortCommand(context: UInt64, target targetID: UInt32) {
        guard targetID < options.maxTargets, let lun = LogicalUnitNumber(Int(targetID)) else { return }
        var plan = target.planTaskManagement(.abortTask(tag: context), nexus: nexus, lun: lun)
        // A LUN removed with the request in flight: the core knows no unit, the task set still holds the task.
        if plan.abortScopes.isEmpty { plan.abortScopes = [TaskScope(nexus: nexus, lun: lun, tag: context)] }
        let outcome = plan.apply(to: &taskSet)
        target.finishTaskManagement(plan, outcome)
        guard outcome.abortedCount > 0 else { return }
        let sent = abortMarkedTasks(host: .abortQueue)
        log.info("pvscsi: abort of context \(context) target \(targetID): \(sent > 0 ? "back-end aborting it" : "back-end cannot abort; completes") with BTSTAT_ABORTQUEUE when its I/O returns")
    }

    /// RESET_DEVICE (one target) or RESET_BUS (every target): a LOGICAL UNIT RESET through the core on each
    /// LUN (BUS DEVICE RESET FUNCTION OCCURRED unit attention, SPC-2 reservation released) whose tasks complete
    /// with BTSTAT_BUSRESET when their I/O returns; each LUN's back-end resets its logical unit (remote iSCSI:
    /// LUN RESET, its in-flight I/O completes ECANCELED), or aborts the tasks one by one when it cannot.
    func resetRequests(target resetTarget: UInt32?) {
        target.refresh(&view)
        var luns: [LogicalUnitNumber] = []
        if let t = resetTarget {
            if t < options.maxTargets, let l = LogicalUnitNumber(Int(t)) { luns = [l] }
        } else {
            luns = view.numbers.filter { UInt32($0.value) < options.maxTargets }
        }
        var aborted = 0
        var resetUses: [Int] = []
        for lun in luns {
            let plan = target.planTaskManagement(.logicalUnitReset, nexus: nexus, lun: lun)
            let outcome = plan.apply(to: &taskSet)
            target.finishTaskManagement(plan, outcome)
            aborted += outcome.abortedCount
            if let unit = view.unit(lun) {
                let use = channels.existingUse(unit.backendID)
                if !resetUses.contains(use), let ch = channels.openedChannel(use), ch.resetLogicalUnit() {
                    resetUses.append(use)
                    stats.backendResets += 1
                }
            }
        }
        // Requests of LUNs that left the map while in flight are reset too.
        aborted += taskSet.markAborted(TaskScope(nexus: nil, lun: resetTarget.flatMap { LogicalUnitNumber(Int($0)) }, tag: nil))
        _ = abortMarkedTasks(host: .busReset, resetUses: resetUses)
        log.info("pvscsi: \(resetTarget.map { "RESET_DEVICE target \($0)" } ?? "RESET_BUS"): \(aborted) request(s) in flight")
    }

    /// Notes how the tasks a TMF just aborted in the task set complete (`host`), and asks the back-end of each
    /// one still in flight to abort it, unless its channel's logical unit reset (`resetUses`) cancels it
    /// already. Tasks not in the back-end are being answered right now (a DMA wait) and complete with `host`.
    /// Returns how many aborts the back-ends accepted.
    private func abortMarkedTasks(host: HostAdapterStatus, resetUses: [Int] = []) -> Int {
        var accepted = 0
        for i in 0..<slots.count where slots[i].registered && !slots[i].aborted && !slots[i].resetHit && taskSet.isAborted(slot: i) {
            if host == .abortQueue { slots[i].aborted = true } else { slots[i].resetHit = true }
            let use = Int(slots[i].use)
            guard slots[i].state == .submitted, !resetUses.contains(use) else { continue }
            if channels.openedChannel(use)?.abort(token: UInt64(i)) == true { accepted += 1 }
        }
        stats.backendAborts += accepted
        return accepted
    }
}
