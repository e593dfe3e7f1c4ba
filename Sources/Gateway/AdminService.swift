import BlockIO
import Foundation
import Logging

/// The control-plane methods of a running gateway, as a JSON-RPC method table.
///
/// Every method validates all of its parameters before it changes anything. Calls arrive on the
/// control server's one thread, so admin changes never race one another.
///
/// | method | params | result |
/// |---|---|---|
/// | `gateway.version` | – | version, pid, config source, control socket |
/// | `controller.list` | – | controllers with transport, socket, queues, LUN count |
/// | `lun.list` | `controller`? | LUNs with back-end, size, block size, read-only, identity |
/// | `lun.add` | `controller` + the LUN keys of the config file | the new LUN |
/// | `lun.remove` | `controller`, `target`?, `lun`?, `wait_ms`? | the removed LUN, drained, in_flight |
/// | `lun.resize` | `controller`, `target`?, `lun`?, `size`, `force`? | old_size, size |
/// | `lun.set_readonly` | `controller`, `target`?, `lun`?, `read_only` | the LUN |
/// | `lun.set_limits` | `controller`, `target`?, `lun`?, QoS keys of the config file (left out: unchanged) | the LUN |
/// | `stats.get` | `controller`? | per-LUN and per-queue counters |
/// | `config.save` | `path`? | path, luns |
/// | `config.reload` | – | path, changes |
public final class AdminService: Sendable {
    /// The gateway being administered.
    public let gateway: Gateway
    private let logger: Logger

    /// Longest `wait_ms` of `lun.remove`.
    public static let maximumWaitMilliseconds = 600_000

    /// Creates the service.
    public init(gateway: Gateway, logger: Logger) {
        self.gateway = gateway
        self.logger = logger
    }

    /// The method table.
    public var dispatcher: JSONRPCDispatcher {
        JSONRPCDispatcher(methods: [
            "gateway.version": { [self] p, _ throws(RPCError) in try version(p) },
            "controller.list": { [self] p, _ throws(RPCError) in try listControllers(p) },
            "lun.list": { [self] p, _ throws(RPCError) in try listLUNs(p) },
            "lun.add": { [self] p, peer throws(RPCError) in try audited("lun.add", p, peer) { () throws(RPCError) in try addLUN(p, peer: peer) } },
            "lun.remove": { [self] p, peer throws(RPCError) in try audited("lun.remove", p, peer) { () throws(RPCError) in try removeLUN(p, peer: peer) } },
            "lun.resize": { [self] p, peer throws(RPCError) in try audited("lun.resize", p, peer) { () throws(RPCError) in try resizeLUN(p, peer: peer) } },
            "lun.set_readonly": { [self] p, peer throws(RPCError) in
                try audited("lun.set_readonly", p, peer) { () throws(RPCError) in try setReadOnly(p, peer: peer) }
            },
            "lun.set_limits": { [self] p, peer throws(RPCError) in
                try audited("lun.set_limits", p, peer) { () throws(RPCError) in try setLimits(p, peer: peer) }
            },
            "stats.get": { [self] p, _ throws(RPCError) in try stats(p) },
            "config.save": { [self] p, peer throws(RPCError) in try audited("config.save", p, peer) { () throws(RPCError) in try saveConfig(p, peer: peer) } },
            // Reload takes the gateway's change lock itself (SIGHUP reloads from the main thread).
            "config.reload": { [self] p, peer throws(RPCError) in
                try audited("config.reload", p, peer, locking: false) { () throws(RPCError) in try reloadConfig(p, peer: peer) }
            },
        ])
    }

    // MARK: - Methods

    func version(_ params: RPCParams) throws(RPCError) -> JSONValue {
        try params.allowOnly([])
        return .object([
            "version": .string(ScsiGateVersion.string), "pid": .number(Int(getpid())),
            "config": .string(gateway.config.source), "control_socket": .string(gateway.config.settings.controlSocket),
            "save_path": .string(gateway.defaultSavePath),
        ])
    }

    func listControllers(_ params: RPCParams) throws(RPCError) -> JSONValue {
        try params.allowOnly([])
        let statuses = gateway.lunStatuses()
        return .array(gateway.controllers.map { runtime in
            let c = runtime.config
            var members: [String: JSONValue] = [
                "name": .string(c.name), "transport": .string(c.transport.rawValue), "socket": .string(c.socket),
                "luns": .number(statuses.filter { $0.controller == c.name }.count), "hotplug": .bool(c.hotplug),
            ]
            if !c.transport.isVirtio {
                members["max_targets"] = .number(c.maxTargets)
                members["queues"] = .number(1)
            } else {
                members["queues"] = .number(c.queues)
                members["queue_size"] = .number(c.queueSize)
            }
            return .object(members)
        })
    }

