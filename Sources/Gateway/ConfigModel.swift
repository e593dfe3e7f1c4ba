/// The validated gateway configuration: global settings and the controllers with their LUN maps.
///
/// Produced by `ConfigLoader`; every value here has passed validation, and relative paths have
/// been resolved against `settings.stateDirectory`.
public struct GatewayConfig: Sendable, Equatable {
    /// The `[gateway]` table.
    public var settings: GatewaySettings
    /// The `[[controller]]` tables, in file order.
    public var controllers: [ControllerConfig]
    /// Where the configuration came from (for messages).
    public var source: String

    /// Creates a configuration.
    public init(settings: GatewaySettings, controllers: [ControllerConfig], source: String) {
        self.settings = settings
        self.controllers = controllers
        self.source = source
    }

    /// Total number of LUNs over every controller.
    public var lunCount: Int { controllers.reduce(0) { $0 + $1.luns.count } }
}

/// Log verbosity, as spelled in the config and on the command line.
public enum LogLevel: String, Sendable, CaseIterable, Equatable {
    case trace, debug, info, notice, warning, error, critical
}

/// The `[gateway]` table: process-wide settings.
public struct GatewaySettings: Sendable, Equatable {
    /// Directory for state (default backing files, saved configs). Default `/var/lib/scsigate`.
    public var stateDirectory: String
    /// Path of the JSON-RPC control socket. Default `/run/scsigate/control.sock`.
    public var controlSocket: String
    /// Log level. Default `info`.
    public var logLevel: LogLevel
    /// Optional `host:port` for the Prometheus text endpoint.
    public var statsListen: ListenAddress?
    /// Default permission bits of controller sockets (a controller's `socket_mode` overrides it). Default 0o600.
    public var socketMode: UInt32
    /// Default group of controller sockets (a controller's `socket_group` overrides it); nil: the gateway's group.
    public var socketGroup: String?

    /// Creates settings.
    public init(stateDirectory: String = GatewaySettings.defaultStateDirectory,
                controlSocket: String = GatewaySettings.defaultControlSocket,
                logLevel: LogLevel = .info, statsListen: ListenAddress? = nil,
                socketMode: UInt32 = 0o600, socketGroup: String? = nil) {
        self.stateDirectory = stateDirectory
        self.controlSocket = controlSocket
        self.logLevel = logLevel
        self.statsListen = statsListen
        self.socketMode = socketMode
        self.socketGroup = socketGroup
    }

    /// Default state directory.
    public static let defaultStateDirectory = "/var/lib/scsigate"
    /// Default control socket path.
    public static let defaultControlSocket = "/run/scsigate/control.sock"
}

/// A TCP listen address `host:port` (`[v6]:port` for IPv6; an empty host means every address).
public struct ListenAddress: Sendable, Equatable, CustomStringConvertible {
    /// Host name or address literal (without brackets); empty for every address.
    public var host: String
    /// TCP port, 1...65535.
    public var port: UInt16

    /// Creates an address.
    public init(host: String, port: UInt16) {
        self.host = host
        self.port = port
    }

    /// Parses `host:port`, `[v6]:port` or `:port`; returns a reason on failure.
    public static func parse(_ text: String) -> Result<ListenAddress, ConfigValueError> {
        let hostPart: Substring
        let portPart: Substring
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]") else {
                return .failure(ConfigValueError("missing ']' after the IPv6 address"))
            }
            hostPart = text[text.index(after: text.startIndex)..<close]
            let rest = text[text.index(after: close)...]
            guard rest.hasPrefix(":") else { return .failure(ConfigValueError("expected ':port' after ']'")) }
            portPart = rest.dropFirst()
        } else {
            guard let colon = text.lastIndex(of: ":") else {
                return .failure(ConfigValueError("expected host:port, e.g. \"127.0.0.1:9100\""))
            }
            hostPart = text[..<colon]
            portPart = text[text.index(after: colon)...]
            if hostPart.contains(":") {
                return .failure(ConfigValueError("put IPv6 addresses in brackets, e.g. \"[::1]:9100\""))
            }
        }
        guard let port = UInt16(portPart), port > 0 else {
            return .failure(ConfigValueError("port '\(portPart)' must be a number between 1 and 65535"))
        }
        if hostPart.contains(where: { $0 == " " || $0 == "/" }) {
            return .failure(ConfigValueError("host '\(hostPart)' is not a host name or address"))
        }
        return .success(ListenAddress(host: String(hostPart), port: port))
    }

    public var description: String {
        host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
    }
}

