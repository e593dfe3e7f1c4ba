import Backends
import BlockIO
import Foundation
import Glibc
import Logging
import SCSI
import TOMLKit
import SystemErrors

/// Why an admin change was refused: a kind (which maps to a control-protocol error code) and one line.
public struct AdminError: Error, Sendable, Equatable, CustomStringConvertible {
    /// What kind of refusal.
    public enum Kind: Sendable, Equatable {
        case noSuchController, noSuchLUN, lunExists, fileMissing, lockHeld, shrinkNeedsForce, backendFailed
        case unsupported, saveFailed
        /// A configuration reload found an invalid file or a change it cannot apply live; nothing changed.
        case reloadRefused
        /// A bad parameter, named.
        case invalid(field: String)
    }

    /// The kind.
    public var kind: Kind
    /// One line for the operator.
    public var message: String

    /// Creates an error.
    public init(_ kind: Kind, _ message: String) {
        self.kind = kind
        self.message = message
    }

    public var description: String { message }

    /// The JSON-RPC error for this refusal.
    public var rpcError: RPCError {
        switch kind {
        case .noSuchController: return RPCError(code: ControlErrorCode.noSuchController, message: message)
        case .noSuchLUN: return RPCError(code: ControlErrorCode.noSuchLUN, message: message)
        case .lunExists: return RPCError(code: ControlErrorCode.lunExists, message: message)
        case .fileMissing: return RPCError(code: ControlErrorCode.fileMissing, message: message)
        case .lockHeld: return RPCError(code: ControlErrorCode.lockHeld, message: message)
        case .shrinkNeedsForce: return RPCError(code: ControlErrorCode.shrinkNeedsForce, message: message)
        case .backendFailed: return RPCError(code: ControlErrorCode.backendFailed, message: message)
        case .unsupported: return RPCError(code: ControlErrorCode.unsupported, message: message)
        case .saveFailed: return RPCError(code: ControlErrorCode.saveFailed, message: message)
        case .reloadRefused: return RPCError(code: ControlErrorCode.reloadRefused, message: message)
        case let .invalid(field): return .invalidParams(field, message)
        }
    }
}

/// A LUN as the control plane reports it.
public struct LUNStatus: Sendable {
    /// The controller.
    public var controller: String
    /// The entry (with the current size and read-only setting).
    public var config: LUNConfig
    /// False for a LUN whose back-end could not be opened at start (iSCSI, retried later).
    public var online: Bool
    /// Capacity in bytes (0 when offline).
    public var capacityBytes: UInt64
    /// Logical block size.
    public var blockSize: Int
    /// Whether writes are refused.
    public var readOnly: Bool
    /// INQUIRY unit serial number.
    public var serial: String
    /// NAA identifier.
    public var naa: UInt64
    /// The back-end id (nil when offline).
    public var backendID: Int?
    /// Commands in flight (0 unless the front-end counts starts).
    public var inFlight: Int
}

extension Gateway {
    /// The controller named `name`, or a `noSuchController` refusal listing the names.
    public func runtime(named name: String) throws(AdminError) -> ControllerRuntime {
        if let runtime = controller(named: name) { return runtime }
        let names = controllers.map(\.config.name)
        throw AdminError(.noSuchController, "no such controller '\(name)'; controllers: \(names.isEmpty ? "none" : names.joined(separator: ", "))")
    }

    /// The core LUN number of a guest address on `runtime` (the address was range-checked by the caller).
    func coreLUN(_ runtime: ControllerRuntime, target: Int, lun: Int) throws(AdminError) -> LogicalUnitNumber {
        guard let number = LogicalUnitNumber(runtime.config.transport.coreLUN(target: target, lun: lun)) else {
            throw AdminError(.invalid(field: "lun"), "address out of range for \(runtime.config.transport.rawValue)")
        }
        return number
    }

    /// The logical unit and back-end entry at an address.
    func lookup(_ runtime: ControllerRuntime, target: Int, lun: Int) throws(AdminError) -> (LogicalUnit, LUNBackend) {
        let number = try coreLUN(runtime, target: target, lun: lun)
        guard let unit = runtime.target.logicalUnit(number), let entry = runtime.backend(of: unit) else {
            throw AdminError(.noSuchLUN, "controller \(runtime.config.name) has no LUN at target \(target) lun \(lun)")
        }
        return (unit, entry)
    }

