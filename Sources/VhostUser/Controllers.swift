import BlockIO
import SCSI

/// QEMU command-line pieces that attach a vhost-user controller.
public enum QEMUCommandLine {
    /// Guest RAM shared with the back-end (vhost-user needs fd-backed, shared memory).
    public static func sharedMemory(megabytes: Int, id: String = "mem0") -> [String] {
        ["-object", "memory-backend-memfd,id=\(id),size=\(megabytes)M,share=on", "-numa", "node,memdev=\(id)"]
    }

    /// Joins arguments into one shell-safe line.
    public static func render(_ arguments: [String]) -> String {
        arguments.map { a in
            a.allSatisfy({ $0.isLetter || $0.isNumber || "-_=,./:@+".contains($0) }) ? a : "'" + a.replacingAll("'", "'\\''") + "'"
        }.joined(separator: " ")
    }
}

extension String {
    fileprivate func replacingAll(_ target: Character, _ replacement: String) -> String {
        var out = ""
        for c in self { if c == target { out += replacement } else { out.append(c) } }
        return out
    }
}

/// A virtio-scsi controller served over vhost-user: the public entry the gateway uses.
///
/// ```
/// let controller = try VhostUserSCSIController(socketPath: "/run/scsigate/scsi0.sock", target: target,
///                                              options: VirtioSCSIOptions(requestQueues: 2, threads: 2),
///                                              channelFactory: { backendID in try backends[backendID].makeChannel() },
///                                              log: { level, text in logger.log(...) })
/// try controller.start()
/// print(controller.qemuArguments(id: "scsi0"))
/// controller.stop()   // drains in-flight I/O
/// ```
public final class VhostUserSCSIController<Channel: VhostChannel>: Sendable {
    /// The device model.
    public let device: VirtioSCSIDevice<Channel>
    /// The vhost-user server.
    public let server: VhostUserServer<VirtioSCSIDevice<Channel>>

    /// Creates the controller (threads start; the socket is bound by `start`).
    /// `channelFactory(backendID)` is called on each event-loop thread the first time it needs that back-end;
    /// that thread closes the channel once the LUN has left the target and nothing is in flight on it.
    /// `counters(backendID, requestQueue)` gives the statistics the commands of that LUN and queue are counted in.
    public init(socketPath: String, target: SCSITarget, options: VirtioSCSIOptions = VirtioSCSIOptions(),
                channelFactory: @escaping @Sendable (Int) throws -> Channel, counters: VirtioSCSICountersProvider? = nil,
                log: @escaping VhostUserLogger) throws(VhostUserDeviceError) {
        device = try VirtioSCSIDevice(target: target, options: options, channelFactory: channelFactory, counters: counters, log: log)
        server = VhostUserServer(socketPath: socketPath, device: device, log: log)
    }

    /// Binds the socket (or serves `listeningFD`, handed over by systemd) and starts accepting a front-end.
    public func start(listeningFD: Int32? = nil) throws(VhostUserServerError) { try server.start(listeningFD: listeningFD) }

    /// Disconnects the front-end after its in-flight I/O completed, then stops the threads.
    public func stop() {
        server.stop()
        device.shutdown()
    }

    /// The QEMU arguments that attach this controller (add `QEMUCommandLine.sharedMemory` once per VM).
    public func qemuArguments(id: String, queueSize: Int = 128) -> [String] {
        ["-chardev", "socket,id=char-\(id),path=\(server.socketPath)",
         "-device", "vhost-user-scsi-pci,id=\(id),chardev=char-\(id),num_queues=\(device.options.requestQueues),virtqueue_size=\(queueSize)"]
    }

    /// A full example command line for logs.
    public func qemuCommandLine(id: String, memoryMegabytes: Int = 1024) -> String {
        QEMUCommandLine.render(["qemu-system-x86_64"] + QEMUCommandLine.sharedMemory(megabytes: memoryMegabytes) + qemuArguments(id: id))
    }
}

/// A virtio-blk device served over vhost-user, over one back-end.
public final class VhostUserBlkController<Channel: VhostChannel>: Sendable {
    /// The device model.
    public let device: VirtioBlkDevice<Channel>
    /// The vhost-user server.
    public let server: VhostUserServer<VirtioBlkDevice<Channel>>

    /// Creates the controller; `channelFactory` is called once per event-loop thread, now (the channels
    /// close when the controller stops). `counters(queue)` gives the statistics of each request queue.
    public init(socketPath: String, geometry: BlockGeometry, options: VirtioBlkOptions, channelFactory: () throws -> Channel,
                counters: VirtioBlkCountersProvider? = nil,
                log: @escaping VhostUserLogger) throws(VhostUserDeviceError) {
        device = try VirtioBlkDevice(geometry: geometry, options: options, channelFactory: channelFactory, counters: counters, log: log)
        server = VhostUserServer(socketPath: socketPath, device: device, log: log)
    }

    /// Binds the socket (or serves `listeningFD`, handed over by systemd) and starts accepting a front-end.
    public func start(listeningFD: Int32? = nil) throws(VhostUserServerError) { try server.start(listeningFD: listeningFD) }

    /// Disconnects the front-end after its in-flight I/O completed, then stops the threads.
    public func stop() {
        server.stop()
        device.shutdown()
    }

    /// Changes the capacity (config-change interrupt when the front-end negotiated BACKEND_REQ + CONFIG).
    public func resize(blockCount: UInt64) { device.resize(blockCount: blockCount) }

    /// The QEMU arguments that attach this device.
    public func qemuArguments(id: String, queueSize: Int = 128) -> [String] {
        ["-chardev", "socket,id=char-\(id),path=\(server.socketPath)",
         "-device", "vhost-user-blk-pci,id=\(id),chardev=char-\(id),num-queues=\(device.options.queues),queue-size=\(queueSize)"]
    }

    /// A full example command line for logs.
    public func qemuCommandLine(id: String, memoryMegabytes: Int = 1024) -> String {
        QEMUCommandLine.render(["qemu-system-x86_64"] + QEMUCommandLine.sharedMemory(megabytes: memoryMegabytes) + qemuArguments(id: id))
    }
}
