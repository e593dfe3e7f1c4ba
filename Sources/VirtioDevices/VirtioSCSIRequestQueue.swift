import BlockIO
import CSystem
import Logging
import SCSI
import Synchronization
import Virtio
#if canImport(Glibc)
import Glibc
#endif

/// The virtio-scsi data path of one queue group (plus the control and event queues on group 0).
final class SCSIGroupHandler<Channel: BlockChannel>: QueueGroupHandler, @unchecked Sendable {
    unowned(unsafe) var device: VirtioSCSIDevice<Channel>!
    unowned(unsafe) var group: QueueGroup<SCSIGroupHandler<Channel>>!
    /// This thread's LUN channels (opened on first I/O, retired on removal, closed when idle).
    let channels: LUNChannelTable<Channel>
    // The handler's state is used on its group's loop thread only, and no access to it spans a call that
    // could reach it again: dynamic exclusivity checks (about 100 instructions per access, several per
    // request) are off for what the data path touches (`queues`, `taskSet`, `view`, `abortWaiters`).
    @exclusivity(unchecked) var queues: [SCSIQueueSlots?]
    /// Slots of abandoned rings (their drain timed out) whose back-end requests have not all come back:
    /// their task-set slots stay reserved; their late completions are dropped.
    private var abandonedQueues: [SCSIQueueSlots] = []
    private var nextGeneration: UInt32 = 0
    /// One flag per region of `slotsPerQueue` task-set slots (a request queue's slots while it runs).
    private var queueSlotsInUse: [Bool]
    /// Task-set slots per queue region: the expected ring size, or `maxSlotsPerQueue` after a larger ring came.
    private var slotsPerQueue: Int
    private let maxSlotsPerQueue: Int
    @exclusivity(unchecked) var taskSet: TaskSet
    @exclusivity(unchecked) private var view = LUNMapView()
    @exclusivity(unchecked) var abortWaiters: [@Sendable (TaskManagementOutcome) -> Void] = []
    var abortOutcomes: [TaskManagementOutcome] = []
    // Event queue state (group 0).
    var pendingEvents: [(VirtioSCSI.Event, LogicalUnitNumber?, UInt32)] = []
    var eventsMissed = false

    /// `queueRegions` request queues (with room for a restarted one whose old start still drains) of
    /// `slotsPerQueue` slots each are preallocated; `maxSlotsPerQueue` is the largest ring accepted.
    init(queueCount: Int, queueRegions: Int, slotsPerQueue: Int, maxSlotsPerQueue: Int,
         channelFactory: @escaping @Sendable (Int) throws -> Channel, counters: VirtioSCSICountersProvider?) {
        queues = Array(repeating: nil, count: queueCount)
        queueSlotsInUse = Array(repeating: false, count: max(1, queueRegions))
        self.slotsPerQueue = min(slotsPerQueue, maxSlotsPerQueue)
        self.maxSlotsPerQueue = maxSlotsPerQueue
        taskSet = TaskSet(capacity: queueSlotsInUse.count * self.slotsPerQueue)
        channels = LUNChannelTable(queues: max(0, queueCount - VirtioSCSI.firstRequestQueue), open: channelFactory, counters: counters)
        channels.openFailed = { [unowned self] id, error in self.device.log.error("back-end \(id): no channel: \(error)") }
    }

    func bind(registerCompletionFD: @escaping (Int32) -> Void) { channels.watch = { fd, _ in registerCompletionFD(fd) } }
    func bind(unregisterCompletionFD: @escaping (Int32) -> Void) { channels.unwatch = unregisterCompletionFD }
    func completionFDs() -> [Int32] { [] }
    func takesRequests(_ queue: RunningQueue) -> Bool { queue.index != VirtioSCSI.eventQueue }
    func kicked(_ queue: RunningQueue) { if queue.index == VirtioSCSI.eventQueue { eventQueueKicked() } }

