import Backends
import BlockIO
import Glibc
import Logging
import SCSI
import VhostUser
import VirtioDevices

extension Logger {
    /// Bridges a module's `(level, text)` log calls to swift-log, so every line has the gateway's one format;
    /// `level` maps the module's levels.
    func bridge<Level>(_ level: @escaping @Sendable (Level) -> Logger.Level) -> @Sendable (Level, String) -> Void {
        let logger = self
        return { l, text in logger.log(level: level(l), "\(text)") }
    }

    /// Bridges the vhost-user module's log calls to swift-log.
    func vhostUserSink() -> DeviceLogger {
        bridge { (level: DeviceLogLevel) -> Logger.Level in
            switch level {
            case .debug: .debug
            case .info: .info
            case .warning: .warning
            case .error: .error
            }
        }
    }
}

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
        throw FrontEndError("controller \(runtime.config.name): \(error.message)")
    }
}

/// Serves a `vhost-user-scsi` controller: virtio-scsi over vhost-user (VhostUser module).
public struct VhostUserSCSIFrontEndFactory: FrontEndFactory {
    public init() {}
    public var transport: TransportKind { .vhostUserSCSI }

    public func makeFrontEnd(for controller: ControllerRuntime) throws(FrontEndError) -> any FrontEnd {
        try VhostUserSCSIFrontEnd(controller)
    }
}

/// A running virtio-scsi controller.
final class VhostUserSCSIFrontEnd: FrontEnd, @unchecked Sendable {
    private let runtime: ControllerRuntime
    private let controller: VhostUserSCSIController<PolicyChannel>

    init(_ runtime: ControllerRuntime) throws(FrontEndError) {
        self.runtime = runtime
        let config = runtime.config
        let options = VirtioSCSIOptions(
            requestQueues: config.queues, maxQueueSize: VhostUserWire.maxQueueSize, expectedQueueSize: config.queueSize,
            maxSegments: config.segmentMax,
            threads: config.ioThreads, pollBudgetNanoseconds: UInt64(config.pollMicroseconds) * 1000,
            hotplug: config.hotplug)
        do {
            controller = try VhostUserSCSIController(
                socketPath: config.socket, target: runtime.target, options: options,
                channelFactory: { [runtime] id throws(BlockBackendError) in try runtime.makeChannel(backendID: id) },
                counters: { [runtime] id, queue in
                    guard let statistics = runtime.statistics(backendID: id), queue < statistics.queueCount else { return nil }
                    return statistics.counters(queue: queue)
                },
                log: runtime.logger.vhostUserSink())
        } catch {
            throw FrontEndError("controller \(config.name): \(error)")
        }
    }

    func start() throws(FrontEndError) {
        try startListening(runtime, controller.start)
    }

    func stop() { controller.stop() }
}

/// Serves a `vhost-user-blk` controller: its one LUN as a virtio-blk disk over vhost-user.
public struct VhostUserBlkFrontEndFactory: FrontEndFactory {
    public init() {}
    public var transport: TransportKind { .vhostUserBlk }

    public func makeFrontEnd(for controller: ControllerRuntime) throws(FrontEndError) -> any FrontEnd {
        try VhostUserBlkFrontEnd(controller)
    }
}

/// A running virtio-blk controller. Capacity changes of its LUN (admin resize) become a
/// config-change notification to the guest; removing its LUN detaches the back-end (capacity 0,
/// requests fail with VIRTIO_BLK_S_IOERR, channels closed once idle).
final class VhostUserBlkFrontEnd: FrontEnd, @unchecked Sendable {
    private let runtime: ControllerRuntime
    private let controller: VhostUserBlkController<PolicyChannel>
    private var subscription: Int?

    init(_ runtime: ControllerRuntime) throws(FrontEndError) {
        self.runtime = runtime
        let config = runtime.config
        guard let unit = runtime.target.logicalUnits.first, let entry = runtime.backend(of: unit) else {
            throw FrontEndError("controller \(config.name): its LUN is not online (a vhost-user-blk controller needs its disk at start)")
        }
        var geometry = unit.geometry
        geometry.supportsDiscard = geometry.supportsDiscard && config.discard
        geometry.supportsWriteZeroes = geometry.supportsWriteZeroes && config.writeZeroes
        let options = VirtioBlkOptions(
            queues: config.queues, maxQueueSize: VhostUserWire.maxQueueSize, expectedQueueSize: config.queueSize,
            maxSegments: config.segmentMax,
            serial: unit.identity.serial, threads: config.ioThreads,
            pollBudgetNanoseconds: UInt64(config.pollMicroseconds) * 1000)
        let statistics = entry.statistics
        do {
            controller = try VhostUserBlkController(
                socketPath: config.socket, geometry: geometry, options: options,
                channelFactory: { () throws(BlockBackendError) -> PolicyChannel in try entry.makeChannel() },
                counters: { queue in queue < statistics.queueCount ? statistics.counters(queue: queue) : nil },
                log: runtime.logger.vhostUserSink())
        } catch {
            throw FrontEndError("controller \(config.name): \(error)")
        }
    }

    func start() throws(FrontEndError) {
        try startListening(runtime, controller.start)
        let controller = self.controller
        let runtime = self.runtime
        subscription = runtime.target.subscribe { event in
            switch event {
            case let .capacityChanged(_, blocks): controller.resize(blockCount: blocks)
            // Its one LUN is gone: capacity 0, requests fail, channels close once idle (the file unlocks).
            case .removed: controller.device.detachBackend()
            // A LUN added again after its removal becomes the disk again (capacity back, config change).
            case let .added(lun):
                guard controller.device.backendDetached, let unit = runtime.target.logicalUnit(lun),
                      let entry = runtime.backend(of: unit) else { return }
                do {
                    try controller.device.attachBackend(geometry: unit.geometry) { () throws(BlockBackendError) -> PolicyChannel in
                        try entry.makeChannel()
                    }
                } catch {
                    runtime.logger.warning("controller \(runtime.config.name): LUN \(lun.value) added but not attached to the virtio-blk disk: \(error)")
                }
            default: break
            }
        }
    }

    func stop() {
        if let subscription { runtime.target.unsubscribe(subscription) }
        subscription = nil
        controller.stop()
    }
}
