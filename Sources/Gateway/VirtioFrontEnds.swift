import Backends
import BlockIO
import SCSI
import VirtioDevices

/// A transport's controller hosting one virtio device model (vhost-user server, or a virtio-pci function
/// over vfio-user): what the shared virtio front-ends start and stop.
protocol VirtioDeviceHost: AnyObject, Sendable {
    /// Why `start` failed.
    associatedtype StartError: Error
    /// Binds the socket (or serves `listeningFD`, handed over by systemd) and starts accepting a VMM.
    func start(listeningFD: Int32?) throws(StartError)
    /// Disconnects the VMM after in-flight I/O completed, removes the socket, shuts the device down.
    func stop()
}

/// The virtio device models of controllers, built from their config once per controller, whichever
/// transport hosts them. `maxQueueSize` is the largest ring the transport lets a driver set up.
enum VirtioDeviceModels {
    /// The virtio-scsi device of a virtio-scsi controller: its target, queues, threads and hotplug setting.
    static func scsi(_ runtime: ControllerRuntime, maxQueueSize: Int) throws(FrontEndError) -> VirtioSCSIDevice<PolicyChannel> {
        let config = runtime.config
        let options = VirtioSCSIOptions(
            requestQueues: config.queues, maxQueueSize: maxQueueSize, expectedQueueSize: config.queueSize,
            maxSegments: config.segmentMax,
            threads: config.ioThreads, pollBudgetNanoseconds: UInt64(config.pollMicroseconds) * 1000,
            hotplug: config.hotplug)
        do {
            return try VirtioSCSIDevice(
                target: runtime.target, options: options,
                channelFactory: { [runtime] id throws(BlockBackendError) in try runtime.makeChannel(backendID: id) },
                counters: { [runtime] id, queue in
                    guard let statistics = runtime.statistics(backendID: id), queue < statistics.queueCount else { return nil }
                    return statistics.counters(queue: queue)
                },
                log: runtime.logger)
        } catch {
            throw FrontEndError("controller \(config.name): \(error)")
        }
    }

    /// The virtio-blk device of a virtio-blk controller over its one LUN (which must be online).
    static func blk(_ runtime: ControllerRuntime, maxQueueSize: Int) throws(FrontEndError) -> VirtioBlkDevice<PolicyChannel> {
        let config = runtime.config
        guard let unit = runtime.target.logicalUnits.first, let entry = runtime.backend(of: unit) else {
            throw FrontEndError("controller \(config.name): its LUN is not online (a \(config.transport.rawValue) controller needs its disk at start)")
        }
        var geometry = unit.geometry
        geometry.supportsDiscard = geometry.supportsDiscard && config.discard
        geometry.supportsWriteZeroes = geometry.supportsWriteZeroes && config.writeZeroes
        let options = VirtioBlkOptions(
            queues: config.queues, maxQueueSize: maxQueueSize, expectedQueueSize: config.queueSize,
            maxSegments: config.segmentMax,
            serial: unit.identity.serial, threads: config.ioThreads,
            pollBudgetNanoseconds: UInt64(config.pollMicroseconds) * 1000)
        let statistics = entry.statistics
        do {
            return try VirtioBlkDevice(
                geometry: geometry, options: options,
                channelFactory: { () throws(BlockBackendError) -> PolicyChannel in try entry.makeChannel() },
                counters: { queue in queue < statistics.queueCount ? statistics.counters(queue: queue) : nil },
                log: runtime.logger)
        } catch {
            throw FrontEndError("controller \(config.name): \(error)")
        }
    }

    /// What a virtio-blk controller does on its target's LUN events: capacity changes of its LUN (admin resize)
    /// become a config-change notification; removing its LUN detaches the back-end (capacity 0, requests fail
    /// with VIRTIO_BLK_S_IOERR, channels closed once idle); a LUN added again becomes the disk again.
    static func blkEvents(_ runtime: ControllerRuntime, _ device: VirtioBlkDevice<PolicyChannel>) -> @Sendable (LUNEvent) -> Void {
        { event in
            switch event {
            case let .capacityChanged(_, blocks): device.resize(blockCount: blocks)
            // Its one LUN is gone: capacity 0, requests fail, channels close once idle (the file unlocks).
            case .removed: device.detachBackend()
            // A LUN added again after its removal becomes the disk again (capacity back, config change).
            case let .added(lun):
                guard device.backendDetached, let unit = runtime.target.logicalUnit(lun),
                      let entry = runtime.backend(of: unit) else { return }
                do {
                    try device.attachBackend(geometry: unit.geometry) { () throws(BlockBackendError) -> PolicyChannel in
                        try entry.makeChannel()
                    }
                } catch {
                    runtime.logger.warning("controller \(runtime.config.name): LUN \(lun.value) added but not attached to the virtio-blk disk: \(error)")
                }
            default: break
            }
        }
    }
}

