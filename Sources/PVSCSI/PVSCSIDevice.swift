import BlockIO
import CSystem
import EventLoop
import Logging
import SCSI
import VfioUser
#if canImport(Glibc)
import Glibc
#endif

/// Tunables of one PVSCSI controller.
public struct PVSCSIOptions: Sendable {
    /// Targets the adapter reports in its controller config page (`numPhys`); Linux scans targets
    /// 0..<maxTargets, LUN 0 each. LUN n of the SCSI target is exposed as PVSCSI target n, LUN 0.
    /// The page is only answered for a synchronous COMMAND_DATA write (`synchronousRegisterWrites` with
    /// fd-backed guest memory, or QEMU's `x-no-posted-writes`); otherwise Linux assumes 16 targets.
    public var maxTargets: UInt32 = 16
    /// Largest data length of one request (bytes).
    public var maxTransferBytes: UInt64 = 64 << 20
    /// Largest number of SG elements walked for one request (bounds loops and endless lists).
    public var maxSGElements = 2048
    /// Initiator identifier used for the I_T nexus of this adapter.
    public var initiatorID: UInt64 = 1
    /// Offer BAR0's unused page 5 to the client as a mappable area, which makes QEMU's vfio-user client send
    /// register writes synchronously (see `VfioUserDevice.synchronousWritesPage`): Linux reads the CONFIG page
    /// right after its last COMMAND_DATA write, so only then can CONFIG answer (`maxTargets` above 16; the page
    /// must also be in fd-backed guest memory). Costs a round trip per kick (4 KiB randread QD32 under TCG:
    /// about 3.4k IOPS against 8.0k with posted writes). Off (the default): writes stay posted, Linux assumes
    /// 16 targets. The gateway turns it on for controllers with `max_targets` above 16.
    public var synchronousRegisterWrites = false
    /// Post DEV_ADDED / DEV_REMOVED messages for LUNs added and removed while the guest runs (config key
    /// `hotplug`); off: guests learn of them from REPORTED LUNS DATA HAS CHANGED unit attentions.
    public var hotplugMessages = true
    /// Bytes of bounce buffer for guest memory the client exported without an fd (reached with DMA_READ/WRITE
    /// messages), allocated on first use; a request waits on the ring while too little is free.
    public var bounceBufferBytes = 16 << 20
    public init() {}
}

/// Counters (loop thread).
public struct PVSCSIStats: Sendable {
    public var requests = 0
    public var completions = 0
    public var invalidRequests = 0
    public var ringErrors = 0
    public var messagesPosted = 0
    public var messagesDropped = 0
    public var interrupts = 0
    /// ABORT_CMD / ADAPTER_RESET aborts and RESET_DEVICE / RESET_BUS resets the back-ends accepted.
    public var backendAborts = 0
    public var backendResets = 0
}

/// State of one request slot.
enum SlotState: UInt8 {
    case free
    case executing
    case submitted
    case awaitingRing
}

/// Per-slot request bookkeeping (the SCSITask and iovecs live in parallel preallocated storage).
struct RequestSlot {
    var state: SlotState = .free
    var context: UInt64 = 0
    var target: UInt32 = 0
    var senseAddress: UInt64 = 0
    var senseLength: UInt32 = 0
    var dataLength: UInt64 = 0
    var toHost = false
    var toDevice = false
    /// Registered in the adapter's task set (from its start until its completion is posted).
    var registered = false
    /// ABORT_CMD aborted it in the task set: complete with BTSTAT_ABORTQUEUE.
    var aborted = false
    /// RESET_BUS / RESET_DEVICE aborted it in the task set: complete with BTSTAT_BUSRESET.
    var resetHit = false
    /// The rings it came from are gone (adapter reset): drop its completion.
    var orphaned = false
    /// Bounce chunks holding its data (guest memory without an fd); its iovecs point at them and its guest
    /// ranges are in the segment table.
    var bounceChunks = 0
    var segmentCount = 0
    /// Nested resume depth guard.
    var resubmits = 0
    // Completion awaiting room on the completion ring.
    var completionDataLength: UInt64 = 0
    var completionSenseLength: UInt32 = 0
    var completionHostStatus: UInt16 = 0
    var completionSCSIStatus: UInt16 = 0
    /// The `LUNChannelTable` use the command is counted on (`beginTask` done, `endTask` not yet), -1: none.
    var use: Int32 = -1
    /// `IOCounters.now()` when the command arrived.
    var arrival: UInt64 = 0
}