    func attach(_ queue: RunningQueue) {
        guard queue.index >= VirtioSCSI.firstRequestQueue else { return }
        if queue.ring.size > slotsPerQueue && !growSlots() {
            queue.ring.markBroken("ring size \(queue.ring.size) above the \(slotsPerQueue) task slots of a queue while other queues of its group run")
            return
        }
        guard let base = queueSlotsInUse.firstIndex(of: false), queue.ring.size <= slotsPerQueue else {
            queue.ring.markBroken("no task slots for another queue in this group")
            return
        }
        queueSlotsInUse[base] = true
        if let previous = queues[queue.index] { abandonedQueues.append(previous) }
        nextGeneration &+= 1
        queues[queue.index] = SCSIQueueSlots(queue: queue, taskSetBase: base * slotsPerQueue, generation: nextGeneration)
    }

    /// Lays the task set out again for rings of `maxSlotsPerQueue` (a driver that chose a ring larger than the
    /// expected size: virtio-mmio guests pick up to 1024). Control path, at a ring start; only while no queue of
    /// the group is attached or draining and no task is in flight, so that no slot number changes meaning.
    private func growSlots() -> Bool {
        guard slotsPerQueue < maxSlotsPerQueue, taskSet.count == 0, abandonedQueues.isEmpty,
              !queueSlotsInUse.contains(true), queues.allSatisfy({ $0 == nil }) else { return false }
        slotsPerQueue = maxSlotsPerQueue
        taskSet = TaskSet(capacity: queueSlotsInUse.count * slotsPerQueue)
        return true
    }

    func detach(_ queue: RunningQueue) {
        // Only the slots of this very ring: a later start of the same index may be attached already.
        let slots: SCSIQueueSlots
        if let q = queues[queue.index], q.queue === queue {
            slots = q
            queues[queue.index] = nil
        } else if let i = abandonedQueues.firstIndex(where: { $0.queue === queue }) {
            slots = abandonedQueues.remove(at: i)
        } else {
            channels.closeIdleRetired()
            return
        }
        queueSlotsInUse[slots.taskSetBase / slotsPerQueue] = false
        // A drained queue has no task left; forget any that never got its answer.
        for head in 0..<slots.size where slots.uses[head] >= 0 {
            channels.endTask(Int(slots.uses[head]))
            slots.uses[head] = -1
        }
        channels.closeIdleRetired()
    }

    /// The ring stopped before its back-end requests came back: its tasks end now (the task set forgets
    /// their tags, so a new start of the ring may reuse them; a TMF waiting for them finishes), the
    /// back-end is asked to abort them, and their slots stay reserved until the completions arrive.
    func abandon(_ queue: RunningQueue) {
        guard let q = queues[queue.index], q.queue === queue else { return }
        queues[queue.index] = nil
        abandonedQueues.append(q)
        for h in 0..<q.size {
            let head = UInt16(h)
            let slot = q.taskSetBase + h
            if q.inBackend[h] {
                let index = Int(q.uses[h])
                if !q.abortRequested[h], let c = channels.openedChannel(index) {
                    q.abortRequested[h] = true
                    _ = c.abort(token: q.token(head))
                }
            }
            guard taskSet.isActive(slot: slot) else { continue }
            taskSet.complete(slot: slot)
            q.tasks[h].status = .taskAborted
            endTask(q, head)
            // Not waiting for the back-end (cannot happen: such tasks are answered at once): return it.
            if !q.inBackend[h] { q.queue.complete(head: head, ringEntries: q.entries[h], length: 0) }
        }
        if !abortWaiters.isEmpty && taskSet.abortedCount == 0 { finishAbortWaiters() }
    }

    /// The queue slots a back-end token belongs to: the running start of its queue, or an abandoned one.
    @inline(__always)
    private func slots(for token: BackendToken) -> SCSIQueueSlots? {
        if token.queueIndex < queues.count, let q = queues[token.queueIndex], q.generation == token.generation { return q }
        return abandonedSlots(token)
    }

