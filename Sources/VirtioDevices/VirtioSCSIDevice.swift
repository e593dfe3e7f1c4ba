import BlockIO
import CSystem
import GuestMemoryMap
import Logging
import SCSI
import Synchronization
import Virtio
#if canImport(Glibc)
import Glibc
#endif

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
    let log: Logger
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
                log: Logger) throws(VirtioDeviceError) {
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
                throw .systemCall(error.within("event loop"))
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
