import Backends
import BlockIO
import Foundation
import Logging
import SCSI
import Synchronization

/// Why the gateway could not start.
public struct GatewayError: Error, Sendable, CustomStringConvertible {
    /// One line per problem.
    public var problems: [String]
    /// Creates an error.
    public init(_ problems: [String]) { self.problems = problems }
    public var description: String { problems.joined(separator: "\n") }
}

/// A LUN's back-end as the gateway keeps it: looked up by `LogicalUnit.backendID`.
public struct LUNBackend: Sendable {
    /// The LUN entry (as configured or as added at run time).
    public var config: LUNConfig
    /// The controller it belongs to.
    public var controller: String
    /// The open back-end.
    public var backend: AnyBlockBackend
    /// I/O counters of this LUN, one slot per queue; front-ends record into them (see `IOCounters`).
    public var statistics: LUNIOStatistics
    /// QoS limits and out-of-space policy, shared by every channel of the LUN (see `PolicyChannel`).
    public var policy: LUNPolicy

    /// Opens a channel to the back-end for one event-loop thread, with the LUN's policies.
    public func makeChannel() throws(BlockBackendError) -> PolicyChannel {
        let inner = try backend.makeChannel()
        do throws(BlockBackendError) {
            return try PolicyChannel(inner, policy: policy)
        } catch {
            inner.close()
            throw error
        }
    }
}

/// Every open back-end of a gateway, by back-end id. Front-ends resolve `LogicalUnit.backendID` here
/// when they create channels (at connect, and on an `added` event).
public final class BackendRegistry: Sendable {
    private struct State {
        var entries: [Int: LUNBackend] = [:]
        var nextID = 1
    }
    private let state = Mutex(State())

    /// Creates an empty registry.
    public init() {}

    /// Registers a back-end; returns its id.
    public func register(_ entry: LUNBackend) -> Int {
        state.withLock { s in
            let id = s.nextID
            s.nextID += 1
            s.entries[id] = entry
            return id
        }
    }

    /// The back-end with `id`.
    public func backend(_ id: Int) -> LUNBackend? { state.withLock { $0.entries[id] } }

    /// Removes and returns the back-end with `id` (the caller closes it once its channels are closed).
    @discardableResult
    public func remove(_ id: Int) -> LUNBackend? { state.withLock { $0.entries.removeValue(forKey: id) } }

    /// Changes the entry with `id` in place (resize, read-only); false when it is gone.
    @discardableResult
    public func update(_ id: Int, _ body: (inout LUNBackend) -> Void) -> Bool {
        state.withLock { s in
            guard var entry = s.entries[id] else { return false }
            body(&entry)
            s.entries[id] = entry
            return true
        }
    }

    /// Every registered id, ascending.
    public var ids: [Int] { state.withLock { $0.entries.keys.sorted() } }
}

/// One configured controller at run time: its SCSI target and what a front-end needs.
///
/// Each controller has one `SCSITarget`. A LUN entry's guest address maps onto the target's LUNs by
/// `TransportKind.coreLUN(target:lun:)`: virtio-scsi LUN n is LUN n, PVSCSI target n is LUN n, the
/// virtio-blk disk is LUN 0.
public final class ControllerRuntime: Sendable {
    /// The controller's configuration.
    public let config: ControllerConfig
    /// The SCSI target (LUN table, task sets, unit attentions) the front-end drives.
    public let target: SCSITarget
    /// Back-ends of the whole gateway (resolve `LogicalUnit.backendID`).
    public let backends: BackendRegistry
    /// A logger labelled with the controller name.
    public let logger: Logger
    /// The listening socket systemd handed over for this controller (socket activation), if any: the
    /// front-end serves it instead of binding `config.socket`, and never unlinks it.
    public let activatedSocket: Int32?

    /// Creates the runtime with an empty target.
    public init(config: ControllerConfig, backends: BackendRegistry, logger: Logger, activatedSocket: Int32? = nil) {
        self.config = config
        self.activatedSocket = activatedSocket
        self.target = SCSITarget(name: config.name)
        self.backends = backends
        var logger = logger
        logger[metadataKey: "controller"] = .string(config.name)
        self.logger = logger
    }

    /// The back-end behind a logical unit.
    public func backend(of unit: LogicalUnit) -> LUNBackend? { backends.backend(unit.backendID) }

    /// The I/O counters of the LUN whose back-end is `backendID` (front-ends take
    /// `counters(queue:)` from it when they open the LUN's channel for a queue).
    public func statistics(backendID: Int) -> LUNIOStatistics? { backends.backend(backendID)?.statistics }

