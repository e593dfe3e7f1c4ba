import Backends
import VfioUser
import VfioUserVirtio
import VirtioDevices

extension VfioUserVirtioController: VirtioDeviceHost {}

extension VirtioTransportHosting {
    /// virtio-pci over vfio-user (VfioUserVirtio module): the device offers the controller's `queue_size` as
    /// its rings' size (the driver may choose smaller ones).
    static let vfioUser = VirtioTransportHosting(
        maxQueueSize: { config in config.queueSize },
        scsi: { runtime, device throws(FrontEndError) in try vfioUserController(runtime, device, .scsi) },
        blk: { runtime, device throws(FrontEndError) in try vfioUserController(runtime, device, .blk) })

    private static func vfioUserController<Device: VirtioDeviceModel>(
        _ runtime: ControllerRuntime, _ device: Device, _ kind: VirtioPCIDeviceKind
    ) throws(FrontEndError) -> VfioUserVirtioController<Device> {
        do {
            return try VfioUserVirtioController(socketPath: runtime.config.socket, device: device, kind: kind,
                                                log: runtime.logger.vhostUserSink())
        } catch {
            throw FrontEndError("controller \(runtime.config.name): \(error)")
        }
    }
}

/// Serves a `vfio-user-virtio-scsi` controller: virtio-scsi as a virtio-pci function over vfio-user.
public struct VfioUserVirtioSCSIFrontEndFactory: FrontEndFactory {
    public init() {}
    public var transport: TransportKind { .vfioUserVirtioSCSI }

    public func makeFrontEnd(for controller: ControllerRuntime) throws(FrontEndError) -> any FrontEnd {
        try VirtioFrontEndFactory(transport: transport, hosting: .vfioUser).makeFrontEnd(for: controller)
    }
}

/// Serves a `vfio-user-virtio-blk` controller: its one LUN as a virtio-blk virtio-pci function over vfio-user.
public struct VfioUserVirtioBlkFrontEndFactory: FrontEndFactory {
    public init() {}
    public var transport: TransportKind { .vfioUserVirtioBlk }

    public func makeFrontEnd(for controller: ControllerRuntime) throws(FrontEndError) -> any FrontEnd {
        try VirtioFrontEndFactory(transport: transport, hosting: .vfioUser).makeFrontEnd(for: controller)
    }
}
