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

/// Settings of a virtio-scsi controller.
public struct VirtioSCSIOptions: Sendable {
    /// Request queues (num_queues).
    public var requestQueues: Int
    /// Largest ring size accepted (the driver picks the size over virtio-mmio: up to the transport's 1024).
    public var maxQueueSize: Int
    /// Ring size the task slots are laid out for at start (the controller's `queue_size`, what the printed QEMU
    /// command line asks for). A larger ring, up to `maxQueueSize`, regrows them to `maxQueueSize` when it starts
    /// while its queue group has no ring attached and no task in flight (the first start of a device).
    public var expectedQueueSize: Int
    /// seg_max.
    public var maxSegments: Int
    /// max_sectors.
    public var maxSectors: UInt32
    /// cmd_per_lun.
    public var commandsPerLUN: UInt32
    /// Event-loop threads the request queues are spread over (control and event queues run on the first).
    public var threads: Int
    /// Adaptive polling budget.
    public var pollBudgetNanoseconds: UInt64
    /// Initiator port identifier of the front-end's I_T nexus.
    public var initiatorID: UInt64
    /// Offer VIRTIO_SCSI_F_HOTPLUG (TRANSPORT_RESET events for added and removed LUNs). Without it the
    /// guest learns of LUN changes only through the REPORTED LUNS DATA HAS CHANGED unit attention.
    public var hotplug: Bool
    /// How long stopping a ring (GET_VRING_BASE) waits for its back-end requests before abandoning them.
    public var drainTimeoutMilliseconds: Int32
    /// Period of the lost-notification watchdog of each queue group (0: off); see `QueueGroup.watchdogMilliseconds`.
    public var watchdogMilliseconds: Int

    /// Creates options.
    public init(requestQueues: Int = 1, maxQueueSize: Int = 1024, expectedQueueSize: Int? = nil, maxSegments: Int = 126,
                maxSectors: UInt32 = 0xFFFF, commandsPerLUN: UInt32 = 128, threads: Int = 1, pollBudgetNanoseconds: UInt64 = 50_000, initiatorID: UInt64 = 1,
                hotplug: Bool = true, drainTimeoutMilliseconds: Int32 = 30_000, watchdogMilliseconds: Int = 1000) {
        self.watchdogMilliseconds = watchdogMilliseconds
        self.hotplug = hotplug
        self.drainTimeoutMilliseconds = drainTimeoutMilliseconds
        self.requestQueues = requestQueues
        self.maxQueueSize = maxQueueSize
        self.expectedQueueSize = min(expectedQueueSize ?? maxQueueSize, maxQueueSize)
        self.maxSegments = maxSegments
        self.maxSectors = maxSectors
        self.commandsPerLUN = commandsPerLUN
        self.threads = threads
        self.pollBudgetNanoseconds = pollBudgetNanoseconds
        self.initiatorID = initiatorID
    }
}

/// Where a virtio-scsi device finds the I/O counters of a LUN: `(backendID, requestQueueIndex)` to the
/// counters of that LUN's queue, or nil to count nothing for it. Called on an event-loop thread when it
/// starts using a back-end (control path), never per I/O.
public typealias VirtioSCSICountersProvider = @Sendable (_ backendID: Int, _ requestQueue: Int) -> IOCounters?

/// The virtio-scsi device model: a SCSI target behind control, event and request queues.
/// Back-end channels are created per event-loop thread and LUN back-end on first use, and closed
/// once their LUN is gone from the map and nothing is in flight on them.
public final class VirtioSCSIDevice<Channel: BlockChannel>: VirtioDeviceModel, @unchecked Sendable {
    /// Options.
    public let options: VirtioSCSIOptions
    /// The SCSI target.
    public let target: SCSITarget
    let log: DeviceLogger
    let senseSize = Atomic<UInt32>(UInt32(SenseBytes.capacity))
    let cdbSize = Atomic<UInt32>(UInt32(CDB.capacity))
    let negotiated = Atomic<UInt64>(0)
    let nexus: ITNexus
    private(set) var groups: [QueueGroup<SCSIGroupHandler<Channel>>] = []
    private var subscription = 0

