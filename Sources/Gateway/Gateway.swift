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

    /// Every registered id, ascending.
    public var ids: [Int] { state.withLock { $0.entries.keys.sorted() } }
}

/// One configured controller at run time: its SCSI targets (by target id) and what a front-end needs.
public final class ControllerRuntime: Sendable {
    /// The controller's configuration.
    public let config: ControllerConfig
    /// SCSI targets by target id (virtio-scsi: 0...255, PVSCSI: 0...63, vhost-user-blk: only 0).
    /// Targets exist for every id that has a configured LUN; `target(_:create:)` makes more at run time.
    private let targetTable: Mutex<[Int: SCSITarget]>
    /// Back-ends of the whole gateway (resolve `LogicalUnit.backendID`).
    public let backends: BackendRegistry
    /// A logger labelled with the controller name.
    public let logger: Logger

    /// Creates the runtime with empty targets for `targetIDs`.
    public init(config: ControllerConfig, targetIDs: [Int], backends: BackendRegistry, logger: Logger) {
        self.config = config
        var table: [Int: SCSITarget] = [:]
        for id in targetIDs { table[id] = SCSITarget(name: "\(config.name):\(id)") }
        self.targetTable = Mutex(table)
        self.backends = backends
        var logger = logger
        logger[metadataKey: "controller"] = .string(config.name)
        self.logger = logger
    }

    /// The target with `id`; with `create`, made (empty) when absent and the id is in the transport's range.
    public func target(_ id: Int, create: Bool = false) -> SCSITarget? {
        targetTable.withLock { table in
            if let target = table[id] { return target }
            guard create, id >= 0, id <= config.transport.maximumTarget else { return nil }
            let target = SCSITarget(name: "\(config.name):\(id)")
            table[id] = target
            return target
        }
    }

    /// Target ids in use, ascending.
    public var targetIDs: [Int] { targetTable.withLock { $0.keys.sorted() } }

    /// The back-end behind a logical unit.
    public func backend(of unit: LogicalUnit) -> LUNBackend? { backends.backend(unit.backendID) }
}

/// The gateway daemon: opens back-ends, builds one SCSI target per (controller, target id) with its
/// LUNs, and starts one front-end per controller through the `FrontEndRegistry`.
///
/// `start` and `stop` are called from one thread (the CLI's main thread); the runtime objects they
/// create are shared with front-end threads and the control plane.
public final class Gateway: @unchecked Sendable {
    /// The configuration being served.
    public let config: GatewayConfig
    /// Every open back-end.
    public let backends = BackendRegistry()
    private let logger: Logger
    private let opener: any BackendOpener
    private let frontEndRegistry: FrontEndRegistry
    private var runtimes: [ControllerRuntime] = []
    private var frontEnds: [(String, any FrontEnd)] = []
    private var started = false

    /// Creates a gateway (nothing is opened until `start`).
    public init(config: GatewayConfig, logger: Logger, backendOpener: any BackendOpener = StandardBackendOpener(),
                frontEnds: FrontEndRegistry = .standard) {
        self.config = config
        self.logger = logger
        self.opener = backendOpener
        self.frontEndRegistry = frontEnds
    }

    /// The controllers, once started.
    public var controllers: [ControllerRuntime] { runtimes }

    /// The controller named `name`, once started.
    public func controller(named name: String) -> ControllerRuntime? { runtimes.first { $0.config.name == name } }

    /// Prepares directories, opens every back-end, builds the targets and starts the front-ends.
    /// On failure everything opened so far is closed again and the error lists every problem.
    public func start() throws(GatewayError) {
        precondition(!started, "Gateway.start called twice")
        try prepareDirectories()
        var problems: [String] = []
        var built: [ControllerRuntime] = []
        for controller in config.controllers {
            let runtime = ControllerRuntime(config: controller, targetIDs: Array(Set(controller.luns.map(\.target))).sorted(),
                                            backends: backends, logger: logger)
            for lun in controller.luns {
                do throws(BackendOpeningError) {
                    try addConfiguredLUN(lun, to: runtime)
                } catch where error.mayStartWithout {
                    logger.error("LUN offline: \(error.description)")
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
        runtimes = built
        started = true
        for runtime in runtimes {
            logServed(runtime)
            guard let factory = frontEndRegistry.factory(for: runtime.config.transport) else {
                runtime.logger.warning(
                    "transport \(runtime.config.transport.rawValue) has no front-end in this build; controller \(runtime.config.name) is not attached")
                continue
            }
            do throws(FrontEndError) {
                let frontEnd = try factory.makeFrontEnd(for: runtime)
                try frontEnd.start()
                frontEnds.append((runtime.config.name, frontEnd))
                runtime.logger.info("listening on \(runtime.config.socket)")
            } catch {
                stop()
                throw GatewayError(["controller \(runtime.config.name): \(error.description)"])
            }
        }
    }

    /// Stops the front-ends (each drains its in-flight I/O), then closes every back-end. Idempotent.
    public func stop() {
        for (name, frontEnd) in frontEnds.reversed() {
            logger.info("stopping controller \(name)")
            frontEnd.stop()
        }
        frontEnds.removeAll()
        closeAllBackends()
        runtimes.removeAll()
        started = false
    }

    /// Opens a configured LUN and adds it to its target.
    private func addConfiguredLUN(_ lun: LUNConfig, to runtime: ControllerRuntime) throws(BackendOpeningError) {
        let opened = try opener.open(lun, on: runtime.config)
        let id = backends.register(LUNBackend(config: lun, controller: runtime.config.name, backend: opened.backend))
        var geometry = opened.geometry
        geometry.readOnly = geometry.readOnly || lun.readOnly
        let unit = LogicalUnit(number: LogicalUnitNumber(lun.lun)!, identity: DerivedIdentity.identity(for: lun, controller: runtime.config),
                               geometry: geometry, backendID: id)
        guard let target = runtime.target(lun.target, create: true) else {
            backends.remove(id)?.backend.close()
            throw BackendOpeningError(lun: "controller \(runtime.config.name) target \(lun.target) lun \(lun.lun)",
                                      reason: "target id out of range for \(runtime.config.transport.rawValue)")
        }
        do throws(LUNTableError) {
            try target.add(unit)
        } catch {
            backends.remove(id)?.backend.close()
            throw BackendOpeningError(lun: "controller \(runtime.config.name) target \(lun.target) lun \(lun.lun)",
                                      reason: error.description)
        }
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
        for id in runtime.targetIDs {
            guard let target = runtime.target(id) else { continue }
            for unit in target.logicalUnits {
                let entry = runtime.backend(of: unit)
                let g = unit.geometry
                var what = entry.map { e -> String in
                    switch e.config.backend {
                    case .file, .block: return "\(e.config.backend.rawValue) \(e.config.path ?? "")"
                    case .iscsi: return "iscsi \(e.config.iscsi?.url.description ?? "")"
                    case .null: return "null"
                    }
                } ?? "?"
                if unit.isReadOnly { what += " (read-only)" }
                runtime.logger.info(
                    "  target \(id) lun \(unit.number.value): \(what), \(ByteSize.format(g.capacityBytes)), \(g.logicalBlockSize)-byte blocks, serial \(unit.identity.serial), naa \(String(unit.identity.naa, radix: 16))")
            }
        }
        runtime.logger.info("  attach with: \(QEMUCommandLine.deviceArguments(for: c).joined(separator: " "))")
    }
}
