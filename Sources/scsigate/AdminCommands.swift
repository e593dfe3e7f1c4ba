import ArgumentParser
import Foundation
import Gateway

/// Exit codes of the admin commands (documented in the README).
enum AdminExit {
    /// The gateway refused the change or the query (the message says why).
    static let refused: Int32 = 1
    /// Nothing answers at the control socket.
    static let unreachable: Int32 = 3
    /// A bad argument, found by the command line parser or by the gateway (same as ArgumentParser's usage errors).
    static let usage: Int32 = ExitCode.validationFailure.rawValue
}

/// Options every admin command shares: where the gateway is and how to print.
struct ControlOptions: ParsableArguments {
    @Option(help: ArgumentHelp("Control socket of the gateway (default: [gateway] control_socket of --config, else of the built-in default config).",
                               valueName: "path"))
    var socket: String?

    @Option(name: .shortAndLong, help: ArgumentHelp("Configuration file whose control_socket to use.", valueName: "file"))
    var config: String?

    @Flag(help: "Print the gateway's answer as JSON instead of a table.")
    var json = false

    /// The socket path to use.
    func socketPath() throws -> String {
        if let socket { return socket }
        do throws(ConfigErrors) {
            let loaded: GatewayConfig
            if let config { loaded = try ConfigLoader.load(file: config) } else { loaded = try ConfigLoader.loadDefault() }
            return loaded.settings.controlSocket
        } catch {
            printError("scsigate: --config: \(error.errors.first?.description ?? "invalid configuration")")
            throw ExitCode(AdminExit.usage)
        }
    }

    /// Calls the gateway; on failure prints one line and exits with the documented code.
    func call(_ method: String, _ params: [String: JSONValue] = [:], timeoutMilliseconds: Int = 30_000) throws -> JSONValue {
        let client = ControlClient(path: try socketPath(), timeoutMilliseconds: timeoutMilliseconds)
        do throws(ControlClientError) {
            return try client.call(method, params)
        } catch {
            printError("scsigate: \(error.description)")
            switch error {
            case .unreachable, .protocolFailure: throw ExitCode(AdminExit.unreachable)
            case let .refused(rpc):
                throw ExitCode(rpc.code == ControlErrorCode.invalidParams ? AdminExit.usage : AdminExit.refused)
            }
        }
    }

    /// Prints `value` as JSON when --json was given; returns whether it did.
    func printJSONIfAsked(_ value: JSONValue) -> Bool {
        if json { print(value.pretty) }
        return json
    }
}

/// The guest address of a LUN on the command line.
struct LUNAddressOptions: ParsableArguments {
    @Argument(help: ArgumentHelp("Controller name (see `scsigate controller list`).", valueName: "controller"))
    var controller: String

    @Option(help: ArgumentHelp("Target id (PVSCSI: 0..max_targets-1; virtio: 0, may be left out).", valueName: "n"))
    var target: Int?

    @Option(help: ArgumentHelp("LUN (virtio-scsi: 0..16383; PVSCSI and virtio-blk: 0, may be left out).", valueName: "n"))
    var lun: Int?

    var params: [String: JSONValue] {
        var p: [String: JSONValue] = ["controller": .string(controller)]
        if let target { p["target"] = .number(target) }
        if let lun { p["lun"] = .number(lun) }
        return p
    }
}

/// `scsigate lun ...`
struct LUNCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "lun", abstract: "Add, remove, resize, list LUNs of a running gateway.",
        subcommands: [LUNAdd.self, LUNRemove.self, LUNResize.self, LUNList.self, LUNSetReadOnly.self, LUNSetLimits.self])
}

