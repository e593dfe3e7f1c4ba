/// The semantic validation pass: turns the TOML tree into a `GatewayConfig`, reporting every problem.
import Backends
import TOMLKit

struct ConfigValidator {
    let validation: Validation

    /// A validated controller with the key paths of it and its LUNs (for cross-check messages).
    struct ParsedController {
        var config: ControllerConfig
        var path: ConfigKeyPath
        var lunPaths: [ConfigKeyPath]
    }

    static let rootKeys = ["gateway", "controller"]
    static let gatewayKeys = ["state_dir", "control_socket", "log_level", "stats_listen", "socket_mode", "socket_group"]
    static let controllerKeys = ["name", "transport", "socket", "socket_mode", "socket_group", "queues", "queue_size", "poll_us",
                                 "hotplug", "seg_max", "discard", "write_zeroes", "io_threads", "max_targets", "lun"]
    static let lunKeys = ["target", "lun", "backend", "path", "url", "size", "block_size", "physical_block_size", "read_only", "cache",
                          "create", "serial", "wwn", "vendor", "product", "revision", "initiator_name", "chap_user",
                          "chap_secret_file", "chap_secret_env", "header_digest", "data_digest", "timeout",
                          "reconnect_min_ms", "reconnect_max_ms"] + LUNPolicyConfig.keys
    static let iscsiOnlyKeys = ["url", "initiator_name", "chap_user", "chap_secret_file", "chap_secret_env",
                                "header_digest", "data_digest", "timeout", "reconnect_min_ms", "reconnect_max_ms"]

    /// Longest UNIX socket path (sun_path is 108 bytes with the terminating NUL).
    static let maximumSocketPathBytes = 107

    func validate(_ root: TOMLTable) -> GatewayConfig {
        let reader = TableReader(table: root, path: .root, validation: validation)
        reader.rejectUnknownKeys(allowed: Self.rootKeys, hints: [
            "lun": "LUNs go in [[controller.lun]] tables after their [[controller]]",
            "controllers": "controllers are [[controller]] tables",
        ])
        let settings = validateGateway(reader)
        var controllers: [ParsedController] = []
        let controllerTables = reader.tables("controller")
        if controllerTables.isEmpty && !reader.has("controller") {
            validation.fail(ConfigKeyPath.root.appending("controller"),
                            "at least one [[controller]] is required")
        }
        for (index, table) in controllerTables {
            let path = ConfigKeyPath.root.appending("controller").appending(index: index)
            if let controller = validateController(TableReader(table: table, path: path, validation: validation),
                                                   settings: settings) {
                controllers.append(controller)
            }
        }
        checkCrossReferences(controllers, settings: settings)
        return GatewayConfig(settings: settings, controllers: controllers.map(\.config), source: validation.source)
    }

    // MARK: - [gateway]

    private func validateGateway(_ root: TableReader) -> GatewaySettings {
        var settings = GatewaySettings()
        guard let table = root.subtable("gateway") else { return settings }
        let reader = TableReader(table: table, path: ConfigKeyPath.root.appending("gateway"), validation: validation)
        reader.rejectUnknownKeys(allowed: Self.gatewayKeys)
        if let dir = reader.nonEmptyString("state_dir") {
            if dir.hasPrefix("/") {
                settings.stateDirectory = Self.normalize(dir)
            } else {
                validation.fail(reader.keyPath("state_dir"), "must be an absolute path, found '\(dir)'")
            }
        }
        if let socket = reader.nonEmptyString("control_socket") {
            let resolved = Self.resolve(socket, against: settings.stateDirectory)
            if checkSocketPath(resolved, at: reader.keyPath("control_socket")) { settings.controlSocket = resolved }
        }
        if let level = reader.choice("log_level", LogLevel.self) { settings.logLevel = level }
        if let listen = reader.nonEmptyString("stats_listen") {
            switch ListenAddress.parse(listen) {
            case let .success(address): settings.statsListen = address
            case let .failure(error): validation.fail(reader.keyPath("stats_listen"), error.message)
            }
        }
        if reader.has("socket_mode") { settings.socketMode = parseSocketMode(reader) ?? settings.socketMode }
        if reader.has("socket_group") { settings.socketGroup = parseSocketGroup(reader) }
        return settings
    }

    // MARK: - [[controller]]

