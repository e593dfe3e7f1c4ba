import CSystem
import EventLoop
import GuestMemoryMap
import Logging
import SystemErrors
import Virtio
#if canImport(Glibc)
import Glibc
#endif

/// A one-shot completion signal between threads (an eventfd kept alive by whichever side holds it last).
final class CompletionSignal: @unchecked Sendable {
    let fd: Int32
    init() { fd = csys_eventfd(0, 0) }
    deinit { if fd >= 0 { close(fd) } }
    func signal() { _ = csys_eventfd_signal(fd, 1) }
    /// Waits up to `milliseconds`; returns whether the signal arrived.
    func wait(milliseconds: Int32) -> Bool {
        guard fd >= 0 else { return false }
        return csys_wait_readable(fd, milliseconds) == 1
    }
}

/// Runs `work` on `loop` and blocks the calling (control) thread until it calls its completion argument,
/// or `milliseconds` pass. Returns whether it completed.
@discardableResult
func runOnLoopAndWait(_ loop: EventLoop, milliseconds: Int32 = 30_000,
                      _ work: @escaping @Sendable (@escaping @Sendable () -> Void) -> Void) -> Bool {
    let done = CompletionSignal()
    loop.execute { work { done.signal() } }
    return done.wait(milliseconds: milliseconds)
}

/// A running virtqueue as the event loop sees it: ring, kick and call fds, and stop state.
/// Touched only on its group's loop thread after it is handed over.
public final class RunningQueue: @unchecked Sendable {
    /// Virtqueue index in the device (0-based, as vhost-user numbers them).
    public let index: Int
    /// The ring.
    public let ring: Virtqueue
    /// Kick eventfd (driver to device).
    public internal(set) var kickFD: Int32
    /// Call eventfd (device to driver), or -1 for none.
    public internal(set) var callFD: Int32
    /// Whether SET_VRING_ENABLE allows processing.
    public internal(set) var enabled: Bool
    var stopping = false
    var onDrained: (@Sendable () -> Void)?
    var retiredMemory: [GuestMemory] = []
    var brokenReported = false
    var interruptsSent: UInt64 = 0
    /// The queue stopped before its requests completed (see `QueueGroup.remove`): its ring is broken
    /// and its slots wait only for the back-end's late completions. Read for every completion of a device
    /// model, on the queue's loop thread: no dynamic exclusivity check (see `Virtqueue.inFlight`).
    @exclusivity(unchecked) public internal(set) var abandoned = false
    /// Watchdog state: progress seen at the last tick, pushes covered by its last re-signal, and counts
    /// of the lost notifications it repaired.
    var watchPops: UInt64 = 0
    var watchPushes: UInt64 = 0
    var watchSignalledPushes: UInt64 = 0
    /// Times the watchdog found requests made available without a kick reaching the loop.
    public internal(set) var lostKicks: UInt64 = 0
    /// Times the watchdog signalled an idle queue whose driver still waited for an interrupt.
    public internal(set) var interruptsResent: UInt64 = 0
    /// Slot index of this queue inside its group (handlers use it in completion tokens).
    public internal(set) var groupSlot = 0

    /// Told once (on the group's loop thread) when the ring is found broken: a transport with a device status (virtio-pci)
    /// sets DEVICE_NEEDS_RESET.
    let onBroken: (@Sendable (String) -> Void)?

    package init(index: Int, ring: Virtqueue, kickFD: Int32, callFD: Int32, enabled: Bool, onBroken: (@Sendable (String) -> Void)? = nil) {
        self.index = index
        self.ring = ring
        self.kickFD = kickFD
        self.callFD = callFD
        self.enabled = enabled
        self.onBroken = onBroken
    }

    /// Returns request `head` with `length` bytes written (published by the group's next flush).
    @inline(__always)
    public func complete(head: UInt16, ringEntries: UInt16, length: UInt32) {
        ring.push(head: head, ringEntries: ringEntries, length: length)
    }

    /// Signals the call fd when the driver wants an interrupt for what was pushed.
    @inline(__always)
    func flush() {
        if ring.flush(), callFD >= 0 {
            _ = csys_eventfd_signal(callFD, 1)
            interruptsSent &+= 1
        }
    }
}