/// `scsigate lun add`
struct LUNAdd: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "add", abstract: "Add a LUN to a running controller (guests see it without a rescan).",
        discussion: """
            The options are the [[controller.lun]] keys of the configuration file and are checked by the same rules.
            Relative paths are taken relative to the gateway's state_dir, as in the file.
            Example: scsigate lun add scsi0 --lun 1 --backend file --path disk1.img --size 10GiB --create
            """)

    @OptionGroup var address: LUNAddressOptions
    @Option(help: ArgumentHelp("Back-end: file, block, iscsi or null.", valueName: "kind")) var backend: String
    @Option(help: ArgumentHelp("Backing file or block device (file, block).", valueName: "path")) var path: String?
    @Option(help: ArgumentHelp("Remote LUN iscsi://host[:port]/iqn.../lun (iscsi).", valueName: "url")) var url: String?
    @Option(help: ArgumentHelp("Size: bytes or 512M, 10GiB... (null; file with --create).", valueName: "size")) var size: String?
    @Option(help: ArgumentHelp("Logical block size, 512 or 4096.", valueName: "bytes")) var blockSize: Int?
    @Option(help: ArgumentHelp("Physical block size the guest sees (power of two, >= block size).", valueName: "bytes"))
    var physicalBlockSize: Int?
    @Flag(help: "Refuse writes.") var readOnly = false
    @Option(help: ArgumentHelp("Host caching: none (O_DIRECT) or writeback.", valueName: "mode")) var cache: String?
    @Flag(help: "Create a missing backing file, sparse, at --size.") var create = false
    @Option(help: ArgumentHelp("Unit serial number (default derived).", valueName: "text")) var serial: String?
    @Option(help: ArgumentHelp("NAA identifier, 16 hex digits (default derived).", valueName: "hex")) var wwn: String?
    @Option(help: ArgumentHelp("INQUIRY vendor.", valueName: "text")) var vendor: String?
    @Option(help: ArgumentHelp("INQUIRY product.", valueName: "text")) var product: String?
    @Option(help: ArgumentHelp("INQUIRY revision.", valueName: "text")) var revision: String?
    @Option(help: ArgumentHelp("iSCSI initiator IQN.", valueName: "iqn")) var initiatorName: String?
    @Option(help: ArgumentHelp("iSCSI CHAP user.", valueName: "name")) var chapUser: String?
    @Option(help: ArgumentHelp("File holding the CHAP secret.", valueName: "path")) var chapSecretFile: String?
    @Option(help: ArgumentHelp("Environment variable (of the gateway) holding the CHAP secret.", valueName: "name")) var chapSecretEnv: String?
    @Option(help: ArgumentHelp("iSCSI header digest: none or crc32c.", valueName: "kind")) var headerDigest: String?
    @OptionGroup var limits: LUNLimitOptions
    @Option(help: ArgumentHelp("When the back-end is out of space: report (fail writes at once) or hold (retry them for --out-of-space-hold seconds).",
                               valueName: "report|hold")) var outOfSpace: String?
    @Option(help: ArgumentHelp("Seconds a write is held while space is short (with --out-of-space hold; default 20).", valueName: "s"))
    var outOfSpaceHold: Int?
    @OptionGroup var options: ControlOptions

    func run() throws {
        var p = address.params
        p["backend"] = .string(backend)
        let strings: [(String, String?)] = [
            ("path", path), ("url", url), ("size", size), ("cache", cache), ("serial", serial), ("wwn", wwn),
            ("vendor", vendor), ("product", product), ("revision", revision), ("initiator_name", initiatorName),
            ("chap_user", chapUser), ("chap_secret_file", chapSecretFile), ("chap_secret_env", chapSecretEnv),
            ("header_digest", headerDigest),
        ]
        for (key, value) in strings { if let value { p[key] = .string(value) } }
        if let blockSize { p["block_size"] = .number(blockSize) }
        if let physicalBlockSize { p["physical_block_size"] = .number(physicalBlockSize) }
        if readOnly { p["read_only"] = .bool(true) }
        if create { p["create"] = .bool(true) }
        p.merge(limits.params) { $1 }
        if let outOfSpace { p["out_of_space"] = .string(outOfSpace) }
        if let outOfSpaceHold { p["out_of_space_hold"] = .number(outOfSpaceHold) }
        let result = try options.call("lun.add", p)
        if options.printJSONIfAsked(result) { return }
        print("added \(LUNText.describe(result))")
    }
}