    /// Every LUN (online and offline), by controller then address; only `controller`'s when given.
    public func lunStatuses(controller name: String? = nil) -> [LUNStatus] {
        var out: [LUNStatus] = []
        let offline = offlineState.withLock { $0 }
        for runtime in controllers where name == nil || runtime.config.name == name {
            var rows: [LUNStatus] = []
            for unit in runtime.target.logicalUnits {
                guard let entry = runtime.backend(of: unit) else { continue }
                rows.append(LUNStatus(controller: runtime.config.name, config: entry.config, online: true,
                                      capacityBytes: unit.blockCount * UInt64(unit.blockSize),
                                      blockSize: Int(unit.blockSize), readOnly: unit.isReadOnly,
                                      serial: unit.identity.serial, naa: unit.identity.naa, backendID: unit.backendID,
                                      inFlight: entry.statistics.inFlight))
            }
            for (controller, lun) in offline where controller == runtime.config.name {
                let identity = DerivedIdentity.identity(for: lun, controller: runtime.config)
                rows.append(LUNStatus(controller: controller, config: lun, online: false, capacityBytes: 0,
                                      blockSize: lun.blockSize, readOnly: lun.readOnly, serial: identity.serial,
                                      naa: identity.naa, backendID: nil, inFlight: 0))
            }
            rows.sort { ($0.config.target, $0.config.lun) < ($1.config.target, $1.config.lun) }
            out += rows
        }
        return out
    }

    /// Forgets a LUN that is waiting to come online (`lun remove` or reload of an offline LUN).
    func forgetOfflineLUN(controller name: String, target: Int, lun: Int) {
        offlineState.withLock { list in
            list.removeAll { $0.controller == name && $0.lun.target == target && $0.lun.lun == lun }
        }
    }

    /// Checks a validated LUN entry against the running map before anything is opened: the address is
    /// free, the backing path, remote LUN, serial and WWN are not used by another LUN, and the backing
    /// file exists unless it is to be created.
    public func checkNewLUN(_ lun: LUNConfig, on runtime: ControllerRuntime) throws(AdminError) {
        let all = lunStatuses()
        let here = all.filter { $0.controller == runtime.config.name }
        if runtime.config.transport.device == .virtioBlk, let existing = here.first {
            throw AdminError(.lunExists, "controller \(runtime.config.name) is \(runtime.config.transport.rawValue) and already has its one disk (\(describe(existing.config)))")
        }
        if let taken = here.first(where: { $0.config.target == lun.target && $0.config.lun == lun.lun }) {
            throw AdminError(.lunExists, "controller \(runtime.config.name) already has a LUN at target \(lun.target) lun \(lun.lun) (\(describe(taken.config)))")
        }
        for other in all {
            let owner = "controller \(other.controller) target \(other.config.target) lun \(other.config.lun)"
            if let path = lun.path, let otherPath = other.config.path, Self.sameFile(path, otherPath) {
                throw AdminError(.lockHeld, "'\(path)' already backs \(owner) (lock held)")
            }
            if let url = lun.iscsi?.url.description, url == other.config.iscsi?.url.description {
                throw AdminError(.invalid(field: "url"), "remote LUN '\(url)' already backs \(owner)")
            }
            if let serial = lun.serial, serial == other.serial {
                throw AdminError(.invalid(field: "serial"), "serial '\(serial)' is already used by \(owner)")
            }
            if let wwn = lun.wwn, wwn == other.naa {
                throw AdminError(.invalid(field: "wwn"), "wwn is already used by \(owner)")
            }
        }
        if let path = lun.path, lun.backend == .file || lun.backend == .block {
            var st = stat()
            if stat(path, &st) != 0 {
                let e = errno
                if e == ENOENT && !(lun.backend == .file && lun.create) {
                    let hint = lun.backend == .file ? " (pass create with a size to create it sparse)" : ""
                    throw AdminError(.fileMissing, "'\(path)' does not exist\(hint)")
                }
                if e != ENOENT { throw AdminError(.backendFailed, "'\(path)': \(SystemCallError.text(errno: e))") }
            }
        }
    }

