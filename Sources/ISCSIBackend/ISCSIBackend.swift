import BlockIO
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Whether a remote LUN is reachable, as the gateway reports it.
public enum ISCSIBackendStatus: Sendable, Equatable, CustomStringConvertible {
    /// At least one channel is logged in and the geometry is known.
    case online
    /// No channel is logged in; `reason` says why (refused, unreachable, CHAP failure...).
    case offline(reason: String)

    public var description: String {
        switch self {
        case .online: return "online"
        case .offline(let reason): return "offline: \(reason)"
        }
    }
}

/// A LUN on a remote iSCSI target, reached through libiscsi's asynchronous API.
///
/// The back-end itself holds no connection: each `ISCSIChannel` (one per event-loop thread) has its
/// own iSCSI session. The back-end keeps the configuration, the geometry the channels discovered
/// (READ CAPACITY 16, VPD B0h/B2h) and whether any channel is online.
///
/// Start-up: `open(config:waitMilliseconds:allowOffline:)` probes the target for a bounded time.
/// With `allowOffline`, an unreachable target yields an offline back-end (geometry unknown, logged
/// clearly); its channels keep reconnecting and it comes online, with its geometry, when the target
/// answers. A remote CAPACITY DATA HAS CHANGED makes the channels re-read the capacity; the change
/// bumps `geometryGeneration` and calls `onGeometryChange` (on the channel's thread) so the gateway
/// turns it into a resize event.
public final class ISCSIBackend: BlockBackend {
    public typealias Channel = ISCSIChannel

    struct Shared {
        var geometry: BlockGeometry?
        var onlineChannels = 0
        var lastFailure = "not connected yet"
    }

    /// The validated configuration.
    public let config: ISCSIBackendConfig
    private let shared = Mutex(Shared())
    private let generation = Atomic<UInt64>(0)
    private let geometryCallback: (@Sendable (BlockGeometry) -> Void)?
    /// Handlers added after creation (`addGeometryObserver`), called after `geometryCallback`.
    private let geometryObservers = Mutex<[@Sendable (BlockGeometry) -> Void]>([])
    /// `address:port` handed to libiscsi. A host name is resolved here, on the control path, so
    /// that reconnects on the event-loop thread never wait for DNS; if it cannot be resolved now,
    /// the name is kept (libiscsi then resolves it at each attempt).
    let portal: String

    /// Creates an offline back-end without touching the network; channels connect on their own.
    /// `onGeometryChange` runs on the thread of the channel that saw a capacity change.
    ///
    /// libiscsi writes to its socket with plain send/writev, so a target that drops the connection
    /// would raise SIGPIPE: creating a back-end sets SIGPIPE to ignored for the process (a daemon
    /// serving sockets wants that anyway) and the loss is seen as EPIPE.
    public init(config: ISCSIBackendConfig, onGeometryChange: (@Sendable (BlockGeometry) -> Void)? = nil) {
        _ = signal(SIGPIPE, SIG_IGN)
        self.config = config
        self.portal = Self.resolvePortal(config.url)
        self.geometryCallback = onGeometryChange
    }

    /// Creates a back-end and waits up to `waitMilliseconds` for the target to answer (login and
    /// geometry). If it does not: with `allowOffline` the back-end is returned offline (one warning
    /// line says why and that it will come online later); otherwise the error is thrown.
    public static func open(config: ISCSIBackendConfig, waitMilliseconds: Int = 5000, allowOffline: Bool = false,
                            onGeometryChange: (@Sendable (BlockGeometry) -> Void)? = nil) throws(BlockBackendError) -> ISCSIBackend {
        let backend = ISCSIBackend(config: config, onGeometryChange: onGeometryChange)
        do {
            _ = try backend.probe(timeoutMilliseconds: waitMilliseconds)
        } catch {
            guard allowOffline else { throw error }
            config.emit(.warning, "\(config.url) is OFFLINE at start-up (\(error.message)); the LUN will come online when the target answers")
        }
        return backend
    }

    /// Connects a temporary session on the calling thread (control path), reads the geometry and
    /// disconnects. Fails at the first refused or failed attempt, or after `timeoutMilliseconds`.
    @discardableResult
    public func probe(timeoutMilliseconds: Int) throws(BlockBackendError) -> BlockGeometry {
        let channel = ISCSIChannel(backend: self, quiet: true)
        defer { channel.close() }
        let deadline = monotonicNanoseconds() &+ UInt64(max(timeoutMilliseconds, 1)) * 1_000_000
        channel.tick()
        while !channel.isOnline {
            if channel.phase == .waiting {
                throw BlockBackendError("iSCSI LUN \(config.url): \(channel.lastFailure)")
            }
            let now = monotonicNanoseconds()
            if now >= deadline {
                throw BlockBackendError("iSCSI LUN \(config.url): no answer within \(timeoutMilliseconds) ms")
            }
            channel.runOnce(timeoutMilliseconds: Int32(clamping: (deadline - now) / 1_000_000 + 1))
        }
        guard let geometry = channel.currentGeometry else {
            throw BlockBackendError("iSCSI LUN \(config.url): geometry unknown after login")
        }
        return geometry
    }

