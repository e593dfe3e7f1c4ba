import BlockIO
import CSystem
import EventLoop
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
    public private(set) var stats = PVSCSIStats()
    public let target: Target
    private let log: VfioUserLog
    private unowned(unsafe) var loop: EventLoop
    private var memory: DMAWindows!
    private var interrupts: InterruptController!

    // Registers.
    private var currentCommand: PVSCSI.Command? = nil
    private var commandWords: [UInt32] = Array(repeating: 0, count: 136)
    private var commandWordCount = 0
    private var commandWordsNeeded = 0
    /// Counts COMMAND writes (see `writeCommandData`).
    private var commandSequence = 0
    public private(set) var commandStatus: UInt32 = 0
    public private(set) var interruptStatus: UInt32 = 0
    public private(set) var interruptMask: UInt32 = 0

    // Rings.
    private var ringsStatePPN: UInt64 = 0
    private var requestPPNs: [UInt64] = Array(repeating: 0, count: PVSCSI.maxRingPages)
    private var completionPPNs: [UInt64] = Array(repeating: 0, count: PVSCSI.maxRingPages)
    private var messagePPNs: [UInt64] = Array(repeating: 0, count: PVSCSI.maxMessageRingPages)
    private var ringsState: UnsafeMutableRawPointer? = nil
    private var requestPages: [UnsafeMutableRawPointer?] = Array(repeating: nil, count: PVSCSI.maxRingPages)
    private var completionPages: [UnsafeMutableRawPointer?] = Array(repeating: nil, count: PVSCSI.maxRingPages)
    private var messagePages: [UnsafeMutableRawPointer?] = Array(repeating: nil, count: PVSCSI.maxMessageRingPages)
    /// Local copies of ring pages that live in fd-less guest memory (slot 0: rings state, 1...32 request,
    /// 33...64 completion, 65...80 message); each access is mirrored with DMA_READ/DMA_WRITE.
    private let shadowPages: UnsafeMutableRawPointer
    private static var shadowPageCount: Int { 1 + 2 * PVSCSI.maxRingPages + PVSCSI.maxMessageRingPages }
    private var requestPageCount = 0
    private var completionPageCount = 0
    private var messagePageCount = 0
    private var requestEntries: UInt32 = 0
    private var completionEntries: UInt32 = 0
    private var messageEntries: UInt32 = 0
    private var requestConsumer: UInt32 = 0
    private var completionProducer: UInt32 = 0
    private var messageProducer: UInt32 = 0
    /// SETUP_RINGS succeeded (until ADAPTER_RESET or the next SETUP_RINGS).
    private var ringsConfigured = false
    /// Whether the rings are set up and their pages are mapped right now. A DMA window holding them
    /// may be unmapped and mapped again by the client (QEMU re-lays out guest memory during boot):
    /// the rings then detach and re-attach on the next access; meanwhile kicks wait and completions queue.
    public var ringsReady: Bool { ringsConfigured && ringsState != nil }
    /// Whether SETUP_MSG_RING succeeded (and the rings are attached).
    public var messageRingReady: Bool { ringsReady && messageEntries > 0 }

    // Requests.
    public static var slotCount: Int { PVSCSI.maxRingPages * 4096 / PVSCSI.requestDescriptorSize }  // 1024
    public static var iovecsPerSlot: Int { 160 }
    private var slots: [RequestSlot]
    private var tasks: [SCSITask]
    private var freeSlots: [Int]
    private var awaitingRing: [Int]
    private var awaitingRingHead = 0
    private let iovecs: IOVectorStorage
    // DMA by message: bounce chunks and each bounced request's guest ranges (allocated on first use).
    static var bounceChunkSize: Int { 64 << 10 }
    private var bouncePool: UnsafeMutableRawPointer? = nil
    private var freeChunks: [Int] = []
    private var totalChunks = 0
    private var segments: UnsafeMutablePointer<(UInt64, Int)>? = nil
    /// A request waits on the ring for bounce chunks.
    private var bounceStalled = false
    /// Device work that may wait for DMA by message is in progress (the server then handles client messages
    /// meanwhile): a kick arriving then is only noted, and the ring is processed once that work is over.
    private var work = 0
    private var kickPending = false
    /// Changes whenever the rings are dropped, set up, attached or detached: work interrupted by a DMA wait
    /// checks it and stops when a client message handled meanwhile (ADAPTER_RESET, SETUP_RINGS) replaced them.
    private var ringsGeneration = 0
    private var view = LUNMapView()
    /// The adapter's I_T nexus (initiator `options.initiatorID`).
    private let nexus: ITNexus
    /// The adapter's tasks, one per request slot, in the core's task set: ABORT_CMD, RESET_DEVICE, RESET_BUS
    /// and the adapter reset mark them aborted there, as virtio-scsi's TMFs do.
    private var taskSet: TaskSet
    /// The LUN channels of the adapter's loop thread (opened on a LUN's first command, retired on removal,
    /// closed when idle).
    private let channels: LUNChannelTable<Channel>
    /// Called (control path) once no retired channel is left.
    private var retiredWaiters: [() -> Void] = []
    private var reaped: [(UInt64, BlockResult)] = []
    private var completionsPosted = false
    private var loggedRingError = false
    private var loggedPostedConfig = false

    /// Creates the device. `channelFactory(backendID)` returns the channel for a LUN's back-end (called
    /// once per back-end, on the loop thread, when the LUN gets its first command), or nil when it cannot
    /// be opened. `statistics(backendID)` returns that LUN's I/O counters (queue 0), asked once at the
    /// same moment; the device calls `begin()` when a command starts and `record(task:latencyNanos:)`
    /// when its completion is posted. The channel of a removed LUN is closed once its I/O has completed.
    public init(target: Target, options: PVSCSIOptions, loop: EventLoop,
                channelFactory: @escaping (Int) -> Channel?,
                statistics: @escaping (Int) -> IOCounters? = { _ in nil },
                log: @escaping VfioUserLog) {
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
                self.log("pvscsi: cannot watch back-end \(self.channels.backendID(use)) completions: \(error)")
            }
        }
        channels.unwatch = { [unowned self] fd in self.loop.unregister(fd: fd) }
        channels.openFailed = { [unowned self] id, error in self.log("pvscsi: no channel for back-end \(id): \(error)") }
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

    // MARK: Register access

    public func barRead(bar: Int, offset: UInt64, count: Int) -> UInt64 {
        guard bar == 0 else { return 0 }
        let aligned = offset & ~3
        let value: UInt32
        switch aligned {
        case PVSCSI.Register.commandStatus: value = commandStatus
        case PVSCSI.Register.interruptStatus: value = interruptStatus
        case PVSCSI.Register.interruptMask: value = interruptMask
        default: value = 0
        }
        let shifted = UInt64(value) >> ((offset & 3) * 8)
        return count >= 8 ? shifted : shifted & ((1 << (UInt64(count) * 8)) - 1)
    }

    public func barWrite(bar: Int, offset: UInt64, count: Int, value: UInt64, posted: Bool) {
        guard bar == 0 else { return }
        guard count == 4 || count == 8, offset & 3 == 0 else {
            log("pvscsi: ignored \(count)-byte register write at 0x\(String(offset, radix: 16))")
            return
        }
        let v = UInt32(truncatingIfNeeded: value)
        switch offset {
        case PVSCSI.Register.command: writeCommand(v)
        case PVSCSI.Register.commandData: writeCommandData(v, posted: posted)
        case PVSCSI.Register.interruptStatus:
            interruptStatus &= ~v
            updateInterruptLine()
        case PVSCSI.Register.interruptMask:
            interruptMask = v & PVSCSI.interruptAll
            updateInterruptLine()
            if interruptStatus & interruptMask != 0 && messageSignalled { signalMessage() }
        case PVSCSI.Register.kickNonRWIO, PVSCSI.Register.kickRWIO:
            processRequestRing()
        case PVSCSI.Register.debug:
            log("pvscsi: guest DEBUG register 0x\(String(v, radix: 16))")
        default:
            break  // MSI-X table/PBA (emulated by the client) and unused space
        }
    }

    // MARK: Commands

    private func writeCommand(_ value: UInt32) {
        commandSequence &+= 1
        commandWordCount = 0
        currentCommand = nil
        guard let command = PVSCSI.Command(rawValue: value) else {
            log("pvscsi: unknown command \(value)")
            commandStatus = PVSCSI.commandFailed
            return
        }
        let words: Int
        switch command {
        case .adapterReset, .resetBus: words = 0
        case .setupRings: words = PVSCSI.setupRingsWords
        case .resetDevice: words = PVSCSI.resetDeviceWords
        case .abortCommand: words = PVSCSI.abortCommandWords
        case .config: words = PVSCSI.configWords
        case .setupMessageRing: words = PVSCSI.setupMessageRingWords
        case .issueSCSI, .deviceUnplug, .setupRequestCallThreshold:
            // Not implemented (as in QEMU): the driver reads -1 and falls back (no request-call threshold).
            commandStatus = PVSCSI.commandFailed
            return
        }
        if words == 0 {
            commandStatus = execute(command, posted: false)
            return
        }
        currentCommand = command
        commandWordsNeeded = words
        // SETUP_MSG_RING support probe: the status register answers the descriptor size in words.
        commandStatus = command == .setupMessageRing ? UInt32(PVSCSI.setupMessageRingWords) : PVSCSI.commandNeedsData
    }

    private func writeCommandData(_ value: UInt32, posted: Bool) {
        guard let command = currentCommand else {
            log("pvscsi: COMMAND_DATA write with no command pending")
            return
        }
        commandWords[commandWordCount] = value
        commandWordCount += 1
        if commandWordCount == commandWordsNeeded {
            currentCommand = nil
            let sequence = commandSequence
            let status = execute(command, posted: posted)
            // A command written while this one waited for DMA by message owns the status register now.
            if sequence == commandSequence { commandStatus = status }
        }
    }

    private func word64(_ i: Int) -> UInt64 { UInt64(commandWords[i]) | UInt64(commandWords[i + 1]) << 32 }

    private func execute(_ command: PVSCSI.Command, posted: Bool) -> UInt32 {
        switch command {
        case .adapterReset:
            adapterReset()
            return PVSCSI.commandSucceeded
        case .setupRings: return setupRings() ? PVSCSI.commandSucceeded : PVSCSI.commandFailed
        case .setupMessageRing: return setupMessageRing() ? PVSCSI.commandSucceeded : PVSCSI.commandFailed
        case .abortCommand:
            abortCommand(context: word64(0), target: commandWords[2])
            return PVSCSI.commandSucceeded
        case .resetBus:
            resetRequests(target: nil)
            return PVSCSI.commandSucceeded
        case .resetDevice:
            resetRequests(target: commandWords[0])
            return PVSCSI.commandSucceeded
        case .config:
            // Linux reads the page right after its last COMMAND_DATA write and frees it at once. When that
            // write was posted the guest did not wait for it, so by now the page may hold anything (a kernel
            // stack, seen under QEMU 11): writing it would corrupt the guest. Answer only synchronous writes;
            // the driver then falls back to 16 targets.
            if posted {
                if !loggedPostedConfig {
                    log("pvscsi: CONFIG arrived as a posted write: not answered (the guest no longer waits for it); the driver assumes 16 targets. Synchronous writes need fd-backed guest memory (memory-backend-memfd share=on) or x-no-posted-writes")
                    loggedPostedConfig = true
                }
                return PVSCSI.commandFailed
            }
            // The page must be host-mapped: a DMA_WRITE would let the server acknowledge the write first
            // (see VfioUserServer), and the guest would read (and free) the page before the answer landed.
            let completion = word64(0)
            guard memory.translate(completion, length: UInt64(PVSCSI.configPageControllerSize), write: true) != nil else {
                log("pvscsi: CONFIG page 0x\(String(completion, radix: 16)) is not in fd-backed guest memory: not answered; the driver assumes 16 targets")
                return PVSCSI.commandFailed
            }
            return configCommand() ? PVSCSI.commandSucceeded : PVSCSI.commandFailed
        case .issueSCSI, .deviceUnplug, .setupRequestCallThreshold: return PVSCSI.commandFailed
        }
    }

    /// Drops rings, interrupts and command state; in-flight requests finish silently.
    func adapterReset() {
        orphanInFlight()
        dropRings()
        currentCommand = nil
        commandWordCount = 0
        commandStatus = 0
        interruptStatus = 0
        interruptMask = 0
        updateInterruptLine()
    }

    /// The adapter reset ends every task of the adapter's nexus in the task set (no unit attention, and no
    /// further back-end step for them); their completions are dropped.
    private func orphanInFlight() {
        _ = taskSet.markAborted(TaskScope(nexus: nexus, lun: nil, tag: nil))
        for i in 0..<slots.count {
            switch slots[i].state {
            case .submitted:
                slots[i].orphaned = true
                // Nobody waits for it any more: let a remote back-end drop it.
                if channels.openedChannel(Int(slots[i].use))?.abort(token: UInt64(i)) == true { stats.backendAborts += 1 }
            case .executing: slots[i].orphaned = true
            case .awaitingRing: release(i)
            case .free: break
            }
        }
        awaitingRing.removeAll(keepingCapacity: true)
        awaitingRingHead = 0
    }

    private func dropRings() {
        ringsGeneration &+= 1
        ringsConfigured = false
        ringsState = nil
        requestPageCount = 0
        completionPageCount = 0
        messagePageCount = 0
        requestEntries = 0
        completionEntries = 0
        messageEntries = 0
        requestConsumer = 0
        completionProducer = 0
        messageProducer = 0
        loggedRingError = false
    }

    /// A page-aligned guest page: its host mapping, or shadow page `shadow` when it lies in fd-less guest memory
    /// (reachable by DMA messages, read and write); nil when the PPN is out of range or not mapped with the access.
    private func page(_ ppn: UInt64, write: Bool, shadow: Int) -> UnsafeMutableRawPointer? {
        guard ppn < (UInt64(1) << 52) else { return nil }
        if let p = memory.translate(ppn << 12, length: PVSCSI.pageSize, write: write) { return p }
        guard memory.isRemote(ppn << 12, length: PVSCSI.pageSize, write: write),
              memory.isRemote(ppn << 12, length: PVSCSI.pageSize, write: false) else { return nil }
        return shadowPages + shadow * 4096
    }

    @inline(__always) private func isShadow(_ p: UnsafeMutableRawPointer) -> Bool {
        p >= shadowPages && p < shadowPages + Self.shadowPageCount * 4096
    }

    /// Refreshes `count` bytes of a shadow ring page from guest memory (no-op for mapped pages).
    @inline(__always) private func pull(_ p: UnsafeMutableRawPointer, ppn: UInt64, offset: Int, count: Int) -> Bool {
        guard isShadow(p) else { return true }
        return memory.read((ppn << 12) + UInt64(offset), into: UnsafeMutableRawBufferPointer(start: p + offset, count: count))
    }

    /// Copies `count` bytes of a shadow ring page out to guest memory (no-op for mapped pages).
    @inline(__always) private func push(_ p: UnsafeMutableRawPointer, ppn: UInt64, offset: Int, count: Int) -> Bool {
        guard isShadow(p) else { return true }
        let ok = memory.write((ppn << 12) + UInt64(offset), from: UnsafeRawBufferPointer(start: p + offset, count: count))
        if !ok { stats.ringErrors += 1 }
        return ok
    }

    private static func validPageCount(_ n: UInt32, max: Int) -> Bool {
        n > 0 && n <= UInt32(max) && n & (n - 1) == 0
    }

    private func setupRings() -> Bool {
        let reqPages = commandWords[0]
        let cmpPages = commandWords[1]
        guard Self.validPageCount(reqPages, max: PVSCSI.maxRingPages), Self.validPageCount(cmpPages, max: PVSCSI.maxRingPages) else {
            log("pvscsi: SETUP_RINGS rejected: page counts \(reqPages)/\(cmpPages) (need a power of two in 1...\(PVSCSI.maxRingPages))")
            return false
        }
        let statePPN = word64(2)
        var newReq: [UnsafeMutableRawPointer?] = Array(repeating: nil, count: PVSCSI.maxRingPages)
        var newCmp: [UnsafeMutableRawPointer?] = Array(repeating: nil, count: PVSCSI.maxRingPages)
        guard let state = page(statePPN, write: true, shadow: 0) else {
            log("pvscsi: SETUP_RINGS rejected: rings state PPN 0x\(String(statePPN, radix: 16)) not in mapped guest memory")
            return false
        }
        for i in 0..<Int(reqPages) {
            let ppn = word64(4 + 2 * i)
            guard let p = page(ppn, write: false, shadow: 1 + i) else {
                log("pvscsi: SETUP_RINGS rejected: request ring PPN[\(i)] 0x\(String(ppn, radix: 16)) not in mapped guest memory")
                return false
            }
            newReq[i] = p
            requestPPNs[i] = ppn
        }
        for i in 0..<Int(cmpPages) {
            let ppn = word64(4 + 2 * PVSCSI.maxRingPages + 2 * i)
            guard let p = page(ppn, write: true, shadow: 1 + PVSCSI.maxRingPages + i) else {
                log("pvscsi: SETUP_RINGS rejected: completion ring PPN[\(i)] 0x\(String(ppn, radix: 16)) not in mapped guest memory")
                return false
            }
            newCmp[i] = p
            completionPPNs[i] = ppn
        }
        orphanInFlight()
        dropRings()
        ringsStatePPN = statePPN
        ringsState = state
        ringsConfigured = true
        requestPages = newReq
        completionPages = newCmp
        requestPageCount = Int(reqPages)
        completionPageCount = Int(cmpPages)
        requestEntries = reqPages * UInt32(4096 / PVSCSI.requestDescriptorSize)
        completionEntries = cmpPages * UInt32(4096 / PVSCSI.completionDescriptorSize)
        // The outcome is known: publish it before the ring-state writes, which may be DMA messages during which
        // the client's register reads are answered.
        commandStatus = PVSCSI.commandSucceeded
        store32(PVSCSI.RingsState.requestEntriesLog2, UInt32(requestEntries.trailingZeroBitCount))
        store32(PVSCSI.RingsState.completionEntriesLog2, UInt32(completionEntries.trailingZeroBitCount))
        store32(PVSCSI.RingsState.requestConsumer, 0)
        store32(PVSCSI.RingsState.completionProducer, 0)
        log("pvscsi: rings set up: \(requestEntries) request / \(completionEntries) completion entries")
        return true
    }

    private func setupMessageRing() -> Bool {
        guard ringsConfigured, ringsState != nil || attachRings() else {
            log("pvscsi: SETUP_MSG_RING before SETUP_RINGS ignored")
            return false
        }
        let pages = commandWords[0]
        guard Self.validPageCount(pages, max: PVSCSI.maxMessageRingPages) else {
            log("pvscsi: SETUP_MSG_RING rejected: \(pages) pages (need a power of two in 1...\(PVSCSI.maxMessageRingPages))")
            return false
        }
        var newPages: [UnsafeMutableRawPointer?] = Array(repeating: nil, count: PVSCSI.maxMessageRingPages)
        for i in 0..<Int(pages) {
            let ppn = word64(2 + 2 * i)
            guard let p = page(ppn, write: true, shadow: 1 + 2 * PVSCSI.maxRingPages + i) else {
                log("pvscsi: SETUP_MSG_RING rejected: PPN[\(i)] 0x\(String(ppn, radix: 16)) not in mapped guest memory")
                return false
            }
            newPages[i] = p
            messagePPNs[i] = ppn
        }
        messagePages = newPages
        messagePageCount = Int(pages)
        messageEntries = pages * UInt32(4096 / PVSCSI.messageDescriptorSize)
        messageProducer = 0
        commandStatus = PVSCSI.commandSucceeded  // before DMA messages, as in setupRings
        store32(PVSCSI.RingsState.messageEntriesLog2, UInt32(messageEntries.trailingZeroBitCount))
        store32(PVSCSI.RingsState.messageProducer, 0)
        log("pvscsi: message ring set up: \(messageEntries) entries")
        return true
    }

    private func configCommand() -> Bool {
        let completionAddress = word64(0)
        let pageAddress = word64(2)
        let pageNumber = commandWords[4]
        // PVSCSIConfigPageController: 16-byte header, nodeWWN, 5 UTF-16 strings (64+64+32+32+32 units), numPhys, flags.
        let size = PVSCSI.configPageControllerSize
        var pageBytes = [UInt8](repeating: 0, count: size)
        func put16(_ o: Int, _ v: UInt16) { pageBytes[o] = UInt8(v & 0xFF); pageBytes[o + 1] = UInt8(v >> 8) }
        func put32(_ o: Int, _ v: UInt32) { put16(o, UInt16(v & 0xFFFF)); put16(o + 2, UInt16(v >> 16)) }
        put32(0, pageNumber)
        let supported = pageNumber == PVSCSI.configPageController
            && pageAddress == UInt64(PVSCSI.configControllerAddress) << 32
        if supported {
            put16(4, UInt16(size / 4))
            put16(6, HostAdapterStatus.success.rawValue)
            put16(8, UInt16(SCSIStatus.good.rawValue))
            let wwn: UInt64 = 0x5000_C0DE_0000_0000 | (options.initiatorID & 0xFFFF_FFFF)
            for i in 0..<8 { pageBytes[16 + i] = UInt8(truncatingIfNeeded: wwn >> (8 * UInt64(i))) }
            for (i, c) in "ScsiGate".utf16.enumerated() { put16(24 + 2 * i, c) }
            put32(size - 8, options.maxTargets)
        } else {
            put16(6, HostAdapterStatus.invalidParameter.rawValue)
            put16(8, UInt16(SCSIStatus.checkCondition.rawValue))
        }
        let written = pageBytes.withUnsafeBytes { memory.write(completionAddress, from: $0) }
        if !written { log("pvscsi: CONFIG completion address 0x\(String(completionAddress, radix: 16)) not in mapped guest memory") }
        return written && supported
    }

    /// ABORT_CMD: ABORT TASK through the core for the request `context` of `targetID`. The request completes
    /// with BTSTAT_ABORTQUEUE; its back-end is asked to abort it (a remote iSCSI back-end sends ABORT TASK and
    /// completes it with ECANCELED; local I/O just finishes, and the command takes no further back-end step).
    private func abortCommand(context: UInt64, target targetID: UInt32) {
        guard targetID < options.maxTargets, let lun = LogicalUnitNumber(Int(targetID)) else { return }
        var plan = target.planTaskManagement(.abortTask(tag: context), nexus: nexus, lun: lun)
        // A LUN removed with the request in flight: the core knows no unit, the task set still holds the task.
        if plan.abortScopes.isEmpty { plan.abortScopes = [TaskScope(nexus: nexus, lun: lun, tag: context)] }
        let outcome = plan.apply(to: &taskSet)
        target.finishTaskManagement(plan, outcome)
        guard outcome.abortedCount > 0 else { return }
        let sent = abortMarkedTasks(host: .abortQueue)
        log("pvscsi: abort of context \(context) target \(targetID): \(sent > 0 ? "back-end aborting it" : "back-end cannot abort; completes") with BTSTAT_ABORTQUEUE when its I/O returns")
    }

    /// RESET_DEVICE (one target) or RESET_BUS (every target): a LOGICAL UNIT RESET through the core on each
    /// LUN (BUS DEVICE RESET FUNCTION OCCURRED unit attention, SPC-2 reservation released) whose tasks complete
    /// with BTSTAT_BUSRESET when their I/O returns; each LUN's back-end resets its logical unit (remote iSCSI:
    /// LUN RESET, its in-flight I/O completes ECANCELED), or aborts the tasks one by one when it cannot.
    private func resetRequests(target resetTarget: UInt32?) {
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
        log("pvscsi: \(resetTarget.map { "RESET_DEVICE target \($0)" } ?? "RESET_BUS"): \(aborted) request(s) in flight")
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

    // MARK: Guest ring access

    /// A rings-state field (through DMA_READ when the page is fd-less; nil when that fails).
    @inline(__always) private func load32(_ offset: Int) -> UInt32? {
        guard let state = ringsState, pull(state, ppn: ringsStatePPN, offset: offset, count: 4) else { return nil }
        return csys_load32_acquire(state + offset)
    }
    @inline(__always) private func store32(_ offset: Int, _ value: UInt32) {
        guard let state = ringsState else { return }
        csys_store32_release(state + offset, value)
        _ = push(state, ppn: ringsStatePPN, offset: offset, count: 4)
    }

    /// A request descriptor, each field read once from guest memory.
    struct RequestDescriptor {
        var context: UInt64
        var dataAddress: UInt64
        var dataLength: UInt64
        var senseAddress: UInt64
        var senseLength: UInt32
        var flags: UInt32
        var cdb: CDB
        var cdbLength: UInt8
        var lun: UInt64
        var tag: UInt8
        var bus: UInt8
        var target: UInt8
    }

    private func readRequest(_ index: UInt32) -> RequestDescriptor? {
        let perPage = UInt32(4096 / PVSCSI.requestDescriptorSize)
        let page = requestPages[Int(index / perPage)]!
        let offset = Int(index % perPage) * PVSCSI.requestDescriptorSize
        guard pull(page, ppn: requestPPNs[Int(index / perPage)], offset: offset, count: PVSCSI.requestDescriptorSize) else { return nil }
        let p = page + offset
        let cdbLength = p.load(fromByteOffset: 56, as: UInt8.self)
        let cdb = CDB(copying: UnsafeRawBufferPointer(start: p + 40, count: Int(min(cdbLength, 16))))
        var lun: UInt64 = 0
        for i in 0..<8 { lun = lun << 8 | UInt64(p.load(fromByteOffset: 57 + i, as: UInt8.self)) }
        return RequestDescriptor(
            context: p.loadUnaligned(fromByteOffset: 0, as: UInt64.self),
            dataAddress: p.loadUnaligned(fromByteOffset: 8, as: UInt64.self),
            dataLength: p.loadUnaligned(fromByteOffset: 16, as: UInt64.self),
            senseAddress: p.loadUnaligned(fromByteOffset: 24, as: UInt64.self),
            senseLength: p.loadUnaligned(fromByteOffset: 32, as: UInt32.self),
            flags: p.loadUnaligned(fromByteOffset: 36, as: UInt32.self),
            cdb: cdb, cdbLength: cdbLength, lun: lun,
            tag: p.load(fromByteOffset: 65, as: UInt8.self),
            bus: p.load(fromByteOffset: 66, as: UInt8.self),
            target: p.load(fromByteOffset: 67, as: UInt8.self))
    }

    @inline(__always) private func beginWork() { work += 1 }

    /// Ends a stretch of device work; the outermost one processes a kick that arrived meanwhile.
    private func endWork() {
        work -= 1
        if work == 0 && kickPending {
            kickPending = false
            processRequestRing()
        }
    }

    /// Consumes new request descriptors (KICK_RW_IO / KICK_NON_RW_IO, or a slot freed up).
    func processRequestRing() {
        if work > 0 {
            kickPending = true
            return
        }
        beginWork()
        defer { endWork() }
        guard ringsConfigured else {
            if !loggedRingError { log("pvscsi: kick before SETUP_RINGS ignored") }
            loggedRingError = true
            stats.ringErrors += 1
            return
        }
        guard ringsState != nil || attachRings() else {
            log("pvscsi: kick while the ring pages are not mapped: waiting for the client to map them again")
            return
        }
        let generation = ringsGeneration
        flushAwaitingRing()
        guard generation == ringsGeneration, ringsState != nil else { return }
        let producerIndex = load32(PVSCSI.RingsState.requestProducer)
        guard generation == ringsGeneration else { return }
        guard let producer = producerIndex else {
            log("pvscsi: request producer index not readable (DMA by message failed)")
            return
        }
        var available = producer &- requestConsumer
        if available > requestEntries {
            stats.ringErrors += 1
            if !loggedRingError {
                log("pvscsi: request producer index \(producer) is \(available) entries ahead of the consumer (ring holds \(requestEntries)): ignoring the ring until it is sane")
                loggedRingError = true
            }
            return
        }
        target.refresh(&view)
        let bounced = memory.remoteRegionCount > 0
        if bounced && segments == nil { segments = .allocate(capacity: Self.slotCount * Self.iovecsPerSlot) }
        while available > 0, !freeSlots.isEmpty {
            let descriptor = readRequest(requestConsumer & (requestEntries - 1))
            guard generation == ringsGeneration else { break }  // rings replaced during a DMA wait
            guard let descriptor else {
                log("pvscsi: request descriptor not readable (DMA by message failed)")
                break
            }
            if bounced && descriptor.dataLength > 0 {
                let needed = Int((descriptor.dataLength + UInt64(Self.bounceChunkSize) - 1) / UInt64(Self.bounceChunkSize))
                let total = bouncePool == nil ? max(1, options.bounceBufferBytes / Self.bounceChunkSize) : totalChunks
                let free = bouncePool == nil ? total : freeChunks.count
                if needed <= min(total, Self.iovecsPerSlot) && needed > free {
                    bounceStalled = true  // retried when bounced requests complete
                    break
                }
            }
            let slot = freeSlots.removeLast()
            requestConsumer &+= 1
            available -= 1
            store32(PVSCSI.RingsState.requestConsumer, requestConsumer)
            guard generation == ringsGeneration else {
                freeSlots.append(slot)
                break
            }
            stats.requests += 1
            start(slot, descriptor)
            guard generation == ringsGeneration else { break }
        }
        commitChannels()
        raiseCompletionInterruptIfNeeded()
        sweepRetired()
    }

    private func start(_ slot: Int, _ d: RequestDescriptor) {
        let arrival = IOCounters.now()
        slots[slot] = RequestSlot(state: .executing, context: d.context, target: UInt32(d.target),
                                  senseAddress: d.senseAddress, senseLength: d.senseLength, dataLength: d.dataLength)
        // Addressing: bus 0, target n <-> LUN n of the SCSI target, PVSCSI LUN 0 only.
        guard d.bus == 0, d.lun == 0, UInt32(d.target) < options.maxTargets,
              let lun = LogicalUnitNumber(Int(d.target)), let unit = view.unit(lun) else {
            finish(slot, host: .selectionTimeout)
            return
        }
        guard d.cdbLength >= 1, d.cdbLength <= 16, d.flags & PVSCSI.flagOutOfBandCDB == 0 else {
            invalid(slot, "CDB length \(d.cdbLength) / flags 0x\(String(d.flags, radix: 16))")
            return
        }
        let toHost = d.flags & PVSCSI.flagDirectionToHost != 0
        let toDevice = d.flags & PVSCSI.flagDirectionToDevice != 0
        if toHost && toDevice { invalid(slot, "both data directions"); return }
        var list = IOVectorList.empty
        if d.dataLength > 0 && (toHost || toDevice) {
            guard d.dataLength <= options.maxTransferBytes else { invalid(slot, "data length \(d.dataLength)"); return }
            guard let count = buildIOVectors(slot, d, toHost: toHost) else { return }
            list = IOVectorList(base: iovecs.elements + slot * Self.iovecsPerSlot, count: count)
        } else if d.dataLength > 0 && d.flags & PVSCSI.flagDirectionNone == 0 {
            invalid(slot, "data length \(d.dataLength) without a direction")
            return
        }
        slots[slot].toHost = toHost && d.dataLength > 0
        slots[slot].toDevice = toDevice && d.dataLength > 0
        let attribute: TaskAttribute
        switch d.tag {
        case 0x21: attribute = .headOfQueue
        case 0x22: attribute = .ordered
        default: attribute = .simple
        }
        tasks[slot].reset(nexus: nexus, lun: lun, tag: d.context, attribute: attribute,
                          cdb: d.cdb, dataOut: toDevice ? list : .empty, dataIn: toHost ? list : .empty)
        // The LUN's channel opens on its first command; the command counts on it until its completion is posted.
        var use = channels.existingUse(unit.backendID)
        if use < 0 {
            use = channels.use(for: unit.backendID)
            if use >= 0 { _ = channels.channel(use) }
        }
        if use >= 0 {
            channels.beginTask(use)
            channels.counters(use)?.begin()
            slots[slot].use = Int32(use)
            slots[slot].arrival = arrival
        }
        switch taskSet.register(slot: slot, nexus: nexus, lun: lun, tag: d.context, attribute: attribute) {
        case .registered:
            slots[slot].registered = true
        case .overlapped:
            tasks[slot].status = .checkCondition
            _ = TaskSet.overlappedCommandsError.sense?.encode(.fixed, into: &tasks[slot].sense)
            finishTask(slot)
            return
        case .slotUnavailable:
            tasks[slot].status = .busy
            finishTask(slot)
            return
        }
        if d.cdb.opcode == 0xA0 {
            answerReportLUNs(slot)
            return
        }
        let disposition = target.execute(&tasks[slot], view: &view)
        handle(slot, disposition)
    }

    /// REPORT LUNS for a PVSCSI target: each target carries exactly one LUN (0), whatever the SCSI
    /// target's map holds (those LUNs are the other PVSCSI targets). Answered here so that Linux does not
    /// probe LUN n on every target during its REPORT LUNS scan.
    private func answerReportLUNs(_ slot: Int) {
        let cdb = tasks[slot].cdb
        let allocation = Int(cdb.be32(6))
        let select = cdb[2]
        var badByte: Int? = nil
        for b in [1, 3, 4, 5, 10] where cdb[b] != 0 { badByte = b; break }
        if badByte == nil && select > 0x02 { badByte = 2 }
        if badByte == nil && allocation < 16 { badByte = 6 }
        if let b = badByte {
            tasks[slot].status = .checkCondition
            _ = SCSIError.invalidFieldInCDB(byte: b).sense?.encode(.fixed, into: &tasks[slot].sense)
            finishTask(slot)
            return
        }
        var list: (UInt64, UInt64) = (0, 0)
        withUnsafeMutableBytes(of: &list) { raw in
            // LUN LIST LENGTH: one entry (LUN 0, all zero), none for SELECT REPORT 01h (well-known LUNs).
            raw[3] = select == 0x01 ? 0 : 8
            let length = select == 0x01 ? 8 : 16
            tasks[slot].dataInLength = tasks[slot].dataIn.scatter(at: 0, from: UnsafeRawBufferPointer(rebasing: raw[0..<min(length, allocation)]))
        }
        tasks[slot].status = .good
        finishTask(slot)
    }

    private func invalid(_ slot: Int, _ why: String) {
        stats.invalidRequests += 1
        log("pvscsi: request context \(slots[slot].context) rejected: \(why)")
        finish(slot, host: .invalidParameter)
    }

    /// Translates the data buffer or SG list into iovecs; returns the count, or nil after failing the request.
    private func buildIOVectors(_ slot: Int, _ d: RequestDescriptor, toHost: Bool) -> Int? {
        let base = iovecs.elements + slot * Self.iovecsPerSlot
        var count = 0
        var overflow = false
        // Guest memory without an fd: the guest ranges go to the segment table, the data through bounce chunks.
        let recordRanges = memory.remoteRegionCount > 0 && segments != nil
        let ranges = recordRanges ? segments! + slot * Self.iovecsPerSlot : nil
        var remote = false
        func add(_ address: UInt64, _ length: UInt64) -> Bool {
            if !recordRanges {
                return memory.forEachPiece(address, length: length, write: toHost) { p, n in
                    guard count < Self.iovecsPerSlot else { overflow = true; return false }
                    base[count] = iovec(iov_base: p, iov_len: n)
                    count += 1
                    return true
                }
            }
            return memory.forEachRange(address, length: length, write: toHost) { p, guest, n in
                guard count < Self.iovecsPerSlot else { overflow = true; return false }
                if p == nil { remote = true }
                base[count] = iovec(iov_base: p, iov_len: n)
                ranges![count] = (guest, n)
                count += 1
                return true
            }
        }
        if d.flags & PVSCSI.flagSGList == 0 {
            guard add(d.dataAddress, d.dataLength) else {
                invalid(slot, overflow ? "buffer spans too many DMA windows" : "data buffer 0x\(String(d.dataAddress, radix: 16)) +\(d.dataLength) not in mapped guest memory")
                return nil
            }
            return remote ? bounce(slot, ranges: count, length: d.dataLength, toHost: toHost) : count
        }
        var remaining = d.dataLength
        var segment = d.dataAddress
        var index: UInt64 = 0
        var visited = 0
        var element = (UInt64(0), UInt32(0), UInt32(0))
        while remaining > 0 {
            visited += 1
            guard visited <= options.maxSGElements else {
                invalid(slot, "SG list longer than \(options.maxSGElements) elements (loop, or shorter than the data length \(d.dataLength))")
                return nil
            }
            guard (segment & 0xFFF) + 16 * (index + 1) <= 4096 else {
                invalid(slot, "SG segment at 0x\(String(segment, radix: 16)) runs off its page without a chain element")
                return nil
            }
            let ok = withUnsafeMutableBytes(of: &element) { memory.read(segment + 16 * index, into: $0) }
            guard ok else {
                invalid(slot, "SG element at 0x\(String(segment + 16 * index, radix: 16)) not in mapped guest memory")
                return nil
            }
            let (address, length, flags) = element
            if flags & PVSCSI.sgChainElement != 0 {
                segment = address
                index = 0
                continue
            }
            index += 1
            let n = min(UInt64(length), remaining)
            if n == 0 { continue }
            guard add(address, n) else {
                invalid(slot, overflow ? "SG list needs more than \(Self.iovecsPerSlot) buffers" : "SG buffer 0x\(String(address, radix: 16)) +\(n) not in mapped guest memory")
                return nil
            }
            remaining -= n
        }
        return remote ? bounce(slot, ranges: count, length: d.dataLength, toHost: toHost) : count
    }

    // MARK: Bounce buffers (guest memory without an fd)

    /// Allocates the bounce pool the first time a request's data lies in fd-less guest memory.
    private func ensureBouncePool() {
        guard bouncePool == nil else { return }
        totalChunks = max(1, options.bounceBufferBytes / Self.bounceChunkSize)
        bouncePool = .allocate(byteCount: totalChunks * Self.bounceChunkSize, alignment: 4096)
        freeChunks = Array((0..<totalChunks).reversed())
        log("pvscsi: guest memory without fd: \((totalChunks * Self.bounceChunkSize) >> 20) MiB of bounce buffers for DMA by message")
    }

    /// Points the slot's iovecs at bounce chunks for `length` bytes (its `ranges` guest ranges stay in the
    /// segment table); for data-out, fetches the data with DMA_READ. Returns the iovec count, or nil after
    /// failing the request.
    private func bounce(_ slot: Int, ranges: Int, length: UInt64, toHost: Bool) -> Int? {
        ensureBouncePool()
        guard let pool = bouncePool else { finish(slot, host: .hardwareFailure); return nil }
        let needed = Int((length + UInt64(Self.bounceChunkSize) - 1) / UInt64(Self.bounceChunkSize))
        guard needed <= Self.iovecsPerSlot, needed <= freeChunks.count else {
            invalid(slot, "data length \(length) exceeds the bounce buffers for guest memory without fd (\(freeChunks.count) of \(totalChunks) chunks free)")
            return nil
        }
        let base = iovecs.elements + slot * Self.iovecsPerSlot
        var left = Int(length)
        for k in 0..<needed {
            let chunk = freeChunks.removeLast()
            let n = min(left, Self.bounceChunkSize)
            base[k] = iovec(iov_base: pool + chunk * Self.bounceChunkSize, iov_len: n)
            left -= n
        }
        slots[slot].bounceChunks = needed
        slots[slot].segmentCount = ranges
        if !toHost && !copyBounce(slot, toGuest: false, length: Int(length)) {
            log("pvscsi: request context \(slots[slot].context): data-out not readable from guest memory (DMA by message failed)")
            finish(slot, host: .hardwareFailure)
            return nil
        }
        return needed
    }

    /// Copies `length` bytes between the slot's bounce chunks and its guest ranges.
    private func copyBounce(_ slot: Int, toGuest: Bool, length: Int) -> Bool {
        guard let table = segments else { return false }
        let chunks = iovecs.elements + slot * Self.iovecsPerSlot
        let ranges = table + slot * Self.iovecsPerSlot
        var done = 0
        var r = 0
        var rOffset = 0
        while done < length && r < slots[slot].segmentCount {
            let (guest, rLength) = ranges[r]
            let chunk = done / Self.bounceChunkSize
            let cOffset = done % Self.bounceChunkSize
            let n = min(rLength - rOffset, Self.bounceChunkSize - cOffset, length - done)
            let host = chunks[chunk].iov_base! + cOffset
            let address = guest + UInt64(rOffset)
            let ok = toGuest ? memory.write(address, from: UnsafeRawBufferPointer(start: host, count: n))
                             : memory.read(address, into: UnsafeMutableRawBufferPointer(start: host, count: n))
            guard ok else { return false }
            done += n
            rOffset += n
            if rOffset == rLength { r += 1; rOffset = 0 }
        }
        return done == length
    }

    private func releaseBounce(_ slot: Int) {
        let chunks = iovecs.elements + slot * Self.iovecsPerSlot
        if let pool = bouncePool {
            for k in 0..<slots[slot].bounceChunks {
                freeChunks.append((chunks[k].iov_base! - pool) / Self.bounceChunkSize)
            }
        }
        slots[slot].bounceChunks = 0
        slots[slot].segmentCount = 0
    }

    // MARK: Back-end I/O

    /// Retires the channels of back-ends no LUN of the map uses any more; those with nothing in flight close
    /// now, the others in `sweepRetired` after their last completion is posted.
    private func retireUnmappedBackends() {
        target.refresh(&view)
        channels.retireUnmapped(view) { id in log("pvscsi: back-end \(id) of a removed LUN: channel closed") }
        sweepRetired()
    }

    /// Closes retired channels that have nothing in flight; runs the waiters once none is left.
    private func sweepRetired() {
        channels.closeIdleRetired { id in log("pvscsi: back-end \(id) of a removed LUN: channel closed") }
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

    private func handle(_ slot: Int, _ disposition: TaskDisposition) {
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

    private func commitChannels() {
        _ = channels.commit()
    }

    private func reapNow(_ use: Int) {
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

    private func reap(_ use: Int) {
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

    // MARK: Completion

    private func finishTask(_ slot: Int) {
        let s = slots[slot]
        let task = tasks[slot]
        var host: HostAdapterStatus = .success
        if s.aborted { host = .abortQueue } else if s.resetHit { host = .busReset }
        var dataLength: UInt64 = 0
        if s.toHost { dataLength = UInt64(max(0, task.dataInLength)) }
        else if s.toDevice { dataLength = task.status == .good ? s.dataLength : UInt64(max(0, task.dataOutLength)) }
        if s.bounceChunks > 0 && s.toHost && dataLength > 0 && !s.orphaned && host == .success {
            if !copyBounce(slot, toGuest: true, length: Int(min(dataLength, s.dataLength))) {
                log("pvscsi: request context \(s.context): data-in not writable to guest memory (DMA by message failed)")
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
            if copied { senseLength = UInt32(n) } else { log("pvscsi: sense buffer 0x\(String(s.senseAddress, radix: 16)) not in mapped guest memory") }
        }
        post(slot, dataLength: dataLength, senseLength: senseLength, host: host,
             scsiStatus: host == .success ? UInt16(task.status.rawValue) : 0)
    }

    private func finish(_ slot: Int, host: HostAdapterStatus) {
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

    private func flushAwaitingRing() {
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

    private func release(_ slot: Int) {
        slots[slot].state = .free
        slots[slot].orphaned = false
        if slots[slot].bounceChunks > 0 { releaseBounce(slot) }
        freeSlots.append(slot)
    }

    private func raiseCompletionInterruptIfNeeded() {
        guard completionsPosted else { return }
        completionsPosted = false
        raise(PVSCSI.interruptCompletion0)
    }

    // MARK: Interrupts

    private func raise(_ bits: UInt32) {
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
    private var messageSignalled: Bool { interrupts.msixActive || interrupts.msiActive }

    /// One message interrupt: MSI-X vector 0, else MSI vector 0 (vmw_pvscsi tries MSI-X, then MSI, then INTx).
    private func signalMessage() {
        if interrupts.msixActive { interrupts.signalMSIX(0) } else { interrupts.signalMSI(0) }
    }

    private func updateInterruptLine() {
        guard let interrupts else { return }
        let intxEnabled = configSpace.command & PCIConfigSpace.commandINTxDisable == 0
        interrupts.setINTx(!messageSignalled && intxEnabled && interruptStatus & interruptMask != 0)
    }

    // MARK: Messages (hotplug)

    /// Posts DEV_ADDED / DEV_REMOVED for `event` on the message ring and raises MSG_0.
    public func handle(_ event: LUNEvent) {
        let type: UInt32
        let lun: LogicalUnitNumber
        switch event {
        case .added(let l): type = PVSCSI.messageDeviceAdded; lun = l
        case .removed(let l):
            type = PVSCSI.messageDeviceRemoved; lun = l
            retireUnmappedBackends()
        case .capacityChanged, .parametersChanged: return  // reported through unit attentions by the core
        }
        guard options.hotplugMessages else { return }
        guard UInt32(lun.value) < options.maxTargets else {
            log("pvscsi: \(lun) is beyond the adapter's \(options.maxTargets) targets: no hotplug message")
            return
        }
        postMessage(type: type, target: UInt32(lun.value))
    }

    private func postMessage(type: UInt32, target: UInt32) {
        beginWork()
        defer { endWork() }
        if ringsConfigured && ringsState == nil { attachRings() }
        guard messageRingReady else {
            stats.messagesDropped += 1
            log("pvscsi: no message ring: hotplug message for target \(target) dropped")
            return
        }
        guard let consumer = load32(PVSCSI.RingsState.messageConsumer) else {
            stats.messagesDropped += 1
            log("pvscsi: message consumer index not readable: hotplug message for target \(target) dropped")
            return
        }
        guard messageProducer &- consumer < messageEntries else {
            stats.messagesDropped += 1
            log("pvscsi: message ring full: hotplug message for target \(target) dropped")
            return
        }
        let perPage = UInt32(4096 / PVSCSI.messageDescriptorSize)
        let index = messageProducer & (messageEntries - 1)
        let page = messagePages[Int(index / perPage)]!
        let offset = Int(index % perPage) * PVSCSI.messageDescriptorSize
        let p = page + offset
        p.initializeMemory(as: UInt8.self, repeating: 0, count: PVSCSI.messageDescriptorSize)
        p.storeBytes(of: type, toByteOffset: 0, as: UInt32.self)
        p.storeBytes(of: UInt32(0), toByteOffset: 4, as: UInt32.self)  // bus
        p.storeBytes(of: target, toByteOffset: 8, as: UInt32.self)
        // lun[8] at 12: LUN 0 of the target.
        _ = push(page, ppn: messagePPNs[Int(index / perPage)], offset: offset, count: PVSCSI.messageDescriptorSize)
        messageProducer &+= 1
        store32(PVSCSI.RingsState.messageProducer, messageProducer)
        stats.messagesPosted += 1
        raise(PVSCSI.interruptMessage0)
    }

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
        if rounds == 10_000 { log("pvscsi: back-end I/O still in flight after 10 s of quiesce") }
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
            if wasAttached { log("pvscsi: guest memory holding the rings is not mapped: rings detached until it is mapped again") }
        } else {
            flushAwaitingRing()
            raiseCompletionInterruptIfNeeded()
        }
    }

    /// Translates every configured ring page; on success the rings are attached, otherwise detached.
    @discardableResult
    private func attachRings() -> Bool {
        ringsGeneration &+= 1
        ringsState = nil
        guard ringsConfigured, let state = page(ringsStatePPN, write: true, shadow: 0) else { return false }
        for i in 0..<requestPageCount {
            guard let p = page(requestPPNs[i], write: false, shadow: 1 + i) else { return false }
            requestPages[i] = p
        }
        for i in 0..<completionPageCount {
            guard let p = page(completionPPNs[i], write: true, shadow: 1 + PVSCSI.maxRingPages + i) else { return false }
            completionPages[i] = p
        }
        for i in 0..<messagePageCount {
            guard let p = page(messagePPNs[i], write: true, shadow: 1 + 2 * PVSCSI.maxRingPages + i) else { return false }
            messagePages[i] = p
        }
        ringsState = state
        return true
    }
}
