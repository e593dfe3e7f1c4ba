import Backends
import BlockIO
import CSystem
import SystemErrors
#if canImport(Glibc)
import Glibc
#endif

/// A LUN's channel with its per-LUN policies applied: the one place every transport's requests pass
/// (virtio-scsi, virtio-blk and PVSCSI front-ends all submit through it), so each policy exists once.
///
/// Both policies hold requests and submit them later, on the channel's own thread, from a timer:
/// - QoS (`LUNPolicy.admit`): a read or write over its LUN's rate waits until its start time, then goes
///   to the back-end. It is never failed.
/// - Out of space with the `hold` policy: a write (or write-zeroes) that fails with ENOSPC / EDQUOT is
///   held and retried every `LUNPolicy.spaceRetryNanoseconds`; once the bound has passed since its first
///   failure, its failure is delivered (the core maps it to DATA PROTECT 27h/07h).
///
/// Held requests and writes that may need a retry live in a slot table allocated the first time a policy
/// is on (4096 slots; none then: EAGAIN, which the front-ends turn into BUSY). Writes the `hold` policy
/// watches go to the back-end with the slot number as their token (bit 63 set), so their request can be
/// submitted again. `completionFD` is a private epoll fd holding the back-end's completion fd and the
/// channel's timerfd: readable when completions are ready or a held request is due. Over a back-end that
/// completes on commit (null), `completesOnCommit` is true: the front-ends reap right after `commit`, and held
/// requests the timer releases complete inside that `reap` (released, committed, then reaped).
///
/// With no policy on, `submit` is one relaxed atomic load and the back-end's `submit`, and `reap` is the
/// back-end's `reap`.
public final class PolicyChannel: BlockChannel, @unchecked Sendable {
    /// The back-end channel.
    public let inner: AnyBlockChannel
    /// The LUN's policies (shared with its other channels and the control plane).
    public let policy: LUNPolicy

    private let epollFD: Int32
    private let timerFD: Int32
    /// Whether the back-end completes on commit (no completion fd: the null back-end); see `completesOnCommit`.
    public let completesOnCommit: Bool
    /// Absolute CLOCK_MONOTONIC time the timer is armed for (0: disarmed).
    private var timerDue: UInt64 = 0

    /// Slots (nil until a policy is first on).
    private var slots: UnsafeMutablePointer<HeldRequest>?
    private var freeSlots: UnsafeMutablePointer<Int32>?
    private var freeCount = 0
    /// Requests waiting for their time (linked through `HeldRequest.next`), and completions to deliver.
    private var heldHead: Int32 = -1
    private var readyHead: Int32 = -1
    private var heldCount = 0
    private var readyCount = 0
    /// Requests in the back-end under a slot token.
    private var trackedCount = 0

    /// Slots per channel.
    public static let capacity = 4096
    /// Bit 63 of a back-end token: the low bits are a slot of this channel.
    static let slotToken: UInt64 = 1 << 63

    struct HeldRequest {
        enum State: UInt8 { case free, throttled, spaceHeld, inBackend, ready }
        var state: State = .free
        /// Whether the `hold` policy watches it (its token in the back-end is a slot token).
        var tracked = false
        var token: UInt64 = 0
        var request = BlockRequest(operation: .flush, offset: 0, length: 0)
        var due: UInt64 = 0
        /// First ENOSPC of the request (0: none yet).
        var firstFailure: UInt64 = 0
        var result = BlockResult.success(0)
        var next: Int32 = -1
    }

    /// Wraps `inner` with `policy`.
    public init(_ inner: AnyBlockChannel, policy: LUNPolicy) throws(BlockBackendError) {
        self.inner = inner
        self.policy = policy
        epollFD = epoll_create1(Int32(EPOLL_CLOEXEC))
        timerFD = timerfd_create(CLOCK_MONOTONIC, Int32(TFD_NONBLOCK | TFD_CLOEXEC))
        completesOnCommit = inner.completionFD < 0
        var ok = epollFD >= 0 && timerFD >= 0
        let e = errno
        for fd in [timerFD, inner.completionFD] where ok && fd >= 0 {
            var ev = epoll_event()
            ev.events = EPOLLIN.rawValue
            ev.data.fd = fd
            ok = epoll_ctl(epollFD, EPOLL_CTL_ADD, fd, &ev) == 0
        }
        if !ok {
            let code = errno != 0 ? errno : e
            if epollFD >= 0 { Glibc.close(epollFD) }
            if timerFD >= 0 { Glibc.close(timerFD) }
            throw .systemCall(SystemCallError("epoll/timerfd", errno: code, context: "LUN policy channel"))
        }
    }

    deinit {
        Glibc.close(epollFD)
        Glibc.close(timerFD)
        if let slots {
            slots.deinitialize(count: Self.capacity)
            slots.deallocate()
        }
        freeSlots?.deallocate()
    }

    /// Readable when completions are ready or a held request is due.
    public var completionFD: Int32 { epollFD }