    private func validateController(_ reader: TableReader, settings: GatewaySettings) -> ParsedController? {
        reader.rejectUnknownKeys(allowed: Self.controllerKeys, hints: [
            "luns": "LUNs are [[controller.lun]] tables",
            "type": "did you mean 'transport'?",
        ])
        let name = reader.nonEmptyString("name", required: true)
        if let name, !Self.isValidName(name) {
            validation.fail(reader.keyPath("name"),
                            "'\(name)' must be 1 to 32 letters, digits, '-', '_' or '.'")
        }
        let transport = reader.choice("transport", TransportKind.self, required: true)
        let socketText = reader.nonEmptyString("socket", required: true)
        var socket: String? = nil
        if let socketText {
            let runtimeDirectory = Self.directory(of: settings.controlSocket)
            let resolved = Self.resolve(socketText, against: runtimeDirectory)
            if checkSocketPath(resolved, at: reader.keyPath("socket")) { socket = resolved }
        }
        var socketMode = settings.socketMode
        if reader.has("socket_mode") { socketMode = parseSocketMode(reader) ?? socketMode }
        var socketGroup = settings.socketGroup
        if reader.has("socket_group") { socketGroup = parseSocketGroup(reader) }
        let pollMicroseconds = reader.int("poll_us", range: 0...100_000) ?? 50

        var queues = 1
        var queueSize = 128
        var segmentMax: Int? = nil
        var hotplug = true
        var discard = true
        var writeZeroes = true
        var ioThreads = 1
        var maxTargets = 16
        if let transport {
            if transport.isVirtio {
                queues = reader.int("queues", range: 1...64) ?? 1
                if let size = reader.int("queue_size", range: 2...1024) {
                    if size & (size - 1) != 0 {
                        validation.fail(reader.keyPath("queue_size"), "must be a power of two, found \(size)")
                    } else {
                        queueSize = size
                    }
                }
                segmentMax = reader.int("seg_max", range: 1...1024)
                if let threads = reader.int("io_threads", range: 1...64) {
                    if threads > queues {
                        validation.fail(reader.keyPath("io_threads"), "must not exceed queues (\(queues)), found \(threads)")
                    } else {
                        ioThreads = threads
                    }
                }
                reader.rejectIfPresent("max_targets", "only for transport pvscsi")
            } else {
                reader.rejectIfPresent("queues", "not used by transport pvscsi (the guest driver sizes its one request ring)")
                reader.rejectIfPresent("queue_size", "not used by transport pvscsi (the guest driver sizes its rings)")
                reader.rejectIfPresent("seg_max", "not used by transport pvscsi")
                reader.rejectIfPresent("io_threads", "not used by transport pvscsi (one event-loop thread per adapter)")
                maxTargets = reader.int("max_targets", range: 1...64) ?? 16
            }
            if transport.isSCSI {
                hotplug = reader.bool("hotplug") ?? true
                let blk = TransportKind.names(serving: .virtioBlk)
                reader.rejectIfPresent("discard", "only for transports \(blk) (SCSI guests use UNMAP)")
                reader.rejectIfPresent("write_zeroes", "only for transports \(blk) (SCSI guests use WRITE SAME)")
            } else {
                reader.rejectIfPresent("hotplug", "not used by transport \(transport.rawValue) (one fixed disk; resize still reaches the guest)")
                discard = reader.bool("discard") ?? true
                writeZeroes = reader.bool("write_zeroes") ?? true
            }
        }

        var luns: [LUNConfig] = []
        var lunPaths: [ConfigKeyPath] = []
        let lunTables = reader.tables("lun")
        for (index, table) in lunTables {
            let path = reader.path.appending("lun").appending(index: index)
            if let lun = validateLUN(TableReader(table: table, path: path, validation: validation),
                                     transport: transport, maxTargets: maxTargets, settings: settings) {
                luns.append(lun)
                lunPaths.append(path)
            }
        }
        if let transport, transport.device == .virtioBlk && lunTables.count != 1 {
            validation.fail(reader.keyPath("lun"),
                            "a \(transport.rawValue) controller serves exactly one LUN, found \(lunTables.count)")
        }
        checkDuplicateAddresses(reader, lunTables: lunTables)

        guard let name, let transport, let socket else { return nil }
        let config = ControllerConfig(name: name, transport: transport, socket: socket, socketMode: socketMode,
                                socketGroup: socketGroup, queues: queues, queueSize: queueSize, pollMicroseconds: pollMicroseconds,
                                hotplug: hotplug, segmentMax: segmentMax, discard: discard, writeZeroes: writeZeroes,
                                ioThreads: ioThreads, maxTargets: maxTargets, luns: luns)
        return ParsedController(config: config, path: reader.path, lunPaths: lunPaths)
    }

