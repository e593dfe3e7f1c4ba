import BlockIO
import CLibISCSI
import CSystem
#if canImport(Glibc)
import Glibc
#endif

/// One iSCSI session to the remote LUN, owned by one event-loop thread: a `BlockChannel` that
/// an event loop drives exactly like the libaio one. No call on it blocks (except `runOnce`, which is
/// for tests and the start-up probe) and no per-I/O memory is allocated by it (libiscsi allocates
/// its PDUs and task structures).
///
/// ## Driving it from an `EventLoop`
/// `completionFD` is a private epoll fd that stays the same for the channel's lifetime. Inside it the
/// channel watches the iSCSI socket (which changes on every reconnect, with POLLOUT interest only
/// while libiscsi has PDUs to send) and a timerfd (reconnect backoff, login timeout, request
/// deadlines, BUSY retries; armed only while there is such work). So the loop needs nothing special:
///
/// ```swift
/// try loop.register(fd: channel.completionFD, events: .readable) { _ in
///     _ = channel.reapDetailed { token, result, sense in core.complete(token, result, sense) }
/// }
/// // per batch of guest requests:
/// _ = channel.submit(request, token: token) ... ; channel.commit()
/// ```
///
/// ## What goes to the remote
/// READ/WRITE become READ(16)/WRITE(16) on the guest's iovecs (zero-copy); a transfer above the remote's
/// B0h MAXIMUM TRANSFER LENGTH is sent as consecutive parts of at most that size from the same slot
/// (one completion; the first failing part fails the whole request with its sense), so the geometry
/// handed to the core reports no transfer limit. FLUSH is SYNCHRONIZE CACHE(16), discard UNMAP,
/// write-zeroes WRITE SAME(16) (both split by the B0h limits). `SCSIPassThrough` requests (COMPARE AND
/// WRITE, PERSISTENT RESERVE IN/OUT) are sent unchanged with `iscsi_scsi_command_async` on the guest's
/// iovecs. At login the channel reads READ CAPACITY(16), VPD B0h/B2h, the caching mode page, probes
/// persistent reservations (PERSISTENT RESERVE IN, READ KEYS) and COMPARE AND WRITE (REPORT SUPPORTED
/// OPERATION CODES) and publishes them in the geometry. Failed commands carry the remote's status and
/// sense in `BlockResult.remote`.
///
/// Persistent reservations are held by this channel's session (its I_T nexus on the remote): with one
/// event-loop thread per LUN (`io_threads = 1`, the default) that is one nexus for the guest, as PR
/// expects; with several threads each has its own session and registers separately.
///
/// `reap` first handles whatever is ready inside (socket, timer), then delivers the completions
/// the libiscsi callbacks collected in the slot ring. `commit` sends the queued commands at once
/// (one writev per batch where the socket allows). The lower-level `service(revents:)`/`tick()`
/// with `pollFD`/`pollEvents` remain for loops that prefer to watch the socket directly.
///
/// ## Where the parts are
/// This file holds the state and the `BlockChannel` API. The rest is in extensions, one concern each:
/// `+EventLoop` (epoll fd, timerfd, tick), `+Login` (connect, login, backoff, session loss), `+Slots` (slot
/// table, submit queue, deadlines), `+Commands` (slot to libiscsi task), `+Completion` (status and sense to
/// success, retry or failure), `+TaskManagement` (ABORT TASK, LUN RESET), `+Discovery` and `+Callbacks`
/// (libiscsi's C callbacks). The decisions without I/O are pure types with their own tests:
/// `ISCSIGeometryDiscovery`, `ISCSICommand`, `ISCSIPassThroughCommand`, `ISCSITransferSplit`.
public final class ISCSIChannel: BlockChannel, @unchecked Sendable {
    /// Connection phase.
    enum Phase: Equatable {
        /// No socket; the next attempt starts at `nextAttempt`.
        case waiting
        /// TCP connect and login in progress.
        case connecting
        /// Logged in; reading capacity and VPD pages before accepting I/O.
        case discovering
        /// Commands flow.
        case online
        /// `close` was called.
        case closed
    }

    let backend: ISCSIBackend
    let config: ISCSIBackendConfig

    var context: OpaquePointer?
    var phase: Phase = .waiting
    var nextAttempt: UInt64 = 0
    var phaseDeadline: UInt64 = 0
    var consecutiveFailures = 0
    var outageStart: UInt64 = 0
    var lostConnection = false
    var failureReason = ""
    var lastLoggedFailure = ""
    /// Increments whenever the socket (fd) changes.
    public internal(set) var pollGeneration: UInt64 = 0

