/// What `scsigate check-config` prints and returns, computed without side effects so tests can call it.
public struct ConfigCheckReport: Sendable, Equatable {
    /// Lines for standard output (the summary on success).
    public var output: [String]
    /// Lines for standard error (one per problem).
    public var errors: [String]
    /// Process exit status: 0 valid, 1 invalid.
    public var exitCode: Int32

    /// Validates the file at `path` (or the embedded default when `path` is nil).
    public static func check(path: String?) -> ConfigCheckReport {
        do throws(ConfigErrors) {
            let config: GatewayConfig
            if let path { config = try ConfigLoader.load(file: path) } else { config = try ConfigLoader.loadDefault() }
            return ConfigCheckReport(output: ConfigSummary.lines(for: config), errors: [], exitCode: 0)
        } catch {
            let count = error.errors.count
            let source = path ?? ConfigLoader.embeddedSourceName
            return ConfigCheckReport(output: [],
                                     errors: error.errors.map(\.description) + ["\(source): \(count) error\(count == 1 ? "" : "s"), not valid"],
                                     exitCode: 1)
        }
    }
}

/// A human-readable description of a configuration (check-config's success output).
public enum ConfigSummary {
    /// The summary lines.
    public static func lines(for config: GatewayConfig) -> [String] {
        let controllers = config.controllers.count
        var lines = ["\(config.source): OK: \(controllers) controller\(controllers == 1 ? "" : "s"), \(config.lunCount) LUN\(config.lunCount == 1 ? "" : "s")"]
        let s = config.settings
        lines.append("gateway: state_dir \(s.stateDirectory), control_socket \(s.controlSocket), log_level \(s.logLevel.rawValue)"
                     + (s.statsListen.map { ", stats on \($0)" } ?? ""))
        for c in config.controllers {
            var line = "controller \(c.name): \(c.transport.rawValue) on \(c.socket) (mode 0\(String(c.socketMode, radix: 8))\(c.socketGroup.map { ", group \($0)" } ?? ""))"
            if c.transport.isVirtio { line += ", \(c.queues) queue\(c.queues == 1 ? "" : "s") of \(c.queueSize)" }
            lines.append(line)
            for lun in c.luns {
                lines.append("  target \(lun.target) lun \(lun.lun): " + describe(lun, controller: c))
            }
            lines.append("  qemu: " + QEMUCommandLine.deviceLine(for: c))
        }
        return lines
    }

    /// One LUN in a line.
    public static func describe(_ lun: LUNConfig, controller: ControllerConfig) -> String {
        var parts: [String] = []
        switch lun.backend {
        case .file:
            parts.append("file \(lun.path ?? "")")
            if let size = lun.size { parts.append(ByteSize.format(size) + (lun.create ? " (created if missing)" : "")) }
        case .block:
            parts.append("block device \(lun.path ?? "")")
        case .iscsi:
            parts.append("iscsi \(lun.iscsi?.url.description ?? "")")
            if let user = lun.iscsi?.chapUser { parts.append("CHAP user \(user)") }
        case .null:
            parts.append("null")
            if let size = lun.size { parts.append(ByteSize.format(size)) }
        }
        if lun.backend != .iscsi { parts.append("\(lun.blockSize)-byte blocks") }
        if lun.backend == .file || lun.backend == .block { parts.append("cache \(lun.cache.rawValue)") }
        if lun.readOnly { parts.append("read-only") }
        let policy = lun.policy.lines
        if !policy.isEmpty { parts.append(policy.joined(separator: ", ")) }
        let identity = DerivedIdentity.identity(for: lun, controller: controller)
        parts.append("serial \(identity.serial)")
        parts.append("naa \(String(identity.naa, radix: 16))")
        return parts.joined(separator: ", ")
    }
}
