import CSystem
import EventLoop
import Logging
import VfioUser
import VirtioDevices
#if canImport(Glibc)
import Glibc
#endif

/// A virtio-scsi or virtio-blk device model served as a modern virtio-pci function over vfio-user
/// (QEMU >= 10.1: `-device '{"driver":"vfio-user-pci","socket":{"path":"...","type":"unix"}}'`).
/// One UNIX socket, one loop thread for the vfio-user server and the PCI registers; the device runs its
/// rings on its own queue-group threads.
///
///     let c = try VfioUserVirtioController(socketPath: "/run/scsigate/vblk0.sock", device: blk, kind: .blk, log: log)
///     try c.start()
///     ...
///     c.stop()
public final class VfioUserVirtioController<Device: VirtioDeviceModel>: @unchecked Sendable {
    public let socketPath: String
    public let device: Device
    let loop: EventLoop
    let function: VirtioPCIFunction<Device>
    let server: VfioUserServer<VirtioPCIFunction<Device>>
    private let log: Logger
    private var thread: pthread_t? = nil
    private var stopped = false

    public init(socketPath: String, device: Device, kind: VirtioPCIDeviceKind, log: Logger) throws(VfioUserError) {
        self.socketPath = socketPath
        self.device = device
        self.log = log
        do {
            loop = try EventLoop(name: "vfu-\(kind.name)", pollBudgetNanoseconds: 0)
        } catch {
            throw .systemCall(error.within("cannot create the event loop"))
        }
        function = try VirtioPCIFunction(device: device, kind: kind, loop: loop, name: "\(kind.name) \(socketPath)", log: log)
        server = VfioUserServer(socketPath: socketPath, loop: loop, device: function, msixVectors: device.queueCount + 1,
                                log: log)
        function.dmaWindows = server.memory
        function.interrupts = server.interrupts
    }

    /// Binds the socket (or serves `listeningFD` from systemd) and starts the loop thread.
    public func start(listeningFD: Int32? = nil) throws(VfioUserError) {
        guard thread == nil, !stopped else { return }
        try function.activate()
        do {
            try server.listen(adopting: listeningFD)
        } catch {
            function.deactivate()
            throw error
        }
        let loop = self.loop
        guard let t = spawnThread({ loop.run() }) else {
            server.shutdown()
            function.deactivate()
            throw VfioUserError("cannot start the loop thread")
        }
        thread = t
        log.info("\(function.kind.name): vfio-user virtio-pci function on \(socketPath) started")
    }

    /// Disconnects the client, stops the rings (draining in-flight I/O), removes the socket, joins the thread,
    /// shuts the device down.
    public func stop() {
        guard !stopped else { return }
        stopped = true
        if let t = thread {
            let work = LoopWork { [server, function] in
                server.shutdown()  // disconnect: the function's reset stops and drains every ring
                function.deactivate()
            }
            let loop = self.loop
            loop.execute {
                work.body()
                loop.stop()
            }
            pthread_join(t, nil)
            thread = nil
        }
        device.shutdown()
    }
}

/// A loop closure that captures generic values without making the @Sendable closure generic.
private final class LoopWork: @unchecked Sendable {
    let body: () -> Void
    init(_ body: @escaping () -> Void) { self.body = body }
}
