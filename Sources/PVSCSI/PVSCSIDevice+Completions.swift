import BlockIO
import CSystem
import EventLoop
import SCSI
import VfioUser
#if canImport(Glibc)
import Glibc
#endif

/// Completions and interrupts: back-end I/O dispositions and reaping, channel retirement, completion
/// descriptors written to the completion ring (or held while it is full or detached), and the interrupt
/// status, INTx line and MSI/MSI-X signalling.
extension PVSCSIDevice {
    /// Retires the channels of back-ends no LUN of the map uses any more; those with nothing in flight close
    /// now, the others in `sweepRetired` after their last completion is posted.
    func retireUnmappedBackends() {
        target.refresh(&view)
        channels.retireUnmapped(view) { id in log.info("pvscsi: back-end \(id) of a removed LUN: channel closed") }
        sweepRetired()
    }

    /// Closes retired channels that have nothing in flight; runs the waiters once none is left.
    func sweepRetired() {
        channels.closeIdleRetired { id in log.info("pvscsi: back-end \(id) of a removed LUN: channel closed") }
        if channels.retiredCount == 0 && !retiredWaiters.isEmpty {
            let waiters = retiredWaiters
            retiredWaiters.removeAll()
            for w in waiters { w() }
        }
    }

    /// Runs `body` (loop thread) once every channel of a removed LUN is closed: now, or after the last
    /// in-flight completion of those channels has been delivered.
    public func whenRemovedChannelsClosed(_ body: @escaping () -> Void) {
        if channels.retiredCount == 0 { body() } else { retiredWaiters.append(body) }
    }

    /// Open back-end channels (including those of removed LUNs still draining).
    public var openChannelCount: Int { channels.openChannelCount }

    func handle(_ slot: Int, _ disposition: TaskDisposition) {
        switch disposition {
        case .complete:
            finishTask(slot)
        case .submit(let request):
            let use = Int(slots[slot].use)
            guard use >= 0, let ch = channels.channel(use) else {
                handle(slot, target.resume(&tasks[slot], with: .failure(EIO)))
                return
            }
            slots[slot].state = .submitted
            let rc = ch.submit(request, token: UInt64(slot))
            if rc != 0 {
                slots[slot].state = .executing
                slots[slot].resubmits += 1
                if slots[slot].resubmits > 16 { finish(slot, host: .hardwareFailure); return }
                handle(slot, target.resume(&tasks[slot], with: .failure(rc)))
                return
            }
            channels.submitted(use)
            taskSet.setInBackend(slot: slot, true)
            if ch.completesOnCommit {
                ch.commit()
                reapNow(use)
            }
        }
    }

    func commitChannels() {
        _ = channels.commit()
    }

    func reapNow(_ use: Int) {
        let start = reaped.count
        _ = channels.reap(use, polling: false) { token, result in reaped.append((token, result)) }
        var i = start
        while i < reaped.count {
            let (token, result) = reaped[i]
            i += 1
            guard token < UInt64(slots.count) else { continue }
            let slot = Int(token)
            guard slots[slot].state == .submitted else { continue }
            slots[slot].state = .executing
            taskSet.setInBackend(slot: slot, false)
            // Aborted by a TMF or the adapter reset: no further back-end step; answered as aborted.
            if taskSet.isAborted(slot: slot) {
                finishTask(slot)
                continue
            }
            handle(slot, target.resume(&tasks[slot], with: result))
        }
        reaped.removeSubrange(start...)
    }

    func reap(_ use: Int) {
        guard channels.openedChannel(use) != nil else { return }
        beginWork()
        defer { endWork() }
        reapNow(use)
        commitChannels()
        sweepRetired()
        raiseCompletionInterruptIfNeeded()
        if ringsReady && (requestsInFlight < Self.slotCount || bounceStalled) {
            bounceStalled = false
            processRequestRing()
        }
    }


