import BlockIO
import CSystem
import GuestMemoryMap
import Logging
import Synchronization
import Virtio
#if canImport(Glibc)
import Glibc
import SystemErrors
#endif

/// virtio-blk feature bits and wire constants (virtio 1.2 section 5.2).
public enum VirtioBlk {
    public static let featureSizeMax: UInt64 = 1 << 1
    public static let featureSegMax: UInt64 = 1 << 2
    public static let featureReadOnly: UInt64 = 1 << 5
    public static let featureBlockSize: UInt64 = 1 << 6
    public static let featureFlush: UInt64 = 1 << 9
    public static let featureTopology: UInt64 = 1 << 10
    public static let featureConfigWCE: UInt64 = 1 << 11
    public static let featureMultiQueue: UInt64 = 1 << 12
    public static let featureDiscard: UInt64 = 1 << 13
    public static let featureWriteZeroes: UInt64 = 1 << 14

    public static let typeIn: UInt32 = 0
    public static let typeOut: UInt32 = 1
    public static let typeFlush: UInt32 = 4
    public static let typeGetID: UInt32 = 8
    public static let typeDiscard: UInt32 = 11
    public static let typeWriteZeroes: UInt32 = 13

    public static let statusOK: UInt8 = 0
    public static let statusIOError: UInt8 = 1
    public static let statusUnsupported: UInt8 = 2

    /// Length of the GET_ID answer.
    public static let serialLength = 20
    /// Offset of `writeback` in the config space.
    public static let configWritebackOffset = 32
}

/// Settings of a virtio-blk device.
public struct VirtioBlkOptions: Sendable {
    /// Request queues.
    public var queues: Int
    /// Largest ring size accepted (the driver picks the size over virtio-mmio: up to the transport's 1024).
    public var maxQueueSize: Int
    /// The ring size on the QEMU command line (the controller's `queue_size`); see `VirtioDeviceModel.expectedQueueSize`.
    public var expectedQueueSize: Int
    /// seg_max: data segments per request.
    public var maxSegments: Int
    /// size_max: bytes per segment.
    public var maxSegmentBytes: UInt32
    /// Serial returned by GET_ID (up to 20 bytes).
    public var serial: String
    /// Event-loop threads (queues are spread over them).
    public var threads: Int
    /// Adaptive polling budget of each loop.
    public var pollBudgetNanoseconds: UInt64
    /// Discard sectors per request.
    public var maxDiscardSectors: UInt32
    /// Write-zeroes sectors per request.
    public var maxWriteZeroesSectors: UInt32
    /// How long stopping a ring (GET_VRING_BASE) waits for its back-end requests before abandoning them.
    public var drainTimeoutMilliseconds: Int32
    /// Period of the lost-notification watchdog of each queue group (0: off); see `QueueGroup.watchdogMilliseconds`.
    public var watchdogMilliseconds: Int

    /// Creates options.
    public init(queues: Int = 1, maxQueueSize: Int = 1024, expectedQueueSize: Int? = nil, maxSegments: Int = 126, maxSegmentBytes: UInt32 = 1 << 20,
                serial: String, threads: Int = 1, pollBudgetNanoseconds: UInt64 = 50_000,
                maxDiscardSectors: UInt32 = 1 << 22, maxWriteZeroesSectors: UInt32 = 1 << 22,
                drainTimeoutMilliseconds: Int32 = 30_000, watchdogMilliseconds: Int = 1000) {
        self.watchdogMilliseconds = watchdogMilliseconds
        self.drainTimeoutMilliseconds = drainTimeoutMilliseconds
        self.queues = queues
        self.maxQueueSize = maxQueueSize
        self.expectedQueueSize = min(expectedQueueSize ?? maxQueueSize, maxQueueSize)
        self.maxSegments = maxSegments
        self.maxSegmentBytes = maxSegmentBytes
        self.serial = serial
        self.threads = threads
        self.pollBudgetNanoseconds = pollBudgetNanoseconds
        self.maxDiscardSectors = maxDiscardSectors
        self.maxWriteZeroesSectors = maxWriteZeroesSectors
    }
}

