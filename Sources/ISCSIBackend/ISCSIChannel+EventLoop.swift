import BlockIO
import CLibISCSI
import CSystem
#if canImport(Glibc)
import Glibc
#endif

// Event-loop glue: the channel's private epoll fd (socket + timerfd) and the periodic tick.

extension ISCSIChannel {
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
    func syncRegistration() {
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
    func updateTimer(forceFire: Bool) {
        guard timerFD >= 0 else { return }
        let needed = forceFire || (phase != .online && phase != .closed) || inFlight > 0 || discovery.step != .idle
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
}