/// The device-specific data path of one queue group, called on the group's loop thread only.
public protocol QueueGroupHandler: AnyObject, SendableMetatype {
    /// A queue joins the group (allocate its slots here).
    func attach(_ queue: RunningQueue)
    /// A queue leaves the group (it has no request in flight).
    func detach(_ queue: RunningQueue)
    /// Handles one request; completes it now or later with `queue.complete`.
    func handle(_ chain: DescriptorChain, on queue: RunningQueue)
    /// Delivers back-end completions; returns whether any arrived.
    func reap() -> Bool
    /// Delivers the back-end completions found without a system call (while polling); returns whether
    /// any arrived. Default: `reap`.
    func poll() -> Bool
    /// Sends queued back-end submissions; completions of synchronous back-ends (no completion fd) are
    /// delivered before it returns.
    func commit()
    /// Fds that become readable when back-end completions are ready (registered once).
    func completionFDs() -> [Int32]
    /// Receives a function that registers further completion fds on the loop (loop thread only).
    func bind(registerCompletionFD: @escaping (Int32) -> Void)
    /// Receives a function that takes a completion fd out of the loop before its channel closes
    /// (loop thread only).
    func bind(unregisterCompletionFD: @escaping (Int32) -> Void)
    /// The group is about to stop: release back-end channels (loop thread, after the queues drained).
    func stopping()
    /// Whether the group pops requests from `queue` (false for queues the device fills on its own, such
    /// as the virtio-scsi event queue: they are neither polled nor popped on kicks).
    func takesRequests(_ queue: RunningQueue) -> Bool
    /// A queue that does not take requests was kicked.
    func kicked(_ queue: RunningQueue)
    /// A stopping queue did not drain in time and was abandoned (its ring is broken: pushes no longer
    /// touch guest memory). The handler keeps the queue's slots until the back-end completions of its
    /// requests arrive, then drops them (completing them on `queue`, which only does bookkeeping); a
    /// new start of the same queue index gets fresh slots meanwhile.
    func abandon(_ queue: RunningQueue)
}

extension QueueGroupHandler {
    public func poll() -> Bool { reap() }
    public func bind(registerCompletionFD: @escaping (Int32) -> Void) {}
    public func bind(unregisterCompletionFD: @escaping (Int32) -> Void) {}
    public func stopping() {}
    public func takesRequests(_ queue: RunningQueue) -> Bool { true }
    public func kicked(_ queue: RunningQueue) {}
    public func abandon(_ queue: RunningQueue) {}
}

/// One event-loop thread running a set of virtqueues for a device: kick eventfds and back-end
/// completion fds in epoll, adaptive ring polling with kick suppression, batched used-ring updates
/// with one interrupt per batch.
public final class QueueGroup<Handler: QueueGroupHandler>: @unchecked Sendable {
    /// The reactor.
    public let loop: EventLoop
    /// The device data path.
    public let handler: Handler
    private var queues: [RunningQueue] = []
    private let log: Logger
    private var thread: pthread_t?
    /// Requests taken from a ring per queue per pass before others get a turn.
    public var batchLimit = 64
    /// How long `remove` waits for a stopping queue's requests before abandoning it.
    public var drainMilliseconds: Int32 = 30_000
    /// Period of the notification watchdog (0: none; set before `start`). On each tick, a queue that
    /// made no progress since the previous one is checked for requests available without a kick
    /// (serviced, logged) and for a driver still waiting for an interrupt about published entries
    /// (signalled once more, logged): a lost notification then costs a tick, not a stalled guest.
    public var watchdogMilliseconds = 1000
    private var watchdogStop: CompletionSignal?
    private var watchdogThread: pthread_t?

    /// Creates a group (its thread starts with `start`).
    public init(name: String, handler: Handler, pollBudgetNanoseconds: UInt64, log: Logger) throws(SystemCallError) {
        loop = try EventLoop(name: name, pollBudgetNanoseconds: pollBudgetNanoseconds)
        self.handler = handler
        self.log = log
    }