    /// Creates the device; `channelFactory(backendID)` runs on an event-loop thread the first time that
    /// thread needs the back-end (it may throw: the command then fails with a hardware error).
    /// `counters(backendID, requestQueue)` gives the statistics each command is counted in.
    public init(target: SCSITarget, options: VirtioSCSIOptions, channelFactory: @escaping @Sendable (Int) throws -> Channel,
                counters: VirtioSCSICountersProvider? = nil,
                log: @escaping DeviceLogger) throws(VirtioDeviceError) {
        guard options.requestQueues >= 1, options.requestQueues <= 64 else {
            throw VirtioDeviceError("virtio-scsi request queues must be 1...64, not \(options.requestQueues)")
        }
        guard options.threads >= 1 else { throw VirtioDeviceError("virtio-scsi threads must be at least 1") }
        self.options = options
        self.target = target
        self.log = log
        nexus = ITNexus(initiator: options.initiatorID)
        let threads = min(options.threads, options.requestQueues)
        let perGroup = (options.requestQueues + threads - 1) / threads
        for t in 0..<threads {
            let handler = SCSIGroupHandler<Channel>(queueCount: 2 + options.requestQueues, queueRegions: perGroup + 1,
                                                    slotsPerQueue: max(1, options.expectedQueueSize),
                                                    maxSlotsPerQueue: options.maxQueueSize, channelFactory: channelFactory,
                                                    counters: counters)
            do {
                let group = try QueueGroup(name: "scsi-q\(t)", handler: handler, pollBudgetNanoseconds: options.pollBudgetNanoseconds, log: log)
                group.drainMilliseconds = max(1, options.drainTimeoutMilliseconds)
                group.watchdogMilliseconds = max(0, options.watchdogMilliseconds)
                groups.append(group)
            } catch {
                throw VirtioDeviceError("event loop: \(error)")
            }
        }
        for g in groups {
            g.handler.device = self
            g.handler.group = g
            g.start()
        }
        let control = groups[0]
        let all = groups
        subscription = target.subscribe { event in
            control.onLoop { control.handler.lunEvent(event) }
            if case .removed = event {
                // Every thread closes its channel of the removed LUN once nothing is in flight on it.
                for g in all { g.onLoop { g.handler.retireRemovedBackends() } }
            }
        }
    }

    /// Stops the event-loop threads (after the server stopped).
    public func shutdown() {
        target.unsubscribe(subscription)
        for g in groups { g.shutdown() }
    }

    public var offeredFeatures: UInt64 {
        (options.hotplug ? VirtioSCSI.featureHotplug : 0) | VirtioSCSI.featureInOut | VirtioSCSI.featureChange
            | VirtioFeature.ringEventIndex | VirtioFeature.ringIndirectDescriptors | VirtioFeature.ringPacked
    }
    /// No CONFIG: QEMU's vhost-user-scsi keeps the virtio-scsi config space itself (it has no config ops),
    /// and hw/virtio/vhost-user.c warns "vhost-user backend supports VHOST_USER_PROTOCOL_F_CONFIG but QEMU
    /// does not" for a back-end that offers it. Hotplug and resize go through the event queue.
    public var notifiesConfigChanges: Bool { false }
    public var queueCount: Int { 2 + options.requestQueues }
    public var maxQueueSize: Int { options.maxQueueSize }
    public var expectedQueueSize: Int { options.expectedQueueSize }
    public var segmentsPerSlot: Int { options.maxSegments + 8 }

    public func readConfig() -> [UInt8] {
        var c = [UInt8]()
        c.appendLE(UInt32(options.requestQueues))
        c.appendLE(UInt32(options.maxSegments))
        c.appendLE(options.maxSectors)
        c.appendLE(options.commandsPerLUN)
        c.appendLE(UInt32(VirtioSCSI.eventSize))
        c.appendLE(senseSize.load(ordering: .relaxed))
        c.appendLE(cdbSize.load(ordering: .relaxed))
        c.appendLE(UInt16(0))  // max_channel
        c.appendLE(UInt16(0))  // max_target
        c.appendLE(UInt32(LogicalUnitNumber.maximum))  // max_lun
        return c
    }