/// Why a device could not be set up.
public struct VirtioDeviceError: ReasonedError, Sendable {
    /// Why it failed: a failed system call (a queue group's event loop) or another reason (options out of range, a back-end channel, a geometry change refused).
    public var reason: FailureReason
    public init(reason: FailureReason) { self.reason = reason }
}

/// Where a virtio-blk device finds the I/O counters of its request queue `queue` (nil: count nothing).
/// Called when a queue starts, never per I/O.
public typealias VirtioBlkCountersProvider = @Sendable (_ queue: Int) -> IOCounters?

/// The virtio-blk device model over one back-end: request queues spread over event-loop threads,
/// each thread with its own back-end channel.
public final class VirtioBlkDevice<Channel: BlockChannel>: VirtioDeviceModel, @unchecked Sendable {
    /// Options.
    public let options: VirtioBlkOptions
    private let geometryLock: Mutex<BlockGeometry>
    let capacitySectors: Atomic<UInt64>
    let readOnly: Atomic<Bool>
    let writeback: Atomic<Bool>
    let serialBytes: [UInt8]
    /// Logical block size in 512-byte sectors (fixed for the device's life).
    let blockSectors: UInt64
    let log: Logger
    private var groups: [QueueGroup<BlkGroupHandler<Channel>>] = []
    private let notifier = Mutex<(@Sendable () -> Void)?>(nil)
    private let negotiated = Atomic<UInt64>(0)

    /// Creates the device; `channelFactory` is called once per event-loop thread.
    public init(geometry: BlockGeometry, options: VirtioBlkOptions, channelFactory: () throws -> Channel,
                counters: VirtioBlkCountersProvider? = nil,
                log: Logger) throws(VirtioDeviceError) {
        guard options.queues >= 1, options.queues <= 64 else { throw VirtioDeviceError("virtio-blk queues must be 1...64, not \(options.queues)") }
        guard options.threads >= 1 else { throw VirtioDeviceError("virtio-blk threads must be at least 1") }
        guard geometry.logicalBlockSize >= 512, geometry.logicalBlockSize % 512 == 0 else {
            throw VirtioDeviceError("block size \(geometry.logicalBlockSize) is not a multiple of 512")
        }
        self.options = options
        geometryLock = Mutex(geometry)
        capacitySectors = Atomic(geometry.capacityBytes / 512)
        readOnly = Atomic(geometry.readOnly)
        writeback = Atomic(geometry.volatileWriteCache)
        var serial = Array(options.serial.utf8.prefix(VirtioBlk.serialLength))
        while serial.count < VirtioBlk.serialLength { serial.append(0) }
        serialBytes = serial
        blockSectors = UInt64(geometry.logicalBlockSize / 512)
        self.log = log
        let threads = min(options.threads, options.queues)
        for t in 0..<threads {
            let channel: Channel
            do { channel = try channelFactory() } catch { throw VirtioDeviceError("back-end channel: \(error)") }
            let handler = BlkGroupHandler(channel: channel, queueCount: options.queues, counters: counters)
            do {
                let group = try QueueGroup(name: "blk-q\(t)", handler: handler, pollBudgetNanoseconds: options.pollBudgetNanoseconds, log: log)
                group.drainMilliseconds = max(1, options.drainTimeoutMilliseconds)
                group.watchdogMilliseconds = max(0, options.watchdogMilliseconds)
                handler.device = self
                groups.append(group)
            } catch {
                throw .systemCall(error.within("event loop"))
            }
        }
        for g in groups { g.start() }
    }

    /// Stops the event-loop threads (call after the server stopped).
    public func shutdown() {
        for g in groups { g.shutdown() }
    }

    /// Current geometry.
    public var geometry: BlockGeometry { geometryLock.withLock { $0 } }

    /// Whether `detachBackend` ran.
    public var backendDetached: Bool { detached.load(ordering: .acquiring) }
    private let detached = Atomic<Bool>(false)

    /// The device's LUN was removed while running: the capacity becomes 0 (the front-end gets a
    /// config-change notification), every new request fails with VIRTIO_BLK_S_IOERR, and each thread
    /// closes its back-end channel once the requests it has in the back-end have completed.
    public func detachBackend() {
        guard !detached.exchange(true, ordering: .acquiringAndReleasing) else { return }
        geometryLock.withLock { $0.blockCount = 0 }
        capacitySectors.store(0, ordering: .releasing)
        for g in groups { g.onLoop { g.handler.closeBackend() } }
        notifier.withLock { $0 }?()
    }