/// How guests reach a controller.
public enum TransportKind: String, Sendable, CaseIterable, Equatable {
    /// virtio-scsi over vhost-user (`-device vhost-user-scsi-pci`).
    case vhostUserSCSI = "vhost-user-scsi"
    /// virtio-blk over vhost-user (`-device vhost-user-blk-pci`): exactly one LUN.
    case vhostUserBlk = "vhost-user-blk"
    /// VMware PVSCSI over vfio-user (`-device vfio-user-pci`).
    case pvscsi = "pvscsi"
    /// virtio-scsi as a virtio-pci function over vfio-user (`-device vfio-user-pci`).
    case vfioUserVirtioSCSI = "vfio-user-virtio-scsi"
    /// virtio-blk as a virtio-pci function over vfio-user (`-device vfio-user-pci`): exactly one LUN.
    case vfioUserVirtioBlk = "vfio-user-virtio-blk"

    /// The device model a transport serves.
    public enum Device: Sendable, Equatable {
        /// virtio-scsi: target 0, LUNs 0...16383, request queues.
        case virtioSCSI
        /// virtio-blk: one disk, request queues.
        case virtioBlk
        /// PVSCSI: LUN 0 of targets 0..<max_targets, one request ring.
        case pvscsi
    }

    /// The device model this transport serves.
    public var device: Device {
        switch self {
        case .vhostUserSCSI, .vfioUserVirtioSCSI: .virtioSCSI
        case .vhostUserBlk, .vfioUserVirtioBlk: .virtioBlk
        case .pvscsi: .pvscsi
        }
    }

    /// Whether the transport carries SCSI commands (targets and LUNs) rather than bare block I/O.
    public var isSCSI: Bool { device != .virtioBlk }

    /// Whether the device is a virtio device (request queues, `queue_size`, `io_threads`, ...).
    public var isVirtio: Bool { device != .pvscsi }

    /// The transports serving `device`, as the config spells them (for messages).
    public static func names(serving device: Device) -> String {
        allCases.filter { $0.device == device }.map(\.rawValue).joined(separator: " and ")
    }

    /// How a LUN entry's (target, lun) becomes a LUN of the controller's one `SCSITarget`:
    /// virtio-scsi serves target 0 with LUNs 0...16383; PVSCSI (as Linux's vmw_pvscsi sees it) serves
    /// LUN 0 of targets 0...63, and PVSCSI target n is LUN n of the SCSI target; virtio-blk is LUN 0.
    public func coreLUN(target: Int, lun: Int) -> Int {
        switch device {
        case .virtioSCSI: return lun
        case .virtioBlk: return 0
        case .pvscsi: return target
        }
    }
}