/// How one transport hosts the virtio device models: its largest ring and how it wraps a built device.
struct VirtioTransportHosting: Sendable {
    /// Largest ring a driver may set up on this transport, for a controller's config.
    var maxQueueSize: @Sendable (ControllerConfig) -> Int
    /// A controller serving a virtio-scsi device on `runtime.config.socket`.
    var scsi: @Sendable (ControllerRuntime, VirtioSCSIDevice<PolicyChannel>) throws(FrontEndError) -> any VirtioDeviceHost
    /// A controller serving a virtio-blk device on `runtime.config.socket`.
    var blk: @Sendable (ControllerRuntime, VirtioBlkDevice<PolicyChannel>) throws(FrontEndError) -> any VirtioDeviceHost
}

/// A running virtio controller (virtio-scsi or virtio-blk, on any transport): its transport's controller,
/// started on the configured socket, and the device's reaction to LUN events of its target, if any
/// (virtio-scsi devices follow their target themselves: hotplug events on the event queue).
final class VirtioFrontEnd: FrontEnd, @unchecked Sendable {
    private let runtime: ControllerRuntime
    private let host: any VirtioDeviceHost
    private let lunEvents: (@Sendable (LUNEvent) -> Void)?
    private var subscription: Int?

    init(_ runtime: ControllerRuntime, host: any VirtioDeviceHost, lunEvents: (@Sendable (LUNEvent) -> Void)? = nil) {
        self.runtime = runtime
        self.host = host
        self.lunEvents = lunEvents
    }

    func start() throws(FrontEndError) {
        let host = self.host
        try startListening(runtime) { fd throws in try host.start(listeningFD: fd) }
        if let lunEvents { subscription = runtime.target.subscribe(lunEvents) }
    }

    func stop() {
        if let subscription { runtime.target.unsubscribe(subscription) }
        subscription = nil
        host.stop()
    }
}

/// Serves the controllers of one virtio transport (`vhost-user-scsi`, `vhost-user-blk` over vhost-user;
/// `vfio-user-virtio-scsi`, `vfio-user-virtio-blk` as virtio-pci over vfio-user): builds the device model of the
/// controller's kind from its config, then hands it to the transport's host.
public struct VirtioFrontEndFactory: FrontEndFactory {
    public let transport: TransportKind
    let hosting: VirtioTransportHosting

    /// The factory of `transport`; nil when it is not a virtio transport.
    public init?(transport: TransportKind) {
        switch transport {
        case .vhostUserSCSI, .vhostUserBlk: hosting = .vhostUser
        case .vfioUserVirtioSCSI, .vfioUserVirtioBlk: hosting = .vfioUser
        case .pvscsi: return nil
        }
        self.transport = transport
    }

    public func makeFrontEnd(for runtime: ControllerRuntime) throws(FrontEndError) -> any FrontEnd {
        let maxQueueSize = hosting.maxQueueSize(runtime.config)
        switch transport.device {
        case .virtioSCSI:
            let device = try VirtioDeviceModels.scsi(runtime, maxQueueSize: maxQueueSize)
            return try Self.hosted(device.shutdown) { () throws(FrontEndError) in
                VirtioFrontEnd(runtime, host: try hosting.scsi(runtime, device))
            }
        case .virtioBlk:
            let device = try VirtioDeviceModels.blk(runtime, maxQueueSize: maxQueueSize)
            return try Self.hosted(device.shutdown) { () throws(FrontEndError) in
                VirtioFrontEnd(runtime, host: try hosting.blk(runtime, device), lunEvents: VirtioDeviceModels.blkEvents(runtime, device))
            }
        case .pvscsi:
            throw FrontEndError("controller \(runtime.config.name): transport \(transport.rawValue) is not a virtio transport")
        }
    }

    /// `make()`; when the transport refuses the device, the device is shut down (its threads stop) and the
    /// error thrown.
    private static func hosted(_ shutdown: () -> Void, _ make: () throws(FrontEndError) -> VirtioFrontEnd) throws(FrontEndError) -> VirtioFrontEnd {
        do { return try make() } catch {
            shutdown()
            throw error
        }
    }
}