    /// A LUN was added again after `detachBackend`: new channels from `channelFactory` serve the
    /// requests, the capacity becomes `geometry`'s and the front-end gets a config-change notification.
    /// Refused when no back-end was detached, when the logical block size differs (a running
    /// virtio-blk driver never re-reads it) or while an old channel still drains.
    public func attachBackend(geometry newGeometry: BlockGeometry,
                              channelFactory: () throws -> Channel) throws(VirtioDeviceError) {
        guard backendDetached else { throw VirtioDeviceError("the device still has its back-end") }
        let current = geometry
        guard newGeometry.logicalBlockSize == current.logicalBlockSize else {
            throw VirtioDeviceError("block size \(newGeometry.logicalBlockSize) differs from the \(current.logicalBlockSize) bytes the guest's driver uses; unplug the device instead")
        }
        var channels: [Channel] = []
        for _ in groups {
            do { channels.append(try channelFactory()) } catch {
                for c in channels { c.close() }
                throw VirtioDeviceError("back-end channel: \(error)")
            }
        }
        let box = AttachResults(count: groups.count)
        for (i, g) in groups.enumerated() {
            nonisolated(unsafe) let channel = channels[i]
            if !g.onLoopAndWait({ box.set(i, g.handler.reattach(channel)) }) { channel.close() }
        }
        guard box.all else {
            throw VirtioDeviceError("the removed LUN's channels are still draining; try again")
        }
        geometryLock.withLock { g in
            g.blockCount = newGeometry.blockCount
            g.readOnly = newGeometry.readOnly
        }
        readOnly.store(newGeometry.readOnly, ordering: .releasing)
        capacitySectors.store(newGeometry.capacityBytes / 512, ordering: .releasing)
        detached.store(false, ordering: .releasing)
        log.info("virtio-blk: back-end attached again, \(newGeometry.capacityBytes) bytes")
        notifier.withLock { $0 }?()
    }

    /// Changes the capacity and tells the front-end (config-change notification when negotiated).
    public func resize(blockCount: UInt64) {
        let bytes = geometryLock.withLock { g -> UInt64 in
            g.blockCount = blockCount
            return g.capacityBytes
        }
        capacitySectors.store(bytes / 512, ordering: .releasing)
        notifier.withLock { $0 }?()
    }

    public var offeredFeatures: UInt64 {
        let g = geometry
        var f = VirtioBlk.featureSizeMax | VirtioBlk.featureSegMax | VirtioBlk.featureBlockSize | VirtioBlk.featureFlush
            | VirtioBlk.featureTopology | VirtioBlk.featureConfigWCE | VirtioBlk.featureMultiQueue
            | VirtioFeature.ringEventIndex | VirtioFeature.ringIndirectDescriptors | VirtioFeature.ringPacked
        if g.readOnly { f |= VirtioBlk.featureReadOnly }
        if g.supportsDiscard && !g.readOnly { f |= VirtioBlk.featureDiscard }
        if !g.readOnly { f |= VirtioBlk.featureWriteZeroes }
        return f
    }

    public var notifiesConfigChanges: Bool { true }
    public var queueCount: Int { options.queues }
    public var maxQueueSize: Int { options.maxQueueSize }
    public var expectedQueueSize: Int { options.expectedQueueSize }
    public var segmentsPerSlot: Int { options.maxSegments + 8 }

