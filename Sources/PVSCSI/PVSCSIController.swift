import BlockIO
import EventLoop
import SCSI
import VfioUser
#if canImport(Glibc)
import Glibc
#endif

/// One PVSCSI adapter served over vfio-user: a UNIX socket, an event-loop thread, the device model
/// and the back-end channels it submits to. The gateway creates one per configured controller:
///
///     let c = try PVSCSIController(socketPath: "/run/scsigate/pvscsi0.sock", target: target,
///                                  channelFactory: { id in try? backends[id].makeChannel() }, log: { print($0) })
///     try c.start()
///     print(c.qemuArguments.joined(separator: " "))
///
/// LUN n of `target` is PVSCSI target n, LUN 0 (Linux vmw_pvscsi scans LUN 0 of each target, and
/// handles DEV_ADDED/DEV_REMOVED messages per target), for n < `options.maxTargets`.
public final class PVSCSIController<Target: SCSICommandTarget, Channel: PVSCSIChannel>: @unchecked Sendable {
    public let socketPath: String
    public let loop: EventLoop
    public let device: PVSCSIDevice<Target, Channel>
    public let server: VfioUserServer<PVSCSIDevice<Target, Channel>>
    private let target: Target
    private let log: VfioUserLog
    private var subscription: Int? = nil
    private var thread: pthread_t? = nil

    /// Creates the controller (nothing runs until `start`).
    public init(socketPath: String, target: Target, options: PVSCSIOptions = PVSCSIOptions(),
                channelFactory: @escaping (Int) -> Channel?, log: @escaping VfioUserLog) throws(VfioUserError) {
        self.socketPath = socketPath
        self.target = target
        self.log = log
        do {
            loop = try EventLoop(name: "pvscsi", pollBudgetNanoseconds: 0)
        } catch {
            throw VfioUserError("cannot create the event loop: \(error)", errno: error.errno)
        }
        device = PVSCSIDevice(target: target, options: options, loop: loop, channelFactory: channelFactory, log: log)
        server = VfioUserServer(socketPath: socketPath, loop: loop, device: device, msixVectors: 1, log: log)
        device.attach(memory: server.memory, interrupts: server.interrupts)
    }

    /// The QEMU `-device` argument that connects a vfio-user-pci client to `socketPath`.
    public static func qemuDeviceArgument(socketPath: String) -> String {
        "{\"driver\":\"vfio-user-pci\",\"socket\":{\"path\":\"\(socketPath)\",\"type\":\"unix\"}}"
    }

    /// QEMU arguments for this controller. Guest RAM must be shareable (an fd-backed memory backend),
    /// because the device reads rings and data through mmap'ed DMA windows (DMA_READ/DMA_WRITE for
    /// fd-less windows is not implemented). Add `"x-no-posted-writes":true` to the device JSON to let the
    /// adapter answer the controller config page (more than 16 targets), at the cost of a round trip per kick.
    public var qemuArguments: [String] {
        ["-object", "memory-backend-memfd,id=mem0,size=<RAM>,share=on", "-machine", "memory-backend=mem0",
         "-device", "'" + Self.qemuDeviceArgument(socketPath: socketPath) + "'"]
    }

    /// Binds the socket, subscribes to LUN events and starts the loop thread.
    public func start() throws(VfioUserError) {
        guard thread == nil else { return }
        try server.listen()
        let device = self.device
        let loop = self.loop
        let onEvent = EventThunk { event in device.handle(event) }
        subscription = target.subscribe { event in
            loop.execute { onEvent.body(event) }
        }
        let box = ThreadBody { loop.run() }
        let raw = Unmanaged.passRetained(box).toOpaque()
        var t = pthread_t()
        let rc = pthread_create(&t, nil, { arg in
            let body = Unmanaged<ThreadBody>.fromOpaque(arg!).takeRetainedValue()
            body.run()
            return nil
        }, raw)
        guard rc == 0 else {
            Unmanaged<ThreadBody>.fromOpaque(raw).release()
            throw VfioUserError("cannot start the loop thread", errno: rc)
        }
        thread = t
        log("pvscsi: controller on \(socketPath) started; QEMU: -device '\(Self.qemuDeviceArgument(socketPath: socketPath))'")
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