    /// Counter slots per LUN: one per request queue (PVSCSI has one request ring).
    public var statisticsQueueCount: Int { config.transport.isVirtio ? max(1, config.queues) : 1 }

    /// Opens a channel to the back-end with `backendID` (what front-ends pass as their channel factory).
    public func makeChannel(backendID: Int) throws(BlockBackendError) -> PolicyChannel {
        guard let entry = backends.backend(backendID) else {
            throw BlockBackendError("back-end \(backendID) of controller \(config.name) is gone")
        }
        return try entry.makeChannel()
    }
}

/// The gateway daemon: opens back-ends, builds one SCSI target per controller with its LUNs, and
/// starts one front-end per controller through the `FrontEndRegistry`.
///
/// `start` and `stop` are called from one thread (the CLI's main thread); the runtime objects they
/// create are shared with front-end threads and the control plane.
public final class Gateway: @unchecked Sendable {
    /// The configuration being served.
    public let config: GatewayConfig
    /// Every open back-end.
    public let backends = BackendRegistry()
    let logger: Logger
    private let opener: any BackendOpener
    private let frontEndRegistry: FrontEndRegistry
    /// Read by the control plane from other threads; written by start/stop.
    private let runtimeState = Mutex<[ControllerRuntime]>([])
    private var frontEnds: [(String, any FrontEnd)] = []
    private var started = false
    /// LUNs whose back-end could not be opened at start but that may come later (iSCSI), by controller.
    let offlineState = Mutex<[(controller: String, lun: LUNConfig)]>([])
    /// Per controller, per queue: the final counters of removed LUNs (so queue totals never go back).
    let retiredStatistics = Mutex<[String: [IOStatisticsSnapshot]]>([:])
    /// Listening sockets handed over by systemd; controllers and the control socket take theirs.
    public let activation: SocketActivation
    /// systemd notifications (reload sends RELOADING=1 / READY=1 through it).
    public let notifier: ServiceNotifier
    /// Held by every change of the LUN map (admin commands, reload), which may come from the control
    /// thread and from SIGHUP on the main thread.
    let changeLock = Mutex<Void>(())

    /// Creates a gateway (nothing is opened until `start`).
    public init(config: GatewayConfig, logger: Logger, backendOpener: (any BackendOpener)? = nil,
                frontEnds: FrontEndRegistry = .standard, activation: SocketActivation = .none,
                notifier: ServiceNotifier = .disabled) {
        self.config = config
        self.logger = logger
        self.opener = backendOpener ?? StandardBackendOpener(logger: logger)
        self.frontEndRegistry = frontEnds
        self.activation = activation
        self.notifier = notifier
    }

    /// The controllers, once started.
    public var controllers: [ControllerRuntime] { runtimeState.withLock { $0 } }

    /// The controller named `name`, once started.
    public func controller(named name: String) -> ControllerRuntime? {
        runtimeState.withLock { $0.first { $0.config.name == name } }
    }

    /// Prepares directories, opens every back-end, builds the targets and starts the front-ends.
    /// On failure everything opened so far is closed again and the error lists every problem.
    public func start() throws(GatewayError) {
        precondition(!started, "Gateway.start called twice")
        try prepareDirectories()
        var problems: [String] = []
        var built: [ControllerRuntime] = []
        for controller in config.controllers {
            let runtime = ControllerRuntime(config: controller, backends: backends, logger: logger,
                                            activatedSocket: takeActivatedSocket(name: controller.name, path: controller.socket))
            for lun in controller.luns {
                do throws(BackendOpeningError) {
                    try addConfiguredLUN(lun, to: runtime)
                } catch where error.mayStartWithout {
                    logger.error("LUN offline: \(error.description); retrying in the background")
                    offlineState.withLock { $0.append((controller.name, lun)) }
                    retryWhenOnline(lun, on: runtime)
                } catch {
                    problems.append(error.description)
                }
            }
            built.append(runtime)
        }
        if !problems.isEmpty {
            closeAllBackends()
            throw GatewayError(problems)
        }
        runtimeState.withLock { $0 = built }
        started = true
        for runtime in built {
            logServed(runtime)
            guard let factory = frontEndRegistry.factory(for: runtime.config.transport) else {
                runtime.logger.warning(
                    "transport \(runtime.config.transport.rawValue) has no front-end in this build; controller \(runtime.config.name) is not attached")
                continue
            }
            do throws(FrontEndError) {
                let frontEnd = try factory.makeFrontEnd(for: runtime)
                // Listed before it starts, so a failed start (socket group or mode) is stopped too.
                frontEnds.append((runtime.config.name, frontEnd))
                try frontEnd.start()
                runtime.logger.info("listening on \(runtime.config.socket)\(runtime.activatedSocket.map { " (socket fd \($0) from systemd)" } ?? "")")
            } catch {
                stop()
                throw GatewayError(["controller \(runtime.config.name): \(error.description)"])
            }
        }
    }