    /// Starts the loop thread and registers the back-end completion fds.
    public func start() {
        loop.execute { [self] in
            let register: (Int32) -> Void = { [unowned self] fd in
                do {
                    try loop.register(fd: fd) { [unowned self] _ in
                        if handler.reap() { afterWork() }
                    }
                } catch {
                    log.error("\(loop.name): cannot watch completion fd \(fd): \(error)")
                }
            }
            for fd in handler.completionFDs() where fd >= 0 { register(fd) }
            handler.bind(registerCompletionFD: register)
            handler.bind(unregisterCompletionFD: { [unowned self] fd in loop.unregister(fd: fd) })
            loop.addPoller(RingPoller(poll: { [unowned self] in pollAll() },
                                      prepareToSleep: { [unowned self] in prepareToSleep() }))
        }
        thread = spawnThread { [self] in loop.run() }
        startWatchdog()
    }

    /// Lets the handler release its channels, then stops the loop thread and waits for it.
    public func shutdown() {
        if let watchdogThread {
            watchdogStop?.signal()
            pthread_join(watchdogThread, nil)
            self.watchdogThread = nil
        }
        if thread != nil {
            runOnLoopAndWait(loop, milliseconds: 5_000) { [self] done in
                handler.stopping()
                done()
            }
        }
        loop.stop()
        if let thread {
            pthread_join(thread, nil)
            self.thread = nil
        }
    }

    /// Starts the watchdog thread: it only wakes the loop with a tick every `watchdogMilliseconds`.
    private func startWatchdog() {
        guard watchdogMilliseconds > 0 else { return }
        let stop = CompletionSignal()
        let period = Int32(clamping: watchdogMilliseconds)
        watchdogStop = stop
        // Weak: a group dropped without `shutdown` ends its watchdog at the next tick.
        watchdogThread = spawnThread { [weak self] in
            while !stop.wait(milliseconds: period) {
                guard let group = self else { return }
                group.loop.execute { [weak group] in group?.watchdog() }
            }
        }
    }

    /// One watchdog tick (loop thread): see `watchdogMilliseconds`.
    func watchdog() {
        var work = false
        for q in queues where q.enabled && !q.stopping && !q.abandoned && !q.ring.isBroken && handler.takesRequests(q) {
            let pops = q.ring.popCount
            let pushes = q.ring.pushCount
            let idle = pops == q.watchPops && pushes == q.watchPushes
            q.watchPops = pops
            q.watchPushes = pushes
            guard idle else { continue }
            if q.ring.hasAvailable {
                q.lostKicks &+= 1
                if q.lostKicks <= 10 || q.lostKicks % 100 == 0 {
                    log.warning(.init(stringLiteral: "\(loop.name): queue \(q.index): requests available with no kick for \(watchdogMilliseconds) ms "
                        + "(lost notification #\(q.lostKicks)); serviced"))
                }
                if service(q) { work = true }
            } else if pushes != q.watchSignalledPushes, q.callFD >= 0, q.ring.driverAwaitsInterrupt {
                q.watchSignalledPushes = pushes
                q.interruptsResent &+= 1
                _ = csys_eventfd_signal(q.callFD, 1)
                q.interruptsSent &+= 1
                if q.ring.interruptNeedIsExact && (q.interruptsResent <= 10 || q.interruptsResent % 100 == 0) {
                    log.warning(.init(stringLiteral: "\(loop.name): queue \(q.index): the driver still waits for an interrupt about published "
                        + "entries after \(watchdogMilliseconds) ms (lost interrupt #\(q.interruptsResent)); signalled again"))
                }
            }
        }
        if work { handler.commit() }
        afterWork()
    }

    /// Hands a running queue to the loop (blocks until it is registered).
    func add(_ queue: RunningQueue) {
        runOnLoopAndWait(loop) { [self] done in
            queue.groupSlot = queues.count
            queues.append(queue)
            handler.attach(queue)
            do {
                try loop.register(fd: queue.kickFD) { [unowned self, unowned queue] _ in
                    var v: UInt64 = 0
                    _ = csys_eventfd_drain(queue.kickFD, &v)
                    guard handler.takesRequests(queue) else {
                        if queue.enabled && !queue.stopping { handler.kicked(queue) }
                        afterWork()
                        return
                    }
                    queue.ring.disableNotifications()
                    if service(queue) { handler.commit() }
                    afterWork()
                }
            } catch {
                log.error("\(loop.name): cannot watch kick fd of queue \(queue.index): \(error)")
            }
            // Work made available before the kick fd was handed over.
            if service(queue) { handler.commit() }
            afterWork()
            done()
        }
    }