/// `scsigate lun remove`
struct LUNRemove: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "remove", abstract: "Remove a LUN from a running controller.",
        discussion: "New commands to the LUN fail at once; commands in flight are waited for up to --wait-ms, then the back-end is closed once the front-end lets go of it.")

    @OptionGroup var address: LUNAddressOptions
    @Option(help: ArgumentHelp("Milliseconds to wait for in-flight I/O (0...600000).", valueName: "ms")) var waitMs: Int = 5000
    @OptionGroup var options: ControlOptions

    func run() throws {
        var p = address.params
        p["wait_ms"] = .number(waitMs)
        let result = try options.call("lun.remove", p, timeoutMilliseconds: 30_000 + max(0, waitMs))
        if options.printJSONIfAsked(result) { return }
        let removed = result["removed"].map(LUNText.describe) ?? "\(address.controller)"
        print("removed \(removed)")
        if result["drained"]?.boolValue == false {
            printError("scsigate: warning: \(result["in_flight"]?.intValue ?? 0) command(s) were still in flight after \(waitMs) ms; they complete against the removed LUN")
        }
    }
}

/// `scsigate lun resize`
struct LUNResize: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "resize", abstract: "Change a LUN's size (guests see CAPACITY DATA HAS CHANGED).",
        discussion: "File LUNs grow sparse; shrinking needs --force. For a block LUN, leave out --size to re-read the device's size.")

    @OptionGroup var address: LUNAddressOptions
    @Option(help: ArgumentHelp("New size: bytes or 512M, 20GiB...", valueName: "size")) var size: String?
    @Flag(help: "Allow a size below the current one (data past the new end is lost).") var force = false
    @OptionGroup var options: ControlOptions

    func run() throws {
        var p = address.params
        if let size { p["size"] = .string(size) }
        if force { p["force"] = .bool(true) }
        let result = try options.call("lun.resize", p)
        if options.printJSONIfAsked(result) { return }
        let old = result["old_size"]?.uint64Value ?? 0, new = result["size"]?.uint64Value ?? 0
        print("resized controller \(address.controller) target \(address.target ?? 0) lun \(address.lun ?? 0): \(ByteSize.format(old)) -> \(ByteSize.format(new))")
    }
}

/// on/off on the command line.
enum Switch: String, ExpressibleByArgument, CaseIterable {
    case on, off
}

/// `scsigate lun set-readonly`
struct LUNSetReadOnly: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "set-readonly", abstract: "Make a LUN read-only (on) or writable again (off).")

    @OptionGroup var address: LUNAddressOptions
    @Argument(help: ArgumentHelp("on or off.", valueName: "on|off")) var state: Switch
    @OptionGroup var options: ControlOptions

    func run() throws {
        var p = address.params
        p["read_only"] = .bool(state == .on)
        let result = try options.call("lun.set_readonly", p)
        if options.printJSONIfAsked(result) { return }
        print("\(state == .on ? "read-only" : "writable"): \(LUNText.describe(result))")
    }
}

/// The QoS options of `lun add` and `lun set-limits`: the `[[controller.lun]]` keys (0: no limit).
struct LUNLimitOptions: ParsableArguments {
    @Option(help: ArgumentHelp("Reads plus writes per second (0: no limit).", valueName: "n")) var iopsLimit: Int?
    @Option(help: ArgumentHelp("Reads per second.", valueName: "n")) var readIopsLimit: Int?
    @Option(help: ArgumentHelp("Writes per second.", valueName: "n")) var writeIopsLimit: Int?
    @Option(help: ArgumentHelp("Bytes read plus written per second: bytes or 200MiB... (0: no limit).", valueName: "size"))
    var bandwidthLimit: String?
    @Option(help: ArgumentHelp("Bytes read per second.", valueName: "size")) var readBandwidthLimit: String?
    @Option(help: ArgumentHelp("Bytes written per second.", valueName: "size")) var writeBandwidthLimit: String?
    @Option(help: ArgumentHelp("Seconds of unused capacity a LUN may use at once (0...3600, default 1).", valueName: "s"))
    var burstSeconds: Int?