    public func writeConfig(offset: Int, bytes: [UInt8]) -> Bool {
        // sense_size and cdb_size are the only writable fields (4 bytes each, adjacent).
        guard bytes.count % 4 == 0, !bytes.isEmpty, offset >= VirtioSCSI.configSenseSizeOffset,
              offset + bytes.count <= VirtioSCSI.configCDBSizeOffset + 4, offset % 4 == 0 else { return false }
        var sense = senseSize.load(ordering: .relaxed)
        var cdb = cdbSize.load(ordering: .relaxed)
        var at = offset
        var i = 0
        while i < bytes.count {
            let v = bytes.readLE(UInt32.self, at: i)!
            if at == VirtioSCSI.configSenseSizeOffset { sense = v } else { cdb = v }
            at += 4
            i += 4
        }
        guard sense <= 252, cdb >= 6, cdb <= UInt32(CDB.capacity) else { return false }
        senseSize.store(sense, ordering: .relaxed)
        cdbSize.store(cdb, ordering: .relaxed)
        return true
    }

    public func setNegotiatedFeatures(_ features: UInt64) { negotiated.store(features, ordering: .relaxed) }

    func group(for index: Int) -> QueueGroup<SCSIGroupHandler<Channel>> {
        index < VirtioSCSI.firstRequestQueue ? groups[0] : groups[(index - VirtioSCSI.firstRequestQueue) % groups.count]
    }

    public func startQueue(_ queue: RunningQueue) { group(for: queue.index).add(queue) }
    public func stopQueue(_ index: Int) -> RunningQueue? { group(for: index).remove(index) }
    public func replaceCallFD(_ index: Int, with fd: Int32) -> Int32? { group(for: index).replaceCallFD(index, with: fd) }
    public func setQueueEnabled(_ index: Int, _ enabled: Bool) { group(for: index).setEnabled(index, enabled) }
    public func updateMemory(_ memory: GuestMemory) { for g in groups { g.updateMemory(memory) } }
    public func setDirtyLog(_ index: Int, _ log: DirtyLog?, usedRingLogAddress: UInt64?) {
        group(for: index).setDirtyLog(index, log, usedRingLogAddress: usedRingLogAddress)
    }
    public func setConfigChangeNotifier(_ notify: (@Sendable () -> Void)?) {}
    public func connectionClosed() {
        // The front-end's nexus is gone: its tasks ended with the rings; report I_T NEXUS LOSS next time.
        for u in target.logicalUnits { u.unitAttentions.establish(.iTNexusLossOccurred, for: .only(nexus)) }
    }

    /// Runs a TMF plan over every group's task set; `done` runs on the control group's loop with the
    /// merged outcome once every aborted task has completed.
    func runTaskManagement(_ plan: TaskManagementPlan, done: @escaping @Sendable (TaskManagementOutcome) -> Void) {
        let tracker = TMFTracker(groups: groups.count, done: done)
        let control = groups[0]
        for g in groups {
            g.onLoop {
                g.handler.applyTaskManagement(plan) { outcome in
                    if tracker.report(outcome) {
                        let merged = tracker.merged
                        control.onLoop { done(merged) }
                    }
                }
            }
        }
    }
}

/// Collects TMF outcomes from every queue group.
final class TMFTracker: Sendable {
    private let state: Mutex<(remaining: Int, outcome: TaskManagementOutcome)>
    init(groups: Int, done: @escaping @Sendable (TaskManagementOutcome) -> Void) {
        state = Mutex((groups, TaskManagementOutcome()))
    }
    /// Adds one group's outcome; true when it was the last.
    func report(_ outcome: TaskManagementOutcome) -> Bool {
        state.withLock { s in
            s.outcome.merge(outcome)
            s.remaining -= 1
            return s.remaining == 0
        }
    }
    var merged: TaskManagementOutcome { state.withLock { $0.outcome } }
}