    public func readConfig() -> [UInt8] {
        let g = geometry
        var c = [UInt8]()
        c.appendLE(capacitySectors.load(ordering: .acquiring))
        c.appendLE(options.maxSegmentBytes)
        c.appendLE(UInt32(options.maxSegments))
        c.appendLE(UInt32(0))  // geometry (cylinders, heads, sectors): not offered
        c.appendLE(g.logicalBlockSize)
        var exponent: UInt8 = 0
        while (g.logicalBlockSize << exponent) < g.physicalBlockSize && exponent < 15 { exponent += 1 }
        c.append(exponent)  // physical_block_exp
        c.append(0)  // alignment_offset
        c.appendLE(UInt16(1))  // min_io_size (logical blocks)
        c.appendLE(UInt32(max(1, g.physicalBlockSize / g.logicalBlockSize)))  // opt_io_size
        c.append(writeback.load(ordering: .relaxed) ? 1 : 0)
        c.append(0)
        c.appendLE(UInt16(options.queues))
        let granularity = max(g.discardGranularity, g.logicalBlockSize) / 512
        c.appendLE(options.maxDiscardSectors)
        c.appendLE(UInt32(1))  // max_discard_seg
        c.appendLE(granularity)  // discard_sector_alignment
        c.appendLE(options.maxWriteZeroesSectors)
        c.appendLE(UInt32(1))  // max_write_zeroes_seg
        c.append(g.supportsDiscard ? 1 : 0)  // write_zeroes_may_unmap
        c += [0, 0, 0]
        return c
    }

    public func writeConfig(offset: Int, bytes: [UInt8]) -> Bool {
        // Only `writeback` is writable (VIRTIO_BLK_F_CONFIG_WCE).
        guard offset == VirtioBlk.configWritebackOffset, bytes.count == 1, bytes[0] <= 1 else { return false }
        writeback.store(bytes[0] == 1, ordering: .relaxed)
        log.info("virtio-blk: write cache \(bytes[0] == 1 ? "writeback" : "writethrough")")
        return true
    }

    public func setNegotiatedFeatures(_ features: UInt64) { negotiated.store(features, ordering: .relaxed) }

    private func group(for index: Int) -> QueueGroup<BlkGroupHandler<Channel>> { groups[index % groups.count] }

    public func startQueue(_ queue: RunningQueue) { group(for: queue.index).add(queue) }
    public func stopQueue(_ index: Int) -> RunningQueue? { group(for: index).remove(index) }
    public func replaceCallFD(_ index: Int, with fd: Int32) -> Int32? { group(for: index).replaceCallFD(index, with: fd) }
    public func setQueueEnabled(_ index: Int, _ enabled: Bool) { group(for: index).setEnabled(index, enabled) }
    public func updateMemory(_ memory: GuestMemory) { for g in groups { g.updateMemory(memory) } }
    public func setDirtyLog(_ index: Int, _ log: DirtyLog?, usedRingLogAddress: UInt64?) {
        group(for: index).setDirtyLog(index, log, usedRingLogAddress: usedRingLogAddress)
    }
    public func setConfigChangeNotifier(_ notify: (@Sendable () -> Void)?) { notifier.withLock { $0 = notify } }
    public func connectionClosed() {}
}

/// One request slot of a virtio-blk queue.
struct BlkSlot {
    var status: UnsafeMutableRawPointer?
    var entries: UInt16 = 1
    var written: UInt32 = 0
    var isRead = false
    /// Arrival time (`IOCounters.now()`), for the latency statistics.
    var arrival: UInt64 = 0
    /// Statistics class of the request.
    var kind: IOCommandClass = .other
    /// Bytes the request moves (reads and writes), counted when it succeeds.
    var bytes: UInt64 = 0
    /// Submitted to the back-end and not yet reaped.
    var inBackend = false
}

/// Per-queue slot table.
final class BlkQueueSlots {
    let queue: RunningQueue
    let slots: UnsafeMutablePointer<BlkSlot>
    /// This queue's statistics, if any.
    let counters: IOCounters?
    /// Which start of a ring these slots serve (carried in back-end tokens).
    let generation: UInt32
    init(queue: RunningQueue, counters: IOCounters?, generation: UInt32) {
        self.queue = queue
        self.counters = counters
        self.generation = generation
        slots = .allocate(capacity: queue.ring.size)
        slots.initialize(repeating: BlkSlot(), count: queue.ring.size)
    }
    deinit { slots.deallocate() }

    /// The back-end token of request `head`: queue index (bits 48-63), ring generation (16-47), head (0-15).
    @inline(__always)
    func token(_ head: UInt16) -> UInt64 {
        UInt64(queue.index) << 48 | UInt64(generation) << 16 | UInt64(head)
    }
}