    func listLUNs(_ params: RPCParams) throws(RPCError) -> JSONValue {
        try params.allowOnly(["controller"])
        let name = try params.string("controller")
        if let name { _ = try admin { () throws(AdminError) in try gateway.runtime(named: name) } }
        return .array(gateway.lunStatuses(controller: name).map(Self.json))
    }

    func addLUN(_ params: RPCParams, peer: ControlPeer) throws(RPCError) -> JSONValue {
        let name = try params.string("controller", required: true)!
        let runtime = try admin { () throws(AdminError) in try gateway.runtime(named: name) }
        let lun = try validateLUN(params, on: runtime.config)
        try admin { () throws(AdminError) in
            try gateway.checkNewLUN(lun, on: runtime)
            try gateway.addCheckedLUN(lun, to: runtime)
        }
        gateway.logAdmin("lun added", runtime: runtime, lun, peerMetadata(peer))
        let status = gateway.lunStatuses(controller: name).first { $0.config.target == lun.target && $0.config.lun == lun.lun }
        return status.map(Self.json) ?? .null
    }

    func removeLUN(_ params: RPCParams, peer: ControlPeer) throws(RPCError) -> JSONValue {
        try params.allowOnly(["controller", "target", "lun", "wait_ms"])
        let name = try params.string("controller", required: true)!
        let runtime = try admin { () throws(AdminError) in try gateway.runtime(named: name) }
        let (target, lun) = try address(params, runtime.config)
        let wait = try params.int("wait_ms", range: 0...Self.maximumWaitMilliseconds) ?? 0
        // An offline LUN is only forgotten.
        if let offline = gateway.lunStatuses(controller: name).first(where: {
            !$0.online && $0.config.target == target && $0.config.lun == lun
        }) {
            gateway.forgetOfflineLUN(controller: name, target: target, lun: lun)
            gateway.logAdmin("lun removed", runtime: runtime, offline.config, peerMetadata(peer))
            return .object(["removed": Self.json(offline), "drained": .bool(true), "in_flight": .number(0)])
        }
        let (unit, entry) = try admin { () throws(AdminError) in try gateway.lookup(runtime, target: target, lun: lun) }
        let before = gateway.lunStatuses(controller: name).first { $0.backendID == unit.backendID }
        let statistics = entry.statistics
        let started = IOCounters.now()
        do throws(BackendOpeningError) {
            try gateway.removeLUN(target: target, lun: lun, from: name, drainTimeoutMilliseconds: wait)
        } catch {
            throw RPCError(code: ControlErrorCode.noSuchLUN, message: error.description)
        }
        let inFlight = statistics.inFlight
        let waited = Int((IOCounters.now() - started) / 1_000_000)
        var metadata = peerMetadata(peer)
        metadata["in_flight"] = "\(inFlight)"
        metadata["waited_ms"] = "\(waited)"
        gateway.logAdmin("lun removed", runtime: runtime, entry.config, metadata)
        return .object([
            "removed": before.map(Self.json) ?? .null, "drained": .bool(inFlight == 0),
            "in_flight": .number(inFlight), "waited_ms": .number(waited),
        ])
    }

    func resizeLUN(_ params: RPCParams, peer: ControlPeer) throws(RPCError) -> JSONValue {
        try params.allowOnly(["controller", "target", "lun", "size", "force"])
        let name = try params.string("controller", required: true)!
        let runtime = try admin { () throws(AdminError) in try gateway.runtime(named: name) }
        let (target, lun) = try address(params, runtime.config)
        let size = try params.size("size")
        let force = try params.bool("force") ?? false
        let (old, new) = try admin { () throws(AdminError) in
            try gateway.resizeLUN(controller: name, target: target, lun: lun, size: size, force: force,
                                  logMetadata: peerMetadata(peer))
        }
        return .object(["old_size": .count(old), "size": .count(new)])
    }