/// Per-request-queue slot tables (preallocated at attach).
final class SCSIQueueSlots {
    let queue: RunningQueue
    let size: Int
    let tasks: UnsafeMutablePointer<SCSITask>
    let responseVectors: UnsafeMutablePointer<iovec>
    let responseCounts: UnsafeMutablePointer<Int>
    let entries: UnsafeMutablePointer<UInt16>
    /// Per slot: the `LUNChannelTable` use the task is counted on (-1: none).
    let uses: UnsafeMutablePointer<Int32>
    /// Per slot: arrival time (`IOCounters.now()`).
    let arrivals: UnsafeMutablePointer<UInt64>
    /// Base of this queue's slots in the group's task set.
    let taskSetBase: Int
    /// Request-queue number (virtqueue index - 2): the statistics queue slot.
    let requestQueue: Int
    /// Which start of a ring these slots serve (back-end tokens carry it, so that a late completion for
    /// an abandoned start never lands on a later start of the same queue index).
    let generation: UInt32
    /// Per slot: a back-end request of the task is submitted and not yet reaped.
    let inBackend: UnsafeMutablePointer<Bool>
    /// Per slot: the back-end was already asked to abort it (one abort per submission).
    let abortRequested: UnsafeMutablePointer<Bool>
    static let responseVectorCapacity = 4

    init(queue: RunningQueue, taskSetBase: Int, generation: UInt32) {
        self.queue = queue
        size = queue.ring.size
        self.taskSetBase = taskSetBase
        self.generation = generation
        inBackend = .allocate(capacity: size)
        inBackend.initialize(repeating: false, count: size)
        abortRequested = .allocate(capacity: size)
        abortRequested.initialize(repeating: false, count: size)
        requestQueue = queue.index - VirtioSCSI.firstRequestQueue
        uses = .allocate(capacity: size)
        uses.initialize(repeating: -1, count: size)
        arrivals = .allocate(capacity: size)
        arrivals.initialize(repeating: 0, count: size)
        tasks = .allocate(capacity: size)
        tasks.initialize(repeating: SCSITask(nexus: ITNexus(initiator: 0), lun: nil, tag: 0, cdb: CDB()), count: size)
        responseVectors = .allocate(capacity: size * Self.responseVectorCapacity)
        responseVectors.initialize(repeating: iovec(iov_base: nil, iov_len: 0), count: size * Self.responseVectorCapacity)
        responseCounts = .allocate(capacity: size)
        responseCounts.initialize(repeating: 0, count: size)
        entries = .allocate(capacity: size)
        entries.initialize(repeating: 1, count: size)
    }

    deinit {
        tasks.deinitialize(count: size)
        tasks.deallocate()
        responseVectors.deallocate()
        responseCounts.deallocate()
        entries.deallocate()
        uses.deallocate()
        arrivals.deallocate()
        inBackend.deallocate()
        abortRequested.deallocate()
    }

    func response(_ head: UInt16) -> IOVectorList {
        IOVectorList(base: responseVectors + Int(head) * Self.responseVectorCapacity, count: responseCounts[Int(head)])
    }

    /// The back-end token of request `head`: queue index (bits 48-63), ring generation (16-47), head (0-15).
    @inline(__always)
    func token(_ head: UInt16) -> UInt64 {
        UInt64(queue.index) << 48 | UInt64(generation) << 16 | UInt64(head)
    }
}

/// The parts of a back-end token (see `SCSIQueueSlots.token` and `BlkQueueSlots.token`).
struct BackendToken {
    var queueIndex: Int
    var generation: UInt32
    var head: UInt16

    @inline(__always)
    init(_ token: UInt64) {
        queueIndex = Int(token >> 48)
        generation = UInt32(truncatingIfNeeded: token >> 16)
        head = UInt16(truncatingIfNeeded: token)
    }
}

/// A control-queue request waiting for its TMF to finish.
struct PendingControl {
    var head: UInt16
    var entries: UInt16
    var response: UnsafeMutableRawPointer
}