    private func parseSocketMode(_ reader: TableReader) -> UInt32? {
        let path = reader.keyPath("socket_mode")
        let message = "must be permission bits such as 0o660 (integer) or \"0660\" (octal string)"
        if let value = reader.table["socket_mode"]?.int {
            guard (0...0o777).contains(value) else { validation.fail(path, message); return nil }
            return UInt32(value)
        }
        guard let text = reader.string("socket_mode") else { return nil }
        guard let value = UInt32(text.hasPrefix("0o") ? String(text.dropFirst(2)) : text, radix: 8), value <= 0o777 else {
            validation.fail(path, message + ", found '\(text)'")
            return nil
        }
        return value
    }

    /// `socket_group`: the name of a group that exists on this machine (checked here, so `check-config`
    /// and `serve` report a typo before QEMU fails to connect).
    private func parseSocketGroup(_ reader: TableReader) -> String? {
        guard let name = reader.nonEmptyString("socket_group") else { return nil }
        guard SocketOwnership.groupID(named: name) != nil else {
            validation.fail(reader.keyPath("socket_group"), "group '\(name)' does not exist on this machine")
            return nil
        }
        return name
    }

    // MARK: - [[controller.lun]]

    func validateLUN(_ reader: TableReader, transport: TransportKind?, maxTargets: Int,
                             settings: GatewaySettings) -> LUNConfig? {
        reader.rejectUnknownKeys(allowed: Self.lunKeys, hints: [
            "read-only": "did you mean 'read_only'?",
            "readonly": "did you mean 'read_only'?",
            "blocksize": "did you mean 'block_size'?",
            "chap_secret": "the secret never goes in the config: use chap_secret_file or chap_secret_env",
            "chap_password": "the secret never goes in the config: use chap_secret_file or chap_secret_env",
        ])
        let isBlk = transport?.device == .virtioBlk
        /// An address key that must be 0 on this transport (optional, default 0).
        func zero(_ key: String, _ reason: String) -> Int? {
            guard let value = reader.int(key) else { return reader.has(key) ? nil : 0 }
            if value != 0 {
                validation.fail(reader.keyPath(key), "must be 0: \(reason), found \(value)")
                return nil
            }
            return 0
        }
        let target: Int?
        let lun: Int?
        switch transport?.device {
        case .virtioBlk?:
            target = zero("target", "a \(transport!.rawValue) controller is one disk")
            lun = zero("lun", "a \(transport!.rawValue) controller is one disk")
        case .pvscsi?:
            target = reader.int("target", required: true, range: 0...(maxTargets - 1))
            lun = zero("lun", "guests address LUN 0 of each PVSCSI target; give each disk its own target")
        case .virtioSCSI?, nil:
            target = zero("target", "the virtio-scsi front-end serves target 0; give each disk its own lun")
            lun = reader.int("lun", required: true, range: 0...16383)
        }
        let backend = reader.choice("backend", BackendKind.self, required: true)
        let blockSize = reader.int("block_size").flatMap { size -> Int? in
            guard size == 512 || size == 4096 else {
                validation.fail(reader.keyPath("block_size"), "must be 512 or 4096, found \(size)")
                return nil
            }
            return size
        }
        let physicalBlockSize = reader.int("physical_block_size").flatMap { physical -> Int? in
            let logical = blockSize ?? 512
            guard (1...65536).contains(physical),
                  BackendSpec.isValidPhysicalBlockSize(UInt32(physical), logical: UInt32(logical)) else {
                validation.fail(reader.keyPath("physical_block_size"),
                                "must be a power of two from block_size (\(logical)) up to 65536, found \(physical)")
                return nil
            }
            return physical
        }
        let size = reader.size("size")
        let readOnly = reader.bool("read_only") ?? false
        let cache = reader.choice("cache", CacheMode.self)
        let create = reader.bool("create")
        var path: String? = nil
        var iscsi: ISCSIConfig? = nil

        switch backend {
        case .file?, .block?:
            if let text = reader.nonEmptyString("path", required: true) {
                path = Self.resolve(text, against: settings.stateDirectory)
            }
            for key in Self.iscsiOnlyKeys { reader.rejectIfPresent(key, "only for backend 'iscsi'") }
            if backend == .block {
                if create == true {
                    validation.fail(reader.keyPath("create"), "a block device cannot be created; remove 'create'")
                }
                reader.rejectIfPresent("size", "a block device's size comes from the device; remove 'size'")
            } else if create == true && size == nil && !reader.has("size") {
                validation.fail(reader.keyPath("size"), "required when create = true (the size of the new file)")
            }
        case .iscsi?:
            for key in ["path", "size", "create", "cache", "block_size", "physical_block_size"] {
                reader.rejectIfPresent(key, "not used by backend 'iscsi' (the remote LUN decides)")
            }
            iscsi = validateISCSI(reader, settings: settings)
        case .null?:
            for key in ["path", "create", "cache"] { reader.rejectIfPresent(key, "not used by backend 'null'") }
            for key in Self.iscsiOnlyKeys { reader.rejectIfPresent(key, "only for backend 'iscsi'") }
            if !reader.has("size") { validation.fail(reader.keyPath("size"), "required for backend 'null'") }
        case nil:
            break
        }

        if let size, let blockSize = blockSize ?? (reader.has("block_size") ? nil : 512),
           size % UInt64(blockSize) != 0 {
            validation.fail(reader.keyPath("size"),
                            "\(size) bytes is not a multiple of block_size \(blockSize)")
        }

        let serial = reader.nonEmptyString("serial")
        if let serial {
            let limit = isBlk ? 20 : 64
            if !Self.isPrintableASCII(serial) {
                validation.fail(reader.keyPath("serial"), "must be printable ASCII")
            } else if serial.utf8.count > limit {
                validation.fail(reader.keyPath("serial"), isBlk
                    ? "at most 20 characters for \(transport!.rawValue) (virtio-blk GET_ID), found \(serial.utf8.count)"
                    : "at most 64 characters, found \(serial.utf8.count)")
            }
        }
        var wwn: UInt64? = nil
        if let text = reader.nonEmptyString("wwn") {
            switch Self.parseWWN(text) {
            case let .success(value): wwn = value
            case let .failure(error): validation.fail(reader.keyPath("wwn"), error.message)
            }
        }
        let vendor = inquiryText(reader, "vendor", limit: 8)
        let product = inquiryText(reader, "product", limit: 16)
        let revision = inquiryText(reader, "revision", limit: 4)
        let policy = validatePolicy(reader, backend: backend)

        guard let target, let lun, let backend else { return nil }
        var config = LUNConfig(target: target, lun: lun, backend: backend, path: path, size: size,
                               blockSize: blockSize ?? 512, readOnly: readOnly, cache: cache ?? .none,
                               create: create ?? false, serial: serial, wwn: wwn, vendor: vendor, product: product,
                               revision: revision, iscsi: iscsi, physicalBlockSize: physicalBlockSize)
        config.policy = policy
        return config
    }