    /// Stops taking requests from queue `index`, waits until its in-flight requests complete, and
    /// removes it. Returns the queue (its ring base is then stable), or nil when it is not here.
    /// When the drain times out (`drainMilliseconds`, e.g. a remote target that stopped answering) the
    /// queue is abandoned: its ring is marked broken so that nothing more is written into guest memory
    /// through it, the handler drops its requests' late completions, and the queue is returned with
    /// `abandoned` set (its ring base counts the abandoned requests as taken).
    func remove(_ index: Int) -> RunningQueue? {
        let result = ResultBox()
        let ok = runOnLoopAndWait(loop, milliseconds: drainMilliseconds) { [self] done in
            guard let q = queues.last(where: { $0.index == index && !$0.stopping }) else {
                done()
                return
            }
            loop.unregister(fd: q.kickFD)
            q.stopping = true
            result.queue = q
            q.onDrained = { [unowned self, unowned q] in
                handler.detach(q)
                queues.removeAll { $0 === q }
                for (i, other) in queues.enumerated() { other.groupSlot = i }
                done()
            }
            checkDrained()
        }
        if ok { return result.queue }
        // Timed out: abandon the queue on its loop before answering (no write into the ring after this).
        let abandoned = ResultBox()
        runOnLoopAndWait(loop) { [self] done in
            if let q = queues.first(where: { $0.index == index && $0.stopping && $0.onDrained != nil && !$0.abandoned }) {
                q.abandoned = true
                q.ring.markBroken("abandoned: requests still in flight after \(drainMilliseconds) ms")
                handler.abandon(q)
                abandoned.queue = q
                afterWork()
            } else {
                // It drained just after the wait gave up.
                abandoned.queue = result.queue
            }
            done()
        }
        if let q = abandoned.queue, q.abandoned {
            log.error("\(loop.name): queue \(index) abandoned with \(q.ring.inFlight) request(s) in the back-end")
        }
        return abandoned.queue
    }

    /// Replaces the call fd of a running queue; returns the old one (for the caller to close).
    func replaceCallFD(_ index: Int, with fd: Int32) -> Int32? {
        let result = ResultBox()
        runOnLoopAndWait(loop) { [self] done in
            if let q = queues.last(where: { $0.index == index && !$0.stopping }) {
                result.fd = q.callFD
                q.callFD = fd
                // An interrupt signalled on the old fd after the front-end last looked at it is lost
                // (QEMU < 8.2 sends SET_VRING_CALL without waiting, then checks its masked notifier):
                // one spurious interrupt on the new fd lets the driver see what was published.
                if fd >= 0 {
                    _ = csys_eventfd_signal(fd, 1)
                    q.interruptsSent &+= 1
                }
            }
            done()
        }
        return result.fd
    }

    /// Enables or disables processing of a running queue.
    func setEnabled(_ index: Int, _ enabled: Bool) {
        runOnLoopAndWait(loop) { [self] done in
            if let q = queues.last(where: { $0.index == index && !$0.stopping }) {
                q.enabled = enabled
                if enabled, service(q) { handler.commit() }
                afterWork()
            }
            done()
        }
    }

    /// Switches every ring of the group to a new memory table; the old one stays mapped until the
    /// requests using it complete.
    func updateMemory(_ memory: GuestMemory) {
        runOnLoopAndWait(loop) { [self] done in
            for q in queues where !q.abandoned {
                let old = q.ring.memory
                if !q.ring.updateMemory(memory) { log.error("queue \(q.index): \(q.ring.brokenReason)") }
                if q.ring.inFlight > 0 { q.retiredMemory.append(old) }
            }
            done()
        }
    }