/// The virtio-blk data path of one queue group.
final class BlkGroupHandler<Channel: BlockChannel>: QueueGroupHandler {
    private(set) var channel: Channel
    /// The channel completes on commit (no completion fd): `commit` delivers at once.
    private var channelIsSynchronous: Bool
    unowned(unsafe) var device: VirtioBlkDevice<Channel>!
    private var queues: [BlkQueueSlots?]
    /// Slots of abandoned rings (drain timed out) waiting for their late back-end completions, which
    /// are dropped without touching guest memory.
    private var abandonedQueues: [BlkQueueSlots] = []
    private var nextGeneration: UInt32 = 0
    private var pendingCommit = false
    private let countersProvider: VirtioBlkCountersProvider?
    private var unregisterFD: ((Int32) -> Void)?
    /// The channel is closed (device stopping, or its LUN removed and nothing left in it).
    private var closed = false
    /// The LUN was removed: no new request reaches the channel, which closes once `submitted` is 0.
    private var backendGone = false
    /// Requests submitted on the channel and not yet reaped.
    private var submitted = 0

    init(channel: Channel, queueCount: Int, counters: VirtioBlkCountersProvider?) {
        self.channel = channel
        channelIsSynchronous = channel.completesOnCommit
        queues = Array(repeating: nil, count: queueCount)
        countersProvider = counters
    }

    func attach(_ queue: RunningQueue) {
        if let previous = queues[queue.index] { abandonedQueues.append(previous) }
        nextGeneration &+= 1
        queues[queue.index] = BlkQueueSlots(queue: queue, counters: countersProvider?(queue.index), generation: nextGeneration)
    }

    func detach(_ queue: RunningQueue) {
        // Only the slots of this very ring: a later start of the same index may be attached already.
        if let q = queues[queue.index], q.queue === queue {
            queues[queue.index] = nil
        } else if let i = abandonedQueues.firstIndex(where: { $0.queue === queue }) {
            abandonedQueues.remove(at: i)
        }
    }

    /// The ring stopped before its back-end requests came back: ask the back-end to abort them and keep
    /// the slots until their completions arrive (then dropped).
    func abandon(_ queue: RunningQueue) {
        guard let q = queues[queue.index], q.queue === queue else { return }
        queues[queue.index] = nil
        abandonedQueues.append(q)
        for h in 0..<queue.ring.size where q.slots[h].inBackend {
            q.slots[h].status = nil
            if !closed { _ = channel.abort(token: q.token(UInt16(h))) }
        }
    }

    /// The queue slots a back-end token belongs to: the running start of its queue, or an abandoned one.
    @inline(__always)
    private func slots(for token: BackendToken) -> BlkQueueSlots? {
        if token.queueIndex < queues.count, let q = queues[token.queueIndex], q.generation == token.generation { return q }
        for q in abandonedQueues where q.generation == token.generation && q.queue.index == token.queueIndex { return q }
        return nil
    }
    func completionFDs() -> [Int32] { [channel.completionFD] }
    func bind(unregisterCompletionFD: @escaping (Int32) -> Void) { unregisterFD = unregisterCompletionFD }
    func bind(registerCompletionFD: @escaping (Int32) -> Void) { registerFD = registerCompletionFD }
    private var registerFD: ((Int32) -> Void)?

    /// Whether a new back-end may be attached: the old channel is closed (its LUN removed and drained).
    var canReattach: Bool { closed && backendGone }

    /// A LUN was added again after its removal: serve requests on `newChannel` from now on.
    /// Returns false (and closes `newChannel`) when the old channel is still draining.
    func reattach(_ newChannel: Channel) -> Bool {
        guard canReattach else {
            newChannel.close()
            return false
        }
        channel = newChannel
        channelIsSynchronous = newChannel.completesOnCommit
        submitted = 0
        closed = false
        backendGone = false
        if newChannel.completionFD >= 0 { registerFD?(newChannel.completionFD) }
        return true
    }

    /// The loop is stopping (queues drained): release the channel.
    func stopping() { closeChannel() }

    private func closeChannel() {
        guard !closed else { return }
        closed = true
        if channel.completionFD >= 0 { unregisterFD?(channel.completionFD) }
        channel.close()
    }

    /// The LUN is gone: fail new requests; close the channel now or after its last completion.
    func closeBackend() {
        backendGone = true
        if submitted == 0 { closeChannel() }
    }