    private func inquiryText(_ reader: TableReader, _ key: String, limit: Int) -> String? {
        guard let text = reader.nonEmptyString(key) else { return nil }
        if !Self.isPrintableASCII(text) {
            validation.fail(reader.keyPath(key), "must be printable ASCII")
            return nil
        }
        if text.utf8.count > limit {
            validation.fail(reader.keyPath(key), "at most \(limit) characters (INQUIRY field), found \(text.utf8.count)")
            return nil
        }
        return text
    }

    private func validateISCSI(_ reader: TableReader, settings: GatewaySettings) -> ISCSIConfig? {
        var url: ISCSIAddress? = nil
        if let text = reader.nonEmptyString("url", required: true) {
            switch ISCSIAddress.parse(text) {
            case let .success(parsed): url = parsed
            case let .failure(error): validation.fail(reader.keyPath("url"), error.message)
            }
        }
        var initiator = ISCSIConfig.defaultInitiatorName
        if let name = reader.nonEmptyString("initiator_name") {
            if case let .failure(error) = ISCSIAddress.checkISCSIName(name, what: "initiator name") {
                validation.fail(reader.keyPath("initiator_name"), error.message)
            } else {
                initiator = name
            }
        }
        let user = reader.nonEmptyString("chap_user")
        let secretFile = reader.nonEmptyString("chap_secret_file")
        let secretEnv = reader.nonEmptyString("chap_secret_env")
        var secret: CHAPSecretLocation? = nil
        if secretFile != nil && secretEnv != nil {
            validation.fail(reader.keyPath("chap_secret_env"), "give either chap_secret_file or chap_secret_env, not both")
        } else if let secretFile {
            secret = .file(Self.resolve(secretFile, against: settings.stateDirectory))
        } else if let secretEnv {
            if Self.isEnvironmentName(secretEnv) {
                secret = .environment(secretEnv)
            } else {
                validation.fail(reader.keyPath("chap_secret_env"),
                                "'\(secretEnv)' is not an environment variable name (letters, digits, '_', not starting with a digit)")
            }
        }
        if user != nil && secretFile == nil && secretEnv == nil {
            validation.fail(reader.keyPath("chap_user"), "chap_user needs chap_secret_file or chap_secret_env")
        }
        if user == nil && (secretFile != nil || secretEnv != nil) {
            let key = secretFile != nil ? "chap_secret_file" : "chap_secret_env"
            validation.fail(reader.keyPath(key), "a CHAP secret needs chap_user")
        }
        let headerDigest = reader.choice("header_digest", HeaderDigest.self) ?? .none
        var dataDigest = DataDigest.none
        if let text = reader.string("data_digest") {
            if let value = DataDigest(rawValue: text) {
                dataDigest = value
            } else {
                validation.fail(reader.keyPath("data_digest"),
                                "'\(text)' is not supported: libiscsi negotiates no data digest, only 'none'")
            }
        }
        let timeout = reader.int("timeout", range: 1...3600) ?? 30
        let reconnectMin = reader.int("reconnect_min_ms", range: 10...600_000) ?? 100
        var reconnectMax = reader.int("reconnect_max_ms", range: 10...600_000) ?? max(2000, reconnectMin)
        if reconnectMax < reconnectMin {
            validation.fail(reader.keyPath("reconnect_max_ms"),
                            "must not be below reconnect_min_ms (\(reconnectMin)), found \(reconnectMax)")
            reconnectMax = reconnectMin
        }
        guard let url else { return nil }
        return ISCSIConfig(url: url, initiatorName: initiator, chapUser: user, chapSecret: secret,
                           headerDigest: headerDigest, dataDigest: dataDigest, timeoutSeconds: timeout,
                           reconnectMinMilliseconds: reconnectMin, reconnectMaxMilliseconds: reconnectMax)
    }

