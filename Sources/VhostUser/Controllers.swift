import BlockIO
import SCSI
import VirtioDevices

/// A virtio-scsi controller served over vhost-user: the public entry the gateway uses.
///
/// ```
/// let controller = try VhostUserSCSIController(socketPath: "/run/scsigate/scsi0.sock", target: target,
///                                              options: VirtioSCSIOptions(requestQueues: 2, threads: 2),
///                                              channelFactory: { backendID in try backends[backendID].makeChannel() },
///                                              log: { level, text in logger.log(...) })
/// try controller.start()
/// controller.stop()   // drains in-flight I/O
/// ```
public final class VhostUserSCSIController<Channel: BlockChannel>: Sendable {
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
                log: @escaping DeviceLogger) throws(VirtioDeviceError) {
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
}

/// A virtio-blk device served over vhost-user, over one back-end.
public final class VhostUserBlkController<Channel: BlockChannel>: Sendable {
    /// The device model.
    public let device: VirtioBlkDevice<Channel>
    /// The vhost-user server.
    public let server: VhostUserServer<VirtioBlkDevice<Channel>>

    /// Creates the controller; `channelFactory` is called once per event-loop thread, now (the channels
    /// close when the controller stops). `counters(queue)` gives the statistics of each request queue.
    public init(socketPath: String, geometry: BlockGeometry, options: VirtioBlkOptions, channelFactory: () throws -> Channel,
                counters: VirtioBlkCountersProvider? = nil,
                log: @escaping DeviceLogger) throws(VirtioDeviceError) {
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
}