    /// Size and capabilities; while the LUN has never been reached, a zero-block placeholder
    /// (check `status` / `isGeometryKnown`).
    public var geometry: BlockGeometry {
        shared.withLock { $0.geometry } ?? BlockGeometry(logicalBlockSize: 512, physicalBlockSize: 512, blockCount: 0,
                                                         supportsDiscard: false, supportsWriteZeroes: false)
    }

    /// Whether the geometry has been read from the target at least once.
    public var isGeometryKnown: Bool { shared.withLock { $0.geometry != nil } }

    /// Bumps each time a channel publishes a different geometry (first discovery included).
    public var geometryGeneration: UInt64 { generation.load(ordering: .acquiring) }

    /// Online, or offline with the reason.
    public var status: ISCSIBackendStatus {
        shared.withLock { s in s.onlineChannels > 0 ? .online : .offline(reason: s.lastFailure) }
    }

    /// Creates a channel (one iSCSI session) for the calling event-loop thread. It connects on its
    /// first `tick`/`commit` and never blocks.
    public func makeChannel() throws(BlockBackendError) -> ISCSIChannel {
        let channel = ISCSIChannel(backend: self)
        guard channel.isUsable else {
            throw BlockBackendError("iSCSI LUN \(config.url): cannot create the channel's epoll/timerfd")
        }
        return channel
    }

    /// Resolves a host name to a numeric address (IP literals pass through unchanged).
    static func resolvePortal(_ url: ISCSIURL) -> String {
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_flags = AI_NUMERICHOST
        var result: UnsafeMutablePointer<addrinfo>?
        if getaddrinfo(url.host, nil, &hints, &result) == 0 {
            freeaddrinfo(result)
            return url.portal
        }
        hints.ai_flags = 0
        guard getaddrinfo(url.host, nil, &hints, &result) == 0, let first = result else { return url.portal }
        defer { freeaddrinfo(result) }
        var buffer = [CChar](repeating: 0, count: Int(NI_MAXHOST))
        guard getnameinfo(first.pointee.ai_addr, first.pointee.ai_addrlen, &buffer, socklen_t(buffer.count), nil, 0,
                          NI_NUMERICHOST) == 0 else { return url.portal }
        let length = buffer.firstIndex(of: 0) ?? buffer.count
        let address = String(decoding: buffer[..<length].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return address.contains(":") ? "[\(address)]:\(url.port)" : "\(address):\(url.port)"
    }

    // MARK: - Channel reports

    func knownGeometry() -> BlockGeometry? { shared.withLock { $0.geometry } }

    func publish(geometry: BlockGeometry, changed: Bool) {
        let (old, isNew) = shared.withLock { s -> (BlockGeometry?, Bool) in
            let old = s.geometry
            s.geometry = geometry
            return (old, old != geometry)
        }
        guard isNew else { return }
        generation.add(1, ordering: .releasing)
        if let old, old.blockCount != geometry.blockCount || old.logicalBlockSize != geometry.logicalBlockSize {
            config.emit(.info, "\(config.url): capacity changed from \(old.capacityBytes) to \(geometry.capacityBytes) bytes")
        }
        if old != nil || changed {
            geometryCallback?(geometry)
            for observer in geometryObservers.withLock({ $0 }) { observer(geometry) }
        }
    }

    /// Adds a handler for geometry changes the channels discover (a remote CAPACITY DATA HAS CHANGED, or
    /// a different capacity found at a re-login); it runs on the discovering channel's thread and must
    /// only enqueue work or take short locks (the gateway calls `SCSITarget.followCapacity`).
    public func addGeometryObserver(_ observer: @escaping @Sendable (BlockGeometry) -> Void) {
        geometryObservers.withLock { $0.append(observer) }
    }

    func channelCameOnline() {
        shared.withLock { $0.onlineChannels += 1 }
    }

    func channelWentOffline(wasOnline: Bool, reason: String) {
        shared.withLock { s in
            if wasOnline { s.onlineChannels = max(0, s.onlineChannels - 1) }
            if !reason.isEmpty { s.lastFailure = reason }
        }
    }
}