    var params: [String: JSONValue] {
        var p: [String: JSONValue] = [:]
        for (key, value) in [("iops_limit", iopsLimit), ("read_iops_limit", readIopsLimit),
                             ("write_iops_limit", writeIopsLimit), ("burst_seconds", burstSeconds)] {
            if let value { p[key] = .number(value) }
        }
        for (key, value) in [("bandwidth_limit", bandwidthLimit), ("read_bandwidth_limit", readBandwidthLimit),
                             ("write_bandwidth_limit", writeBandwidthLimit)] {
            guard let value else { continue }
            // Plain digits go as a number (so that 0, "no limit", reads as in the config file).
            if let number = Int(value) { p[key] = .number(number) } else { p[key] = .string(value) }
        }
        return p
    }
}

/// `scsigate lun set-limits`
struct LUNSetLimits: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "set-limits", abstract: "Change a LUN's IOPS and bandwidth limits at run time.",
        discussion: """
            The options are the QoS keys of [[controller.lun]], checked by the same rules; options left out keep their value, 0 removes a limit.
            Requests over a limit wait (they are never failed). Example: scsigate lun set-limits scsi0 --lun 1 --iops-limit 2000 --bandwidth-limit 200MiB
            """)

    @OptionGroup var address: LUNAddressOptions
    @OptionGroup var limits: LUNLimitOptions
    @OptionGroup var options: ControlOptions

    func run() throws {
        let result = try options.call("lun.set_limits", address.params.merging(limits.params) { $1 })
        if options.printJSONIfAsked(result) { return }
        let policy = result["policy"]
        var parts: [String] = []
        for key in ["iops_limit", "read_iops_limit", "write_iops_limit"] {
            if let n = policy?[key]?.uint64Value, n > 0 { parts.append("\(key.replacingOccurrences(of: "_limit", with: "")) \(n)/s") }
        }
        for key in ["bandwidth_limit", "read_bandwidth_limit", "write_bandwidth_limit"] {
            if let n = policy?[key]?.uint64Value, n > 0 { parts.append("\(key.replacingOccurrences(of: "_limit", with: "")) \(ByteSize.format(n))/s") }
        }
        let limitsText = parts.isEmpty ? "no limit" : parts.joined(separator: ", ") + ", burst \(policy?["burst_seconds"]?.uint64Value ?? 1) s"
        print("limits of controller \(address.controller) target \(address.target ?? 0) lun \(address.lun ?? 0): \(limitsText)")
    }
}

/// `scsigate lun list`
struct LUNList: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "list", abstract: "List the LUNs of a running gateway.")

    @Argument(help: ArgumentHelp("Only this controller's LUNs.", valueName: "controller")) var controller: String?
    @OptionGroup var options: ControlOptions

    func run() throws {
        var p: [String: JSONValue] = [:]
        if let controller { p["controller"] = .string(controller) }
        let result = try options.call("lun.list", p)
        if options.printJSONIfAsked(result) { return }
        var rows = [["CONTROLLER", "TARGET", "LUN", "BACKEND", "SIZE", "BLOCK", "RO", "SERIAL", "SOURCE"]]
        for lun in result.arrayValue ?? [] {
            rows.append([
                lun["controller"]?.stringValue ?? "", "\(lun["target"]?.intValue ?? 0)", "\(lun["lun"]?.intValue ?? 0)",
                lun["backend"]?.stringValue ?? "",
                lun["online"]?.boolValue == false ? "offline" : ByteSize.format(lun["size"]?.uint64Value ?? 0),
                "\(lun["block_size"]?.intValue ?? 0)", lun["read_only"]?.boolValue == true ? "yes" : "no",
                lun["serial"]?.stringValue ?? "", lun["path"]?.stringValue ?? lun["url"]?.stringValue ?? "-",
            ])
        }
        print(Table.render(rows, numericColumns: [1, 2, 5]), terminator: "")
    }
}

/// `scsigate controller ...`
struct ControllerCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "controller", abstract: "Show the controllers of a running gateway.", subcommands: [ControllerList.self])
}