/// The PVSCSI device model: registers, commands, request/completion/message rings in guest memory,
/// SG lists, sense, interrupts; SCSI commands run by `Target` and their I/O by `Channel`s.
///
/// Runs on the vfio-user server's event-loop thread; every guest address goes through `DMAWindows`.
public final class PVSCSIDevice<Target: SCSICommandTarget, Channel: BlockChannel>: VfioUserDevice, @unchecked Sendable {
    public var configSpace: PCIConfigSpace
    public let options: PVSCSIOptions
    public internal(set) var stats = PVSCSIStats()
    public let target: Target
    let log: Logger
    private unowned(unsafe) var loop: EventLoop
    var memory: DMAWindows!
    var interrupts: InterruptController!

    // Registers.
    var currentCommand: PVSCSI.Command? = nil
    var commandWords: [UInt32] = Array(repeating: 0, count: 136)
    var commandWordCount = 0
    var commandWordsNeeded = 0
    /// Counts COMMAND writes (see `writeCommandData`).
    var commandSequence = 0
    public internal(set) var commandStatus: UInt32 = 0
    public internal(set) var interruptStatus: UInt32 = 0
    public internal(set) var interruptMask: UInt32 = 0

    // Rings.
    var ringsStatePPN: UInt64 = 0
    var requestPPNs: [UInt64] = Array(repeating: 0, count: PVSCSI.maxRingPages)
    var completionPPNs: [UInt64] = Array(repeating: 0, count: PVSCSI.maxRingPages)
    var messagePPNs: [UInt64] = Array(repeating: 0, count: PVSCSI.maxMessageRingPages)
    var ringsState: UnsafeMutableRawPointer? = nil
    var requestPages: [UnsafeMutableRawPointer?] = Array(repeating: nil, count: PVSCSI.maxRingPages)
    var completionPages: [UnsafeMutableRawPointer?] = Array(repeating: nil, count: PVSCSI.maxRingPages)
    var messagePages: [UnsafeMutableRawPointer?] = Array(repeating: nil, count: PVSCSI.maxMessageRingPages)
    /// Local copies of ring pages that live in fd-less guest memory (slot 0: rings state, 1...32 request,
    /// 33...64 completion, 65...80 message); each access is mirrored with DMA_READ/DMA_WRITE.
    let shadowPages: UnsafeMutableRawPointer
    static var shadowPageCount: Int { 1 + 2 * PVSCSI.maxRingPages + PVSCSI.maxMessageRingPages }
    var requestPageCount = 0
    var completionPageCount = 0
    var messagePageCount = 0
    var requestEntries: UInt32 = 0
    var completionEntries: UInt32 = 0
    var messageEntries: UInt32 = 0
    var requestConsumer: UInt32 = 0
    var completionProducer: UInt32 = 0
    var messageProducer: UInt32 = 0
    /// SETUP_RINGS succeeded (until ADAPTER_RESET or the next SETUP_RINGS).
    var ringsConfigured = false
    /// Whether the rings are set up and their pages are mapped right now. A DMA window holding them
    /// may be unmapped and mapped again by the client (QEMU re-lays out guest memory during boot):
    /// the rings then detach and re-attach on the next access; meanwhile kicks wait and completions queue.
    public var ringsReady: Bool { ringsConfigured && ringsState != nil }
    /// Whether SETUP_MSG_RING succeeded (and the rings are attached).
    public var messageRingReady: Bool { ringsReady && messageEntries > 0 }