    func setReadOnly(_ params: RPCParams, peer: ControlPeer) throws(RPCError) -> JSONValue {
        try params.allowOnly(["controller", "target", "lun", "read_only"])
        let name = try params.string("controller", required: true)!
        let runtime = try admin { () throws(AdminError) in try gateway.runtime(named: name) }
        let (target, lun) = try address(params, runtime.config)
        let readOnly = try params.bool("read_only", required: true)!
        try admin { () throws(AdminError) in
            try gateway.setLUNReadOnly(controller: name, target: target, lun: lun, readOnly: readOnly,
                                       logMetadata: peerMetadata(peer))
        }
        let status = gateway.lunStatuses(controller: name).first { $0.config.target == target && $0.config.lun == lun }
        return status.map(Self.json) ?? .null
    }

    /// `lun.set_limits`: the QoS keys given replace the LUN's (0: no limit), checked by the config file's
    /// rules with the same messages; the keys left out keep their value.
    func setLimits(_ params: RPCParams, peer: ControlPeer) throws(RPCError) -> JSONValue {
        try params.allowOnly(["controller", "target", "lun"] + LUNPolicyConfig.limitKeys)
        let name = try params.string("controller", required: true)!
        let runtime = try admin { () throws(AdminError) in try gateway.runtime(named: name) }
        let (target, lun) = try address(params, runtime.config)
        let current = try admin { () throws(AdminError) in try gateway.lookup(runtime, target: target, lun: lun).1.policy.limits }
        let limits = try Self.validated(params, keys: LUNPolicyConfig.limitKeys) { reader throws(RPCError) in
            ConfigValidator.validateLimits(reader, base: current)
        }
        try admin { () throws(AdminError) in
            try gateway.setLUNLimits(controller: name, target: target, lun: lun, limits: limits, logMetadata: peerMetadata(peer))
        }
        let status = gateway.lunStatuses(controller: name).first { $0.config.target == target && $0.config.lun == lun }
        return status.map(Self.json) ?? .null
    }

    func stats(_ params: RPCParams) throws(RPCError) -> JSONValue {
        try params.allowOnly(["controller"])
        let name = try params.string("controller")
        if let name { _ = try admin { () throws(AdminError) in try gateway.runtime(named: name) } }
        return GatewayStatistics.collect(gateway, controller: name).json
    }