    private func abandonedSlots(_ token: BackendToken) -> SCSIQueueSlots? {
        for q in abandonedQueues where q.generation == token.generation && q.queue.index == token.queueIndex { return q }
        return nil
    }

    // MARK: Back-end channels

    /// Retires this thread's channels of back-ends no LUN of the map names any more (after a `.removed`
    /// event): new commands can no longer reach them, and each closes once its last task has been answered.
    func retireRemovedBackends() {
        device.target.refresh(&view)
        channels.retireUnmapped(view)
    }

    /// The loop is stopping (the queues drained): close every channel.
    func stopping() {
        channels.closeAll()
    }

    func commit() {
        // Synchronous back-ends completed on commit: deliver now, with no wake-up round trip (a command's
        // next back-end step may submit again).
        while channels.commit() {
            if !deliver(polling: true) { break }
        }
        channels.closeIdleRetired()
    }

    func reap() -> Bool {
        let any = deliver(polling: false)
        if any || channels.retiredCount > 0 { commit() }
        return any
    }

    func poll() -> Bool {
        let any = deliver(polling: true)
        if any || channels.retiredCount > 0 { commit() }
        return any
    }

    /// Delivers the completions of every channel: all of them, or (`polling`) those found without a
    /// system call. Returns whether any arrived.
    private func deliver(polling: Bool) -> Bool {
        channels.deliver(polling: polling) { _, token, result in completed(token, result) }
    }

    /// One back-end completion: the task resumes (next step or answer), or is dropped for an abandoned ring.
    @inline(__always)
    private func completed(_ raw: UInt64, _ result: BlockResult) {
        let token = BackendToken(raw)
        let head = token.head
        guard let q = slots(for: token), Int(head) < q.size, q.inBackend[Int(head)] else { return }
        q.inBackend[Int(head)] = false
        q.abortRequested[Int(head)] = false
        if q.queue.abandoned {
            // Its ring is gone (the task ended when it was abandoned): drop the completion; the
            // broken ring only does its bookkeeping, so the old queue can finish draining.
            q.queue.complete(head: head, ringEntries: q.entries[Int(head)], length: 0)
            return
        }
        let slot = q.taskSetBase + Int(head)
        taskSet.setInBackend(slot: slot, false)
        if taskSet.isAborted(slot: slot) {
            // A TMF aborted it: no further back-end step; answered VIRTIO_SCSI_S_ABORTED.
            respond(q, head, registered: true)
            return
        }
        let disposition = device.target.resume(&q.tasks[Int(head)], with: result)
        drive(q, head, disposition)
    }

    // MARK: Statistics

    /// Starts counting the task in `head` on use `index` (-1: not counted).
    @inline(__always)
    private func beginTask(_ q: SCSIQueueSlots, _ head: UInt16, use index: Int) {
        q.uses[Int(head)] = Int32(index)
        guard index >= 0 else { return }
        channels.beginTask(index)
        channels.counters(index, queue: q.requestQueue)?.begin()
    }

    /// Counts the answer of the task in `head` (status and sense final) and releases its use.
    @inline(__always)
    func endTask(_ q: SCSIQueueSlots, _ head: UInt16) {
        let index = Int(q.uses[Int(head)])
        guard index >= 0 else { return }
        q.uses[Int(head)] = -1
        channels.endTask(index)
        if let counters = channels.counters(index, queue: q.requestQueue) {
            counters.record(task: q.tasks + Int(head), latencyNanos: IOCounters.now() &- q.arrivals[Int(head)])
        }
    }

    // MARK: Requests

    func handle(_ chain: DescriptorChain, on queue: RunningQueue) {
        switch queue.index {
        case VirtioSCSI.controlQueue: handleControl(chain, on: queue)
        case VirtioSCSI.eventQueue:
            // Event buffers are taken only when an event exists (see deliverEvents); a popped one returns unused.
            queue.complete(head: chain.head, ringEntries: chain.ringEntries, length: 0)
        default: handleCommand(chain, on: queue)
        }
    }