    // Requests.
    public static var slotCount: Int { PVSCSI.maxRingPages * 4096 / PVSCSI.requestDescriptorSize }  // 1024
    public static var iovecsPerSlot: Int { 160 }
    var slots: [RequestSlot]
    var tasks: [SCSITask]
    var freeSlots: [Int]
    var awaitingRing: [Int]
    var awaitingRingHead = 0
    let iovecs: IOVectorStorage
    // DMA by message: bounce chunks and each bounced request's guest ranges (allocated on first use).
    static var bounceChunkSize: Int { 64 << 10 }
    var bouncePool: UnsafeMutableRawPointer? = nil
    var freeChunks: [Int] = []
    var totalChunks = 0
    var segments: UnsafeMutablePointer<(UInt64, Int)>? = nil
    /// A request waits on the ring for bounce chunks.
    var bounceStalled = false
    /// Device work that may wait for DMA by message is in progress (the server then handles client messages
    /// meanwhile): a kick arriving then is only noted, and the ring is processed once that work is over.
    var work = 0
    var kickPending = false
    /// Changes whenever the rings are dropped, set up, attached or detached: work interrupted by a DMA wait
    /// checks it and stops when a client message handled meanwhile (ADAPTER_RESET, SETUP_RINGS) replaced them.
    var ringsGeneration = 0
    var view = LUNMapView()
    /// The adapter's I_T nexus (initiator `options.initiatorID`).
    let nexus: ITNexus
    /// The adapter's tasks, one per request slot, in the core's task set: ABORT_CMD, RESET_DEVICE, RESET_BUS
    /// and the adapter reset mark them aborted there, as virtio-scsi's TMFs do.
    var taskSet: TaskSet
    /// The LUN channels of the adapter's loop thread (opened on a LUN's first command, retired on removal,
    /// closed when idle).
    let channels: LUNChannelTable<Channel>
    /// Called (control path) once no retired channel is left.
    var retiredWaiters: [() -> Void] = []
    var reaped: [(UInt64, BlockResult)] = []
    var completionsPosted = false
    var loggedRingError = false
    var loggedPostedConfig = false

    /// Creates the device. `channelFactory(backendID)` returns the channel for a LUN's back-end (called
    /// once per back-end, on the loop thread, when the LUN gets its first command), or nil when it cannot
    /// be opened. `statistics(backendID)` returns that LUN's I/O counters (queue 0), asked once at the
    /// same moment; the device calls `begin()` when a command starts and `record(task:latencyNanos:)`
    /// when its completion is posted. The channel of a removed LUN is closed once its I/O has completed.
    public init(target: Target, options: PVSCSIOptions, loop: EventLoop,
                channelFactory: @escaping (Int) -> Channel?,
                statistics: @escaping (Int) -> IOCounters? = { _ in nil },
                log: Logger) {
        self.target = target
        self.options = options
        self.loop = loop
        channels = LUNChannelTable(open: { id throws(BlockBackendError) in
            guard let c = channelFactory(id) else { throw BlockBackendError("cannot be opened") }
            return c
        }, counters: { id, _ in statistics(id) })
        self.log = log
        let identity = PCIIdentity(vendorID: PVSCSI.vendorID, deviceID: PVSCSI.deviceID,
                                   subsystemVendorID: PVSCSI.vendorID, subsystemID: PVSCSI.deviceID,
                                   classCode: PVSCSI.classCode, revision: PVSCSI.revision)
        configSpace = PCIConfigSpace(identity: identity, bars: [PCIBAR(size: PVSCSI.memorySpaceSize)],
                                     msix: MSIXLayout(vectors: 1, tableBAR: 0, tableOffset: PVSCSI.msixTableOffset,
                                                      pbaBAR: 0, pbaOffset: PVSCSI.msixPBAOffset),
                                     msi: true)
        let n = Self.slotCount
        nexus = ITNexus(initiator: options.initiatorID)
        taskSet = TaskSet(capacity: n)
        slots = Array(repeating: RequestSlot(), count: n)
        let placeholder = SCSITask(nexus: ITNexus(initiator: options.initiatorID), lun: nil, tag: 0, cdb: CDB())
        tasks = Array(repeating: placeholder, count: n)
        freeSlots = Array((0..<n).reversed())
        awaitingRing = []
        awaitingRing.reserveCapacity(n)
        reaped.reserveCapacity(n)
        iovecs = IOVectorStorage(capacity: n * Self.iovecsPerSlot)
        shadowPages = .allocate(byteCount: Self.shadowPageCount * 4096, alignment: 4096)
        shadowPages.initializeMemory(as: UInt8.self, repeating: 0, count: Self.shadowPageCount * 4096)
        channels.watch = { [unowned self] fd, use in
            do {
                try self.loop.register(fd: fd) { [unowned self] _ in self.reap(use) }
            } catch {
                self.log.error("pvscsi: cannot watch back-end \(self.channels.backendID(use)) completions: \(error)")
            }
        }
        channels.unwatch = { [unowned self] fd in self.loop.unregister(fd: fd) }
        channels.openFailed = { [unowned self] id, error in self.log.error("pvscsi: no channel for back-end \(id): \(error)") }
    }