    /// Adds a checked LUN entry (opens the back-end, creating a sparse file and its directory when
    /// asked) and maps back-end failures to refusals.
    public func addCheckedLUN(_ lun: LUNConfig, to runtime: ControllerRuntime) throws(AdminError) {
        if lun.create, let path = lun.path {
            try? FileManager.default.createDirectory(atPath: ConfigValidator.directory(of: path),
                                                     withIntermediateDirectories: true)
        }
        do throws(BackendOpeningError) {
            try addLUN(lun, to: runtime.config.name)
        } catch {
            switch error.cause {
            case .missingFile?: throw AdminError(.fileMissing, error.description)
            case .lockConflict?: throw AdminError(.lockHeld, error.description)
            default: throw AdminError(.backendFailed, error.description)
            }
        }
    }

    /// Resizes the LUN at an address to `size` bytes (block devices: nil or the device's size re-reads
    /// it). Shrinking needs `force`. Returns (old size, new size) in bytes.
    public func resizeLUN(controller name: String, target: Int, lun: Int, size: UInt64?,
                          force: Bool, logMetadata: Logger.Metadata = [:]) throws(AdminError) -> (old: UInt64, new: UInt64) {
        let runtime = try runtime(named: name)
        let (unit, entry) = try lookup(runtime, target: target, lun: lun)
        let number = unit.number
        let blockSize = UInt64(unit.blockSize)
        let oldBytes = unit.blockCount * blockSize
        switch entry.config.backend {
        case .null: throw AdminError(.unsupported, "a null LUN has a fixed size; remove it and add it again with the new size")
        case .iscsi: throw AdminError(.unsupported, "an iSCSI LUN's size is the remote target's")
        case .file:
            guard let size else { throw AdminError(.invalid(field: "size"), "required parameter is missing") }
            guard size % blockSize == 0 else {
                throw AdminError(.invalid(field: "size"), "\(size) bytes is not a multiple of block_size \(blockSize)")
            }
            if size < oldBytes && !force {
                throw AdminError(.shrinkNeedsForce, "new size \(size) bytes (\(ByteSize.format(size))) is below the current \(oldBytes) bytes (\(ByteSize.format(oldBytes))); shrinking loses data; pass force (--force) to shrink")
            }
            if size == oldBytes { return (oldBytes, oldBytes) }
            let newBlocks = size / blockSize
            if size < oldBytes {
                // Refuse I/O past the new end before the file shrinks.
                do throws(LUNTableError) { try runtime.target.resize(number, blockCount: newBlocks, allowShrink: true) } catch {
                    throw AdminError(.noSuchLUN, error.description)
                }
                do throws(BackendOpenError) {
                    try entry.backend.resize(to: size, allowShrink: true)
                } catch {
                    try? runtime.target.resize(number, blockCount: oldBytes / blockSize, allowShrink: true)
                    throw AdminError(.backendFailed, error.description)
                }
            } else {
                do throws(BackendOpenError) { try entry.backend.resize(to: size, allowShrink: false) } catch {
                    throw AdminError(.backendFailed, error.description)
                }
                do throws(LUNTableError) { try runtime.target.resize(number, blockCount: newBlocks, allowShrink: false) } catch {
                    throw AdminError(.noSuchLUN, error.description)
                }
            }
            backends.update(unit.backendID) { $0.config.size = size }
            logAdmin("lun resized", runtime: runtime, entry.config, ["old_size": "\(oldBytes)", "size": "\(size)"].merging(logMetadata) { $1 })
            return (oldBytes, size)
        case .block:
            let geometry: BlockGeometry
            do throws(BackendOpenError) { geometry = try entry.backend.resize(to: size ?? 0) } catch {
                throw AdminError(.backendFailed, error.description)
            }
            let newBytes = geometry.capacityBytes
            if newBytes < oldBytes && !force {
                throw AdminError(.shrinkNeedsForce, "the device now has \(newBytes) bytes, below the current \(oldBytes); pass force (--force) to shrink the LUN")
            }
            do throws(LUNTableError) {
                try runtime.target.resize(number, blockCount: newBytes / blockSize, allowShrink: true)
            } catch {
                throw AdminError(.noSuchLUN, error.description)
            }
            logAdmin("lun resized", runtime: runtime, entry.config, ["old_size": "\(oldBytes)", "size": "\(newBytes)"].merging(logMetadata) { $1 })
            return (oldBytes, newBytes)
        }
    }