/// A `[[controller]]` table: one front-end device with its socket and LUN map.
public struct ControllerConfig: Sendable, Equatable {
    /// Unique name (letters, digits, `-`, `_`, `.`; up to 32 characters).
    public var name: String
    /// The transport.
    public var transport: TransportKind
    /// Absolute path of the listening UNIX socket the VMM connects to.
    public var socket: String
    /// Permission bits of the socket (default: `[gateway] socket_mode`, 0o600).
    public var socketMode: UInt32
    /// Group the socket is given (`chown`), so a VMM running as another user in that group can connect
    /// (e.g. "libvirt-qemu" or "kvm" with `socket_mode = "0660"`); nil: the gateway's own group.
    public var socketGroup: String?
    /// Request queues (virtio transports; 1 for pvscsi, which has one request ring).
    public var queues: Int
    /// Virtqueue size, a power of two (virtio transports).
    public var queueSize: Int
    /// Adaptive polling budget in microseconds after the last work before an event loop sleeps (0: never poll).
    public var pollMicroseconds: Int
    /// Announce added/removed LUNs as they happen (virtio-scsi F_HOTPLUG events, PVSCSI hotplug
    /// messages); when false guests learn of them from unit attentions. Resizes are always announced.
    public var hotplug: Bool
    /// Largest number of data segments per request announced to the guest (virtio seg_max).
    public var segmentMax: Int
    /// virtio-blk: announce DISCARD.
    public var discard: Bool
    /// virtio-blk: announce WRITE_ZEROES.
    public var writeZeroes: Bool
    /// Event-loop threads the request queues are spread over (virtio transports; 1...queues).
    public var ioThreads: Int
    /// PVSCSI: targets the adapter reports (Linux scans targets 0..<maxTargets).
    public var maxTargets: Int
    /// The LUN map.
    public var luns: [LUNConfig]

    /// Creates a controller with defaults for the optional settings.
    public init(name: String, transport: TransportKind, socket: String, socketMode: UInt32 = 0o600,
                socketGroup: String? = nil, queues: Int = 1, queueSize: Int = 128, pollMicroseconds: Int = 50, hotplug: Bool = true,
                segmentMax: Int? = nil, discard: Bool = true, writeZeroes: Bool = true, ioThreads: Int = 1,
                maxTargets: Int = 16, luns: [LUNConfig] = []) {
        self.name = name
        self.transport = transport
        self.socket = socket
        self.socketMode = socketMode
        self.socketGroup = socketGroup
        self.queues = queues
        self.queueSize = queueSize
        self.pollMicroseconds = pollMicroseconds
        self.hotplug = hotplug
        self.segmentMax = segmentMax ?? max(1, queueSize - 2)
        self.discard = discard
        self.writeZeroes = writeZeroes
        self.ioThreads = ioThreads
        self.maxTargets = maxTargets
        self.luns = luns
    }
}

/// Kind of store behind a LUN.
public enum BackendKind: String, Sendable, CaseIterable, Equatable {
    /// A regular file (created sparse when `create = true` and it does not exist).
    case file
    /// A block device.
    case block
    /// A LUN on a remote iSCSI target.
    case iscsi
    /// Discards writes, reads zeroes (benchmarks, tests).
    case null
}

/// Host caching of a file or block back-end.
public enum CacheMode: String, Sendable, CaseIterable, Equatable {
    /// O_DIRECT: no host page cache.
    case none
    /// Buffered I/O through the host page cache; flush makes it stable.
    case writeback
}

/// A `[[controller.lun]]` table: one logical unit and its back-end.
public struct LUNConfig: Sendable, Equatable {
    /// Target id the guest sees: 0 for virtio-scsi and virtio-blk, 0..<max_targets for PVSCSI.
    public var target: Int
    /// LUN the guest sees: 0...16383 for virtio-scsi, 0 for PVSCSI and virtio-blk.
    public var lun: Int
    /// Back-end kind.
    public var backend: BackendKind
    /// Absolute path (file and block back-ends).
    public var path: String?
    /// Size in bytes (required for `null` and for `file` with `create = true`).
    public var size: UInt64?
    /// Logical block size, 512 or 4096.
    public var blockSize: Int
    /// Physical block size reported to the guest; nil: the device's own (block), else `blockSize`.
    public var physicalBlockSize: Int?
    /// Refuse writes.
    public var readOnly: Bool
    /// Host caching (file and block back-ends).
    public var cache: CacheMode
    /// Create a missing backing file, sparse, at `size` (file back-end).
    public var create: Bool
    /// Unit serial number; nil to derive one from the controller name and address.
    public var serial: String?
    /// NAA identifier (WWN); nil to derive one.
    public var wwn: UInt64?
    /// INQUIRY vendor (up to 8 characters); nil for the default.
    public var vendor: String?
    /// INQUIRY product (up to 16 characters); nil for the default.
    public var product: String?
    /// INQUIRY revision (up to 4 characters); nil for the default.
    public var revision: String?
    /// Remote target settings (iscsi back-end only).
    public var iscsi: ISCSIConfig?
    /// QoS limits and the out-of-space policy (see `LUNPolicyConfig`).
    public var policy = LUNPolicyConfig()

