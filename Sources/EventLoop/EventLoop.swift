import CSystem
import SystemErrors
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Readiness bits passed to fd handlers (a subset of epoll's).
public struct FDEvents: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let readable = FDEvents(rawValue: UInt32(EPOLLIN.rawValue))
    public static let writable = FDEvents(rawValue: UInt32(EPOLLOUT.rawValue))
    public static let error = FDEvents(rawValue: UInt32(EPOLLERR.rawValue))
    public static let hangup = FDEvents(rawValue: UInt32(EPOLLHUP.rawValue) | UInt32(EPOLLRDHUP.rawValue))
}

/// A poller the loop calls while it spins before sleeping (ring polling). It returns whether it did
/// any work. Before the loop sleeps it calls `prepareToSleep`, which re-enables notifications and
/// returns false when work arrived meanwhile (the loop then keeps polling).
public struct RingPoller {
    public var poll: () -> Bool
    public var prepareToSleep: () -> Bool
    public init(poll: @escaping () -> Bool, prepareToSleep: @escaping () -> Bool) {
        self.poll = poll
        self.prepareToSleep = prepareToSleep
    }
}

/// One epoll reactor, run by exactly one thread (a queue group). Fds, pollers and handlers are
/// registered from that thread; `execute` and `stop` may be called from any thread.
///
/// Adaptive polling: after handling events the loop keeps calling its pollers for up to
/// `pollBudgetNanoseconds` while they keep finding work, then asks each to prepare to sleep and
/// blocks in epoll_wait.
public final class EventLoop: @unchecked Sendable {
    private let epfd: Int32
    private let wakeFD: Int32
    private var handlers: [Int32: (FDEvents) -> Void] = [:]
    private var pollers: [Int: RingPoller] = [:]
    private var nextPollerID = 0
    private let pending = Mutex<[@Sendable () -> Void]>([])
    private let stopping = Atomic<Bool>(false)
    private let eventBuffer: UnsafeMutablePointer<epoll_event>
    private let eventCapacity = 64
    /// How long to spin on pollers after the last work before sleeping (0 disables polling).
    public var pollBudgetNanoseconds: UInt64
    /// While polling, how often the loop also looks at its fds (epoll_wait with no timeout): pollers
    /// find ring work and user-space completions themselves, so the fds (control work, completions only
    /// an fd reports) are checked at this period instead of once per poll (a system call each).
    public var fdCheckNanoseconds: UInt64 = 10_000
    /// A name for the thread.
    public let name: String

    public init(name: String, pollBudgetNanoseconds: UInt64 = 50_000) throws(SystemCallError) {
        self.name = name
        self.pollBudgetNanoseconds = pollBudgetNanoseconds
        let ep = epoll_create1(Int32(EPOLL_CLOEXEC))
        guard ep >= 0 else { throw .current("epoll_create1") }
        let wake = csys_eventfd(0, 1)
        guard wake >= 0 else {
            let e = errno
            close(ep)
            throw SystemCallError("eventfd", errno: e)
        }
        epfd = ep
        wakeFD = wake
        eventBuffer = .allocate(capacity: eventCapacity)
        var ev = epoll_event()
        ev.events = EPOLLIN.rawValue
        ev.data.fd = wake
        _ = epoll_ctl(ep, EPOLL_CTL_ADD, wake, &ev)
    }

    deinit {
        close(epfd)
        close(wakeFD)
        eventBuffer.deallocate()
    }

    /// Watches `fd` for `events`; `handler` runs on the loop thread with the ready bits.
    public func register(fd: Int32, events: FDEvents = .readable, handler: @escaping (FDEvents) -> Void) throws(SystemCallError) {
        var ev = epoll_event()
        ev.events = events.rawValue
        ev.data.fd = fd
        let op = handlers[fd] == nil ? EPOLL_CTL_ADD : EPOLL_CTL_MOD
        guard epoll_ctl(epfd, op, fd, &ev) == 0 else { throw .current("epoll_ctl(\(fd))") }
        handlers[fd] = handler
    }

    /// Stops watching `fd` (does not close it).
    public func unregister(fd: Int32) {
        guard handlers.removeValue(forKey: fd) != nil else { return }
        _ = epoll_ctl(epfd, EPOLL_CTL_DEL, fd, nil)
    }

    /// Adds a ring poller; returns an id for `removePoller`.
    @discardableResult
    public func addPoller(_ poller: RingPoller) -> Int {
        nextPollerID += 1
        pollers[nextPollerID] = poller
        return nextPollerID
    }

    /// Removes a ring poller.
    public func removePoller(_ id: Int) { pollers[id] = nil }

    /// Runs `work` on the loop thread soon (control path: takes a lock).
    public func execute(_ work: @escaping @Sendable () -> Void) {
        pending.withLock { $0.append(work) }
        _ = csys_eventfd_signal(wakeFD, 1)
    }

    /// Asks `run` to return after the current iteration.
    public func stop() {
        stopping.store(true, ordering: .releasing)
        _ = csys_eventfd_signal(wakeFD, 1)
    }

    /// Whether `stop` was called.
    public var isStopping: Bool { stopping.load(ordering: .acquiring) }

    private func runPending() {
        var value: UInt64 = 0
        _ = csys_eventfd_drain(wakeFD, &value)
        let work = pending.withLock { q -> [@Sendable () -> Void] in
            let w = q
            q.removeAll(keepingCapacity: true)
            return w
        }
        for w in work { w() }
    }

    private static func nowNanoseconds() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
    }

    /// Polls every ring poller once; returns whether any did work.
    @inline(__always)
    private func pollOnce() -> Bool {
        var didWork = false
        for (_, p) in pollers where p.poll() { didWork = true }
        return didWork
    }

    /// Dispatches ready fds; `timeout` in ms (-1 blocks). Returns the number of events.
    private func dispatch(timeout: Int32) -> Int {
        let n = epoll_wait(epfd, eventBuffer, Int32(eventCapacity), timeout)
        if n <= 0 { return 0 }
        for i in 0..<Int(n) {
            let ev = eventBuffer[i]
            let fd = ev.data.fd
            if fd == wakeFD {
                runPending()
                continue
            }
            if let h = handlers[fd] { h(FDEvents(rawValue: ev.events)) }
        }
        return Int(n)
    }

    /// Runs the loop on the calling thread until `stop`.
    public func run() {
        _ = csys_set_thread_name(name)
        while !isStopping {
            _ = dispatch(timeout: 0)
            if pollBudgetNanoseconds > 0 && !pollers.isEmpty {
                var now = Self.nowNanoseconds()
                var lastWork = now
                var lastFDCheck = now
                while !isStopping {
                    let worked = pollOnce()
                    now = Self.nowNanoseconds()
                    if worked { lastWork = now }
                    if now &- lastFDCheck >= fdCheckNanoseconds {
                        lastFDCheck = now
                        if dispatch(timeout: 0) > 0 { lastWork = Self.nowNanoseconds(); continue }
                    }
                    if !worked && now &- lastWork > pollBudgetNanoseconds { break }
                }
            } else {
                _ = pollOnce()
            }
            if isStopping { break }
            var readyToSleep = true
            for (_, p) in pollers where !p.prepareToSleep() { readyToSleep = false }
            if !readyToSleep { continue }
            _ = dispatch(timeout: -1)
        }
        runPending()
    }
}