    /// Sets or clears operator read-only on the LUN at an address.
    public func setLUNReadOnly(controller name: String, target: Int, lun: Int, readOnly: Bool,
                               logMetadata: Logger.Metadata = [:]) throws(AdminError) {
        let runtime = try runtime(named: name)
        let (unit, entry) = try lookup(runtime, target: target, lun: lun)
        if !readOnly && entry.backend.geometry.readOnly {
            throw AdminError(.unsupported, "the back-end was opened read-only; remove the LUN and add it again without read_only to make it writable")
        }
        do throws(LUNTableError) { try runtime.target.setReadOnly(unit.number, readOnly) } catch {
            throw AdminError(.noSuchLUN, error.description)
        }
        backends.update(unit.backendID) { $0.config.readOnly = readOnly }
        logAdmin("lun read-only changed", runtime: runtime, entry.config, ["read_only": "\(readOnly)"].merging(logMetadata) { $1 })
    }

    /// Replaces the QoS limits of the LUN at an address; every queue applies them from its next request
    /// (requests already held keep their start time). `lun set-limits` calls it.
    public func setLUNLimits(controller name: String, target: Int, lun: Int, limits: QoSLimits,
                             logMetadata: Logger.Metadata = [:]) throws(AdminError) {
        let runtime = try runtime(named: name)
        let (_, entry) = try lookup(runtime, target: target, lun: lun)
        var policy = entry.config.policy
        policy.limits = limits
        try setLUNPolicy(controller: name, target: target, lun: lun, policy: policy, logMetadata: logMetadata)
    }

    /// Replaces a LUN's policies (QoS limits and out-of-space policy, validated by the caller as the
    /// config file's `[[controller.lun]]` keys) while it serves I/O: for config reload and `lun set-limits`.
    public func setLUNPolicy(controller name: String, target: Int, lun: Int, policy: LUNPolicyConfig,
                             logMetadata: Logger.Metadata = [:]) throws(AdminError) {
        let runtime = try runtime(named: name)
        let (unit, entry) = try lookup(runtime, target: target, lun: lun)
        entry.policy.setLimits(policy.limits)
        entry.policy.setOutOfSpace(policy.outOfSpace, holdSeconds: policy.holdSeconds)
        backends.update(unit.backendID) { $0.config.policy = policy }
        let text = policy.lines.joined(separator: ", ")
        logAdmin("lun policy changed", runtime: runtime, entry.config,
                 ["policy": "\(text.isEmpty ? "none" : text)"].merging(logMetadata) { $1 })
    }

    /// The configuration of the running gateway: the settings and controllers it was started with and
    /// the LUN map as it is now (added, removed, resized LUNs; offline LUNs kept), sorted by address.
    public func runningConfig() -> GatewayConfig {
        let statuses = lunStatuses()
        let runtimes = controllers
        let controllerConfigs = runtimes.isEmpty ? config.controllers : runtimes.map(\.config)
        let saved = controllerConfigs.map { c -> ControllerConfig in
            var c = c
            c.luns = statuses.filter { $0.controller == c.name }.map(\.config)
            return c
        }
        return GatewayConfig(settings: config.settings, controllers: saved, source: config.source)
    }

    /// Where `config.save` writes without a path: the file `serve` was started from, or
    /// `state_dir/scsigate.toml` when it was started from the built-in default.
    public var defaultSavePath: String {
        if config.source == ConfigLoader.embeddedSourceName { return config.settings.stateDirectory + "/scsigate.toml" }
        if config.source.hasPrefix("/") { return config.source }
        return FileManager.default.currentDirectoryPath + "/" + config.source
    }

    /// Renders the running configuration and writes it atomically to `path` (absolute). The text is
    /// parsed back before writing, so a file is only replaced by one `serve` accepts. Returns the
    /// number of LUNs saved.
    @discardableResult
    public func saveRunningConfig(to path: String, logMetadata: Logger.Metadata = [:]) throws(AdminError) -> Int {
        let running = runningConfig()
        let text = ConfigWriter.render(running, header: [
            "ScsiGate configuration saved from the running gateway by `scsigate config save`",
            "(scsigate \(ScsiGateVersion.string), \(StderrLogHandler.timestamp())).",
        ])
        do throws(ConfigErrors) {
            _ = try ConfigLoader.parse(text, source: path)
        } catch {
            throw AdminError(.saveFailed, "the rendered configuration does not validate: \(error.errors.first?.description ?? "")")
        }
        do throws(AtomicFileError) {
            try AtomicFile.write(Array(text.utf8), to: path)
        } catch {
            throw AdminError(.saveFailed, error.description)
        }
        logger.notice("config saved", metadata: ["event": "config saved", "path": "\(path)", "luns": "\(running.lunCount)"]
                        .merging(logMetadata) { $1 })
        return running.lunCount
    }