    func saveConfig(_ params: RPCParams, peer: ControlPeer) throws(RPCError) -> JSONValue {
        try params.allowOnly(["path"])
        let path = try params.string("path") ?? gateway.defaultSavePath
        guard path.hasPrefix("/") else { throw .invalidParams("path", "must be an absolute path, found '\(path)'") }
        guard !path.hasSuffix("/") else { throw .invalidParams("path", "'\(path)' names a directory, not a file") }
        var isDirectory: ObjCBool = false
        if FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory), isDirectory.boolValue {
            throw .invalidParams("path", "'\(path)' is a directory")
        }
        let count = try admin { () throws(AdminError) in
            try gateway.saveRunningConfig(to: path, logMetadata: peerMetadata(peer))
        }
        return .object(["path": .string(path), "luns": .number(count)])
    }

    func reloadConfig(_ params: RPCParams, peer: ControlPeer) throws(RPCError) -> JSONValue {
        try params.allowOnly([])
        let report = try admin { () throws(AdminError) in try gateway.reload(logMetadata: peerMetadata(peer)) }
        return .object(["path": .string(report.path), "changes": .array(report.changes.map(JSONValue.string))])
    }

    // MARK: - Helpers

    /// Runs a changing method under the gateway's change lock (unless `locking` is false: the method
    /// takes it itself); a refusal is logged (warning) with the method, code and client.
    private func audited(_ method: String, _ params: RPCParams, _ peer: ControlPeer, locking: Bool = true,
                         _ body: () throws(RPCError) -> JSONValue) throws(RPCError) -> JSONValue {
        do throws(RPCError) {
            if !locking { return try body() }
            return try gateway.changeLock.withLock { _ throws(RPCError) in try body() }
        } catch {
            var metadata = peerMetadata(peer)
            metadata["method"] = .string(method)
            metadata["code"] = .string("\(error.code)")
            if let controller = params.members["controller"]?.stringValue { metadata["controller"] = .string(controller) }
            logger.warning("admin request refused: \(error.message)", metadata: metadata)
            throw error
        }
    }

    /// Runs an admin action, turning its refusal into the JSON-RPC error.
    private func admin<T>(_ body: () throws(AdminError) -> T) throws(RPCError) -> T {
        do throws(AdminError) { return try body() } catch { throw error.rpcError }
    }

    private func peerMetadata(_ peer: ControlPeer) -> Logger.Metadata {
        ["client_pid": "\(peer.pid)", "client_uid": "\(peer.uid)"]
    }

    /// The guest address of a LUN on `controller`, checked as the config file checks it.
    func address(_ params: RPCParams, _ controller: ControllerConfig) throws(RPCError) -> (target: Int, lun: Int) {
        func zero(_ key: String, _ reason: String) throws(RPCError) -> Int {
            let value = try params.int(key) ?? 0
            if value != 0 { throw .invalidParams(key, "must be 0: \(reason), found \(value)") }
            return 0
        }
        switch controller.transport.device {
        case .virtioBlk:
            let target = try zero("target", "a \(controller.transport.rawValue) controller is one disk")
            let lun = try zero("lun", "a \(controller.transport.rawValue) controller is one disk")
            return (target, lun)
        case .pvscsi:
            let target = try params.int("target", required: true, range: 0...(controller.maxTargets - 1))!
            let lun = try zero("lun", "guests address LUN 0 of each PVSCSI target")
            return (target, lun)
        case .virtioSCSI:
            let target = try zero("target", "the virtio-scsi front-end serves target 0")
            let lun = try params.int("lun", required: true, range: 0...16383)!
            return (target, lun)
        }
    }

    /// Validates `lun.add` parameters with the config file's own LUN rules (same messages, the key
    /// named): the validator reads the JSON object as it reads a `[[controller.lun]]` table.
    func validateLUN(_ params: RPCParams, on controller: ControllerConfig) throws(RPCError) -> LUNConfig {
        let settings = gateway.config.settings
        return try Self.validated(params, keys: nil) { reader throws(RPCError) in
            ConfigValidator(validation: reader.validation).validateLUN(reader, transport: controller.transport,
                                                                       maxTargets: controller.maxTargets, settings: settings)
        }
    }

    /// Runs a config-file validation over the parameters (`keys`: only those; nil: all but `controller`)
    /// and turns its problems into one invalid-params error naming the fields.
    static func validated<T>(_ params: RPCParams, keys: [String]?,
                             _ body: (TableReader) throws(RPCError) -> T?) throws(RPCError) -> T {
        let members = params.members.filter { keys?.contains($0.key) ?? ($0.key != "controller") }
        let validation = Validation(source: "params", index: ConfigLineIndex(text: ""))
        let reader = TableReader(table: .json(members), path: .root, validation: validation)
        let value = try body(reader)
        if let first = validation.errors.first {
            let field = first.keyPath ?? "params"
            var message = "invalid params: '\(field)': \(first.message)"
            if validation.errors.count > 1 {
                message += " (and \(validation.errors.count - 1) more: "
                    + validation.errors.dropFirst().map { "'\($0.keyPath ?? "")': \($0.message)" }.joined(separator: "; ") + ")"
            }
            throw RPCError(code: ControlErrorCode.invalidParams, message: message, data: .object([
                "field": .string(field),
                "fields": .array(validation.errors.map { .string($0.keyPath ?? "") }),
            ]))
        }
        guard let value else { throw RPCError(code: ControlErrorCode.invalidParams, message: "invalid params") }
        return value
    }

    /// One LUN as `lun.list` shows it.
    static func json(_ s: LUNStatus) -> JSONValue {
        var members: [String: JSONValue] = [
            "controller": .string(s.controller), "target": .number(s.config.target), "lun": .number(s.config.lun),
            "backend": .string(s.config.backend.rawValue), "online": .bool(s.online),
            "size": .count(s.capacityBytes), "block_size": .number(s.blockSize), "read_only": .bool(s.readOnly),
            "serial": .string(s.serial), "wwn": .string(hex16(s.naa)), "in_flight": .number(s.inFlight),
        ]
        if let path = s.config.path { members["path"] = .string(path) }
        if let url = s.config.iscsi?.url.description { members["url"] = .string(url) }
        if s.config.backend == .file || s.config.backend == .block { members["cache"] = .string(s.config.cache.rawValue) }
        members["policy"] = LUNPolicyConfig.json(s.config.policy)
        return .object(members)
    }

    static func hex16(_ value: UInt64) -> String {
        let hex = String(value, radix: 16)
        return String(repeating: "0", count: max(0, 16 - hex.count)) + hex
    }
}