    var geometryKnown = false
    var blockSize: UInt64 = 512
    /// Largest READ/WRITE sent as one command: the remote's B0h MAXIMUM TRANSFER LENGTH (larger requests
    /// are split inside the channel, so the geometry handed to the core reports no limit).
    var maxIOBytes: UInt64 = UInt64(UInt32.max)
    /// A smaller per-command limit in bytes set from outside (tests), kept across rediscoveries; 0: none.
    var transferLimitOverride: UInt64 = 0 { didSet { updateMaxIOBytes() } }
    /// The remote's per-command limits, as last discovered (or set by tests).
    var limits = ISCSITransferLimits() { didSet { updateMaxIOBytes() } }

    func updateMaxIOBytes() {
        maxIOBytes = ISCSITransferLimits.maxIOBytes(blockSize: blockSize, remoteMaxTransferBytes: limits.remoteMaxTransferBytes,
                                                    override: transferLimitOverride)
    }
    /// The remote's B0h MAXIMUM TRANSFER LENGTH in bytes (0: none), as last discovered.
    public var remoteMaxTransferBytes: UInt64 { limits.remoteMaxTransferBytes }
    /// Blocks per UNMAP / WRITE SAME command (larger requests are split; from VPD B0h).
    var maxUnmapBlocks: UInt64 {
        get { limits.maxUnmapBlocks }
        set { limits.maxUnmapBlocks = newValue }
    }
    var maxWriteSameBlocks: UInt64 {
        get { limits.maxWriteSameBlocks }
        set { limits.maxWriteSameBlocks = newValue }
    }
    var geometry = BlockGeometry(logicalBlockSize: 512, physicalBlockSize: 512, blockCount: 0)

    /// The discovery under way (its step is `idle` when none) and the command it waits for.
    var discovery = ISCSIGeometryDiscovery()
    var discoveryTask: UnsafeMutablePointer<scsi_task>?
    var discoveryRetries = 0
    var rediscoverPending = false

    let slots: UnsafeMutablePointer<Slot>
    let capacity: Int
    let tags: UnsafeMutablePointer<CallbackTag>
    /// Command slots, connect/login, discovery, LUN RESET, then one ABORT TASK tag per slot.
    var tagCount: Int { 2 * capacity + 3 }
    var freeSlots: [Int32]
    var submitQueue: SlotRing
    var completions: SlotRing
    var zeroBlock: UnsafeMutableRawPointer
    /// Per-slot iovec arrays for the parts of a transfer above the remote's maximum transfer length
    /// (`splitIOVCapacity` entries per slot, preallocated).
    let splitIOV: UnsafeMutablePointer<iovec>
    static let splitIOVCapacity = 64
    var zeroBlockSize: Int
    let timeoutNanoseconds: UInt64

    /// Connection history counters.
    public internal(set) var statistics = ISCSIChannelStatistics()

    /// Timer period while the channel has timed work (reconnects, deadlines, retries).
    public let tickIntervalMilliseconds: Int32 = 50

    /// Private epoll instance exported as `completionFD`.
    let epollFD: Int32
    /// timerfd inside `epollFD`.
    let timerFD: Int32
    var timerArmed = false
    /// The socket currently registered in `epollFD` (-1: none) and its generation and events.
    var registeredSocket: Int32 = -1
    var registeredGeneration: UInt64 = 0
    var registeredEvents: UInt32 = 0
    let eventBuffer: UnsafeMutablePointer<epoll_event>

    /// Probe channels report failures to their caller instead of logging them.
    let quiet: Bool

    /// Connected, login request sent (the connect/login tag's next callback answers the login).
    var loggingIn = false
    /// Local cancels requested by a task management answer, performed after `iscsi_service` returns.
    var cancelsPending = false
    /// Task management functions sent and not yet answered.
    public internal(set) var pendingTaskManagement = 0
    /// The response code of the last task management function the remote answered
    /// (0 FUNCTION COMPLETE, 1 TASK DOES NOT EXIST, 2 LUN DOES NOT EXIST, 5 REJECTED, 255 REJECTED...),
    /// or -1 when the session was lost before the answer.
    public internal(set) var lastTaskManagementResponse: Int32 = -1

