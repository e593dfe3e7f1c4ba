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
                                                log: runtime.logger)
        } catch {
            throw FrontEndError("controller \(runtime.config.name): \(error)")
        }
    }
}
