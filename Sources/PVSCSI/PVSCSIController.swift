import BlockIO
import EventLoop
import Logging
import SCSI
import VfioUser
import Synchronization
#if canImport(Glibc)
import Glibc
import SystemErrors
#endif

/// One PVSCSI adapter served over vfio-user: a UNIX socket, an event-loop thread, the device model
/// and the back-end channels it submits to. The gateway creates one per configured controller:
///
///     let c = try PVSCSIController(socketPath: "/run/scsigate/pvscsi0.sock", target: target,
///                                  channelFactory: { id in try? backends[id].makeChannel() },
///                                  statistics: { id in stats[id]?.counters(queue: 0) }, log: { print($0) })
///     try c.start()
///
/// LUN n of `target` is PVSCSI target n, LUN 0 (Linux vmw_pvscsi scans LUN 0 of each target, and
/// handles DEV_ADDED/DEV_REMOVED messages per target), for n < `options.maxTargets`.
public final class PVSCSIController<Target: SCSICommandTarget, Channel: BlockChannel>: @unchecked Sendable {
    public let socketPath: String
    public let loop: EventLoop
    public let device: PVSCSIDevice<Target, Channel>
    public let server: VfioUserServer<PVSCSIDevice<Target, Channel>>
    private let target: Target
    private let log: Logger
    private var subscription: Int? = nil
    private var thread: pthread_t? = nil

    /// Creates the controller (nothing runs until `start`). `statistics(backendID)` gives the I/O
    /// counters of a LUN (queue 0 of its `LUNIOStatistics`); it is called on the loop thread when the
    /// device opens that LUN's channel.
    public init(socketPath: String, target: Target, options: PVSCSIOptions = PVSCSIOptions(),
                channelFactory: @escaping (Int) -> Channel?,
                statistics: @escaping (Int) -> IOCounters? = { _ in nil },
                log: Logger) throws(VfioUserError) {
        self.socketPath = socketPath
        self.target = target
        self.log = log
        do {
            loop = try EventLoop(name: "pvscsi", pollBudgetNanoseconds: 0)
        } catch {
            throw .systemCall(error.within("cannot create the event loop"))
        }
        device = PVSCSIDevice(target: target, options: options, loop: loop, channelFactory: channelFactory,
                              statistics: statistics, log: log)
        server = VfioUserServer(socketPath: socketPath, loop: loop, device: device, msixVectors: 1, msiVectors: 1, log: log)
        device.attach(memory: server.memory, interrupts: server.interrupts)
    }

    /// Longest time a LUN removal waits for the device to close the removed LUN's channel.
    public static var removalWaitMilliseconds: Int { 5000 }

    /// Binds the socket, subscribes to LUN events and starts the loop thread.
    ///
    /// A `.removed` event blocks the thread that removed the LUN until the device has delivered the
    /// completions still in flight on that LUN's channel and closed it (at most `removalWaitMilliseconds`),
    /// so that the back-end's file is unlocked when `SCSITarget.remove` returns.
    /// With `listeningFD` (handed over by systemd) the server serves that socket and never unlinks it.
    public func start(listeningFD: Int32? = nil) throws(VfioUserError) {
        guard thread == nil else { return }
        try server.listen(adopting: listeningFD)
        let device = self.device
        let loop = self.loop
        let onEvent = EventThunk { event in device.handle(event) }
        let threadBox = LoopThreadID()
        let removalWait = Self.removalWaitMilliseconds
        subscription = target.subscribe { event in
            guard case .removed = event, !threadBox.isCurrent else {
                loop.execute { onEvent.body(event) }
                return
            }
            let done = DoneFlag()
            let whenClosed = Thunk { device.whenRemovedChannelsClosed { done.set() } }
            loop.execute {
                onEvent.body(event)
                whenClosed.body()
            }
            done.wait(milliseconds: removalWait)
        }
        let box = ThreadBody {
            threadBox.set()
            loop.run()
        }
        let raw = Unmanaged.passRetained(box).toOpaque()
        var t = pthread_t()
        let rc = pthread_create(&t, nil, { arg in
            let body = Unmanaged<ThreadBody>.fromOpaque(arg!).takeRetainedValue()
            body.run()
            return nil
        }, raw)
        guard rc == 0 else {
            Unmanaged<ThreadBody>.fromOpaque(raw).release()
            throw .systemCall(SystemCallError("pthread_create", errno: rc, context: "cannot start the loop thread"))
        }
        thread = t
        log.info("pvscsi: controller on \(socketPath) started")
    }