    /// Requests queued, held or in flight.
    public var inFlight: Int { inner.inFlight + heldCount + readyCount }

    /// Queues one request, or holds it when its LUN's QoS limit says it must wait.
    @inline(__always)
    public func submit(_ request: BlockRequest, token: UInt64) -> Int32 {
        let flags = policy.flags
        if flags == 0 { return inner.submit(request, token: token) }
        return submitWithPolicy(request, token: token, flags: flags)
    }

    /// Sends the queued batch.
    @inline(__always)
    public func commit() { inner.commit() }

    /// Delivers ready completions (and submits held requests that are due); returns how many completions.
    @inline(__always)
    public func reap(_ handler: (UInt64, BlockResult) -> Void) -> Int {
        if timerDue == 0 && trackedCount == 0 { return inner.reap(handler) }
        return reapWithPolicy(handler)
    }

    /// Delivers the completions the back-end finds without a system call (`AnyBlockChannel.poll`: the AIO
    /// completion ring read in user space) while nothing is held; with held requests, `reap`.
    @inline(__always)
    public func poll(_ handler: (UInt64, BlockResult) -> Void) -> Int {
        if timerDue == 0 && trackedCount == 0 { return inner.poll(handler) }
        return reapWithPolicy(handler)
    }

    /// Aborts a request: a held one completes with ECANCELED at the next `reap`; others go to the back-end.
    public func abort(token: UInt64) -> Bool {
        if let slots {
            var i = heldHead, previous: Int32 = -1
            while i >= 0 {
                let next = slots[Int(i)].next
                if slots[Int(i)].token == token {
                    unlinkHeld(i, previous: previous)
                    cancel(i)
                    return true
                }
                previous = i
                i = next
            }
            for s in 0..<Self.capacity where slots[s].state == .inBackend && slots[s].token == token {
                return inner.abort(token: Self.slotToken | UInt64(s))
            }
        }
        return inner.abort(token: token)
    }

    /// LOGICAL UNIT RESET: every held request completes with ECANCELED; the back-end resets its LUN.
    public func resetLogicalUnit() -> Bool {
        var cancelled = false
        if let slots {
            while heldHead >= 0 {
                let i = heldHead
                heldHead = slots[Int(i)].next
                heldCount -= 1
                cancel(i)
                cancelled = true
            }
        }
        return inner.resetLogicalUnit() || cancelled
    }

    /// Closes the back-end channel (the front-end calls it after the last completion was reaped).
    public func close() { inner.close() }

    // MARK: - With a policy on

    private func submitWithPolicy(_ request: BlockRequest, token: UInt64, flags: UInt8) -> Int32 {
        let tracked = flags & LUNPolicy.holdingOnENOSPC != 0 && !request.passThrough.isPresent
            && (request.operation == .write || request.operation == .writeZeroes)
        var start: UInt64 = 0
        var now: UInt64 = 0
        if flags & LUNPolicy.throttling != 0 {
            guard freeCount > 0 || allocateSlots() else { return EAGAIN }
            now = IOCounters.now()
            start = policy.admit(request, now: now)
        }
        if start > now {
            guard let i = takeSlot() else { return EAGAIN }
            slots![Int(i)] = HeldRequest(state: .throttled, tracked: tracked, token: token, request: request, due: start)
            hold(i)
            return 0
        }
        if !tracked { return inner.submit(request, token: token) }
        guard let i = takeSlot() else { return EAGAIN }
        slots![Int(i)] = HeldRequest(state: .inBackend, tracked: true, token: token, request: request)
        let rc = inner.submit(request, token: Self.slotToken | UInt64(i))
        if rc != 0 {
            releaseSlot(i)
            return rc
        }
        trackedCount += 1
        return 0
    }

    private func reapWithPolicy(_ handler: (UInt64, BlockResult) -> Void) -> Int {
        var delivered = 0
        if timerDue != 0 {
            let now = IOCounters.now()
            if now >= timerDue {
                var ticks: UInt64 = 0
                _ = Glibc.read(timerFD, &ticks, 8)
                timerDue = 0
                delivered += releaseDue(now: now, handler)
            }
        }
        delivered += inner.reap { token, result in
            guard token & Self.slotToken != 0, let slots else {
                handler(token, result)
                return
            }
            let i = Int32(truncatingIfNeeded: token & 0xFFFF_FFFF)
            trackedCount -= 1
            let slot = slots + Int(i)
            if (result.errno == ENOSPC || result.errno == EDQUOT) && policy.flags & LUNPolicy.holdingOnENOSPC != 0 {
                let now = IOCounters.now()
                if slot.pointee.firstFailure == 0 {
                    slot.pointee.firstFailure = now
                    policy.noteSpaceHeld()
                }
                if now &- slot.pointee.firstFailure < policy.holdBoundNanoseconds {
                    slot.pointee.state = .spaceHeld
                    slot.pointee.due = now &+ policy.spaceRetryNanoseconds
                    hold(i)
                    return
                }
            }
            if slot.pointee.firstFailure != 0 { policy.noteSpaceHoldEnded(resumed: result.succeeded) }
            let outer = slot.pointee.token
            releaseSlot(i)
            handler(outer, result)
        }
        if timerDue == 0 { rearmTimer() }
        return delivered
    }