    /// Starts or stops dirty logging on running queue `index` (live migration; see `Virtqueue.setDirtyLog`).
    func setDirtyLog(_ index: Int, _ log: DirtyLog?, usedRingLogAddress: UInt64?) {
        runOnLoopAndWait(loop) { [self] done in
            // Draining queues included: their late completions write guest memory too.
            for q in queues where q.index == index && !q.abandoned { q.ring.setDirtyLog(log, usedRingLogAddress: usedRingLogAddress) }
            done()
        }
    }

    /// Runs `work` on the loop thread (for device events such as hotplug notifications).
    func onLoop(_ work: @escaping @Sendable () -> Void) {
        loop.execute { [self] in
            work()
            handler.commit()
            afterWork()
        }
    }

    /// Runs `work` on the loop thread and waits (up to 30 s) until it ran; returns whether it did.
    @discardableResult
    func onLoopAndWait(_ work: @escaping @Sendable () -> Void) -> Bool {
        runOnLoopAndWait(loop) { [self] done in
            work()
            handler.commit()
            afterWork()
            done()
        }
    }

    /// The running queue with device index `index` (loop thread only).
    func queue(_ index: Int) -> RunningQueue? { queues.last { $0.index == index && !$0.stopping } }

    /// Takes up to `batchLimit` requests from `queue`; returns whether any were taken.
    @discardableResult
    func service(_ queue: RunningQueue) -> Bool {
        guard queue.enabled, !queue.stopping else { return false }
        guard handler.takesRequests(queue) else {
            // A queue the handler fills itself (virtio-scsi events): its buffers may be there already (a ring
            // started or enabled with buffers the driver posted before, e.g. on a reconnect), as after a kick.
            handler.kicked(queue)
            return false
        }
        var n = 0
        while n < batchLimit {
            switch queue.ring.pop() {
            case .empty:
                return n > 0
            case .broken:
                if !queue.brokenReported {
                    queue.brokenReported = true
                    log.error("\(loop.name): queue \(queue.index) broken: \(queue.ring.brokenReason)")
                    if !queue.stopping { queue.onBroken?(queue.ring.brokenReason) }
                }
                return n > 0
            case let .invalid(head, entries, error):
                log.warning("\(loop.name): queue \(queue.index): request \(head) refused: \(error)")
                queue.complete(head: head, ringEntries: entries, length: 0)
            case let .chain(chain):
                handler.handle(chain, on: queue)
            }
            n += 1
        }
        return true
    }

    /// Publishes used entries, signals interrupts, finishes drains.
    @inline(__always)
    func afterWork() {
        for q in queues {
            q.flush()
            if !q.retiredMemory.isEmpty && q.ring.inFlight == 0 { q.retiredMemory.removeAll() }
        }
        checkDrained()
    }

    private func checkDrained() {
        var i = 0
        while i < queues.count {
            let q = queues[i]
            i += 1
            if q.stopping, q.ring.inFlight == 0, let done = q.onDrained {
                q.onDrained = nil
                q.flush()
                done()
                i = 0
            }
        }
    }

    private func pollAll() -> Bool {
        var work = false
        for q in queues where service(q) { work = true }
        if work { handler.commit() }
        if handler.poll() { work = true }
        if work { afterWork() }
        return work
    }

    private func prepareToSleep() -> Bool {
        var ready = true
        for q in queues where q.enabled && !q.stopping && handler.takesRequests(q) {
            if q.ring.enableNotificationsAndCheck() {
                q.ring.disableNotifications()
                ready = false
            }
        }
        return ready
    }
}

/// Carries a value out of a loop closure to the waiting control thread.
final class ResultBox: @unchecked Sendable {
    var queue: RunningQueue?
    var fd: Int32?
}

/// Starts a joinable thread running `body`.
package func spawnThread(_ body: @escaping () -> Void) -> pthread_t? {
    final class Box { let body: () -> Void; init(_ b: @escaping () -> Void) { body = b } }
    let box = Unmanaged.passRetained(Box(body)).toOpaque()
    var thread = pthread_t()
    let rc = pthread_create(&thread, nil, { arg in
        let b = Unmanaged<Box>.fromOpaque(arg!).takeRetainedValue()
        b.body()
        return nil
    }, box)
    if rc != 0 {
        Unmanaged<Box>.fromOpaque(box).release()
        return nil
    }
    return thread
}