/// The virtio-scsi data path of one queue group (plus the control and event queues on group 0).
final class SCSIGroupHandler<Channel: BlockChannel>: QueueGroupHandler, @unchecked Sendable {
    unowned(unsafe) var device: VirtioSCSIDevice<Channel>!
    unowned(unsafe) var group: QueueGroup<SCSIGroupHandler<Channel>>!
    /// This thread's LUN channels (opened on first I/O, retired on removal, closed when idle).
    private let channels: LUNChannelTable<Channel>
    private var queues: [SCSIQueueSlots?]
    /// Slots of abandoned rings (their drain timed out) whose back-end requests have not all come back:
    /// their task-set slots stay reserved; their late completions are dropped.
    private var abandonedQueues: [SCSIQueueSlots] = []
    private var nextGeneration: UInt32 = 0
    /// One flag per region of `slotsPerQueue` task-set slots (a request queue's slots while it runs).
    private var queueSlotsInUse: [Bool]
    /// Task-set slots per queue region: the expected ring size, or `maxSlotsPerQueue` after a larger ring came.
    private var slotsPerQueue: Int
    private let maxSlotsPerQueue: Int
    private var taskSet: TaskSet
    private var view = LUNMapView()
    private var abortWaiters: [@Sendable (TaskManagementOutcome) -> Void] = []
    private var abortOutcomes: [TaskManagementOutcome] = []
    // Event queue state (group 0).
    private var pendingEvents: [(UInt32, LogicalUnitNumber?, UInt32)] = []
    private var eventsMissed = false

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
        channels.openFailed = { [unowned self] id, error in self.device.log(.error, "back-end \(id): no channel: \(error)") }
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
    private func endTask(_ q: SCSIQueueSlots, _ head: UInt16) {
        let index = Int(q.uses[Int(head)])
        guard index >= 0 else { return }
        q.uses[Int(head)] = -1
        channels.endTask(index)
        if let counters = channels.counters(index, queue: q.requestQueue) {
            counters.record(task: q.tasks[Int(head)], latencyNanos: IOCounters.now() &- q.arrivals[Int(head)])
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
            device.log(.warning, "virtio-scsi queue \(queue.index): request \(head) has no room for a response")
            queue.complete(head: head, ringEntries: chain.ringEntries, length: 0)
            return
        }
        q.responseCounts[Int(head)] = n
        guard chain.readableBytes >= UInt64(requestSize) else {
            respondTransport(q, head, VirtioSCSI.responseFailure)
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
            respondTransport(q, head, VirtioSCSI.responseFailure)
            return
        }
        let unitNumber: LogicalUnitNumber
        switch VirtioSCSI.decodeAddress(lun) {
        case .badTarget:
            respondTransport(q, head, VirtioSCSI.responseBadTarget)
            return
        case .incorrectLUN:
            respondTransport(q, head, VirtioSCSI.responseIncorrectLUN)
            return
        case let .lun(l):
            unitNumber = l
        }
        if dataOut.count > 0 && dataIn.count > 0 && device.negotiated.load(ordering: .relaxed) & VirtioSCSI.featureInOut == 0 {
            respondTransport(q, head, VirtioSCSI.responseFailure)
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
            respondTransport(q, head, VirtioSCSI.responseBusy)
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
                let index = Int(q.uses[Int(head)])
                guard index >= 0, let c = channels.channel(index) else {
                    disposition = device.target.resume(&task.pointee, with: .failure(EIO))
                    continue
                }
                let rc = c.submit(request, token: q.token(head))
                if rc != 0 {
                    disposition = device.target.resume(&task.pointee, with: .failure(rc))
                    continue
                }
                channels.submitted(index)
                q.inBackend[Int(head)] = true
                taskSet.setInBackend(slot: q.taskSetBase + Int(head), true)
                return
            }
        }
    }

    // MARK: Responses

    private func respondTransport(_ q: SCSIQueueSlots, _ head: UInt16, _ response: UInt8) {
        var bytes: (UInt64, UInt32) = (0, 0)
        withUnsafeMutableBytes(of: &bytes) { b in
            b[11] = response
            _ = q.response(head).scatter(at: 0, from: UnsafeRawBufferPointer(rebasing: b[0..<12]))
        }
        q.queue.complete(head: head, ringEntries: q.entries[Int(head)], length: UInt32(VirtioSCSI.responseHeaderSize))
    }

    /// Writes the response of a completed task and returns its buffers.
    private func respond(_ q: SCSIQueueSlots, _ head: UInt16, registered: Bool) {
        let task = q.tasks + Int(head)
        var response = VirtioSCSI.responseOK
        if registered, taskSet.complete(slot: q.taskSetBase + Int(head)) == .aborted {
            response = VirtioSCSI.responseAborted
            task.pointee.status = .taskAborted
            task.pointee.sense.length = 0
        }
        let senseSize = Int(device.senseSize.load(ordering: .relaxed))
        let senseLength = min(task.pointee.sense.length, senseSize, SenseBytes.capacity)
        let dataIn = response == VirtioSCSI.responseOK ? min(task.pointee.dataInLength, task.pointee.dataIn.totalLength) : 0
        let residual = task.pointee.dataIn.totalLength - dataIn
        withUnsafeTemporaryAllocation(byteCount: VirtioSCSI.responseHeaderSize + SenseBytes.capacity, alignment: 8) { raw in
            raw.storeBytes(of: UInt32(senseLength).littleEndian, toByteOffset: 0, as: UInt32.self)
            raw.storeBytes(of: UInt32(truncatingIfNeeded: residual).littleEndian, toByteOffset: 4, as: UInt32.self)
            raw.storeBytes(of: UInt16(0), toByteOffset: 8, as: UInt16.self)
            raw[10] = task.pointee.status.rawValue
            raw[11] = response
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

    // MARK: Control queue

    private func handleControl(_ chain: DescriptorChain, on queue: RunningQueue) {
        let head = chain.head
        let entries = chain.ringEntries
        var request = (UInt64(0), UInt64(0), UInt64(0))
        let got = withUnsafeMutableBytes(of: &request) { chain.readable.gather(from: 0, into: $0) }
        guard got >= 4, let response = chain.writable.base?[0].iov_base, chain.writable.base![0].iov_len >= 1 else {
            queue.complete(head: head, ringEntries: entries, length: 0)
            return
        }
        let type = UInt32(truncatingIfNeeded: request.0.littleEndian)
        switch type {
        case VirtioSCSI.typeTMF:
            guard got >= 24 else {
                response.storeBytes(of: VirtioSCSI.responseFailure, as: UInt8.self)
                queue.complete(head: head, ringEntries: entries, length: 1)
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
                response.storeBytes(of: VirtioSCSI.responseBadTarget, as: UInt8.self)
                queue.complete(head: head, ringEntries: entries, length: 1)
                return
            case .incorrectLUN:
                lun = nil
            case let .lun(value):
                lun = value
            }
            let function: TaskManagementFunction
            switch subtype {
            case VirtioSCSI.tmfAbortTask: function = .abortTask(tag: tag)
            case VirtioSCSI.tmfAbortTaskSet: function = .abortTaskSet
            case VirtioSCSI.tmfClearACA: function = .clearACA
            case VirtioSCSI.tmfClearTaskSet: function = .clearTaskSet
            case VirtioSCSI.tmfITNexusReset: function = .itNexusReset
            case VirtioSCSI.tmfLogicalUnitReset: function = .logicalUnitReset
            case VirtioSCSI.tmfQueryTask: function = .queryTask(tag: tag)
            case VirtioSCSI.tmfQueryTaskSet: function = .queryTaskSet
            default:
                response.storeBytes(of: VirtioSCSI.responseFunctionRejected, as: UInt8.self)
                queue.complete(head: head, ringEntries: entries, length: 1)
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
                let code: UInt8
                switch plan.response(queryMatched: outcome.queryMatched) {
                case .functionComplete: code = VirtioSCSI.responseOK
                case .functionSucceeded: code = VirtioSCSI.responseFunctionSucceeded
                case .functionRejected: code = VirtioSCSI.responseFunctionRejected
                case .incorrectLUN: code = VirtioSCSI.responseIncorrectLUN
                case .serviceDeliveryFailure: code = VirtioSCSI.responseFailure
                }
                let p = pendingBox.value
                p.response.storeBytes(of: code, as: UInt8.self)
                q.complete(head: p.head, ringEntries: p.entries, length: 1)
            }
        case VirtioSCSI.typeANQuery, VirtioSCSI.typeANSubscribe:
            // No asynchronous notification classes are supported: event_actual = 0, response OK.
            guard got >= 16, chain.writableBytes >= 5 else {
                response.storeBytes(of: VirtioSCSI.responseFailure, as: UInt8.self)
                queue.complete(head: head, ringEntries: entries, length: 1)
                return
            }
            let reply: [UInt8] = [0, 0, 0, 0, VirtioSCSI.responseOK]
            _ = reply.withUnsafeBytes { chain.writable.scatter(at: 0, from: $0) }
            queue.complete(head: head, ringEntries: entries, length: 5)
        default:
            response.storeBytes(of: VirtioSCSI.responseFailure, as: UInt8.self)
            queue.complete(head: head, ringEntries: entries, length: 1)
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

    private func respondAborted(_ q: SCSIQueueSlots, _ head: UInt16) {
        endTask(q, head)
        respondTransport(q, head, VirtioSCSI.responseAborted)
    }

    private func finishAbortWaiters() {
        let waiters = abortWaiters
        let outcomes = abortOutcomes
        abortWaiters.removeAll()
        abortOutcomes.removeAll()
        for (w, o) in zip(waiters, outcomes) { w(o) }
    }

    // MARK: Event queue

    func lunEvent(_ event: LUNEvent) {
        let features = device.negotiated.load(ordering: .relaxed)
        if features == 0 {
            // No driver has negotiated yet: a gateway restarted under a running guest, changed by the CLI before
            // QEMU reconnected. The guest learns of it as missed events (it rescans) once its event queue runs.
            if device.options.hotplug { eventsMissed = true }
            return
        }
        switch event {
        case let .added(lun):
            guard features & VirtioSCSI.featureHotplug != 0 else { return }
            pendingEvents.append((VirtioSCSI.eventTransportReset, lun, VirtioSCSI.resetRescan))
        case let .removed(lun):
            guard features & VirtioSCSI.featureHotplug != 0 else { return }
            pendingEvents.append((VirtioSCSI.eventTransportReset, lun, VirtioSCSI.resetRemoved))
        case let .capacityChanged(lun, _):
            guard features & VirtioSCSI.featureChange != 0 else { return }
            pendingEvents.append((VirtioSCSI.eventParamChange, lun, 0x2A | 0x09 << 8))
        case let .parametersChanged(lun):
            guard features & VirtioSCSI.featureChange != 0 else { return }
            pendingEvents.append((VirtioSCSI.eventParamChange, lun, 0x2A | 0x01 << 8))
        }
        deliverEvents()
    }

    /// Sends pending events into event-queue buffers; with no buffer, the events are dropped and the
    /// next event (or a NO_EVENT when a buffer arrives) carries VIRTIO_SCSI_T_EVENTS_MISSED.
    func deliverEvents() {
        guard let queue = group.queue(VirtioSCSI.eventQueue), queue.enabled else {
            if !pendingEvents.isEmpty { eventsMissed = true }
            pendingEvents.removeAll()
            return
        }
        while !pendingEvents.isEmpty || eventsMissed {
            let chain: DescriptorChain
            switch queue.ring.pop() {
            case let .chain(c): chain = c
            case let .invalid(head, entries, error):
                device.log(.warning, "virtio-scsi event queue: buffer \(head) refused: \(error)")
                queue.complete(head: head, ringEntries: entries, length: 0)
                continue
            case .empty, .broken:
                if !pendingEvents.isEmpty { eventsMissed = true }
                pendingEvents.removeAll()
                return
            }
            guard chain.writableBytes >= UInt64(VirtioSCSI.eventSize) else {
                queue.complete(head: chain.head, ringEntries: chain.ringEntries, length: 0)
                continue
            }
            var event: UInt32 = VirtioSCSI.eventNone
            var lunBytes: [UInt8] = [0, 0, 0, 0, 0, 0, 0, 0]
            var reason: UInt32 = 0
            if !pendingEvents.isEmpty {
                let e = pendingEvents.removeFirst()
                event = e.0
                if let lun = e.1 { lunBytes = VirtioSCSI.encodeAddress(lun) }
                reason = e.2
            }
            if eventsMissed {
                event |= VirtioSCSI.eventsMissed
                eventsMissed = false
            }
            var bytes = [UInt8]()
            bytes.appendLE(event)
            bytes += lunBytes
            bytes.appendLE(reason)
            _ = bytes.withUnsafeBytes { chain.writable.scatter(at: 0, from: $0) }
            queue.complete(head: chain.head, ringEntries: chain.ringEntries, length: UInt32(VirtioSCSI.eventSize))
        }
    }

    /// The event queue was kicked: report missed events if any.
    func eventQueueKicked() {
        if eventsMissed { deliverEvents() }
    }
}

/// Moves a non-Sendable value into a @Sendable closure that runs on the same loop thread.
struct UncheckedBox<T>: @unchecked Sendable {
    var value: T
    init(_ value: T) { self.value = value }
}