    /// Submits the held requests whose time has come and delivers the cancelled ones.
    private func releaseDue(now: UInt64, _ handler: (UInt64, BlockResult) -> Void) -> Int {
        guard let slots else { return 0 }
        // Detach what is due first: the handler may submit (and hold) new requests meanwhile.
        var due: Int32 = -1
        var i = heldHead, previous: Int32 = -1
        while i >= 0 {
            let next = slots[Int(i)].next
            if slots[Int(i)].due <= now {
                unlinkHeld(i, previous: previous)
                slots[Int(i)].next = due
                due = i
            } else {
                previous = i
            }
            i = next
        }
        var delivered = 0
        var submitted = false
        while due >= 0 {
            let s = due
            due = slots[Int(s)].next
            let slot = slots + Int(s)
            let outer = slot.pointee.token
            let rc: Int32
            if slot.pointee.tracked {
                slot.pointee.state = .inBackend
                rc = inner.submit(slot.pointee.request, token: Self.slotToken | UInt64(s))
                if rc == 0 { trackedCount += 1; submitted = true; continue }
            } else {
                rc = inner.submit(slot.pointee.request, token: outer)
                if rc == 0 { releaseSlot(s); submitted = true; continue }
            }
            if slot.pointee.firstFailure != 0 { policy.noteSpaceHoldEnded(resumed: false) }
            releaseSlot(s)
            handler(outer, .failure(rc))
            delivered += 1
        }
        if submitted { inner.commit() }
        while readyHead >= 0 {
            let s = readyHead
            readyHead = slots[Int(s)].next
            readyCount -= 1
            let outer = slots[Int(s)].token
            let result = slots[Int(s)].result
            releaseSlot(s)
            handler(outer, result)
            delivered += 1
        }
        return delivered
    }

    // MARK: - Slots and timer

    private func allocateSlots() -> Bool {
        guard slots == nil else { return false }
        let table = UnsafeMutablePointer<HeldRequest>.allocate(capacity: Self.capacity)
        table.initialize(repeating: HeldRequest(), count: Self.capacity)
        let free = UnsafeMutablePointer<Int32>.allocate(capacity: Self.capacity)
        for i in 0..<Self.capacity { free[i] = Int32(Self.capacity - 1 - i) }
        slots = table
        freeSlots = free
        freeCount = Self.capacity
        return true
    }

    private func takeSlot() -> Int32? {
        if freeCount == 0 && !allocateSlots() { return nil }
        freeCount -= 1
        return freeSlots![freeCount]
    }

    private func releaseSlot(_ i: Int32) {
        slots![Int(i)].state = .free
        slots![Int(i)].firstFailure = 0
        freeSlots![freeCount] = i
        freeCount += 1
    }

    private func hold(_ i: Int32) {
        slots![Int(i)].next = heldHead
        heldHead = i
        heldCount += 1
        armTimer(at: slots![Int(i)].due)
    }

    private func unlinkHeld(_ i: Int32, previous: Int32) {
        if previous >= 0 { slots![Int(previous)].next = slots![Int(i)].next } else { heldHead = slots![Int(i)].next }
        heldCount -= 1
    }

    /// Completes a held request with ECANCELED at the next `reap`.
    private func cancel(_ i: Int32) {
        let slot = slots! + Int(i)
        if slot.pointee.firstFailure != 0 { policy.noteSpaceHoldEnded(resumed: false) }
        slot.pointee.firstFailure = 0
        slot.pointee.state = .ready
        slot.pointee.result = .failure(ECANCELED)
        slot.pointee.next = readyHead
        readyHead = i
        readyCount += 1
        armTimer(at: 1)
    }

    /// Arms the timer for `due` unless it is armed for earlier.
    private func armTimer(at due: UInt64) {
        if timerDue != 0 && timerDue <= due { return }
        timerDue = max(due, 1)
        var spec = itimerspec()
        spec.it_value.tv_sec = Int(timerDue / 1_000_000_000)
        spec.it_value.tv_nsec = Int(timerDue % 1_000_000_000)
        _ = timerfd_settime(timerFD, Int32(TFD_TIMER_ABSTIME), &spec, nil)
    }

    /// After the timer fired: arms it for the earliest request still held (at once when a completion is ready).
    private func rearmTimer() {
        guard let slots else { return }
        if readyCount > 0 { return armTimer(at: 1) }
        var earliest = UInt64.max
        var i = heldHead
        while i >= 0 {
            earliest = min(earliest, slots[Int(i)].due)
            i = slots[Int(i)].next
        }
        if earliest != .max { armTimer(at: earliest) }
    }
}
