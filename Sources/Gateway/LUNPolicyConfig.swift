import Backends

/// A LUN's policies as configured: QoS limits and what to do when its back-end is out of space.
/// The `[[controller.lun]]` keys, the `lun add` / `lun set-limits` options and the `lun.add` /
/// `lun.set_limits` parameters all go through `ConfigValidator.validatePolicy` / `validateLimits`.
public struct LUNPolicyConfig: Sendable, Equatable {
    /// `iops_limit` ... `burst_seconds` (0: no limit).
    public var limits: QoSLimits
    /// `out_of_space`: `report` (default) or `hold`.
    public var outOfSpace: SpaceExhaustionPolicy
    /// `out_of_space_hold`: how long a write is held, in seconds (with `hold`).
    public var holdSeconds: Int

    /// Default bound of the `hold` policy: below the 30 s command timeout of Linux guests, so a held write fails with its sense before the guest aborts it.
    public static let defaultHoldSeconds = 20
    /// Largest `out_of_space_hold`.
    public static let maximumHoldSeconds = 3600
    /// Largest `burst_seconds`.
    public static let maximumBurstSeconds = 3600
    /// Largest IOPS limit.
    public static let maximumIOPS = 100_000_000

    /// Creates a policy (defaults: no limit, report at once).
    public init(limits: QoSLimits = .unlimited, outOfSpace: SpaceExhaustionPolicy = .report,
                holdSeconds: Int = LUNPolicyConfig.defaultHoldSeconds) {
        self.limits = limits
        self.outOfSpace = outOfSpace
        self.holdSeconds = holdSeconds
    }

    /// The QoS keys, in the order `config save` writes them.
    public static let limitKeys = ["iops_limit", "read_iops_limit", "write_iops_limit", "bandwidth_limit",
                                   "read_bandwidth_limit", "write_bandwidth_limit", "burst_seconds"]
    /// Every policy key of a `[[controller.lun]]` table.
    public static let keys = limitKeys + ["out_of_space", "out_of_space_hold"]

    /// The shared policy object of a LUN opened with this configuration.
    func makePolicy(log: @escaping @Sendable (String) -> Void) -> LUNPolicy {
        LUNPolicy(limits: limits, outOfSpace: outOfSpace, holdSeconds: holdSeconds, log: log)
    }

    /// The TOML lines `config save` writes (only what differs from the defaults).
    var lines: [String] {
        var out: [String] = []
        let values: [(String, UInt64)] = [
            ("iops_limit", limits.iops), ("read_iops_limit", limits.readIOPS), ("write_iops_limit", limits.writeIOPS),
            ("bandwidth_limit", limits.bandwidth), ("read_bandwidth_limit", limits.readBandwidth),
            ("write_bandwidth_limit", limits.writeBandwidth),
        ]
        for (key, value) in values where value != 0 { out.append("\(key) = \(value)") }
        if limits.burstMilliseconds != QoSLimits.defaultBurstMilliseconds {
            out.append("burst_seconds = \(limits.burstMilliseconds / 1000)")
        }
        if outOfSpace != .report {
            out.append("out_of_space = \(ConfigWriter.quote(outOfSpace.rawValue))")
            out.append("out_of_space_hold = \(holdSeconds)")
        }
        return out
    }
}

extension LUNPolicyConfig {
    /// The policy as `lun.list` and `lun.set_limits` show it (the config keys; 0: no limit).
    static func json(_ policy: LUNPolicyConfig) -> JSONValue {
        let l = policy.limits
        return .object([
            "iops_limit": .count(l.iops), "read_iops_limit": .count(l.readIOPS), "write_iops_limit": .count(l.writeIOPS),
            "bandwidth_limit": .count(l.bandwidth), "read_bandwidth_limit": .count(l.readBandwidth),
            "write_bandwidth_limit": .count(l.writeBandwidth), "burst_seconds": .count(l.burstMilliseconds / 1000),
            "out_of_space": .string(policy.outOfSpace.rawValue), "out_of_space_hold": .number(policy.holdSeconds),
        ])
    }
}

extension ConfigValidator {
    /// Reads the policy keys of a LUN entry (`backend`: its back-end kind, when valid).
    func validatePolicy(_ reader: TableReader, backend: BackendKind?) -> LUNPolicyConfig {
        var policy = LUNPolicyConfig()
        if let limits = Self.validateLimits(reader, base: .unlimited) { policy.limits = limits }
        if let outOfSpace = reader.choice("out_of_space", SpaceExhaustionPolicy.self) {
            policy.outOfSpace = outOfSpace
            if outOfSpace == .hold, let backend, backend != .file && backend != .block {
                reader.validation.fail(reader.keyPath("out_of_space"),
                                       "'hold' is only for backend 'file' or 'block' (the back-ends that run out of space), not '\(backend.rawValue)'")
            }
        }
        if reader.has("out_of_space_hold") {
            if let seconds = reader.int("out_of_space_hold", range: 1...LUNPolicyConfig.maximumHoldSeconds) {
                policy.holdSeconds = seconds
            }
            let kind = reader.value("out_of_space", required: false)?.string
            if kind == nil || kind == SpaceExhaustionPolicy.report.rawValue {
                reader.validation.fail(reader.keyPath("out_of_space_hold"), "only used with out_of_space = \"hold\"")
            }
        }
        return policy
    }

    /// Reads the QoS keys over `base` (keys left out keep `base`'s value); nil when any is invalid
    /// (each problem is reported on `reader.validation`).
    static func validateLimits(_ reader: TableReader, base: QoSLimits) -> QoSLimits? {
        var limits = base
        var valid = true
        func iops(_ key: String, _ field: WritableKeyPath<QoSLimits, UInt64>) {
            guard reader.has(key) else { return }
            if let value = reader.int(key, range: 0...LUNPolicyConfig.maximumIOPS) {
                limits[keyPath: field] = UInt64(value)
            } else {
                valid = false
            }
        }
        func bandwidth(_ key: String, _ field: WritableKeyPath<QoSLimits, UInt64>) {
            guard reader.has(key) else { return }
            // 0 (no limit) or a size of at least 4 KiB per second.
            if reader.value(key, required: false)?.int == 0 {
                limits[keyPath: field] = 0
                return
            }
            guard let bytes = reader.size(key) else { valid = false; return }
            guard bytes >= 4096 else {
                reader.validation.fail(reader.keyPath(key), "must be 0 (no limit) or at least 4096 bytes per second, found \(bytes)")
                valid = false
                return
            }
            limits[keyPath: field] = bytes
        }
        iops("iops_limit", \.iops)
        iops("read_iops_limit", \.readIOPS)
        iops("write_iops_limit", \.writeIOPS)
        bandwidth("bandwidth_limit", \.bandwidth)
        bandwidth("read_bandwidth_limit", \.readBandwidth)
        bandwidth("write_bandwidth_limit", \.writeBandwidth)
        if reader.has("burst_seconds") {
            if let seconds = reader.int("burst_seconds", range: 0...LUNPolicyConfig.maximumBurstSeconds) {
                limits.burstMilliseconds = UInt64(seconds) * 1000
            } else {
                valid = false
            }
        }
        return valid ? limits : nil
    }
}