    /// Waits until `statistics` shows nothing in flight, polling every millisecond; false on timeout.
    static func waitUntilDrained(_ statistics: LUNIOStatistics, timeoutMilliseconds: Int) -> Bool {
        let deadline = IOCounters.now() + UInt64(timeoutMilliseconds) * 1_000_000
        while statistics.inFlight > 0 {
            if IOCounters.now() >= deadline { return false }
            usleep(1000)
        }
        return true
    }

    /// Keeps a removed LUN's final counters in its controller's per-queue totals.
    func retire(_ statistics: LUNIOStatistics, controller: String) {
        retiredStatistics.withLock { retired in
            var queues = retired[controller] ?? []
            for queue in 0..<statistics.queueCount {
                if queues.count <= queue { queues.append(IOStatisticsSnapshot()) }
                queues[queue].add(statistics.snapshot(queue: queue))
            }
            retired[controller] = queues
        }
    }

    /// Per-queue counters of removed LUNs of `controller`.
    func retiredQueueStatistics(_ controller: String) -> [IOStatisticsSnapshot] {
        retiredStatistics.withLock { $0[controller] ?? [] }
    }

    /// One structured log line for an admin change.
    func logAdmin(_ message: Logger.Message, runtime: ControllerRuntime, _ lun: LUNConfig,
                  _ extra: Logger.Metadata = [:]) {
        var metadata: Logger.Metadata = [
            "event": .string("\(message)"), "controller": .string(runtime.config.name),
            "target": .string("\(lun.target)"), "lun": .string("\(lun.lun)"), "backend": .string(lun.backend.rawValue),
        ]
        if let path = lun.path { metadata["path"] = .string(path) }
        metadata.merge(extra) { _, new in new }
        logger.notice(message, metadata: metadata)
    }

    private func describe(_ lun: LUNConfig) -> String {
        switch lun.backend {
        case .file, .block: return "\(lun.backend.rawValue) \(lun.path ?? "")"
        case .iscsi: return "iscsi \(lun.iscsi?.url.description ?? "")"
        case .null: return "null"
        }
    }

    /// Whether two paths name the same file (same device and inode, or the same text).
    static func sameFile(_ a: String, _ b: String) -> Bool {
        if a == b { return true }
        var sa = stat(), sb = stat()
        guard stat(a, &sa) == 0, stat(b, &sb) == 0 else { return false }
        return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino
    }
}

/// Why an atomic file write failed; names the file and the step.
public struct AtomicFileError: Error, Sendable, CustomStringConvertible {
    /// One line.
    public var message: String
    public var description: String { message }
}

/// Crash-safe file replacement: write a temporary file in the same directory, fsync it, rename it
/// over the target, fsync the directory. Readers see the old file or the new one, never a mix.
public enum AtomicFile {
    /// Writes `bytes` to `path` atomically (mode 0644).
    public static func write(_ bytes: [UInt8], to path: String) throws(AtomicFileError) {
        let directory = ConfigValidator.directory(of: path)
        let name = String(path[path.index(after: path.lastIndex(of: "/") ?? path.startIndex)...])
        let temporary = "\(directory)/.\(name).\(getpid()).\(UInt32.random(in: 0...UInt32.max)).tmp"
        func fail(_ step: String, _ e: Int32) -> AtomicFileError {
            AtomicFileError(message: "cannot save \(path): \(step) failed: \(SystemCallError.text(errno: e))")
        }
        let fd = open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw fail("creating \(temporary)", errno) }
        var offset = 0
        while offset < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress! + offset, $0.count - offset) }
            if n < 0 {
                if errno == EINTR { continue }
                let e = errno
                close(fd); unlink(temporary)
                throw fail("write", e)
            }
            offset += n
        }
        guard fsync(fd) == 0 else { let e = errno; close(fd); unlink(temporary); throw fail("fsync", e) }
        guard close(fd) == 0 else { let e = errno; unlink(temporary); throw fail("close", e) }
        guard rename(temporary, path) == 0 else { let e = errno; unlink(temporary); throw fail("rename", e) }
        let dfd = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard dfd >= 0 else { throw fail("opening directory \(directory)", errno) }
        defer { close(dfd) }
        guard fsync(dfd) == 0 else { throw fail("fsync of directory \(directory)", errno) }
    }
}