    /// Creates a LUN entry with defaults for the optional settings.
    public init(target: Int = 0, lun: Int, backend: BackendKind, path: String? = nil, size: UInt64? = nil,
                blockSize: Int = 512, readOnly: Bool = false, cache: CacheMode = .none, create: Bool = false,
                serial: String? = nil, wwn: UInt64? = nil, vendor: String? = nil, product: String? = nil,
                revision: String? = nil, iscsi: ISCSIConfig? = nil, physicalBlockSize: Int? = nil) {
        self.target = target
        self.lun = lun
        self.backend = backend
        self.path = path
        self.size = size
        self.blockSize = blockSize
        self.physicalBlockSize = physicalBlockSize
        self.readOnly = readOnly
        self.cache = cache
        self.create = create
        self.serial = serial
        self.wwn = wwn
        self.vendor = vendor
        self.product = product
        self.revision = revision
        self.iscsi = iscsi
    }
}

/// iSCSI header digest (RFC 7143 HeaderDigest), as libiscsi negotiates it.
public enum HeaderDigest: String, Sendable, CaseIterable, Equatable {
    /// No digest.
    case none = "none"
    /// CRC32C over every PDU header.
    case crc32c = "crc32c"
}

/// iSCSI data digest (RFC 7143 DataDigest). libiscsi negotiates only `None`.
public enum DataDigest: String, Sendable, CaseIterable, Equatable {
    /// No digest.
    case none = "none"
}

/// Where the CHAP secret comes from (never from the config file itself, never logged).
public enum CHAPSecretLocation: Sendable, Equatable {
    /// Read from this file (first line, trailing newline removed).
    case file(String)
    /// Read from this environment variable.
    case environment(String)
}

/// Settings of an iSCSI-backed LUN.
public struct ISCSIConfig: Sendable, Equatable {
    /// The remote LUN.
    public var url: ISCSIAddress
    /// Our initiator IQN.
    public var initiatorName: String
    /// CHAP user name, when the target requires CHAP.
    public var chapUser: String?
    /// CHAP secret source (set exactly when `chapUser` is).
    public var chapSecret: CHAPSecretLocation?
    /// Header digest.
    public var headerDigest: HeaderDigest
    /// Data digest.
    public var dataDigest: DataDigest
    /// Outage the guest does not see, in seconds (commands are retried until then).
    public var timeoutSeconds: Int
    /// First reconnect delay after a connection loss, in milliseconds (doubles up to `reconnectMaxMilliseconds`).
    public var reconnectMinMilliseconds: Int
    /// Longest reconnect delay, in milliseconds.
    public var reconnectMaxMilliseconds: Int

    /// Default initiator name.
    public static let defaultInitiatorName = "iqn.2026-11.org.scsigate:initiator"

    /// Creates settings.
    public init(url: ISCSIAddress, initiatorName: String = ISCSIConfig.defaultInitiatorName, chapUser: String? = nil,
                chapSecret: CHAPSecretLocation? = nil, headerDigest: HeaderDigest = .none,
                dataDigest: DataDigest = .none, timeoutSeconds: Int = 30, reconnectMinMilliseconds: Int = 100,
                reconnectMaxMilliseconds: Int = 2000) {
        self.url = url
        self.initiatorName = initiatorName
        self.chapUser = chapUser
        self.chapSecret = chapSecret
        self.headerDigest = headerDigest
        self.dataDigest = dataDigest
        self.timeoutSeconds = timeoutSeconds
        self.reconnectMinMilliseconds = reconnectMinMilliseconds
        self.reconnectMaxMilliseconds = reconnectMaxMilliseconds
    }
}