    /// The listening socket systemd handed over for `name` (a controller, or `control`), if any; warns
    /// when a socket taken by name is bound to another path than the configured one.
    func takeActivatedSocket(name: String, path: String) -> Int32? {
        guard let socket = activation.take(name: name, path: path) else { return nil }
        if !socket.path.isEmpty && socket.path != path {
            logger.warning("socket activation: the socket named '\(name)' (fd \(socket.fd)) is bound to \(socket.path), not to the configured \(path); serving it")
        }
        return socket.fd
    }

    /// Stops the front-ends (each drains its in-flight I/O), then closes every back-end. Idempotent.
    public func stop() {
        for (name, frontEnd) in frontEnds.reversed() {
            logger.info("stopping controller \(name)")
            frontEnd.stop()
        }
        frontEnds.removeAll()
        closeAllBackends()
        runtimeState.withLock { $0.removeAll() }
        offlineState.withLock { $0.removeAll() }
        started = false
    }

    /// Adds a LUN to a running controller (control plane): opens its back-end and adds it to the
    /// controller's target, which tells the front-end and raises the unit attentions. `lun` must have
    /// passed the same checks as a config entry.
    public func addLUN(_ lun: LUNConfig, to controllerName: String) throws(BackendOpeningError) {
        guard let runtime = controller(named: controllerName) else {
            throw BackendOpeningError(lun: "controller \(controllerName)", reason: "no such controller")
        }
        try addConfiguredLUN(lun, to: runtime)
        runtime.logger.info("added target \(lun.target) lun \(lun.lun) (\(lun.backend.rawValue))")
    }

    /// Removes a LUN from a running controller and closes its back-end once the front-end has closed
    /// its channels. With `drainTimeoutMilliseconds` > 0 it first waits (up to that long) until the
    /// LUN's counters show no command in flight. Returns the removed entry.
    @discardableResult
    public func removeLUN(target: Int, lun: Int, from controllerName: String,
                          drainTimeoutMilliseconds: Int = 0) throws(BackendOpeningError) -> LUNConfig {
        let name = "controller \(controllerName) target \(target) lun \(lun)"
        guard let runtime = controller(named: controllerName) else {
            throw BackendOpeningError(lun: "controller \(controllerName)", reason: "no such controller")
        }
        guard let number = LogicalUnitNumber(runtime.config.transport.coreLUN(target: target, lun: lun)) else {
            throw BackendOpeningError(lun: name, reason: "address out of range for \(runtime.config.transport.rawValue)")
        }
        let unit: LogicalUnit
        do throws(LUNTableError) {
            unit = try runtime.target.remove(number)
        } catch {
            throw BackendOpeningError(lun: name, reason: error.description)
        }
        if drainTimeoutMilliseconds > 0, let statistics = backends.backend(unit.backendID)?.statistics {
            _ = Self.waitUntilDrained(statistics, timeoutMilliseconds: drainTimeoutMilliseconds)
        }
        let entry = backends.remove(unit.backendID)
        if let entry { retire(entry.statistics, controller: controllerName) }
        if let backend = entry?.backend {
            backend.close()
            // Front-ends close their channels of the removed LUN on their own threads once its last
            // command completed; wait (bounded) so that the file is unlocked when this returns.
            let deadline = Date().addingTimeInterval(Double(max(drainTimeoutMilliseconds, 2_000)) / 1000)
            while backend.openChannelCount > 0 && Date() < deadline { usleep(1_000) }
            if backend.openChannelCount > 0 {
                runtime.logger.warning("target \(target) lun \(lun): \(backend.openChannelCount) channel(s) still open; the backing file stays locked until they close")
            }
        }
        runtime.logger.info("removed target \(target) lun \(lun)")
        guard let config = entry?.config else {
            throw BackendOpeningError(lun: name, reason: "its back-end was already gone")
        }
        return config
    }