    // MARK: - Cross checks

    /// Duplicate (target, lun) within one controller.
    private func checkDuplicateAddresses(_ reader: TableReader, lunTables: [(Int, TOMLTable)]) {
        var seen: [String: Int] = [:]
        for (tableIndex, table) in lunTables {
            let path = reader.path.appending("lun").appending(index: tableIndex)
            guard let entry = TableReader(table: table, path: path, validation: validation).addressForDuplicateCheck()
            else { continue }
            let key = "\(entry.target):\(entry.lun)"
            if let first = seen[key] {
                validation.fail(path.appending("lun"),
                                "duplicate target \(entry.target) LUN \(entry.lun) in this controller (first at line \(first))")
            } else {
                seen[key] = validation.line(path)
            }
        }
    }

    /// Names, sockets, backing paths, iSCSI URLs, serials and WWNs must be unique across the file.
    private func checkCrossReferences(_ controllers: [ParsedController], settings: GatewaySettings) {
        var names: [String: Int] = [:]
        var sockets: [String: Int] = [
            settings.controlSocket: validation.line(ConfigKeyPath.root.appending("gateway").appending("control_socket")),
        ]
        var paths: [String: Int] = [:]
        var urls: [String: Int] = [:]
        var serials: [String: Int] = [:]
        var wwns: [UInt64: Int] = [:]

        func claim<K: Hashable>(_ key: K, in table: inout [K: Int], at path: ConfigKeyPath, _ message: (Int) -> String) {
            if let first = table[key] {
                validation.fail(path, message(first))
            } else {
                table[key] = validation.line(path)
            }
        }

        for parsed in controllers {
            let controller = parsed.config
            let path = parsed.path
            claim(controller.name, in: &names, at: path.appending("name")) {
                "duplicate controller name '\(controller.name)' (first at line \($0))"
            }
            claim(controller.socket, in: &sockets, at: path.appending("socket")) {
                "socket path '\(controller.socket)' is already used (line \($0))"
            }
            for (lun, lunPath) in zip(controller.luns, parsed.lunPaths) {
                if let file = lun.path {
                    claim(file, in: &paths, at: lunPath.appending("path")) { "'\(file)' already backs another LUN (line \($0))" }
                }
                if let url = lun.iscsi?.url.description {
                    claim(url, in: &urls, at: lunPath.appending("url")) {
                        "remote LUN '\(url)' already backs another LUN (line \($0))"
                    }
                }
                if let serial = lun.serial {
                    claim(serial, in: &serials, at: lunPath.appending("serial")) { "serial '\(serial)' is already used (line \($0))" }
                }
                if let wwn = lun.wwn {
                    claim(wwn, in: &wwns, at: lunPath.appending("wwn")) { "wwn is already used (line \($0))" }
                }
            }
        }
    }