/// `scsigate controller list`
struct ControllerList: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "list", abstract: "List the controllers of a running gateway.")

    @OptionGroup var options: ControlOptions

    func run() throws {
        let result = try options.call("controller.list")
        if options.printJSONIfAsked(result) { return }
        var rows = [["NAME", "TRANSPORT", "LUNS", "QUEUES", "SOCKET"]]
        for c in result.arrayValue ?? [] {
            rows.append([c["name"]?.stringValue ?? "", c["transport"]?.stringValue ?? "", "\(c["luns"]?.intValue ?? 0)",
                         "\(c["queues"]?.intValue ?? 0)", c["socket"]?.stringValue ?? ""])
        }
        print(Table.render(rows, numericColumns: [2, 3]), terminator: "")
    }
}

/// `scsigate stats`
struct StatsCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "stats", abstract: "Show I/O counters per LUN and per queue.",
        discussion: "Latency columns are upper bounds of log2 histogram buckets. The same counters are served as Prometheus text on [gateway] stats_listen.")

    @Argument(help: ArgumentHelp("Only this controller.", valueName: "controller")) var controller: String?
    @OptionGroup var options: ControlOptions

    func run() throws {
        var p: [String: JSONValue] = [:]
        if let controller { p["controller"] = .string(controller) }
        let result = try options.call("stats.get", p)
        if options.printJSONIfAsked(result) { return }
        var rows = [["CONTROLLER", "TARGET", "LUN", "COMMANDS", "READS", "WRITES", "READ", "WRITTEN", "ERRORS", "INFLIGHT", "P50", "P99",
                     "THROTTLED", "SPACE-HELD"]]
        for l in result["luns"]?.arrayValue ?? [] {
            rows.append([l["controller"]?.stringValue ?? "", "\(l["target"]?.intValue ?? 0)", "\(l["lun"]?.intValue ?? 0)"]
                        + Self.counterColumns(l)
                        + [Table.duration(l["throttled_ns"]?.uint64Value ?? 0), "\(l["space_held_writes"]?.intValue ?? 0)"])
        }
        print(Table.render(rows, numericColumns: Array(1...13)), terminator: "")
        print("")
        var queues = [["CONTROLLER", "QUEUE", "COMMANDS", "READS", "WRITES", "READ", "WRITTEN", "ERRORS", "INFLIGHT", "P50", "P99"]]
        for q in result["queues"]?.arrayValue ?? [] {
            queues.append([q["controller"]?.stringValue ?? "", "\(q["queue"]?.intValue ?? 0)"] + Self.counterColumns(q))
        }
        print(Table.render(queues, numericColumns: Array(1...10)), terminator: "")
        var errorLines: [String] = []
        for l in result["luns"]?.arrayValue ?? [] {
            for (key, value) in (l["errors_by_sense_key"]?.objectValue ?? [:]).sorted(by: { $0.key < $1.key }) {
                errorLines.append("  \(l["controller"]?.stringValue ?? "") target \(l["target"]?.intValue ?? 0) lun \(l["lun"]?.intValue ?? 0): \(key): \(value.intValue ?? 0)")
            }
        }
        if !errorLines.isEmpty {
            print("\nCHECK CONDITION by sense key:")
            for line in errorLines { print(line) }
        }
    }

    static func counterColumns(_ c: JSONValue) -> [String] {
        func n(_ key: String) -> String { "\(c[key]?.intValue ?? 0)" }
        func latency(_ key: String) -> String {
            guard let nanos = c["latency"]?[key]?.uint64Value else { return "-" }
            return Table.duration(nanos)
        }
        return [n("commands"), n("reads"), n("writes"), ByteSize.format(c["read_bytes"]?.uint64Value ?? 0),
                ByteSize.format(c["write_bytes"]?.uint64Value ?? 0), n("errors"), n("in_flight"),
                latency("p50_ns"), latency("p99_ns")]
    }
}

/// `scsigate config ...`
struct ConfigCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "config", abstract: "Save the running configuration, or reload the configuration file.",
        subcommands: [ConfigSave.self, ConfigReload.self])
}