    func commit() {
        guard pendingCommit else { return }
        pendingCommit = false
        guard !closed else { return }
        channel.commit()
        // A synchronous back-end completed on commit: deliver now, with no wake-up round trip.
        if channelIsSynchronous { _ = reap() }
    }

    func reap() -> Bool {
        if closed { return false }
        let n = channel.reap { completed($0, $1) }
        if backendGone && submitted <= 0 { closeChannel() }
        return n > 0
    }

    func poll() -> Bool {
        if closed { return false }
        let n = channel.poll { completed($0, $1) }
        if backendGone && submitted <= 0 { closeChannel() }
        return n > 0
    }

    /// One back-end completion: the guest gets its status (or, for an abandoned ring, nothing).
    @inline(__always)
    private func completed(_ raw: UInt64, _ result: BlockResult) {
        submitted -= 1
        let token = BackendToken(raw)
        let head = token.head
        guard let q = slots(for: token), Int(head) < q.queue.ring.size, q.slots[Int(head)].inBackend else { return }
        q.slots[Int(head)].inBackend = false
        if q.queue.abandoned {
            // Its ring is gone: drop the completion (the broken ring only does its bookkeeping).
            q.queue.complete(head: head, ringEntries: q.slots[Int(head)].entries, length: 0)
            return
        }
        let slot = q.slots[Int(head)]
        var ok = result.succeeded
        if slot.isRead && result.bytesTransferred < UInt64(slot.written) { ok = false }
        finish(q, head, ok ? VirtioBlk.statusOK : VirtioBlk.statusIOError, dataWritten: ok ? slot.written : 0)
    }

    @inline(__always)
    private func finish(_ q: BlkQueueSlots, _ head: UInt16, _ status: UInt8, dataWritten: UInt32) {
        let slot = q.slots[Int(head)]
        slot.status?.storeBytes(of: status, as: UInt8.self)
        if let counters = q.counters {
            // IOERR counts as CHECK CONDITION / MEDIUM ERROR, UNSUPP as CHECK CONDITION / ILLEGAL REQUEST.
            let ok = status == VirtioBlk.statusOK
            counters.record(command: slot.kind, bytes: ok ? Int(truncatingIfNeeded: slot.bytes) : 0,
                            latencyNanos: IOCounters.now() &- slot.arrival, status: ok ? 0 : 0x02,
                            senseKey: status == VirtioBlk.statusUnsupported ? 0x05 : 0x03)
        }
        q.queue.complete(head: head, ringEntries: slot.entries, length: dataWritten + 1)
    }