    // MARK: - Value helpers

    static func isValidName(_ name: String) -> Bool {
        !name.isEmpty && name.utf8.count <= 32
            && name.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" || $0 == ".") }
    }

    static func isPrintableASCII(_ text: String) -> Bool {
        text.utf8.allSatisfy { $0 >= 0x20 && $0 <= 0x7E }
    }

    static func isEnvironmentName(_ name: String) -> Bool {
        guard let first = name.first, !(first.isASCII && first.isNumber) else { return false }
        return name.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "_") }
    }

    /// Parses a WWN: 16 hex digits of an 8-byte NAA identifier (NAA 2, 3 or 5), with optional `0x` or `naa.` prefix.
    static func parseWWN(_ text: String) -> Result<UInt64, ConfigValueError> {
        var digits = Substring(text.lowercased())
        if digits.hasPrefix("0x") { digits = digits.dropFirst(2) } else if digits.hasPrefix("naa.") { digits = digits.dropFirst(4) }
        digits = Substring(digits.filter { $0 != ":" })
        guard digits.count == 16, let value = UInt64(digits, radix: 16) else {
            return .failure(ConfigValueError("'\(text)' must be 16 hex digits of an 8-byte NAA identifier, e.g. \"5002538c40000001\""))
        }
        let naa = value >> 60
        guard naa == 2 || naa == 3 || naa == 5 else {
            return .failure(ConfigValueError("'\(text)' has NAA type \(naa); 8-byte identifiers use NAA 2, 3 or 5"))
        }
        return .success(value)
    }

    /// Returns the path if it fits sun_path, else reports it.
    private func checkSocketPath(_ path: String, at key: ConfigKeyPath) -> Bool {
        if path.utf8.count > Self.maximumSocketPathBytes {
            validation.fail(key, "socket path is \(path.utf8.count) bytes; UNIX sockets allow at most \(Self.maximumSocketPathBytes)")
            return false
        }
        if path.hasSuffix("/") {
            validation.fail(key, "'\(path)' names a directory, not a socket")
            return false
        }
        return true
    }

    /// `path` made absolute against `base` (already absolute paths are only normalised).
    static func resolve(_ path: String, against base: String) -> String {
        if path.hasPrefix("/") { return normalize(path) }
        return normalize(base + "/" + path)
    }

    /// Collapses `//` and `/./`, drops a trailing `/` (keeps `..` as written).
    static func normalize(_ path: String) -> String {
        let parts = path.split(separator: "/", omittingEmptySubsequences: true).filter { $0 != "." }
        let joined = "/" + parts.joined(separator: "/")
        return joined
    }

    /// The directory part of an absolute path.
    static func directory(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/"), slash != path.startIndex else { return "/" }
        return String(path[..<slash])
    }
}

extension TableReader {
    /// (target, lun) of a LUN table for the duplicate check, read silently (errors were reported already).
    func addressForDuplicateCheck() -> (target: Int, lun: Int)? {
        let target = table["target"].map { $0.int } ?? 0
        let lun = table["lun"].map { $0.int } ?? 0
        guard let target, let lun else { return nil }
        return (target, lun)
    }
}