    init(backend: ISCSIBackend, quiet: Bool = false) {
        self.backend = backend
        self.quiet = quiet
        self.config = backend.config
        capacity = config.queueDepth
        slots = .allocate(capacity: capacity)
        slots.initialize(repeating: Slot(), count: capacity)
        tags = .allocate(capacity: 2 * capacity + 3)
        freeSlots = []
        freeSlots.reserveCapacity(capacity)
        var i = capacity - 1
        while i >= 0 { freeSlots.append(Int32(i)); i -= 1 }
        submitQueue = SlotRing(capacity: capacity)
        completions = SlotRing(capacity: capacity)
        splitIOV = .allocate(capacity: capacity * Self.splitIOVCapacity)
        splitIOV.initialize(repeating: iovec(iov_base: nil, iov_len: 0), count: capacity * Self.splitIOVCapacity)
        zeroBlockSize = 4096
        zeroBlock = .allocate(byteCount: 4096, alignment: 4096)
        zeroBlock.initializeMemory(as: UInt8.self, repeating: 0, count: 4096)
        timeoutNanoseconds = UInt64(config.timeoutSeconds) * 1_000_000_000
        epollFD = epoll_create1(Int32(EPOLL_CLOEXEC))
        timerFD = timerfd_create(CLOCK_MONOTONIC, Int32(TFD_NONBLOCK | TFD_CLOEXEC))
        eventBuffer = .allocate(capacity: 4)
        let me = Unmanaged.passUnretained(self).toOpaque()
        for j in 0..<capacity { (tags + j).initialize(to: CallbackTag(channel: me, slot: Int32(j))) }
        (tags + capacity).initialize(to: CallbackTag(channel: me, slot: CallbackTag.connectSlot))
        (tags + capacity + 1).initialize(to: CallbackTag(channel: me, slot: CallbackTag.discoverySlot))
        (tags + capacity + 2).initialize(to: CallbackTag(channel: me, slot: CallbackTag.lunResetSlot))
        for j in 0..<capacity {
            (tags + capacity + 3 + j).initialize(to: CallbackTag(channel: me, slot: CallbackTag.abortSlotBase - Int32(j)))
        }
        if let known = backend.knownGeometry() { adoptGeometry(known) }
        outageStart = monotonicNanoseconds()
        if epollFD >= 0 && timerFD >= 0 {
            var ev = epoll_event()
            ev.events = EPOLLIN.rawValue
            ev.data.fd = timerFD
            _ = epoll_ctl(epollFD, EPOLL_CTL_ADD, timerFD, &ev)
        }
        // Start connecting as soon as the owner loop first looks at the channel.
        updateTimer(forceFire: true)
    }

    deinit {
        // Callbacks fired while tearing down must not touch an object being deinitialised.
        for j in 0..<tagCount { tags[j].channel = nil }
        close()
        tags.deinitialize(count: tagCount)
        tags.deallocate()
        slots.deinitialize(count: capacity)
        slots.deallocate()
        zeroBlock.deallocate()
        splitIOV.deallocate()
        eventBuffer.deallocate()
        if timerFD >= 0 { Glibc.close(timerFD) }
        if epollFD >= 0 { Glibc.close(epollFD) }
    }

    /// Whether the session is logged in and the LUN geometry is known.
    public var isOnline: Bool { phase == .online }

    /// The channel's view of the LUN (valid when `isOnline` or once it has been online).
    public var currentGeometry: BlockGeometry? { geometryKnown ? geometry : nil }

    /// Why the last connection attempt or session failed ("" when none).
    public var lastFailure: String { failureReason }

    /// Requests queued or in flight (completed but not yet reaped ones excluded).
    public var inFlight: Int { capacity - freeSlots.count - completions.count }

    // MARK: - BlockChannel (the slot table, commands, completions and task management are in ISCSIChannel+*.swift)