    /// Opens a configured LUN and adds it to its target.
    private func addConfiguredLUN(_ lun: LUNConfig, to runtime: ControllerRuntime) throws(BackendOpeningError) {
        let opened = try opener.open(lun, on: runtime.config)
        let logger = runtime.logger
        let policy = lun.policy.makePolicy { [target = lun.target, lun = lun.lun] text in
            logger.warning("target \(target) lun \(lun): \(text)", metadata: ["event": "lun policy"])
        }
        let id = backends.register(LUNBackend(config: lun, controller: runtime.config.name, backend: opened.backend,
                                              statistics: LUNIOStatistics(queues: runtime.statisticsQueueCount),
                                              policy: policy))
        var geometry = opened.geometry
        geometry.readOnly = geometry.readOnly || lun.readOnly
        let name = "controller \(runtime.config.name) target \(lun.target) lun \(lun.lun)"
        guard let number = LogicalUnitNumber(runtime.config.transport.coreLUN(target: lun.target, lun: lun.lun)) else {
            backends.remove(id)?.backend.close()
            throw BackendOpeningError(lun: name, reason: "address out of range for \(runtime.config.transport.rawValue)")
        }
        let unit = LogicalUnit(number: number, identity: DerivedIdentity.identity(for: lun, controller: runtime.config),
                               geometry: geometry, backendID: id, allocationQuery: opened.backend.allocationQuery)
        do throws(LUNTableError) {
            try runtime.target.add(unit)
        } catch {
            backends.remove(id)?.backend.close()
            throw BackendOpeningError(lun: name, reason: error.description)
        }
        opened.followRemoteCapacity(of: unit, in: runtime.target)
    }

    /// Keeps trying to bring a remote LUN online (every 5 s) until it is added or the gateway stops:
    /// a target unreachable at start-up does not hold back the others, and its LUN appears (with the
    /// usual hotplug events) once the target answers.
    private func retryWhenOnline(_ lun: LUNConfig, on runtime: ControllerRuntime) {
        let thread = Thread { [weak self] in
            while true {
                Thread.sleep(forTimeInterval: 5)
                guard let self, self.controller(named: runtime.config.name) === runtime else { return }
                // Forgotten by `lun.remove` while offline: stop trying.
                guard self.isOffline(lun, on: runtime.config.name) else { return }
                do throws(BackendOpeningError) {
                    try self.addConfiguredLUN(lun, to: runtime)
                    self.offlineState.withLock { list in
                        list.removeAll { $0.controller == runtime.config.name && $0.lun == lun }
                    }
                    runtime.logger.info("LUN online: target \(lun.target) lun \(lun.lun) (\(lun.backend.rawValue))")
                    return
                } catch where error.mayStartWithout {
                    continue
                } catch {
                    runtime.logger.error("LUN stays offline: \(error.description)")
                    return
                }
            }
        }
        thread.name = "lun-retry"
        thread.start()
    }

    /// Whether `lun` of `controller` is still waiting to come online.
    func isOffline(_ lun: LUNConfig, on controller: String) -> Bool {
        offlineState.withLock { list in list.contains { $0.controller == controller && $0.lun == lun } }
    }

    private func closeAllBackends() {
        for id in backends.ids { backends.remove(id)?.backend.close() }
    }

    /// Creates the state directory and the directories of every socket.
    private func prepareDirectories() throws(GatewayError) {
        var directories = [config.settings.stateDirectory, ConfigValidator.directory(of: config.settings.controlSocket)]
        for controller in config.controllers { directories.append(ConfigValidator.directory(of: controller.socket)) }
        for lun in config.controllers.flatMap(\.luns) where lun.create {
            if let path = lun.path { directories.append(ConfigValidator.directory(of: path)) }
        }
        var problems: [String] = []
        for directory in Set(directories).sorted() {
            do {
                try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
            } catch {
                problems.append("cannot create directory \(directory): \(error.localizedDescription)")
            }
        }
        if !problems.isEmpty { throw GatewayError(problems) }
    }

    private func logServed(_ runtime: ControllerRuntime) {
        let c = runtime.config
        runtime.logger.info("controller \(c.name): \(c.transport.rawValue) on \(c.socket)")
        for unit in runtime.target.logicalUnits {
            guard let entry = runtime.backend(of: unit) else { continue }
            let g = unit.geometry
            var what: String
            switch entry.config.backend {
            case .file, .block: what = "\(entry.config.backend.rawValue) \(entry.config.path ?? "")"
            case .iscsi: what = "iscsi \(entry.config.iscsi?.url.description ?? "")"
            case .null: what = "null"
            }
            if unit.isReadOnly { what += " (read-only)" }
            runtime.logger.info(
                "  target \(entry.config.target) lun \(entry.config.lun): \(what), \(ByteSize.format(g.capacityBytes)), \(g.logicalBlockSize)-byte blocks, serial \(unit.identity.serial), naa \(String(unit.identity.naa, radix: 16))")
        }
        runtime.logger.info("  attach with: \(QEMUCommandLine.deviceLine(for: c))")
    }
}
