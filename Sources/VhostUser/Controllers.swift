import BlockIO
import Logging
import SCSI
import VirtioDevices

/// A virtio-scsi controller served over vhost-user: the public entry the gateway uses. The device model is
/// built by the caller (the same model can be hosted by another transport) and handed over.
///
/// ```
/// let device = try VirtioSCSIDevice(target: target, options: VirtioSCSIOptions(requestQueues: 2, threads: 2),
///                                   channelFactory: { backendID in try backends[backendID].makeChannel() },
///                                   log: log)
/// let controller = VhostUserSCSIController(socketPath: "/run/scsigate/scsi0.sock", device: device, log: log)
/// try controller.start()
/// controller.stop()   // drains in-flight I/O, then shuts the device down
/// ```
public final class VhostUserSCSIController<Channel: BlockChannel>: Sendable {
    /// The device model.
    public let device: VirtioSCSIDevice<Channel>
    /// The vhost-user server.
    public let server: VhostUserServer<VirtioSCSIDevice<Channel>>

    /// Hosts `device` (its threads already run; the socket is bound by `start`). The controller owns the
    /// device from now on: `stop` shuts it down.
    public init(socketPath: String, device: VirtioSCSIDevice<Channel>, log: Logger) {
        self.device = device
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

/// A virtio-blk device served over vhost-user, over one back-end. The device model is built by the caller.
public final class VhostUserBlkController<Channel: BlockChannel>: Sendable {
    /// The device model.
    public let device: VirtioBlkDevice<Channel>
    /// The vhost-user server.
    public let server: VhostUserServer<VirtioBlkDevice<Channel>>

    /// Hosts `device` (its channels are open; the socket is bound by `start`). The controller owns the device
    /// from now on: `stop` shuts it down (its channels close).
    public init(socketPath: String, device: VirtioBlkDevice<Channel>, log: Logger) {
        self.device = device
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