/// `scsigate config reload`
struct ConfigReload: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "reload", abstract: "Read the configuration file again and apply the LUN changes (as SIGHUP does).",
        discussion: "The gateway re-reads the file `serve --config` was started with and validates it fully. LUNs added, removed, grown and read_only changes are applied as the lun commands would; any other change (a [gateway] key, a controller added, removed or changed, a LUN's back-end, path, block size or identity, a shrink) is refused, naming the controller, LUN and key. When anything is invalid or refused, nothing is applied (exit 1).")

    @OptionGroup var options: ControlOptions

    func run() throws {
        let result = try options.call("config.reload", [:], timeoutMilliseconds: 120_000)
        if options.printJSONIfAsked(result) { return }
        let changes = result["changes"]?.arrayValue ?? []
        print("reloaded \(result["path"]?.stringValue ?? ""): \(changes.isEmpty ? "no changes" : "\(changes.count) change(s)")")
        for change in changes { print("  " + (change.stringValue ?? "")) }
    }
}

/// `scsigate config save`
struct ConfigSave: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "save", abstract: "Write the running LUN map as a TOML file that `serve --config` starts from.",
        discussion: "Written atomically (temporary file, fsync, rename, fsync of the directory). Without --output, the gateway writes the file it was started from, or state_dir/scsigate.toml when it runs the built-in default.")

    @Option(name: .shortAndLong, help: ArgumentHelp("File to write (relative to the current directory).", valueName: "file"))
    var output: String?
    @OptionGroup var options: ControlOptions

    func run() throws {
        var p: [String: JSONValue] = [:]
        if let output {
            p["path"] = .string(output.hasPrefix("/") ? output : FileManager.default.currentDirectoryPath + "/" + output)
        }
        let result = try options.call("config.save", p)
        if options.printJSONIfAsked(result) { return }
        print("saved \(result["luns"]?.intValue ?? 0) LUN(s) to \(result["path"]?.stringValue ?? "")")
    }
}

/// One-line descriptions of LUNs from `lun.list` entries.
enum LUNText {
    static func describe(_ lun: JSONValue) -> String {
        var text = "controller \(lun["controller"]?.stringValue ?? "") target \(lun["target"]?.intValue ?? 0) lun \(lun["lun"]?.intValue ?? 0)"
        let backend = lun["backend"]?.stringValue ?? ""
        text += ": \(backend)"
        if let path = lun["path"]?.stringValue { text += " \(path)" }
        if let url = lun["url"]?.stringValue { text += " \(url)" }
        text += ", \(ByteSize.format(lun["size"]?.uint64Value ?? 0)), \(lun["block_size"]?.intValue ?? 0)-byte blocks"
        if lun["read_only"]?.boolValue == true { text += ", read-only" }
        if let serial = lun["serial"]?.stringValue { text += ", serial \(serial)" }
        return text
    }
}

/// Plain text tables: columns padded to their widest cell, numbers right-aligned.
enum Table {
    static func render(_ rows: [[String]], numericColumns: [Int] = []) -> String {
        guard let header = rows.first else { return "" }
        var widths = header.map(\.count)
        for row in rows { for (i, cell) in row.enumerated() where i < widths.count { widths[i] = max(widths[i], cell.count) } }
        var out = ""
        for row in rows {
            var cells: [String] = []
            for (i, cell) in row.enumerated() {
                let pad = String(repeating: " ", count: widths[i] - cell.count)
                cells.append(numericColumns.contains(i) ? pad + cell : (i == row.count - 1 ? cell : cell + pad))
            }
            out += cells.joined(separator: "  ") + "\n"
        }
        return out
    }

    /// 1.0us, 250us, 4.1ms, 2.0s.
    static func duration(_ nanos: UInt64) -> String {
        let value = Double(nanos)
        if value < 1_000_000 { return String(format: "%.0fus", value / 1000) }
        if value < 1_000_000_000 { return String(format: "%.1fms", value / 1_000_000) }
        return String(format: "%.1fs", value / 1_000_000_000)
    }
}
