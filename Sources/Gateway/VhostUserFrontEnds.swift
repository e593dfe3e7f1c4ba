import Backends
import BlockIO
import Glibc
import Logging
import SCSI
import VhostUser
import VirtioDevices

/// Starts a front-end's server (naming the controller and socket in its error), then gives the listening
/// socket the configured group and permission bits. A socket handed over by systemd (socket activation)
/// keeps the owner and mode its unit gave it. Shared by every transport's front-end.
func startListening<E: Error>(_ runtime: ControllerRuntime, _ start: (Int32?) throws(E) -> Void) throws(FrontEndError) {
    do {
        try start(runtime.activatedSocket)
    } catch {
        throw FrontEndError("controller \(runtime.config.name) on \(runtime.config.socket): \(error)")
    }
    if runtime.activatedSocket != nil { return }
    do throws(FrontEndError) {
        try SocketOwnership.apply(path: runtime.config.socket, mode: runtime.config.socketMode, group: runtime.config.socketGroup)
    } catch {
        throw error.within("controller \(runtime.config.name)")
    }
}

extension VhostUserSCSIController: VirtioDeviceHost {}
extension VhostUserBlkController: VirtioDeviceHost {}

extension VirtioTransportHosting {
    /// vhost-user (VhostUser module): the VMM sets rings up to the vhost-user limit.
    static let vhostUser = VirtioTransportHosting(
        maxQueueSize: { _ in VhostUserWire.maxQueueSize },
        scsi: { runtime, device in
            VhostUserSCSIController(socketPath: runtime.config.socket, device: device, log: runtime.logger)
        },
        blk: { runtime, device in
            VhostUserBlkController(socketPath: runtime.config.socket, device: device, log: runtime.logger)
        })
}