    func handle(_ chain: DescriptorChain, on queue: RunningQueue) {
        guard let q = queues[queue.index] else { return }
        let head = chain.head
        // The status byte is the last device-writable byte.
        guard let status = chain.writable.lastByte else {
            queue.complete(head: head, ringEntries: chain.ringEntries, length: 0)
            return
        }
        q.slots[Int(head)] = BlkSlot(status: status, entries: chain.ringEntries, written: 0, isRead: false,
                                     arrival: IOCounters.now())
        q.counters?.begin()
        var header = (UInt64(0), UInt64(0))
        let got = withUnsafeMutableBytes(of: &header) { chain.readable.gather(from: 0, into: $0) }
        guard got == 16, let dataOut = chain.readable.droppingPrefix(16), let dataIn = chain.writable.droppingSuffix(1) else {
            finish(q, head, VirtioBlk.statusIOError, dataWritten: 0)
            return
        }
        let type = UInt32(truncatingIfNeeded: header.0.littleEndian)
        switch type {
        case VirtioBlk.typeIn: q.slots[Int(head)].kind = .read
        case VirtioBlk.typeOut, VirtioBlk.typeWriteZeroes: q.slots[Int(head)].kind = .write
        case VirtioBlk.typeFlush: q.slots[Int(head)].kind = .flush
        case VirtioBlk.typeDiscard: q.slots[Int(head)].kind = .discard
        default: break
        }
        let sector = header.1.littleEndian
        let device = self.device!
        let capacity = device.capacitySectors.load(ordering: .relaxed)
        let blockSectors = device.blockSectors
        let token = q.token(head)
        let request: BlockRequest
        switch type {
        case VirtioBlk.typeIn, VirtioBlk.typeOut:
            let isRead = type == VirtioBlk.typeIn
            let buffers = isRead ? dataIn : dataOut
            let bytes = UInt64(isRead ? chain.writableBytes - 1 : chain.readableBytes - 16)
            guard bytes > 0, bytes % (512 * blockSectors) == 0, sector % blockSectors == 0,
                  sector <= capacity, bytes / 512 <= capacity - sector, buffers.count <= device.options.maxSegments + 4 else {
                finish(q, head, VirtioBlk.statusIOError, dataWritten: 0)
                return
            }
            if !isRead && device.readOnly.load(ordering: .relaxed) {
                finish(q, head, VirtioBlk.statusIOError, dataWritten: 0)
                return
            }
            q.slots[Int(head)].isRead = isRead
            q.slots[Int(head)].written = isRead ? UInt32(truncatingIfNeeded: bytes) : 0
            q.slots[Int(head)].bytes = bytes
            request = BlockRequest(operation: isRead ? .read : .write, offset: sector * 512, length: bytes, buffers: buffers,
                                   forceUnitAccess: !isRead && !device.writeback.load(ordering: .relaxed))
        case VirtioBlk.typeFlush:
            request = BlockRequest(operation: .flush, offset: 0, length: 0)
        case VirtioBlk.typeGetID:
            let n = min(dataIn.totalLength, VirtioBlk.serialLength)
            let written = device.serialBytes.withUnsafeBytes { dataIn.scatter(at: 0, from: UnsafeRawBufferPointer(rebasing: $0.prefix(n))) }
            finish(q, head, VirtioBlk.statusOK, dataWritten: UInt32(written))
            return
        case VirtioBlk.typeDiscard, VirtioBlk.typeWriteZeroes:
            let isDiscard = type == VirtioBlk.typeDiscard
            var segment = (UInt64(0), UInt64(0))
            let n = withUnsafeMutableBytes(of: &segment) { dataOut.gather(from: 0, into: $0) }
            guard n == 16, chain.readableBytes == 32 else {
                // Only one segment per request is offered (max_*_seg = 1).
                finish(q, head, n == 16 ? VirtioBlk.statusUnsupported : VirtioBlk.statusIOError, dataWritten: 0)
                return
            }
            let start = segment.0.littleEndian
            let count = UInt64(UInt32(truncatingIfNeeded: segment.1.littleEndian))
            let flags = UInt32(truncatingIfNeeded: segment.1.littleEndian >> 32)
            let unmap = flags & 1 != 0
            let limit = UInt64(isDiscard ? device.options.maxDiscardSectors : device.options.maxWriteZeroesSectors)
            guard flags & ~1 == 0, !(isDiscard && unmap) else {
                finish(q, head, VirtioBlk.statusUnsupported, dataWritten: 0)
                return
            }
            guard !device.readOnly.load(ordering: .relaxed), count > 0, count <= limit, start <= capacity, count <= capacity - start,
                  start % blockSectors == 0, count % blockSectors == 0 else {
                finish(q, head, VirtioBlk.statusIOError, dataWritten: 0)
                return
            }
            request = BlockRequest(operation: isDiscard ? .discard : .writeZeroes, offset: start * 512, length: count * 512,
                                   mayUnmap: unmap)
        default:
            finish(q, head, VirtioBlk.statusUnsupported, dataWritten: 0)
            return
        }
        guard !backendGone, !closed else {
            finish(q, head, VirtioBlk.statusIOError, dataWritten: 0)
            return
        }
        let rc = channel.submit(request, token: token)
        if rc != 0 {
            finish(q, head, VirtioBlk.statusIOError, dataWritten: 0)
        } else {
            q.slots[Int(head)].inBackend = true
            submitted += 1
            pendingCommit = true
        }
    }
}

/// Per-group outcomes of `attachBackend`, written on each group's loop thread and read after the waits.
private final class AttachResults: @unchecked Sendable {
    private var results: [Bool]
    init(count: Int) { results = Array(repeating: false, count: count) }
    func set(_ i: Int, _ value: Bool) { results[i] = value }
    var all: Bool { results.allSatisfy { $0 } }
}
