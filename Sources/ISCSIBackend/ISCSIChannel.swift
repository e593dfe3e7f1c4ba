import BlockIO
import CLibISCSI
import CSystem
#if canImport(Glibc)
import Glibc
#endif

/// What libiscsi's callbacks get as private data: the channel and the slot the command belongs to.
struct CallbackTag {
    /// Unretained `ISCSIChannel`, or nil once the channel is being torn down.
    var channel: UnsafeMutableRawPointer?
    /// Slot index, or one of the special tags below.
    var slot: Int32

    static let connectSlot: Int32 = -1
    static let discoverySlot: Int32 = -2
    static let lunResetSlot: Int32 = -3
    /// ABORT TASK for slot i uses `abortSlotBase - i`.
    static let abortSlotBase: Int32 = -1000
}

/// The single C callback for every command libiscsi completes (SCSI, connect, login).
private let iscsiTrampoline: iscsi_command_cb = { _, status, commandData, privateData in
    guard let privateData else { return }
    let tag = privateData.assumingMemoryBound(to: CallbackTag.self).pointee
    guard let channelPointer = tag.channel else { return }
    let channel = Unmanaged<ISCSIChannel>.fromOpaque(channelPointer).takeUnretainedValue()
    channel.handleCallback(slot: tag.slot, status: status, commandData: commandData)
}

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
/// Counters of one channel's connection history (for the admin CLI and tests).
public struct ISCSIChannelStatistics: Sendable, Equatable {
    /// Successful logins (first one included).
    public var logins: UInt64 = 0
    /// Sessions lost after being online.
    public var connectionLosses: UInt64 = 0
    /// Commands sent again on a new session after the previous one was lost.
    public var commandsResubmitted: UInt64 = 0
    /// Extra commands sent for transfers above the remote's maximum transfer length.
    public var splitParts: UInt64 = 0
    /// Commands retried after a remote UNIT ATTENTION.
    public var unitAttentionsRetried: UInt64 = 0
    /// Commands retried after BUSY, TASK SET FULL, TASK ABORTED, NOT READY (becoming ready) or ABORTED COMMAND.
    public var busyRetries: UInt64 = 0
    /// Requests completed with ETIMEDOUT.
    public var timeouts: UInt64 = 0
    /// Geometry re-reads after CAPACITY DATA HAS CHANGED.
    public var capacityChanges: UInt64 = 0
    /// ABORT TASK / LUN RESET answers received from the remote.
    public var taskManagementResponses: UInt64 = 0
}

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

    enum SlotPhase: UInt8 {
        case free, queued, inFlight, completed
    }

    struct Slot {
        var phase: SlotPhase = .free
        var inQueue = false
        var token: UInt64 = 0
        var request = BlockRequest(operation: .flush, offset: 0, length: 0)
        var deadline: UInt64 = 0
        var notBefore: UInt64 = 0
        var task: UnsafeMutablePointer<scsi_task>?
        var done: UInt64 = 0
        var chunk: UInt64 = 0
        var retries: UInt16 = 0
        var result = BlockResult.success(0)
        var sense = ISCSIRemoteSense.none
        /// The remote's full status and sense (INFORMATION, sense-key specific) for the result.
        var remote = RemoteSCSIStatus.none
        /// Answered by the remote with CAPACITY DATA HAS CHANGED: held until the capacity is re-read,
        /// then sent again; its result carries the new block count (the core's resize event).
        var awaitingGeometry = false
        var reportBlockCount = false
        var unmap = unmap_list(lba: 0, num: 0)
        /// The guest (via the core) asked to abort it: a cancellation completes it with ECANCELED.
        var aborting = false
        /// The remote confirmed the abort: cancel the local libiscsi task after `iscsi_service` returns.
        var cancelRequested = false
    }

    enum DiscoveryStep: Equatable {
        case idle, readCapacity, blockLimits, provisioning, caching, persistentReservations, compareAndWrite
    }

    let backend: ISCSIBackend
    let config: ISCSIBackendConfig

    private var context: OpaquePointer?
    private(set) var phase: Phase = .waiting
    private var nextAttempt: UInt64 = 0
    private var phaseDeadline: UInt64 = 0
    private var consecutiveFailures = 0
    private var outageStart: UInt64 = 0
    private var lostConnection = false
    private var failureReason = ""
    private var lastLoggedFailure = ""
    /// Increments whenever the socket (fd) changes.
    public private(set) var pollGeneration: UInt64 = 0

    private var geometryKnown = false
    private var blockSize: UInt64 = 512
    /// Largest READ/WRITE sent as one command: the remote's B0h MAXIMUM TRANSFER LENGTH (larger requests
    /// are split inside the channel, so the geometry handed to the core reports no limit).
    private(set) var maxIOBytes: UInt64 = UInt64(UInt32.max)
    /// A smaller per-command limit in bytes set from outside (tests), kept across rediscoveries; 0: none.
    var transferLimitOverride: UInt64 = 0 { didSet { updateMaxIOBytes() } }

    private func updateMaxIOBytes() {
        let limit = remoteMaxTransferBytes == 0 ? UInt64(UInt32.max) & ~(blockSize - 1) : remoteMaxTransferBytes
        maxIOBytes = transferLimitOverride != 0 ? min(transferLimitOverride, limit) : limit
    }
    /// The remote's B0h MAXIMUM TRANSFER LENGTH in bytes (0: none), as last discovered.
    public private(set) var remoteMaxTransferBytes: UInt64 = 0
    private var pendingRemoteMaxTransfer: UInt64 = 0
    /// Blocks per UNMAP / WRITE SAME command (larger requests are split; from VPD B0h).
    var maxUnmapBlocks: UInt64 = 0x40_0000
    var maxWriteSameBlocks: UInt64 = 0x40_0000
    private var geometry = BlockGeometry(logicalBlockSize: 512, physicalBlockSize: 512, blockCount: 0)

    private var discoveryStep: DiscoveryStep = .idle
    private var discoveryTask: UnsafeMutablePointer<scsi_task>?
    private var discoveryRetries = 0
    private var rediscoverPending = false
    private var pendingGeometry = BlockGeometry(logicalBlockSize: 512, physicalBlockSize: 512, blockCount: 0)
    private var pendingLBPME = false

    private let slots: UnsafeMutablePointer<Slot>
    private let capacity: Int
    private let tags: UnsafeMutablePointer<CallbackTag>
    /// Command slots, connect/login, discovery, LUN RESET, then one ABORT TASK tag per slot.
    private var tagCount: Int { 2 * capacity + 3 }
    private var freeSlots: [Int32]
    private var submitQueue: SlotRing
    private var completions: SlotRing
    private var zeroBlock: UnsafeMutableRawPointer
    /// Per-slot iovec arrays for the parts of a transfer above the remote's maximum transfer length
    /// (`splitIOVCapacity` entries per slot, preallocated).
    private let splitIOV: UnsafeMutablePointer<scsi_iovec>
    static let splitIOVCapacity = 64
    private var zeroBlockSize: Int
    private let timeoutNanoseconds: UInt64

    /// Connection history counters.
    public private(set) var statistics = ISCSIChannelStatistics()

    /// Timer period while the channel has timed work (reconnects, deadlines, retries).
    public let tickIntervalMilliseconds: Int32 = 50

    /// Private epoll instance exported as `completionFD`.
    private let epollFD: Int32
    /// timerfd inside `epollFD`.
    private let timerFD: Int32
    private var timerArmed = false
    /// The socket currently registered in `epollFD` (-1: none) and its generation and events.
    private var registeredSocket: Int32 = -1
    private var registeredGeneration: UInt64 = 0
    private var registeredEvents: UInt32 = 0
    private let eventBuffer: UnsafeMutablePointer<epoll_event>

    /// Probe channels report failures to their caller instead of logging them.
    let quiet: Bool

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
        splitIOV.initialize(repeating: scsi_iovec(iov_base: nil, iov_len: 0), count: capacity * Self.splitIOVCapacity)
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

    // MARK: - Event-loop interface

    /// The socket to watch, or -1 while no connection attempt is under way.
    public var pollFD: Int32 {
        guard let context else { return -1 }
        return iscsi_get_fd(context)
    }

    /// poll(2) events (POLLIN, POLLOUT) libiscsi wants on `pollFD`; 0 when nothing to wait for.
    public var pollEvents: Int16 {
        guard let context else { return 0 }
        return Int16(truncatingIfNeeded: iscsi_which_events(context))
    }

    /// `BlockChannel`: a stable epoll fd that becomes readable when the socket or the channel's
    /// timer needs attention; call `reap` (or `processEvents`) then.
    public var completionFD: Int32 { epollFD }

    /// Whether the epoll fd and the timerfd could be created.
    var isUsable: Bool { epollFD >= 0 && timerFD >= 0 }

    /// Handles whatever is ready inside `completionFD` (socket readiness, timer) without blocking.
    public func processEvents() {
        guard epollFD >= 0 else { return }
        let n = epoll_wait(epollFD, eventBuffer, 4, 0)
        if n > 0 {
            let generation = pollGeneration
            for i in 0..<Int(n) {
                let ev = eventBuffer[i]
                if ev.data.fd == timerFD {
                    var expirations: UInt64 = 0
                    _ = read(timerFD, &expirations, 8)
                    tick()
                } else if ev.data.fd == registeredSocket && context != nil && generation == pollGeneration {
                    // (An event for a socket replaced earlier in this batch is stale: skipped.)
                    let bits = ev.events & UInt32(POLLIN | POLLOUT | POLLERR | POLLHUP)
                    let hangup = ev.events & EPOLLRDHUP.rawValue != 0 ? Int16(POLLIN) : 0
                    service(revents: Int16(truncatingIfNeeded: bits) | hangup)
                }
            }
        }
        syncRegistration()
    }

    /// Keeps the socket registration and the timer in `epollFD` in step with libiscsi's state.
    private func syncRegistration() {
        guard epollFD >= 0 else { return }
        let fd = pollFD
        let wanted = UInt32(UInt16(bitPattern: pollEvents))
        if fd != registeredSocket || pollGeneration != registeredGeneration {
            if registeredSocket >= 0 { _ = epoll_ctl(epollFD, EPOLL_CTL_DEL, registeredSocket, nil) }
            registeredSocket = -1
            if fd >= 0 {
                var ev = epoll_event()
                ev.events = wanted
                ev.data.fd = fd
                if epoll_ctl(epollFD, EPOLL_CTL_ADD, fd, &ev) == 0 || errno == EEXIST {
                    if errno == EEXIST { _ = epoll_ctl(epollFD, EPOLL_CTL_MOD, fd, &ev) }
                    registeredSocket = fd
                }
            }
            registeredGeneration = pollGeneration
            registeredEvents = wanted
        } else if fd >= 0 && wanted != registeredEvents {
            var ev = epoll_event()
            ev.events = wanted
            ev.data.fd = fd
            _ = epoll_ctl(epollFD, EPOLL_CTL_MOD, fd, &ev)
            registeredEvents = wanted
        }
        updateTimer(forceFire: false)
    }

    /// Arms the periodic timer while there is timed work (not online, requests outstanding, a
    /// discovery running), disarms it when idle.
    private func updateTimer(forceFire: Bool) {
        guard timerFD >= 0 else { return }
        let needed = forceFire || (phase != .online && phase != .closed) || inFlight > 0 || discoveryStep != .idle
        if needed == timerArmed && !forceFire { return }
        let period = timespec(tv_sec: 0, tv_nsec: Int(tickIntervalMilliseconds) * 1_000_000)
        var spec = itimerspec()
        if needed {
            spec.it_interval = period
            spec.it_value = forceFire ? timespec(tv_sec: 0, tv_nsec: 1) : period
        }
        _ = timerfd_settime(timerFD, 0, &spec, nil)
        timerArmed = needed
    }

    /// Whether the session is logged in and the LUN geometry is known.
    public var isOnline: Bool { phase == .online }

    /// The channel's view of the LUN (valid when `isOnline` or once it has been online).
    public var currentGeometry: BlockGeometry? { geometryKnown ? geometry : nil }

    /// Why the last connection attempt or session failed ("" when none).
    public var lastFailure: String { failureReason }

    /// Requests queued or in flight (completed but not yet reaped ones excluded).
    public var inFlight: Int { capacity - freeSlots.count - completions.count }

    /// Handles readiness of `pollFD` (`revents` in poll(2) bits).
    public func service(revents: Int16) {
        guard let context, phase != .closed else { return }
        let rc = iscsi_service(context, Int32(revents))
        if rc < 0 || (revents & Int16(POLLHUP | POLLERR)) != 0 {
            if failureReason.isEmpty || phase == .online {
                failureReason = "connection to \(config.url.portal) lost: \(lastLibraryError())"
            }
            lostConnection = true
        }
        afterLibraryCall(now: monotonicNanoseconds())
        syncRegistration()
    }

    /// Periodic work: reconnect after backoff, login timeouts, BUSY retries, request deadlines.
    public func tick() {
        tick(now: monotonicNanoseconds())
        syncRegistration()
    }

    func tick(now: UInt64) {
        switch phase {
        case .closed:
            return
        case .waiting:
            if now >= nextAttempt { startConnect(now: now) }
        case .connecting, .discovering:
            if now >= phaseDeadline {
                failureReason = phase == .connecting
                    ? "connect/login to \(config.url.portal) not answered within \((phaseDeadline - nextAttempt) / 1_000_000) ms"
                    : "READ CAPACITY/INQUIRY not answered"
                lostConnection = true
            }
        case .online:
            break
        }
        if cancelsPending { performRequestedCancels() }
        if lostConnection { dropConnection(now: now) }
        expireRequests(now: now)
        issueQueued(now: now)
        flushSocket()
    }

    /// Blocks up to `timeoutMilliseconds` in poll(2) on `completionFD`, then handles what is ready.
    /// For tests and the start-up probe only: event loops register `completionFD` and call `reap`.
    public func runOnce(timeoutMilliseconds: Int32) {
        syncRegistration()
        var pfd = pollfd(fd: epollFD, events: Int16(POLLIN), revents: 0)
        _ = Glibc.poll(&pfd, 1, max(timeoutMilliseconds, 0))
        processEvents()
    }

    // MARK: - BlockChannel

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
    private func admit(_ request: BlockRequest, token: UInt64) -> Int32 {
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

    // MARK: - Connection management

    private func lastLibraryError() -> String {
        guard let context, let text = iscsi_get_error(context) else { return "unknown error" }
        var s = String(cString: text)
        while let last = s.last, last == "\n" || last == " " || last == "." { s.removeLast() }
        // libiscsi's own reconnect machinery (disabled here) explains nothing useful.
        if s.isEmpty || s.contains("reconnect") { return "the target closed the connection" }
        return s
    }

    private func startConnect(now: UInt64) {
        guard context == nil else { return }
        guard let ctx = iscsi_create_context(config.initiatorName) else {
            failureReason = "iscsi_create_context failed"
            scheduleRetry(now: now)
            return
        }
        context = ctx
        pollGeneration &+= 1
        iscsi_set_noautoreconnect(ctx, 1)
        _ = iscsi_set_targetname(ctx, config.url.targetName)
        _ = iscsi_set_session_type(ctx, ISCSI_SESSION_NORMAL)
        _ = iscsi_set_header_digest(ctx, config.headerDigest == .crc32c ? ISCSI_HEADER_DIGEST_CRC32C : ISCSI_HEADER_DIGEST_NONE)
        if let user = config.chapUser, let secret = config.chapSecret {
            _ = iscsi_set_initiator_username_pwd(ctx, user, secret.value)
        }
        // Dead peers: keepalive probes on idle sessions (~11 s), and unacknowledged data aborts
        // the connection after a third of the timeout, leaving time to reconnect and resubmit.
        iscsi_set_tcp_keepidle(ctx, 5)
        iscsi_set_tcp_keepintvl(ctx, 2)
        iscsi_set_tcp_keepcnt(ctx, 3)
        iscsi_set_tcp_user_timeout(ctx, Int32(min(max(Int(config.timeoutSeconds) * 1000 / 3, 2000), 20_000)))
        phase = .connecting
        loggingIn = false
        nextAttempt = now
        let loginBudget = min(max(timeoutNanoseconds / 3, 2_000_000_000), 10_000_000_000)
        phaseDeadline = now &+ loginBudget
        lostConnection = false
        if iscsi_connect_async(ctx, backend.portal, iscsiTrampoline, UnsafeMutableRawPointer(tags + capacity)) != 0 {
            failureReason = "cannot connect to \(config.url.portal): \(lastLibraryError())"
            lostConnection = true
        }
    }

    private func scheduleRetry(now: UInt64) {
        let delayMs = config.reconnectBackoff.delay(afterFailures: consecutiveFailures)
        consecutiveFailures += 1
        nextAttempt = now &+ delayMs * 1_000_000
        phase = .waiting
        if failureReason != lastLoggedFailure && !quiet {
            lastLoggedFailure = failureReason
            config.emit(.warning, "\(config.url): \(failureReason); retrying in \(delayMs) ms (backoff up to \(config.reconnectBackoff.maximumMilliseconds) ms)"
                + (inFlight > 0 ? " (\(inFlight) requests held, timeout \(config.timeoutSeconds) s)" : ""))
        }
    }

    /// Closes the socket, takes every in-flight command back into the submit queue, and schedules a reconnect.
    private func dropConnection(now: UInt64) {
        let wasOnline = phase == .online
        if wasOnline {
            outageStart = now
            statistics.connectionLosses += 1
        }
        destroyContext()
        // The cancellations destroyContext triggered report the same loss again.
        lostConnection = false
        if failureReason.isEmpty { failureReason = "connection to \(config.url.portal) lost" }
        backend.channelWentOffline(wasOnline: wasOnline, reason: failureReason)
        scheduleRetry(now: now)
    }

    private func destroyContext() {
        guard let ctx = context else { return }
        // Cancels every PDU: SCSI callbacks run with SCSI_STATUS_CANCELLED and requeue their slots.
        _ = iscsi_destroy_context(ctx)
        context = nil
        pollGeneration &+= 1
        for i in 0..<capacity {
            let slot = slots + i
            if let task = slot.pointee.task {
                // No callback came (libiscsi skips them when not logged in): take the command back.
                slot.pointee.task = nil
                scsi_free_scsi_task(task)
                if slot.pointee.phase == .inFlight {
                    if slot.pointee.aborting {
                        complete(Int32(i), .failure(ECANCELED))
                    } else {
                        statistics.commandsResubmitted += 1
                        requeue(Int32(i), delayNanoseconds: 0)
                    }
                }
            }
        }
        if let task = discoveryTask {
            discoveryTask = nil
            scsi_free_scsi_task(task)
        }
        discoveryStep = .idle
        if phase != .closed { phase = .waiting }
    }

    private func afterLibraryCall(now: UInt64) {
        if cancelsPending { performRequestedCancels() }
        if lostConnection { dropConnection(now: now) }
        if phase == .online {
            if rediscoverPending && discoveryStep == .idle {
                rediscoverPending = false
                startDiscovery()
            }
            issueQueued(now: now)
            flushSocket()
        }
    }

    /// Writes queued PDUs now instead of waiting for the next POLLOUT round trip.
    private func flushSocket() {
        guard let context, phase == .online || phase == .discovering else { return }
        if iscsi_which_events(context) & Int32(POLLOUT) != 0 {
            if iscsi_service(context, Int32(POLLOUT)) < 0 {
                failureReason = "connection to \(config.url.portal) lost: \(lastLibraryError())"
                lostConnection = true
                dropConnection(now: monotonicNanoseconds())
            }
        }
    }

    // MARK: - Callbacks

    func handleCallback(slot index: Int32, status: Int32, commandData: UnsafeMutableRawPointer?) {
        switch index {
        case CallbackTag.connectSlot:
            connectStepDone(status: status)
        case CallbackTag.discoverySlot:
            discoveryStepDone(status: status, task: commandData?.assumingMemoryBound(to: scsi_task.self))
        case CallbackTag.lunResetSlot:
            taskManagementDone(slot: nil, status: status, response: commandData)
        case ...CallbackTag.abortSlotBase:
            let slot = CallbackTag.abortSlotBase - index
            guard Int(slot) < capacity else { return }
            taskManagementDone(slot: slot, status: status, response: commandData)
        default:
            guard index >= 0 && Int(index) < capacity else { return }
            commandDone(index, status: status, task: commandData?.assumingMemoryBound(to: scsi_task.self))
        }
    }

    private var loggingIn = false

    private func connectStepDone(status: Int32) {
        guard let context else { return }
        if !loggingIn {
            guard status == Int32(bitPattern: SCSI_STATUS_GOOD.rawValue) else {
                failureReason = "cannot connect to \(config.url.portal): \(lastLibraryError())"
                lostConnection = true
                return
            }
            loggingIn = true
            if iscsi_login_async(context, iscsiTrampoline, UnsafeMutableRawPointer(tags + capacity)) != 0 {
                loggingIn = false
                failureReason = "login to \(config.url.targetName) failed: \(lastLibraryError())"
                lostConnection = true
            }
            return
        }
        loggingIn = false
        guard status == Int32(bitPattern: SCSI_STATUS_GOOD.rawValue) else {
            let detail = lastLibraryError()
            let lower = detail.lowercased()
            if lower.contains("authentication") || lower.contains("authorization") {
                failureReason = "login to \(config.url.targetName) at \(config.url.portal) refused: CHAP authentication failed"
                    + (config.chapUser == nil ? " (the target requires CHAP; set chap_user and chap_secret_file)" : " for user \(config.chapUser!) (check the CHAP secret)")
                    + " [\(detail)]"
            } else {
                failureReason = "login to \(config.url.targetName) at \(config.url.portal) failed: \(detail)"
            }
            lostConnection = true
            return
        }
        phase = .discovering
        startDiscovery()
    }

    private func commandDone(_ index: Int32, status: Int32, task: UnsafeMutablePointer<scsi_task>?) {
        let slot = slots + Int(index)
        guard let mine = slot.pointee.task, task == nil || task == mine else { return }
        slot.pointee.task = nil
        defer { scsi_free_scsi_task(mine) }
        guard slot.pointee.phase == .inFlight else { return }
        let now = monotonicNanoseconds()
        if slot.pointee.aborting && status != Int32(bitPattern: SCSI_STATUS_GOOD.rawValue)
            && status != Int32(bitPattern: SCSI_STATUS_CONDITION_MET.rawValue) {
            // Aborted on the guest's behalf (ABORT TASK / LUN RESET): never retried or resubmitted,
            // whatever came back (cancellation, the reset's UNIT ATTENTION, a lost session).
            complete(index, .failure(ECANCELED))
            return
        }
        switch status {
        case Int32(bitPattern: SCSI_STATUS_GOOD.rawValue), Int32(bitPattern: SCSI_STATUS_CONDITION_MET.rawValue):
            commandSucceeded(index, task: mine)
        case Int32(bitPattern: SCSI_STATUS_CHECK_CONDITION.rawValue):
            let key = UInt8(truncatingIfNeeded: mine.pointee.sense.key.rawValue)
            let code = UInt16(truncatingIfNeeded: mine.pointee.sense.ascq)
            let sense = ISCSIRemoteSense(status: ISCSIRemoteSense.statusCheckCondition, key: key,
                                         asc: UInt8(code >> 8), ascq: UInt8(code & 0xff))
            slot.pointee.sense = sense
            slot.pointee.remote = Self.remoteStatus(of: mine, sense: sense)
            switch key {
            case ISCSIRemoteSense.keyUnitAttention where code == 0x2a09:
                // The remote's capacity changed: re-read it, then send this command again; its result
                // carries the new block count (the SCSI core turns it into its resize event).
                capacityChanged()
                statistics.unitAttentionsRetried += 1
                slot.pointee.awaitingGeometry = true
                slot.pointee.reportBlockCount = true
                retryOrFail(index, sense: sense, delayNanoseconds: 0, limit: 16, now: now)
            case ISCSIRemoteSense.keyUnitAttention where slot.pointee.request.passThrough.isPresent
                    && sense.asc == 0x2a && (0x03...0x05).contains(sense.ascq):
                // Reservations/registrations preempted or released on the remote: the guest that
                // passes PERSISTENT RESERVE through must learn it (the command did not execute).
                complete(index, .failure(sense.errno))
            case ISCSIRemoteSense.keyUnitAttention:
                statistics.unitAttentionsRetried += 1
                retryOrFail(index, sense: sense, delayNanoseconds: 0, limit: 16, now: now)
            case ISCSIRemoteSense.keyNotReady where sense.asc == 0x04 && (sense.ascq == 0x01 || sense.ascq == 0x0a):
                statistics.busyRetries += 1
                retryOrFail(index, sense: sense, delayNanoseconds: 100_000_000, limit: 1000, now: now)
            case ISCSIRemoteSense.keyAbortedCommand:
                statistics.busyRetries += 1
                retryOrFail(index, sense: sense, delayNanoseconds: 10_000_000, limit: 8, now: now)
            default:
                complete(index, .failure(sense.errno))
            }
        case Int32(bitPattern: SCSI_STATUS_BUSY.rawValue), Int32(bitPattern: SCSI_STATUS_TASK_SET_FULL.rawValue), Int32(bitPattern: SCSI_STATUS_TASK_ABORTED.rawValue):
            let sense = ISCSIRemoteSense(status: UInt8(truncatingIfNeeded: status))
            slot.pointee.sense = sense
            slot.pointee.remote = RemoteSCSIStatus(status: sense.status)
            statistics.busyRetries += 1
            let backoff = min(UInt64(1) << min(UInt64(slot.pointee.retries), 7), 100) * 1_000_000
            retryOrFail(index, sense: sense, delayNanoseconds: backoff, limit: 10_000, now: now)
        case Int32(bitPattern: SCSI_STATUS_RESERVATION_CONFLICT.rawValue):
            let sense = ISCSIRemoteSense(status: ISCSIRemoteSense.statusReservationConflict)
            slot.pointee.sense = sense
            slot.pointee.remote = RemoteSCSIStatus(status: sense.status)
            complete(index, .failure(sense.errno))
        default:
            // CANCELLED (session torn down), ERROR (protocol error), TIMEOUT: the command did not
            // complete on the remote as far as we know; send it again on the next session.
            if status != Int32(bitPattern: SCSI_STATUS_CANCELLED.rawValue) {
                failureReason = "command failed on the transport: \(lastLibraryError())"
            } else if failureReason.isEmpty {
                failureReason = "connection to \(config.url.portal) lost"
            }
            lostConnection = true
            statistics.commandsResubmitted += 1
            requeue(index, delayNanoseconds: 0)
        }
    }

    private func retryOrFail(_ index: Int32, sense: ISCSIRemoteSense, delayNanoseconds: UInt64, limit: UInt16, now: UInt64) {
        let slot = slots + Int(index)
        if slot.pointee.retries >= limit || now &+ delayNanoseconds >= slot.pointee.deadline {
            complete(index, .failure(sense.errno))
            return
        }
        slot.pointee.retries += 1
        requeue(index, delayNanoseconds: delayNanoseconds)
    }

    private func commandSucceeded(_ index: Int32, task: UnsafeMutablePointer<scsi_task>) {
        let slot = slots + Int(index)
        let request = slot.pointee.request
        switch request.operation {
        case .read, .write:
            if request.passThrough.isPresent {
                var bytes = request.length
                if task.pointee.residual_status == SCSI_RESIDUAL_UNDERFLOW { bytes -= min(UInt64(task.pointee.residual), bytes) }
                complete(index, .success(bytes))
                return
            }
            var bytes = slot.pointee.chunk
            if task.pointee.residual_status == SCSI_RESIDUAL_UNDERFLOW {
                bytes -= min(UInt64(task.pointee.residual), bytes)
            }
            let short = bytes < slot.pointee.chunk
            slot.pointee.done += bytes
            slot.pointee.chunk = 0
            slot.pointee.retries = 0
            if short || slot.pointee.done >= request.length {
                complete(index, .success(slot.pointee.done))
            } else {
                statistics.splitParts += 1
                requeue(index, delayNanoseconds: 0)
            }
        case .flush:
            complete(index, .success(0))
        case .discard, .writeZeroes:
            slot.pointee.done += slot.pointee.chunk
            slot.pointee.chunk = 0
            slot.pointee.retries = 0
            if slot.pointee.done >= request.length {
                complete(index, .success(request.length))
            } else {
                requeue(index, delayNanoseconds: 0)
            }
        }
    }

    // MARK: - Slots

    private func enqueue(_ index: Int32) {
        let slot = slots + Int(index)
        guard !slot.pointee.inQueue else { return }
        slot.pointee.inQueue = true
        submitQueue.push(index)
    }

    private func requeue(_ index: Int32, delayNanoseconds: UInt64) {
        let slot = slots + Int(index)
        slot.pointee.phase = .queued
        slot.pointee.notBefore = delayNanoseconds == 0 ? 0 : monotonicNanoseconds() &+ delayNanoseconds
        enqueue(index)
    }

    private func complete(_ index: Int32, _ result: BlockResult) {
        let slot = slots + Int(index)
        slot.pointee.phase = .completed
        var result = result
        if result.succeeded {
            slot.pointee.sense = .none
            slot.pointee.remote = .none
        } else if result.errno != ECANCELED && result.errno != ETIMEDOUT && slot.pointee.remote.isPresent {
            // The remote's verdict (kept when a BUSY/UA that recurred until the deadline ends the request).
            result.remote = slot.pointee.remote
        }
        if slot.pointee.reportBlockCount && geometryKnown { result.remoteBlockCount = geometry.blockCount }
        slot.pointee.awaitingGeometry = false
        slot.pointee.reportBlockCount = false
        slot.pointee.result = result
        completions.push(index)
    }

    private func expireRequests(now: UInt64) {
        guard inFlight > 0 else { return }
        var stuck = false
        for i in 0..<capacity {
            let slot = slots + i
            guard now >= slot.pointee.deadline else { continue }
            switch slot.pointee.phase {
            case .queued:
                let sense = slot.pointee.sense
                // Still waiting for the remote after the whole timeout: retryable failure.
                // A remote BUSY/UA that kept recurring keeps its own sense and errno.
                if sense.isLocal { statistics.timeouts += 1 }
                complete(Int32(i), .failure(sense.isLocal ? ETIMEDOUT : sense.errno))
            case .inFlight:
                stuck = true
            default:
                break
            }
        }
        if stuck && context != nil {
            failureReason = "remote did not answer commands within \(config.timeoutSeconds) s"
            dropConnection(now: now)
            expireRequests(now: now)
        }
    }

    private func issueQueued(now: UInt64) {
        guard phase == .online, let context else { return }
        var remaining = submitQueue.count
        while remaining > 0, let index = submitQueue.pop() {
            remaining -= 1
            let slot = slots + Int(index)
            guard slot.pointee.phase == .queued else { slot.pointee.inQueue = false; continue }
            if slot.pointee.notBefore > now || slot.pointee.awaitingGeometry {
                submitQueue.push(index)
                continue
            }
            slot.pointee.inQueue = false
            issue(index, context: context)
            if lostConnection { break }
        }
    }

    private func issue(_ index: Int32, context: OpaquePointer) {
        let slot = slots + Int(index)
        let request = slot.pointee.request
        let tag = UnsafeMutableRawPointer(tags + Int(index))
        let lun = config.url.lun
        let bs = blockSize
        let lba = (request.offset + slot.pointee.done) / bs
        var task: UnsafeMutablePointer<scsi_task>?
        if request.passThrough.isPresent {
            issuePassThrough(index, context: context)
            return
        }
        switch request.operation {
        case .read, .write:
            var iov = UnsafeMutablePointer<scsi_iovec>(OpaquePointer(request.buffers.base))
            var iovCount = Int32(request.buffers.count)
            var bytes = request.length
            if request.length > maxIOBytes || slot.pointee.done > 0 {
                // One part of a transfer above the remote's limit: the next `maxIOBytes` (or fewer,
                // when they need more iovec entries than a slot has), then the rest on completion.
                let part = splitPart(index, request: request, from: slot.pointee.done,
                                     upTo: min(request.length - slot.pointee.done, maxIOBytes))
                guard part.bytes > 0 else {
                    complete(index, .failure(EINVAL))
                    return
                }
                iov = part.iov
                iovCount = part.count
                bytes = part.bytes
            }
            slot.pointee.chunk = bytes
            if request.operation == .read {
                task = iscsi_read16_iov_task(context, lun, lba, UInt32(bytes), Int32(bs), 0, 0, 0, 0, 0,
                                             iscsiTrampoline, tag, iov, iovCount)
            } else {
                task = iscsi_write16_iov_task(context, lun, lba, nil, UInt32(bytes), Int32(bs), 0, 0,
                                              request.forceUnitAccess ? 1 : 0, 0, 0, iscsiTrampoline, tag, iov, iovCount)
            }
        case .flush:
            task = iscsi_synchronizecache16_task(context, lun, 0, 0, 0, 0, iscsiTrampoline, tag)
        case .discard:
            let blocks = min((request.length - slot.pointee.done) / bs, maxUnmapBlocks)
            slot.pointee.chunk = blocks * bs
            slot.pointee.unmap = unmap_list(lba: lba, num: UInt32(blocks))
            task = iscsi_unmap_task(context, lun, 0, 0, &slot.pointee.unmap, 1, iscsiTrampoline, tag)
        case .writeZeroes:
            let blocks = min((request.length - slot.pointee.done) / bs, maxWriteSameBlocks)
            slot.pointee.chunk = blocks * bs
            task = iscsi_writesame16_task(context, lun, lba, zeroBlock.assumingMemoryBound(to: UInt8.self),
                                          UInt32(bs), UInt32(blocks), 0, request.mayUnmap ? 1 : 0, 0, 0,
                                          iscsiTrampoline, tag)
        }
        guard let task else {
            // libiscsi refused to queue it (no session or out of memory): try again on a new session.
            failureReason = "cannot queue command: \(lastLibraryError())"
            lostConnection = true
            requeue(index, delayNanoseconds: 0)
            return
        }
        slot.pointee.task = task
        if slot.pointee.phase == .queued { slot.pointee.phase = .inFlight }
    }

    // MARK: - Pass-through and split transfers

    /// The remote's status and sense for a CHECK CONDITION: the raw sense libiscsi keeps in `datain`
    /// (2-byte length, then the sense bytes) gives INFORMATION and the sense-key specific bytes.
    static func remoteStatus(of task: UnsafeMutablePointer<scsi_task>, sense: ISCSIRemoteSense) -> RemoteSCSIStatus {
        var remote = RemoteSCSIStatus(status: sense.status, senseKey: sense.key, additionalSenseCode: sense.asc,
                                      additionalSenseCodeQualifier: sense.ascq)
        if let data = task.pointee.datain.data, task.pointee.datain.size > 2 {
            let declared = Int(data[0]) << 8 | Int(data[1])
            let n = min(declared, Int(task.pointee.datain.size) - 2)
            if n > 0, let parsed = RemoteSCSIStatus.checkCondition(sense: UnsafeRawBufferPointer(start: data + 2, count: n)),
               parsed.senseKey == sense.key {
                remote.information = parsed.information
                remote.hasInformation = parsed.hasInformation
                remote.senseKeySpecific = parsed.senseKeySpecific
            }
        }
        return remote
    }

    /// Fills the slot's iovec array with `upTo` bytes of the request's buffers starting at byte `from`
    /// (fewer, whole blocks, when more than `splitIOVCapacity` entries would be needed).
    private func splitPart(_ index: Int32, request: BlockRequest, from: UInt64, upTo: UInt64, wholeBlocks: Bool = true)
        -> (iov: UnsafeMutablePointer<scsi_iovec>, count: Int32, bytes: UInt64) {
        let out = splitIOV + Int(index) * Self.splitIOVCapacity
        var skip = from
        var remaining = upTo
        var used = 0
        var covered: UInt64 = 0
        var i = 0
        while i < request.buffers.count && remaining > 0 && used < Self.splitIOVCapacity {
            let v = request.buffers[i]
            i += 1
            let length = UInt64(v.iov_len)
            if skip >= length { skip -= length; continue }
            let take = min(length - skip, remaining)
            out[used] = scsi_iovec(iov_base: v.iov_base.map { $0 + Int(skip) }, iov_len: Int(take))
            skip = 0
            remaining -= take
            covered += take
            used += 1
        }
        // Whole blocks only: trim the tail when the entries ran out in the middle of a block.
        let whole = wholeBlocks ? covered - covered % blockSize : covered
        var excess = covered - whole
        while excess > 0 && used > 0 {
            let last = UInt64(out[used - 1].iov_len)
            if last <= excess { excess -= last; used -= 1 } else { out[used - 1].iov_len = Int(last - excess); excess = 0 }
        }
        return (out, Int32(used), whole)
    }

    /// Sends a pass-through command unchanged, with the request's buffers as data-in or data-out.
    private func issuePassThrough(_ index: Int32, context: OpaquePointer) {
        let slot = slots + Int(index)
        let request = slot.pointee.request
        let command = request.passThrough
        var cdb: (UInt64, UInt64) = (command.head.bigEndian, command.tail.bigEndian)
        let direction: Int32
        switch request.operation {
        case .read: direction = Int32(SCSI_XFER_READ.rawValue)
        case .write: direction = Int32(SCSI_XFER_WRITE.rawValue)
        default: direction = Int32(SCSI_XFER_NONE.rawValue)
        }
        let length = direction == Int32(SCSI_XFER_NONE.rawValue) ? 0 : Int32(request.length)
        let created = withUnsafeMutableBytes(of: &cdb) { raw in
            scsi_create_task(Int32(command.length), raw.baseAddress!.assumingMemoryBound(to: UInt8.self), direction, length)
        }
        guard let task = created else {
            complete(index, .failure(ENOMEM))
            return
        }
        if length > 0 && UInt64(request.buffers.totalLength) == request.length {
            // The buffers are exactly the transfer: libiscsi reads or fills them as they are.
            let iov = UnsafeMutablePointer<scsi_iovec>(OpaquePointer(request.buffers.base))
            if direction == Int32(SCSI_XFER_READ.rawValue) {
                scsi_task_set_iov_in(task, iov, Int32(request.buffers.count))
            } else {
                scsi_task_set_iov_out(task, iov, Int32(request.buffers.count))
            }
        } else if length > 0 {
            let part = splitPart(index, request: request, from: 0, upTo: request.length, wholeBlocks: false)
            guard part.bytes == request.length else {
                scsi_free_scsi_task(task)
                complete(index, .failure(EINVAL))
                return
            }
            if direction == Int32(SCSI_XFER_READ.rawValue) {
                scsi_task_set_iov_in(task, part.iov, part.count)
            } else {
                scsi_task_set_iov_out(task, part.iov, part.count)
            }
        }
        if iscsi_scsi_command_async(context, Int32(config.url.lun), task, iscsiTrampoline, nil,
                                    UnsafeMutableRawPointer(tags + Int(index))) != 0 {
            scsi_free_scsi_task(task)
            failureReason = "cannot queue command: \(lastLibraryError())"
            lostConnection = true
            requeue(index, delayNanoseconds: 0)
            return
        }
        slot.pointee.task = task
        if slot.pointee.phase == .queued { slot.pointee.phase = .inFlight }
    }

    // MARK: - Task management

    private var cancelsPending = false
    /// Task management functions sent and not yet answered.
    public private(set) var pendingTaskManagement = 0
    /// The response code of the last task management function the remote answered
    /// (0 FUNCTION COMPLETE, 1 TASK DOES NOT EXIST, 2 LUN DOES NOT EXIST, 5 REJECTED, 255 REJECTED...),
    /// or -1 when the session was lost before the answer.
    public private(set) var lastTaskManagementResponse: Int32 = -1

    /// Aborts the request submitted with `token` (the core's ABORT TASK). A request not yet sent
    /// completes with ECANCELED at once; one in flight gets an ABORT TASK on the remote and
    /// completes with ECANCELED when the remote confirms (or with its real result if it finished
    /// first: a write reported successful did reach the remote). Returns false if no such request.
    @discardableResult
    public func abort(token: UInt64) -> Bool {
        for i in 0..<capacity {
            let slot = slots + i
            guard slot.pointee.token == token, slot.pointee.phase == .queued || slot.pointee.phase == .inFlight else { continue }
            if slot.pointee.phase == .queued {
                complete(Int32(i), .failure(ECANCELED))
            } else if !slot.pointee.aborting, let context, let task = slot.pointee.task {
                slot.pointee.aborting = true
                if iscsi_task_mgmt_abort_task_async(context, task, iscsiTrampoline, UnsafeMutableRawPointer(tags + capacity + 3 + i)) == 0 {
                    pendingTaskManagement += 1
                } else {
                    // Cannot send the TMF: drop the session; the aborted command then completes ECANCELED.
                    failureReason = "cannot send ABORT TASK: \(lastLibraryError())"
                    lostConnection = true
                }
            }
            afterLibraryCall(now: monotonicNanoseconds())
            syncRegistration()
            return true
        }
        return false
    }

    /// Resets the remote LUN (the core's LOGICAL UNIT RESET): requests not yet sent complete with
    /// ECANCELED at once; the ones in flight complete with ECANCELED once the remote answers the
    /// LUN RESET (or with their real result if they finished first). Returns 0, or ENOTCONN when
    /// the session is down (all outstanding requests are then cancelled locally).
    @discardableResult
    public func resetLogicalUnit() -> Bool { resetLUN() == 0 }

    /// Resets the remote LUN; see ``resetLogicalUnit()``. Returns 0 or ENOTCONN.
    @discardableResult
    public func resetLUN() -> Int32 {
        var inFlightCount = 0
        for i in 0..<capacity {
            let slot = slots + i
            switch slot.pointee.phase {
            case .queued:
                complete(Int32(i), .failure(ECANCELED))
            case .inFlight:
                slot.pointee.aborting = true
                inFlightCount += 1
            default:
                break
            }
        }
        guard phase == .online, let context else { return ENOTCONN }
        if iscsi_task_mgmt_lun_reset_async(context, UInt32(config.url.lun), iscsiTrampoline,
                                           UnsafeMutableRawPointer(tags + capacity + 2)) == 0 {
            pendingTaskManagement += 1
        } else {
            failureReason = "cannot send LUN RESET: \(lastLibraryError())"
            lostConnection = true
        }
        afterLibraryCall(now: monotonicNanoseconds())
        syncRegistration()
        return 0
    }

    private func taskManagementDone(slot target: Int32?, status: Int32, response: UnsafeMutableRawPointer?) {
        pendingTaskManagement = max(0, pendingTaskManagement - 1)
        guard status == Int32(bitPattern: SCSI_STATUS_GOOD.rawValue) else {
            lastTaskManagementResponse = -1
            return   // session lost: aborting commands complete ECANCELED through the cancellation
        }
        lastTaskManagementResponse = response.map { Int32(bitPattern: $0.load(as: UInt32.self)) } ?? 0
        statistics.taskManagementResponses += 1
        // Whatever the remote still had is gone; commands it answered before this response have
        // already completed. Cancel the local side of the rest (deferred: we are inside iscsi_service).
        for i in 0..<capacity {
            let slot = slots + i
            guard slot.pointee.phase == .inFlight, slot.pointee.aborting, slot.pointee.task != nil else { continue }
            if let target, Int(target) != i { continue }
            slot.pointee.cancelRequested = true
            cancelsPending = true
        }
    }

    /// Cancels the local libiscsi tasks the remote no longer has. Only while libiscsi is not in the
    /// middle of writing a PDU (no POLLOUT wanted): a partly sent PDU must not be freed under it.
    /// Until then the commands may still go out and complete with their real result.
    private func performRequestedCancels() {
        guard let context else { cancelsPending = false; return }
        if iscsi_which_events(context) & Int32(POLLOUT) != 0 { return }
        cancelsPending = false
        for i in 0..<capacity {
            let slot = slots + i
            guard slot.pointee.cancelRequested else { continue }
            slot.pointee.cancelRequested = false
            if let task = slot.pointee.task, slot.pointee.phase == .inFlight {
                // Invokes the command callback with SCSI_STATUS_CANCELLED -> ECANCELED.
                _ = iscsi_scsi_cancel_task(context, task)
            }
        }
    }

    // MARK: - Geometry discovery

    private func capacityChanged() {
        config.emit(.info, "\(config.url): remote reports CAPACITY DATA HAS CHANGED; re-reading capacity")
        rediscoverPending = true
        statistics.capacityChanges += 1
    }

    private func startDiscovery() {
        guard let context else { return }
        discoveryRetries = 0
        pendingGeometry = geometry
        discoveryStep = .readCapacity
        discoveryTask = iscsi_readcapacity16_task(context, config.url.lun, iscsiTrampoline,
                                                  UnsafeMutableRawPointer(tags + capacity + 1))
        if discoveryTask == nil {
            failureReason = "cannot send READ CAPACITY(16): \(lastLibraryError())"
            lostConnection = true
        }
    }

    private func issueDiscoveryStep() {
        guard let context else { return }
        let tag = UnsafeMutableRawPointer(tags + capacity + 1)
        switch discoveryStep {
        case .readCapacity:
            discoveryTask = iscsi_readcapacity16_task(context, config.url.lun, iscsiTrampoline, tag)
        case .blockLimits:
            discoveryTask = iscsi_inquiry_task(context, config.url.lun, 1, 0xB0, 255, iscsiTrampoline, tag)
        case .provisioning:
            discoveryTask = iscsi_inquiry_task(context, config.url.lun, 1, 0xB2, 255, iscsiTrampoline, tag)
        case .caching:
            // MODE SENSE(10), DBD, current values of the caching page: WP bit and WCE.
            discoveryTask = iscsi_modesense10_task(context, config.url.lun, 0, 1, Int32(SCSI_MODESENSE_PC_CURRENT.rawValue),
                                                   Int32(SCSI_MODEPAGE_CACHING.rawValue), 0, 255, iscsiTrampoline, tag)
        case .persistentReservations:
            discoveryTask = iscsi_persistent_reserve_in_task(context, config.url.lun,
                                                             Int32(SCSI_PERSISTENT_RESERVE_READ_KEYS.rawValue), 255,
                                                             iscsiTrampoline, tag)
        case .compareAndWrite:
            // REPORT SUPPORTED OPERATION CODES, one command: COMPARE AND WRITE (89h).
            discoveryTask = iscsi_report_supported_opcodes_task(context, config.url.lun, 0, 1, 0x89, 0, 64,
                                                                iscsiTrampoline, tag)
        case .idle:
            return
        }
        if discoveryTask == nil {
            failureReason = "cannot send discovery command: \(lastLibraryError())"
            lostConnection = true
        }
    }

    private func discoveryStepDone(status: Int32, task: UnsafeMutablePointer<scsi_task>?) {
        guard let mine = discoveryTask else { return }
        discoveryTask = nil
        defer { scsi_free_scsi_task(mine) }
        let good = status == Int32(bitPattern: SCSI_STATUS_GOOD.rawValue)
        if (discoveryStep == .persistentReservations || discoveryStep == .compareAndWrite)
            && status == Int32(bitPattern: SCSI_STATUS_RESERVATION_CONFLICT.rawValue) {
            // Optional probes: a conflict (not expected) counts as "unsupported".
            if discoveryStep == .persistentReservations {
                pendingGeometry.remotePersistentReservations = false
                discoveryStep = .compareAndWrite
                discoveryRetries = 0
                issueDiscoveryStep()
            } else {
                pendingGeometry.remoteCompareAndWrite = false
                finishDiscovery(lbpu: pendingLBPU, lbpws: pendingLBPWS)
            }
            return
        }
        if status != Int32(bitPattern: SCSI_STATUS_GOOD.rawValue) && status != Int32(bitPattern: SCSI_STATUS_CHECK_CONDITION.rawValue) {
            if status == Int32(bitPattern: SCSI_STATUS_BUSY.rawValue) || status == Int32(bitPattern: SCSI_STATUS_TASK_SET_FULL.rawValue) {
                discoveryRetries += 1
                if discoveryRetries < 50 { issueDiscoveryStep(); return }
            }
            if failureReason.isEmpty || status != Int32(bitPattern: SCSI_STATUS_CANCELLED.rawValue) {
                failureReason = "capacity discovery failed: \(lastLibraryError())"
            }
            lostConnection = true
            discoveryStep = .idle
            return
        }
        if !good && mine.pointee.sense.key == SCSI_SENSE_UNIT_ATTENTION && discoveryRetries < 16 {
            discoveryRetries += 1
            issueDiscoveryStep()
            return
        }
        switch discoveryStep {
        case .readCapacity:
            guard good, let raw = scsi_datain_unmarshall(mine) else {
                let code = UInt16(truncatingIfNeeded: mine.pointee.sense.ascq)
                failureReason = "READ CAPACITY(16) failed on \(config.url) (sense key 0x\(String(mine.pointee.sense.key.rawValue, radix: 16)) asc/ascq 0x\(String(code, radix: 16)))"
                lostConnection = true
                discoveryStep = .idle
                return
            }
            let rc = raw.assumingMemoryBound(to: scsi_readcapacity16.self).pointee
            let bs = rc.block_length
            guard bs >= 512, bs <= 65536, bs & (bs - 1) == 0 else {
                failureReason = "remote block size \(bs) is not supported"
                lostConnection = true
                discoveryStep = .idle
                return
            }
            pendingGeometry = BlockGeometry(logicalBlockSize: bs, physicalBlockSize: bs << min(UInt32(rc.lbppbe), 8),
                                            blockCount: rc.returned_lba &+ 1, readOnly: false,
                                            supportsDiscard: false, supportsWriteZeroes: true,
                                            discardReadsZeroes: rc.lbprz != 0, volatileWriteCache: true,
                                            maxTransferBytes: 0, discardGranularity: 0)
            pendingGeometry.supportsPassThrough = true
            pendingRemoteMaxTransfer = 0
            pendingLBPME = rc.lbpme != 0
            pendingLBPU = false
            pendingLBPWS = false
            pendingMaxUnmap = 0
            pendingMaxWriteSame = 0
            discoveryStep = .blockLimits
            discoveryRetries = 0
            issueDiscoveryStep()
        case .blockLimits:
            if good, let raw = scsi_datain_unmarshall(mine) {
                let bl = raw.assumingMemoryBound(to: scsi_inquiry_block_limits.self).pointee
                let bs = UInt64(pendingGeometry.logicalBlockSize)
                let maxXfer = UInt64(bl.max_xfer_len) * bs
                pendingRemoteMaxTransfer = maxXfer == 0 ? 0 : min(maxXfer, UInt64(UInt32.max) & ~(bs - 1))
                pendingGeometry.discardGranularity = UInt32(truncatingIfNeeded: min(UInt64(bl.opt_unmap_gran) * bs, UInt64(UInt32.max)))
                pendingMaxUnmap = UInt64(bl.max_unmap)
                pendingMaxWriteSame = bl.max_ws_len
            }
            if pendingLBPME {
                discoveryStep = .provisioning
            } else {
                discoveryStep = .caching
            }
            discoveryRetries = 0
            issueDiscoveryStep()
        case .provisioning:
            if good, let raw = scsi_datain_unmarshall(mine) {
                let lbp = raw.assumingMemoryBound(to: scsi_inquiry_logical_block_provisioning.self).pointee
                pendingLBPU = lbp.lbpu != 0
                pendingLBPWS = lbp.lbpws != 0
                if lbp.lbprz != 0 { pendingGeometry.discardReadsZeroes = true }
            }
            discoveryStep = .caching
            discoveryRetries = 0
            issueDiscoveryStep()
        case .caching:
            if good, let data = mine.pointee.datain.data, mine.pointee.datain.size >= 8 {
                let size = Int(mine.pointee.datain.size)
                // Mode parameter header(10): byte 3 = device-specific parameter (bit 7 WP).
                pendingGeometry.readOnly = data[3] & 0x80 != 0
                let descriptorLength = Int(data[6]) << 8 | Int(data[7])
                let page = 8 + descriptorLength
                if size >= page + 3, data[page] & 0x3f == 0x08 {
                    pendingGeometry.volatileWriteCache = data[page + 2] & 0x04 != 0
                }
            }
            discoveryStep = .persistentReservations
            discoveryRetries = 0
            issueDiscoveryStep()
        case .persistentReservations:
            // READ KEYS answered: the remote implements persistent reservations (SPC-3 or later).
            pendingGeometry.remotePersistentReservations = good
            discoveryStep = .compareAndWrite
            discoveryRetries = 0
            issueDiscoveryStep()
        case .compareAndWrite:
            // SUPPORT field 011b (supported as in the standard) or 101b (vendor-specific manner).
            var supported = false
            if good, let data = mine.pointee.datain.data, mine.pointee.datain.size >= 2 {
                let support = data[1] & 0x07
                supported = support == 3 || support == 5
            }
            pendingGeometry.remoteCompareAndWrite = supported
            finishDiscovery(lbpu: pendingLBPU, lbpws: pendingLBPWS)
        case .idle:
            break
        }
    }

    private var pendingLBPU = false
    private var pendingLBPWS = false
    private var pendingMaxUnmap: UInt64 = 0
    private var pendingMaxWriteSame: UInt64 = 0

    private func finishDiscovery(lbpu: Bool, lbpws: Bool) {
        discoveryStep = .idle
        for i in 0..<capacity { slots[i].awaitingGeometry = false }
        pendingGeometry.supportsDiscard = pendingLBPME && lbpu
        // WRITE SAME(16) writing zeroes works on any SBC target; with UNMAP=1 it deallocates only when LBPWS.
        pendingGeometry.supportsWriteZeroes = true
        if !(pendingLBPME && lbpws) { pendingGeometry.discardReadsZeroes = pendingGeometry.discardReadsZeroes && pendingGeometry.supportsDiscard }
        let limitUnmap = pendingMaxUnmap == 0 || pendingMaxUnmap == 0xFFFF_FFFF ? 0x40_0000 : pendingMaxUnmap
        let limitWS = pendingMaxWriteSame == 0 ? 0x40_0000 : min(pendingMaxWriteSame, 0xFFFF_FFFF)
        maxUnmapBlocks = limitUnmap
        maxWriteSameBlocks = limitWS
        let changed = !geometryKnown || pendingGeometry != geometry
        remoteMaxTransferBytes = pendingRemoteMaxTransfer
        adoptGeometry(pendingGeometry)
        backend.publish(geometry: pendingGeometry, changed: changed)
        if phase == .discovering {
            let now = monotonicNanoseconds()
            let outageMs = (now &- outageStart) / 1_000_000
            phase = .online
            statistics.logins += 1
            consecutiveFailures = 0
            let wasFailing = !lastLoggedFailure.isEmpty
            lastLoggedFailure = ""
            failureReason = ""
            if !quiet || wasFailing { config.emit(wasFailing ? .warning : .info,
                        "\(config.url): online, \(geometry.blockCount) blocks of \(geometry.logicalBlockSize) bytes"
                        + (statistics.logins == 1 ? "; remote persistent reservations: \(geometry.remotePersistentReservations ? "yes" : "no")"
                           + ", COMPARE AND WRITE: \(geometry.remoteCompareAndWrite ? "listed" : "no")"
                           + ", max transfer: \(remoteMaxTransferBytes == 0 ? "none" : "\(remoteMaxTransferBytes) bytes (larger I/O split)")" : "")
                        + (wasFailing ? " (back after \(outageMs) ms; resubmitting \(submitQueue.count) commands)" : "")) }
            backend.channelCameOnline()
        }
    }

    private func adoptGeometry(_ g: BlockGeometry) {
        geometry = g
        geometryKnown = true
        blockSize = UInt64(g.logicalBlockSize)
        if g.maxTransferBytes != 0 { remoteMaxTransferBytes = UInt64(g.maxTransferBytes) }
        updateMaxIOBytes()
        if zeroBlockSize < Int(g.logicalBlockSize) {
            zeroBlock.deallocate()
            zeroBlockSize = Int(g.logicalBlockSize)
            zeroBlock = .allocate(byteCount: zeroBlockSize, alignment: 4096)
            zeroBlock.initializeMemory(as: UInt8.self, repeating: 0, count: zeroBlockSize)
        }
    }
}