    func finishTask(_ slot: Int) {
        let s = slots[slot]
        let task = tasks[slot]
        var host: HostAdapterStatus = .success
        if s.aborted { host = .abortQueue } else if s.resetHit { host = .busReset }
        var dataLength: UInt64 = 0
        if s.toHost { dataLength = UInt64(max(0, task.dataInLength)) }
        else if s.toDevice { dataLength = task.status == .good ? s.dataLength : UInt64(max(0, task.dataOutLength)) }
        if s.bounceChunks > 0 && s.toHost && dataLength > 0 && !s.orphaned && host == .success {
            if !copyBounce(slot, toGuest: true, length: Int(min(dataLength, s.dataLength))) {
                log.error("pvscsi: request context \(s.context): data-in not writable to guest memory (DMA by message failed)")
                post(slot, dataLength: 0, senseLength: 0, host: .hardwareFailure, scsiStatus: 0)
                return
            }
        }
        var senseLength: UInt32 = 0
        if task.sense.length > 0 && s.senseLength > 0 && s.senseAddress != 0 && !s.orphaned && host == .success {
            let n = min(Int(s.senseLength), task.sense.length, SenseBytes.capacity)
            var buffer = (UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0),
                          UInt64(0), UInt64(0), UInt64(0), UInt64(0))
            let copied = withUnsafeMutableBytes(of: &buffer) { raw -> Bool in
                let dst = UnsafeMutableRawBufferPointer(rebasing: raw[0..<n])
                _ = task.sense.copy(into: dst)
                return memory.write(s.senseAddress, from: UnsafeRawBufferPointer(dst))
            }
            if copied { senseLength = UInt32(n) } else { log.warning("pvscsi: sense buffer 0x\(String(s.senseAddress, radix: 16)) not in mapped guest memory") }
        }
        post(slot, dataLength: dataLength, senseLength: senseLength, host: host,
             scsiStatus: host == .success ? UInt16(task.status.rawValue) : 0)
    }

    func finish(_ slot: Int, host: HostAdapterStatus) {
        post(slot, dataLength: 0, senseLength: 0, host: host, scsiStatus: 0)
    }

    private func post(_ slot: Int, dataLength: UInt64, senseLength: UInt32, host: HostAdapterStatus, scsiStatus: UInt16) {
        if slots[slot].registered {
            slots[slot].registered = false
            _ = taskSet.complete(slot: slot)
        }
        let use = Int(slots[slot].use)
        if use >= 0 {
            slots[slot].use = -1
            channels.endTask(use)
        }
        if use >= 0, let counters = channels.counters(use) {
            let latency = IOCounters.now() &- slots[slot].arrival
            switch host {
            case .success:
                counters.record(task: tasks[slot], latencyNanos: latency)
            case .abortQueue, .busReset:
                counters.record(command: IOCommandClass(scsiOpcode: tasks[slot].cdb.opcode), bytes: 0,
                                latencyNanos: latency, status: SCSIStatus.taskAborted.rawValue)
            default:  // adapter-level failure: counted as CHECK CONDITION / HARDWARE ERROR
                counters.record(command: IOCommandClass(scsiOpcode: tasks[slot].cdb.opcode), bytes: 0,
                                latencyNanos: latency, status: SCSIStatus.checkCondition.rawValue,
                                senseKey: SenseKey.hardwareError.rawValue)
            }
        }
        if slots[slot].orphaned || !ringsConfigured {
            release(slot)
            return
        }
        slots[slot].completionDataLength = dataLength
        slots[slot].completionSenseLength = senseLength
        slots[slot].completionHostStatus = host.rawValue
        slots[slot].completionSCSIStatus = scsiStatus
        if awaitingRingHead < awaitingRing.count || ringsState == nil || !writeCompletion(slot) {
            slots[slot].state = .awaitingRing
            awaitingRing.append(slot)
        }
    }

    /// Writes one completion descriptor if the ring has room; releases the slot.
    private func writeCompletion(_ slot: Int) -> Bool {
        let generation = ringsGeneration
        let consumer = load32(PVSCSI.RingsState.completionConsumer)
        guard generation == ringsGeneration else { return dropAfterRingChange(slot) }
        guard let consumer else { return false }
        guard completionProducer &- consumer < completionEntries else { return false }
        let perPage = UInt32(4096 / PVSCSI.completionDescriptorSize)
        let index = completionProducer & (completionEntries - 1)
        let page = completionPages[Int(index / perPage)]!
        let offset = Int(index % perPage) * PVSCSI.completionDescriptorSize
        let p = page + offset
        let s = slots[slot]
        p.storeBytes(of: s.context, toByteOffset: 0, as: UInt64.self)
        p.storeBytes(of: s.completionDataLength, toByteOffset: 8, as: UInt64.self)
        p.storeBytes(of: s.completionSenseLength, toByteOffset: 16, as: UInt32.self)
        p.storeBytes(of: s.completionHostStatus, toByteOffset: 20, as: UInt16.self)
        p.storeBytes(of: s.completionSCSIStatus, toByteOffset: 22, as: UInt16.self)
        p.storeBytes(of: UInt64(0), toByteOffset: 24, as: UInt64.self)
        _ = push(page, ppn: completionPPNs[Int(index / perPage)], offset: offset, count: PVSCSI.completionDescriptorSize)
        guard generation == ringsGeneration else { return dropAfterRingChange(slot) }
        completionProducer &+= 1
        store32(PVSCSI.RingsState.completionProducer, completionProducer)
        completionsPosted = true
        stats.completions += 1
        release(slot)
        return true
    }

    /// The rings changed during a DMA wait of `writeCompletion`: the completion is dropped (as for any request
    /// of the old rings); the slot is released unless the reset already did.
    private func dropAfterRingChange(_ slot: Int) -> Bool {
        if slots[slot].state != .free && slots[slot].state != .awaitingRing { release(slot) }
        return true
    }

    func flushAwaitingRing() {
        guard ringsState != nil else { return }
        beginWork()
        defer { endWork() }
        let generation = ringsGeneration
        while awaitingRingHead < awaitingRing.count {
            let slot = awaitingRing[awaitingRingHead]
            guard writeCompletion(slot) else { break }
            guard generation == ringsGeneration else { return }
            awaitingRingHead += 1
        }
        if awaitingRingHead == awaitingRing.count {
            awaitingRing.removeAll(keepingCapacity: true)
            awaitingRingHead = 0
        }
    }

    func release(_ slot: Int) {
        slots[slot].state = .free
        slots[slot].orphaned = false
        if slots[slot].bounceChunks > 0 { releaseBounce(slot) }
        freeSlots.append(slot)
    }

    func raiseCompletionInterruptIfNeeded() {
        guard completionsPosted else { return }
        completionsPosted = false
        raise(PVSCSI.interruptCompletion0)
    }


    func raise(_ bits: UInt32) {
        interruptStatus |= bits
        guard interruptMask & bits != 0 else { return }
        stats.interrupts += 1
        if messageSignalled {
            signalMessage()
        } else {
            updateInterruptLine()
        }
    }

    /// MSI-X or MSI is in use (the client installed its eventfd): interrupts are messages, not the INTx line.
    var messageSignalled: Bool { interrupts.msixActive || interrupts.msiActive }

    /// One message interrupt: MSI-X vector 0, else MSI vector 0 (vmw_pvscsi tries MSI-X, then MSI, then INTx).
    func signalMessage() {
        if interrupts.msixActive { interrupts.signalMSIX(0) } else { interrupts.signalMSI(0) }
    }

    func updateInterruptLine() {
        guard let interrupts else { return }
        let intxEnabled = configSpace.command & PCIConfigSpace.commandINTxDisable == 0
        interrupts.setINTx(!messageSignalled && intxEnabled && interruptStatus & interruptMask != 0)
    }
}
