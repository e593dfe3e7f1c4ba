import Backends
import BlockIO
import ISCSIBackend
import Logging
import SCSI

/// An open back-end together with the LUN entry it serves.
public struct OpenedBackend: Sendable {
    /// The back-end (file, block device or null; the iSCSI back-end adds a case to `AnyBlockBackend`).
    public var backend: AnyBlockBackend
    /// Size and capabilities as opened.
    public var geometry: BlockGeometry

    /// Wraps an open back-end.
    public init(backend: AnyBlockBackend) {
        self.backend = backend
        self.geometry = backend.geometry
    }
}

extension OpenedBackend {
    /// For a remote (iSCSI) LUN: follows capacity changes the back-end discovers (a remote CAPACITY DATA
    /// HAS CHANGED, or a different capacity found at a re-login) with `target`'s resize event for `unit`
    /// (CAPACITY DATA HAS CHANGED for the initiators, `.capacityChanged` for every front-end, virtio-blk
    /// included). File, block and null back-ends are resized by the operator: nothing to follow.
    public func followRemoteCapacity(of unit: LogicalUnit, in target: SCSITarget) {
        guard case .iscsi(let remote) = backend else { return }
        remote.addGeometryObserver { [weak unit] geometry in
            guard let unit else { return }
            target.followCapacity(of: unit, blockCount: geometry.blockCount)
        }
    }
}

/// Why a LUN's back-end could not be opened: names the controller, address and cause.
public struct BackendOpeningError: Error, Sendable, CustomStringConvertible {
    /// `controller scsi0 target 0 lun 1`.
    public var lun: String
    /// The cause (path and reason).
    public var reason: String
    /// Whether the gateway may start without this LUN (remote back-ends that come online later).
    public var mayStartWithout: Bool
    /// The back-end's own error, when opening failed there (lets the control plane tell a missing
    /// file or a held lock from other failures).
    public var cause: BackendOpenError?

    /// Creates an error.
    public init(lun: String, reason: String, mayStartWithout: Bool = false, cause: BackendOpenError? = nil) {
        self.lun = lun
        self.reason = reason
        self.mayStartWithout = mayStartWithout
        self.cause = cause
    }

    public var description: String { "\(lun): \(reason)" }
}

/// Opens back-ends for LUN entries. The gateway calls it at start and the control plane on hotplug;
/// tests substitute their own.
public protocol BackendOpener: Sendable {
    /// Opens the back-end of `lun` on `controller`.
    func open(_ lun: LUNConfig, on controller: ControllerConfig) throws(BackendOpeningError) -> OpenedBackend
}

/// The back-ends built into this binary (Backends module: file, block, null).
public struct StandardBackendOpener: BackendOpener {
    /// Where the iSCSI back-end's own lines go (the gateway's logger: one format for every line).
    public var logger: Logger

    /// Creates the opener; `logger` receives the iSCSI back-end's log lines.
    public init(logger: Logger = Logger(label: "scsigate")) { self.logger = logger }

    /// The `BackendSpec` for a file, block or null LUN (nil for iSCSI).
    public static func spec(for lun: LUNConfig, on controller: ControllerConfig) -> BackendSpec? {
        let kind: BackendSpec.Kind
        switch lun.backend {
        case .file: kind = .file
        case .block: kind = .block
        case .null: kind = .null
        case .iscsi: return nil
        }
        // One channel per queue group holds at most one ring's worth of requests.
        let depth = controller.transport.isVirtio ? controller.queueSize : 1024
        return BackendSpec(kind: kind, path: lun.path ?? "", size: lun.size ?? 0,
                           logicalBlockSize: UInt32(lun.blockSize), readOnly: lun.readOnly,
                           cache: lun.cache == .writeback ? .writeback : .none, create: lun.create,
                           queueDepth: depth, workerThreads: 2,
                           physicalBlockSize: lun.physicalBlockSize.map { UInt32($0) })
    }

    public func open(_ lun: LUNConfig, on controller: ControllerConfig) throws(BackendOpeningError) -> OpenedBackend {
        let name = "controller \(controller.name) target \(lun.target) lun \(lun.lun)"
        guard let spec = Self.spec(for: lun, on: controller) else {
            var logger = self.logger
            logger[metadataKey: "controller"] = .string(controller.name)
            logger[metadataKey: "lun"] = .string("\(lun.target)/\(lun.lun)")
            return try Self.openISCSI(lun, name: name, queueDepth: controller.transport.isVirtio ? controller.queueSize : 1024,
                                      log: logger)
        }
        do {
            return OpenedBackend(backend: try AnyBlockBackend.open(spec))
        } catch {
            throw BackendOpeningError(lun: name, reason: error.description, cause: error)
        }
    }
}

extension StandardBackendOpener {
    /// Opens an iSCSI LUN: validates its settings (each error names its key), then logs in once to read
    /// the remote geometry. An unreachable target is reported with `mayStartWithout`, so the gateway
    /// starts the other LUNs and retries this one.
    static func openISCSI(_ lun: LUNConfig, name: String, queueDepth: Int, log: Logger? = nil) throws(BackendOpeningError) -> OpenedBackend {
        guard let settings = lun.iscsi else {
            throw BackendOpeningError(lun: name, reason: "key 'url': an iscsi LUN needs a url")
        }
        let secret: CHAPSecretSource?
        switch settings.chapSecret {
        case .file(let path)?: secret = .file(path)
        case .environment(let variable)?: secret = .environment(variable)
        case nil: secret = nil
        }
        let config: ISCSIBackendConfig
        do {
            config = try ISCSIBackendConfig(
                url: settings.url.description, initiatorName: settings.initiatorName, chapUser: settings.chapUser,
                chapSecretSource: secret, headerDigest: settings.headerDigest.rawValue,
                timeoutSeconds: settings.timeoutSeconds,
                reconnectBackoff: ISCSIReconnectBackoff(initialMilliseconds: UInt32(clamping: settings.reconnectMinMilliseconds),
                                                        maximumMilliseconds: UInt32(clamping: settings.reconnectMaxMilliseconds)),
                queueDepth: min(max(queueDepth, 1), 1024), log: log)
        } catch {
            throw BackendOpeningError(lun: name, reason: "key '\(error.key)': \(error.message)")
        }
        do {
            let backend = try ISCSIBackend.open(config: config, waitMilliseconds: 5000, allowOffline: false)
            return OpenedBackend(backend: .iscsi(backend))
        } catch {
            throw BackendOpeningError(lun: name, reason: "\(settings.url.description): \(error.message)", mayStartWithout: true)
        }
    }
}