    private func handleCommand(_ chain: DescriptorChain, on queue: RunningQueue) {
        guard let q = queues[queue.index] else {
            queue.complete(head: chain.head, ringEntries: chain.ringEntries, length: 0)
            return
        }
        let head = chain.head
        let device = self.device!
        let cdbSize = Int(device.cdbSize.load(ordering: .relaxed))
        let senseSize = Int(device.senseSize.load(ordering: .relaxed))
        let requestSize = VirtioSCSI.requestHeaderSize + cdbSize
        let responseSize = VirtioSCSI.responseHeaderSize + senseSize
        q.entries[Int(head)] = chain.ringEntries
        guard chain.writableBytes >= UInt64(responseSize),
              let n = chain.writable.copyPrefix(responseSize, into: q.responseVectors + Int(head) * SCSIQueueSlots.responseVectorCapacity,
                                                capacity: SCSIQueueSlots.responseVectorCapacity) else {
            device.log.warning("virtio-scsi queue \(queue.index): request \(head) has no room for a response")
            queue.complete(head: head, ringEntries: chain.ringEntries, length: 0)
            return
        }
        q.responseCounts[Int(head)] = n
        guard chain.readableBytes >= UInt64(requestSize) else {
            respondTransport(q, head, .failure)
            return
        }
        // Copy the request header out of guest memory once (the guest may change it under us).
        var lun: (UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8) = (0, 0, 0, 0, 0, 0, 0, 0)
        var tag: UInt64 = 0
        var attributeByte: UInt8 = 0
        var cdb = CDB()
        withUnsafeTemporaryAllocation(byteCount: VirtioSCSI.requestHeaderSize + CDB.capacity, alignment: 8) { raw in
            let header = UnsafeMutableRawBufferPointer(rebasing: raw[0..<requestSize])
            _ = chain.readable.gather(from: 0, into: header)
            withUnsafeMutableBytes(of: &lun) { $0.copyMemory(from: UnsafeRawBufferPointer(rebasing: header[0..<8])) }
            tag = UInt64(littleEndian: header.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
            attributeByte = header[16]
            cdb = CDB(copying: UnsafeRawBufferPointer(rebasing: header[VirtioSCSI.requestHeaderSize..<requestSize]))
        }
        guard let dataOut = chain.readable.droppingPrefix(requestSize),
              let dataIn = chain.writable.droppingPrefix(responseSize) else {
            respondTransport(q, head, .failure)
            return
        }
        let unitNumber: LogicalUnitNumber
        switch VirtioSCSI.decodeAddress(lun) {
        case .badTarget:
            respondTransport(q, head, .badTarget)
            return
        case .incorrectLUN:
            respondTransport(q, head, .incorrectLUN)
            return
        case let .lun(l):
            unitNumber = l
        }
        if dataOut.count > 0 && dataIn.count > 0 && device.negotiated.load(ordering: .relaxed) & VirtioSCSI.featureInOut == 0 {
            respondTransport(q, head, .failure)
            return
        }
        let attribute: TaskAttribute
        switch attributeByte {
        case 1: attribute = .ordered
        case 2: attribute = .headOfQueue
        case 3: attribute = .aca
        default: attribute = .simple
        }
        let slot = q.taskSetBase + Int(head)
        let task = q.tasks + Int(head)
        q.arrivals[Int(head)] = IOCounters.now()
        task.pointee.reset(nexus: device.nexus, lun: unitNumber, tag: tag, attribute: attribute, cdb: cdb,
                           dataOut: dataOut, dataIn: dataIn)
        switch taskSet.register(slot: slot, nexus: device.nexus, lun: unitNumber, tag: tag, attribute: attribute) {
        case .registered:
            break
        case .overlapped:
            task.pointee.status = .checkCondition
            let sense = TaskSet.overlappedCommandsError.sense!
            sense.encode(.fixed, into: &task.pointee.sense)
            beginTask(q, head, use: channels.existingUse(view.unit(unitNumber)?.backendID ?? -1))
            respond(q, head, registered: false)
            return
        case .slotUnavailable:
            task.pointee.status = .busy
            beginTask(q, head, use: channels.existingUse(view.unit(unitNumber)?.backendID ?? -1))
            endTask(q, head)
            respondTransport(q, head, .busy)
            return
        }
        let disposition = device.target.execute(&task.pointee, view: &view)
        beginTask(q, head, use: channels.use(for: task.pointee.backendID))
        drive(q, head, disposition)
    }

    /// Submits back-end requests until the task completes or waits for the back-end.
    @inline(__always)
    private func drive(_ q: SCSIQueueSlots, _ head: UInt16, _ start: TaskDisposition) {
        var disposition = start
        let task = q.tasks + Int(head)
        while true {
            switch disposition {
            case .complete:
                respond(q, head, registered: true)
                return
            case let .submit(request):
                let rc = channels.submit(request, token: q.token(head), use: Int(q.uses[Int(head)]))
                if rc != 0 {
                    disposition = device.target.resume(&task.pointee, with: .failure(rc))
                    continue
                }
                q.inBackend[Int(head)] = true
                taskSet.setInBackend(slot: q.taskSetBase + Int(head), true)
                return
            }
        }
    }

    // MARK: Responses

    /// Answers a request the transport refused (malformed, bad address, busy) with `response` and no status.
    func respondTransport(_ q: SCSIQueueSlots, _ head: UInt16, _ response: VirtioSCSI.Response) {
        var bytes: (UInt64, UInt32) = (0, 0)
        withUnsafeMutableBytes(of: &bytes) { b in
            b[11] = response.rawValue
            _ = q.response(head).scatter(at: 0, from: UnsafeRawBufferPointer(rebasing: b[0..<12]))
        }
        q.queue.complete(head: head, ringEntries: q.entries[Int(head)], length: UInt32(VirtioSCSI.responseHeaderSize))
    }

    /// Writes the response of a completed task and returns its buffers.
    private func respond(_ q: SCSIQueueSlots, _ head: UInt16, registered: Bool) {
        let task = q.tasks + Int(head)
        var response = VirtioSCSI.Response.ok
        if registered, taskSet.complete(slot: q.taskSetBase + Int(head)) == .aborted {
            response = .aborted
            task.pointee.status = .taskAborted
            task.pointee.sense.length = 0
        }
        let senseSize = Int(device.senseSize.load(ordering: .relaxed))
        let senseLength = min(task.pointee.sense.length, senseSize, SenseBytes.capacity)
        let dataIn = response == .ok ? min(task.pointee.dataInLength, task.pointee.dataIn.totalLength) : 0
        let residual = task.pointee.dataIn.totalLength - dataIn
        withUnsafeTemporaryAllocation(byteCount: VirtioSCSI.responseHeaderSize + SenseBytes.capacity, alignment: 8) { raw in
            raw.storeBytes(of: UInt32(senseLength).littleEndian, toByteOffset: 0, as: UInt32.self)
            raw.storeBytes(of: UInt32(truncatingIfNeeded: residual).littleEndian, toByteOffset: 4, as: UInt32.self)
            raw.storeBytes(of: UInt16(0), toByteOffset: 8, as: UInt16.self)
            raw[10] = task.pointee.status.rawValue
            raw[11] = response.rawValue
            var i = 0
            while i < senseLength {
                raw[VirtioSCSI.responseHeaderSize + i] = task.pointee.sense[i]
                i += 1
            }
            _ = q.response(head).scatter(at: 0, from: UnsafeRawBufferPointer(rebasing: raw[0..<(VirtioSCSI.responseHeaderSize + senseLength)]))
        }
        let responseSize = VirtioSCSI.responseHeaderSize + senseSize
        endTask(q, head)
        q.queue.complete(head: head, ringEntries: q.entries[Int(head)], length: UInt32(responseSize + dataIn))
        if !abortWaiters.isEmpty && taskSet.abortedCount == 0 { finishAbortWaiters() }
    }
}