    deinit {
        shadowPages.deallocate()
        bouncePool?.deallocate()
        segments?.deallocate()
    }

    /// BAR0 page 5 (the second kick page, which no driver touches): see `PVSCSIOptions.synchronousRegisterWrites`.
    public var synchronousWritesPage: (bar: Int, offset: UInt64)? {
        options.synchronousRegisterWrites ? (bar: 0, offset: 5 * 4096) : nil
    }

    /// Connects the device to the server's guest memory and interrupt lines.
    public func attach(memory: DMAWindows, interrupts: InterruptController) {
        self.memory = memory
        self.interrupts = interrupts
    }

    /// Requests in flight (submitted to a back-end or waiting for completion-ring room).
    public var requestsInFlight: Int { Self.slotCount - freeSlots.count }

    // MARK: VfioUserDevice

    public func reset() {
        adapterReset()
    }

    public func quiesce() {
        // Wait (bounded) for back-end I/O that still references guest memory.
        var rounds = 0
        while rounds < 10_000 {
            var busy = false
            for use in channels.openUses {
                guard let ch = channels.openedChannel(use), ch.inFlight > 0 else { continue }
                busy = true
                if ch.completionFD >= 0 {
                    var pfd = pollfd(fd: ch.completionFD, events: Int16(POLLIN), revents: 0)
                    _ = poll(&pfd, 1, 1)
                }
                reapNow(use)
            }
            if !busy { break }
            rounds += 1
        }
        if rounds == 10_000 { log.error("pvscsi: back-end I/O still in flight after 10 s of quiesce") }
        commitChannels()
        raiseCompletionInterruptIfNeeded()
        sweepRetired()
    }

    /// Waits for in-flight I/O, then closes every back-end channel (controller stop; loop thread).
    public func closeChannels() {
        quiesce()
        channels.closeAll()
        let waiters = retiredWaiters
        retiredWaiters.removeAll()
        for w in waiters { w() }
    }

    public func memoryChanged() {
        guard memory != nil, ringsConfigured else { return }
        // Windows may have moved or vanished: re-translate every ring page now (or detach until they return).
        let wasAttached = ringsState != nil
        if !attachRings() {
            if wasAttached { log.warning("pvscsi: guest memory holding the rings is not mapped: rings detached until it is mapped again") }
        } else {
            flushAwaitingRing()
            raiseCompletionInterruptIfNeeded()
        }
    }
}
