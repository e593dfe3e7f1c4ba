import Foundation

/// Renders a configuration back to TOML that `ConfigLoader` reads to the same value (for
/// `scsigate config save` and tests). Every key is written explicitly, paths absolute.
public enum ConfigWriter {
    /// The TOML text of `config`, with `header` as leading comment lines.
    public static func render(_ config: GatewayConfig, header: [String] = []) -> String {
        var out: [String] = header.map { "# " + $0 }
        if !out.isEmpty { out.append("") }
        out.append("[gateway]")
        out += gatewayLines(config.settings)
        for c in config.controllers {
            out.append("")
            out.append("[[controller]]")
            out += controllerLines(c)
            for lun in c.luns {
                out.append("")
                out.append("[[controller.lun]]")
                out += lines(for: lun)
            }
        }
        return out.joined(separator: "\n") + "\n"
    }

    /// The key lines of the `[gateway]` table.
    static func gatewayLines(_ s: GatewaySettings) -> [String] {
        var out = ["state_dir = \(quote(s.stateDirectory))", "control_socket = \(quote(s.controlSocket))",
                   "log_level = \(quote(s.logLevel.rawValue))"]
        if let listen = s.statsListen { out.append("stats_listen = \(quote(listen.description))") }
        out.append("socket_mode = \(quote("0" + String(s.socketMode, radix: 8)))")
        if let group = s.socketGroup { out.append("socket_group = \(quote(group))") }
        return out
    }

    /// The key lines of one `[[controller]]` table, without its LUNs.
    static func controllerLines(_ c: ControllerConfig) -> [String] {
        var out = ["name = \(quote(c.name))", "transport = \(quote(c.transport.rawValue))", "socket = \(quote(c.socket))",
                   "socket_mode = \(quote("0" + String(c.socketMode, radix: 8)))"]
        if let group = c.socketGroup { out.append("socket_group = \(quote(group))") }
        out.append("poll_us = \(c.pollMicroseconds)")
        if c.transport.isVirtio {
            out.append("queues = \(c.queues)")
            out.append("queue_size = \(c.queueSize)")
            out.append("seg_max = \(c.segmentMax)")
            out.append("io_threads = \(c.ioThreads)")
        } else {
            out.append("max_targets = \(c.maxTargets)")
        }
        if c.transport.isSCSI {
            out.append("hotplug = \(c.hotplug)")
        } else {
            out.append("discard = \(c.discard)")
            out.append("write_zeroes = \(c.writeZeroes)")
        }
        return out
    }

    /// The keys whose `key = value` lines differ between two renderings (a key present in one only
    /// counts), in the order they first appear: how reload names what changed, including keys this
    /// code does not know by name.
    static func changedKeys(_ old: [String], _ new: [String]) -> [String] {
        func keyed(_ lines: [String]) -> [(String, String)] {
            lines.map { line in
                let key = line.split(separator: "=", maxSplits: 1).first.map { $0.trimmingCharacters(in: .whitespaces) } ?? line
                return (key, line)
            }
        }
        let a = keyed(old), b = keyed(new)
        let oldByKey = Dictionary(a, uniquingKeysWith: { first, _ in first })
        let newByKey = Dictionary(b, uniquingKeysWith: { first, _ in first })
        var keys: [String] = []
        for (key, _) in a + b where oldByKey[key] != newByKey[key] && !keys.contains(key) { keys.append(key) }
        return keys
    }

    /// The key lines of one LUN entry.
    static func lines(for lun: LUNConfig) -> [String] {
        var out = ["target = \(lun.target)", "lun = \(lun.lun)", "backend = \(quote(lun.backend.rawValue))"]
        if let path = lun.path { out.append("path = \(quote(path))") }
        if let size = lun.size { out.append("size = \(size)") }
        if lun.backend != .iscsi { out.append("block_size = \(lun.blockSize)") }
        if let physical = lun.physicalBlockSize { out.append("physical_block_size = \(physical)") }
        out.append("read_only = \(lun.readOnly)")
        if lun.backend == .file || lun.backend == .block { out.append("cache = \(quote(lun.cache.rawValue))") }
        if lun.backend == .file { out.append("create = \(lun.create)") }
        if let serial = lun.serial { out.append("serial = \(quote(serial))") }
        if let wwn = lun.wwn {
            let hex = String(wwn, radix: 16)
            out.append("wwn = \(quote(String(repeating: "0", count: 16 - hex.count) + hex))")
        }
        if let vendor = lun.vendor { out.append("vendor = \(quote(vendor))") }
        if let product = lun.product { out.append("product = \(quote(product))") }
        if let revision = lun.revision { out.append("revision = \(quote(revision))") }
        if let iscsi = lun.iscsi {
            out.append("url = \(quote(iscsi.url.description))")
            out.append("initiator_name = \(quote(iscsi.initiatorName))")
            if let user = iscsi.chapUser { out.append("chap_user = \(quote(user))") }
            switch iscsi.chapSecret {
            case let .file(path)?: out.append("chap_secret_file = \(quote(path))")
            case let .environment(name)?: out.append("chap_secret_env = \(quote(name))")
            case nil: break
            }
            out.append("header_digest = \(quote(iscsi.headerDigest.rawValue))")
            out.append("data_digest = \(quote(iscsi.dataDigest.rawValue))")
            out.append("timeout = \(iscsi.timeoutSeconds)")
            out.append("reconnect_min_ms = \(iscsi.reconnectMinMilliseconds)")
            out.append("reconnect_max_ms = \(iscsi.reconnectMaxMilliseconds)")
        }
        out += lun.policy.lines
        return out
    }

    /// A TOML basic string with `"`, `\` and control characters escaped.
    public static func quote(_ text: String) -> String {
        var out = "\""
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\t": out += "\\t"
            case "\r": out += "\\r"
            default:
                if scalar.value < 0x20 || scalar.value == 0x7F {
                    let hex = String(scalar.value, radix: 16, uppercase: true)
                    out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
                } else {
                    out.unicodeScalars.append(scalar)
                }
            }
        }
        return out + "\""
    }
}