    /// Disconnects the client, removes the socket, closes the back-end channels and joins the loop thread.
    public func stop() {
        if let s = subscription { target.unsubscribe(s); subscription = nil }
        guard let t = thread else { return }
        let server = self.server
        let device = self.device
        let loop = self.loop
        let shutdown = Thunk {
            server.shutdown()
            device.closeChannels()
        }
        loop.execute {
            shutdown.body()
            loop.stop()
        }
        pthread_join(t, nil)
        thread = nil
    }

    /// Runs `body` on the loop thread and waits for it (control path, for tests and admin queries).
    public func sync<T: Sendable>(_ body: @escaping @Sendable () -> T) -> T {
        let result = ResultBox<T>()
        loop.execute {
            let value = body()
            result.set(value)
        }
        return result.wait()
    }
}

/// Non-generic wrappers so that @Sendable closures capture no generic (non-Sendable) metatype; the
/// wrapped closures only ever run on the loop thread.
private final class Thunk: @unchecked Sendable {
    let body: () -> Void
    init(_ body: @escaping () -> Void) { self.body = body }
}

private final class EventThunk: @unchecked Sendable {
    let body: (LUNEvent) -> Void
    init(_ body: @escaping (LUNEvent) -> Void) { self.body = body }
}

private final class ThreadBody: @unchecked Sendable {
    let run: () -> Void
    init(_ run: @escaping () -> Void) { self.run = run }
}

/// The loop thread's identity, so that an event raised on the loop thread itself never waits for it.
private final class LoopThreadID: @unchecked Sendable {
    private let id = Atomic<UInt>(0)
    func set() { id.store(UInt(pthread_self()), ordering: .releasing) }
    var isCurrent: Bool { id.load(ordering: .acquiring) == UInt(pthread_self()) }
}

/// A flag set on the loop thread and awaited, with a time limit, by a control thread.
private final class DoneFlag: @unchecked Sendable {
    private var done = false
    private var mutex = pthread_mutex_t()
    private var cond = pthread_cond_t()
    init() {
        pthread_mutex_init(&mutex, nil)
        var attributes = pthread_condattr_t()
        pthread_condattr_init(&attributes)
        pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)
        pthread_cond_init(&cond, &attributes)
        pthread_condattr_destroy(&attributes)
    }
    deinit {
        pthread_mutex_destroy(&mutex)
        pthread_cond_destroy(&cond)
    }
    func set() {
        pthread_mutex_lock(&mutex)
        done = true
        pthread_cond_broadcast(&cond)
        pthread_mutex_unlock(&mutex)
    }
    /// Returns whether the flag was set within `milliseconds`.
    @discardableResult
    func wait(milliseconds: Int) -> Bool {
        var deadline = timespec()
        clock_gettime(CLOCK_MONOTONIC, &deadline)
        let nanos = Int(deadline.tv_nsec) + (milliseconds % 1000) * 1_000_000
        deadline.tv_sec += milliseconds / 1000 + nanos / 1_000_000_000
        deadline.tv_nsec = nanos % 1_000_000_000
        pthread_mutex_lock(&mutex)
        while !done {
            if pthread_cond_timedwait(&cond, &mutex, &deadline) == ETIMEDOUT { break }
        }
        let result = done
        pthread_mutex_unlock(&mutex)
        return result
    }
}

/// A one-shot value handed from the loop thread to a waiting thread.
private final class ResultBox<T>: @unchecked Sendable {
    private var value: T? = nil
    private var mutex = pthread_mutex_t()
    private var cond = pthread_cond_t()
    init() {
        pthread_mutex_init(&mutex, nil)
        pthread_cond_init(&cond, nil)
    }
    deinit {
        pthread_mutex_destroy(&mutex)
        pthread_cond_destroy(&cond)
    }
    func set(_ v: T) {
        pthread_mutex_lock(&mutex)
        value = v
        pthread_cond_signal(&cond)
        pthread_mutex_unlock(&mutex)
    }
    func wait() -> T {
        pthread_mutex_lock(&mutex)
        while value == nil { pthread_cond_wait(&cond, &mutex) }
        let v = value!
        pthread_mutex_unlock(&mutex)
        return v
    }
}
