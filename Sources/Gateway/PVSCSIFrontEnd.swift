import Backends
import BlockIO
import Logging
import PVSCSI
import SCSI

/// Serves a `pvscsi` controller: a PVSCSI adapter emulated over vfio-user (PVSCSI module).
public struct PVSCSIFrontEndFactory: FrontEndFactory {
    public init() {}
    public var transport: TransportKind { .pvscsi }

    public func makeFrontEnd(for controller: ControllerRuntime) throws(FrontEndError) -> any FrontEnd {
        try PVSCSIFrontEnd(controller)
    }
}

/// A running PVSCSI controller bound to its vfio-user socket.
final class PVSCSIFrontEnd: FrontEnd, @unchecked Sendable {
    private let runtime: ControllerRuntime
    private let controller: PVSCSIController<SCSITarget, PolicyChannel>

    init(_ runtime: ControllerRuntime) throws(FrontEndError) {
        self.runtime = runtime
        var options = PVSCSIOptions()
        options.maxTargets = UInt32(runtime.config.maxTargets)
        // Linux learns of more than 16 targets only from the CONFIG command, which needs synchronous
        // register writes (a round trip per kick): paid only by controllers that ask for more targets.
        options.synchronousRegisterWrites = runtime.config.maxTargets > 16
        options.hotplugMessages = runtime.config.hotplug
        do {
            controller = try PVSCSIController(
                socketPath: runtime.config.socket, target: runtime.target, options: options,
                channelFactory: { [runtime] id in
                    do throws(BlockBackendError) {
                        return try runtime.makeChannel(backendID: id)
                    } catch {
                        runtime.logger.error("cannot open a channel to back-end \(id): \(error.description)")
                        return nil
                    }
                },
                statistics: { [runtime] id in runtime.statistics(backendID: id)?.counters(queue: 0) },
                log: runtime.logger)
        } catch {
            throw FrontEndError("controller \(runtime.config.name): \(error)")
        }
    }

    func start() throws(FrontEndError) {
        try startListening(runtime, controller.start)
    }

    func stop() { controller.stop() }
}