    public func submit(_ request: BlockRequest, token: UInt64) -> Int32 {
        guard phase != .closed else { return ENXIO }
        if request.passThrough.isPresent {
            guard request.passThrough.length >= 6, request.operation == .read || request.operation == .write
                    || request.operation == .flush, request.length <= UInt64(Int32.max) else { return EINVAL }
            if request.operation != .flush {
                guard request.length > 0, UInt64(request.buffers.totalLength) >= request.length else { return EINVAL }
            }
            return admit(request, token: token)
        }
        switch request.operation {
        case .flush:
            break
        case .read, .write:
            // Above the remote's maximum transfer length the request is sent as several commands.
            guard request.length > 0, request.length <= UInt64(UInt32.max) else { return EINVAL }
            guard request.buffers.count > 0, UInt64(request.buffers.totalLength) >= request.length else { return EINVAL }
            if request.operation == .write && geometryKnown && geometry.readOnly { return EROFS }
        case .discard, .writeZeroes:
            guard request.length > 0 else { return EINVAL }
            if geometryKnown {
                if request.operation == .discard && !geometry.supportsDiscard { return EOPNOTSUPP }
                if request.operation == .writeZeroes && !geometry.supportsWriteZeroes { return EOPNOTSUPP }
            }
        }
        if geometryKnown && request.operation != .flush {
            let (end, overflow) = request.offset.addingReportingOverflow(request.length)
            guard request.offset % blockSize == 0, request.length % blockSize == 0, !overflow,
                  end <= geometry.capacityBytes else { return EINVAL }
        }
        return admit(request, token: token)
    }

    /// Takes a free slot for a validated request and queues it.
    func admit(_ request: BlockRequest, token: UInt64) -> Int32 {
        guard let index = freeSlots.popLast() else { return EAGAIN }
        let now = monotonicNanoseconds()
        let slot = slots + Int(index)
        slot.pointee.phase = .queued
        slot.pointee.token = token
        slot.pointee.request = request
        slot.pointee.deadline = now &+ timeoutNanoseconds
        slot.pointee.notBefore = 0
        slot.pointee.task = nil
        slot.pointee.done = 0
        slot.pointee.chunk = 0
        slot.pointee.retries = 0
        slot.pointee.sense = .none
        slot.pointee.remote = .none
        slot.pointee.awaitingGeometry = false
        slot.pointee.reportBlockCount = false
        slot.pointee.aborting = false
        slot.pointee.cancelRequested = false
        enqueue(index)
        return 0
    }

    public func commit() {
        let now = monotonicNanoseconds()
        if phase == .waiting && now >= nextAttempt { startConnect(now: now) }
        issueQueued(now: now)
        flushSocket()
        syncRegistration()
    }

    public func reap(_ handler: (UInt64, BlockResult) -> Void) -> Int {
        reapDetailed { token, result, _ in handler(token, result) }
    }

    /// Like `reap`, with the remote target's status and sense for failed commands, so the SCSI core
    /// can return the remote sense to the guest instead of one derived from the errno.
    public func reapDetailed(_ handler: (UInt64, BlockResult, ISCSIRemoteSense) -> Void) -> Int {
        processEvents()
        var delivered = 0
        while let index = completions.pop() {
            let slot = slots + Int(index)
            let token = slot.pointee.token
            let result = slot.pointee.result
            let sense = slot.pointee.sense
            slot.pointee.phase = .free
            slot.pointee.request = BlockRequest(operation: .flush, offset: 0, length: 0)
            freeSlots.append(index)
            handler(token, result, sense)
            delivered += 1
        }
        return delivered
    }

    /// Tears the session down. Requests not yet completed complete with ECANCELED (reap them).
    public func close() {
        guard phase != .closed else { return }
        let wasOnline = phase == .online
        destroyContext()
        phase = .closed
        for i in 0..<capacity {
            let slot = slots + i
            if slot.pointee.phase == .queued || slot.pointee.phase == .inFlight {
                complete(Int32(i), .failure(ECANCELED))
            }
        }
        backend.channelWentOffline(wasOnline: wasOnline, reason: "")
        updateTimer(forceFire: false)
        if registeredSocket >= 0 { registeredSocket = -1 }
    }

    func adoptGeometry(_ g: BlockGeometry) {
        geometry = g
        geometryKnown = true
        blockSize = UInt64(g.logicalBlockSize)
        if g.maxTransferBytes != 0 { limits.remoteMaxTransferBytes = UInt64(g.maxTransferBytes) }
        updateMaxIOBytes()
        if zeroBlockSize < Int(g.logicalBlockSize) {
            zeroBlock.deallocate()
            zeroBlockSize = Int(g.logicalBlockSize)
            zeroBlock = .allocate(byteCount: zeroBlockSize, alignment: 4096)
            zeroBlock.initializeMemory(as: UInt8.self, repeating: 0, count: zeroBlockSize)
        }
    }
}
