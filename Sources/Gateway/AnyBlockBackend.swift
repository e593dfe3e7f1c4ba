import Backends
import BlockIO
import ISCSIBackend

/// A back-end of any kind, as a concrete enum so the gateway and front-ends dispatch without
/// existentials. It lives where back-ends are chosen (the gateway, from each LUN's config), so that `Backends`
/// (the local back-ends) does not depend on `ISCSIBackend`.
public enum AnyBlockBackend: Sendable {
    /// A raw file or block device.
    case file(FileBackend)
    /// The null back-end.
    case null(NullBackend)
    /// A LUN on a remote iSCSI target (libiscsi), opened with ``ISCSIBackend/open(config:waitMilliseconds:allowOffline:onGeometryChange:)``.
    case iscsi(ISCSIBackend)

    /// Opens the back-end `spec` describes (`.file` and `.block` → ``FileBackend``, `.null` → ``NullBackend``).
    public static func open(_ spec: BackendSpec) throws(BackendOpenError) -> AnyBlockBackend {
        switch spec.kind {
        case .file, .block: return .file(try FileBackend(spec: spec))
        case .null: return .null(try NullBackend(spec: spec))
        }
    }

    /// Size and capabilities.
    public var geometry: BlockGeometry {
        switch self {
        case .file(let backend): return backend.geometry
        case .null(let backend): return backend.geometry
        case .iscsi(let backend): return backend.geometry
        }
    }

    /// Creates a channel for one event-loop thread.
    public func makeChannel() throws(BlockBackendError) -> AnyBlockChannel {
        switch self {
        case .file(let backend): return .file(try backend.makeChannel())
        case .null(let backend): return .null(try backend.makeChannel())
        case .iscsi(let backend): return .iscsi(try backend.makeChannel())
        }
    }

    /// Resizes (files), re-reads the size (block devices; `newSize` 0 or the device's size), or fails
    /// (null back-ends have a fixed size). Returns the new geometry.
    @discardableResult
    public func resize(to newSize: UInt64, allowShrink: Bool = false) throws(BackendOpenError) -> BlockGeometry {
        switch self {
        case .file(let backend): return try backend.resize(to: newSize, allowShrink: allowShrink)
        case .null(let backend):
            throw .unsupported(path: backend.spec.path.isEmpty ? "null" : backend.spec.path,
                               reason: "a null back-end cannot be resized")
        case .iscsi(let backend):
            throw .unsupported(path: backend.config.url.description,
                               reason: "an iSCSI LUN is resized on its target; ScsiGate follows the remote capacity")
        }
    }

    /// The GET LBA STATUS allocation query for `LogicalUnit(allocationQuery:)`: files answer from their
    /// holes (``FileBackend/allocationStatus(offset:length:)``); block devices, null and iSCSI back-ends
    /// have none (every LBA is then "mapped or unknown").
    public var allocationQuery: AllocationQuery? {
        switch self {
        case .file(let backend):
            if backend.isBlockDevice { return nil }
            return { offset, length in backend.allocationStatus(offset: offset, length: length) }
        case .null, .iscsi: return nil
        }
    }

    /// Channels still open (front-ends close theirs asynchronously after a LUN is removed). Only file and
    /// block back-ends hold a lock that outlives `close()` while channels remain; the others report 0.
    public var openChannelCount: Int {
        switch self {
        case .file(let backend): return backend.openChannelCount
        case .null, .iscsi: return 0
        }
    }

    /// Releases the backing store once all channels are closed.
    public func close() {
        switch self {
        case .file(let backend): backend.close()
        case .null, .iscsi: break
        }
    }
}

/// A channel of any back-end kind, dispatched by `switch` (no existential in the per-I/O path).
/// Handed to its event-loop thread, then used by that thread only.
public enum AnyBlockChannel: Sendable {
    /// A ``FileBackend`` channel.
    case file(FileChannel)
    /// A ``NullBackend`` channel.
    case null(NullChannel)
    /// An ``ISCSIBackend`` channel (one iSCSI session; `completionFD` is its private epoll fd).
    case iscsi(ISCSIChannel)

    /// Readable when completions are ready.
    public var completionFD: Int32 {
        @inline(__always) get {
            switch self {
            case .file(let channel): return channel.completionFD
            case .null(let channel): return channel.completionFD
            case .iscsi(let channel): return channel.completionFD
            }
        }
    }

    /// Requests queued or in flight.
    public var inFlight: Int {
        @inline(__always) get {
            switch self {
            case .file(let channel): return channel.inFlight
            case .null(let channel): return channel.inFlight
            case .iscsi(let channel): return channel.inFlight
            }
        }
    }

    /// Queues one request (see ``FileChannel/submit(_:token:)`` for the refusals).
    @inline(__always)
    public func submit(_ request: BlockRequest, token: UInt64) -> Int32 {
        switch self {
        case .file(let channel): return channel.submit(request, token: token)
        case .null(let channel): return channel.submit(request, token: token)
        case .iscsi(let channel): return channel.submit(request, token: token)
        }
    }

    /// Sends the queued batch.
    @inline(__always)
    public func commit() {
        switch self {
        case .file(let channel): channel.commit()
        case .null(let channel): channel.commit()
        case .iscsi(let channel): channel.commit()
        }
    }

    /// Delivers ready completions; returns how many.
    @inline(__always)
    public func reap(_ handler: (UInt64, BlockResult) -> Void) -> Int {
        switch self {
        case .file(let channel): return channel.reap(handler)
        case .null(let channel): return channel.reap(handler)
        case .iscsi(let channel): return channel.reap(handler)
        }
    }

    /// Whether committed requests are complete on return from `commit` (the null channel: no completion fd).
    public var completesOnCommit: Bool { completionFD < 0 }

    /// Delivers the completions found without a system call (see ``FileChannel/poll(_:)``; the null
    /// channel's are all ready after `commit`; iSCSI channels reap).
    @inline(__always)
    public func poll(_ handler: (UInt64, BlockResult) -> Void) -> Int {
        switch self {
        case .file(let channel): return channel.poll(handler)
        case .null(let channel): return channel.reap(handler)
        case .iscsi(let channel): return channel.reap(handler)
        }
    }

    /// Asks the back-end to abort one submitted request (see ``BlockChannel/abort(token:)``); the
    /// request still completes through `reap`. Only remote back-ends can abort.
    public func abort(token: UInt64) -> Bool {
        switch self {
        case .file(let channel): return channel.abort(token: token)
        case .null(let channel): return channel.abort(token: token)
        case .iscsi(let channel): return channel.abort(token: token)
        }
    }

    /// Asks the back-end to reset its logical unit (see ``BlockChannel/resetLogicalUnit()``).
    public func resetLogicalUnit() -> Bool {
        switch self {
        case .file(let channel): return channel.resetLogicalUnit()
        case .null(let channel): return channel.resetLogicalUnit()
        case .iscsi(let channel): return channel.resetLogicalUnit()
        }
    }

    /// Closes the channel (file channels stop their workers; null channels close with their last reference).
    public func close() {
        switch self {
        case .file(let channel): channel.close()
        case .iscsi(let channel): channel.close()
        case .null(let channel): channel.close()
        }
    }
}

/// The gateway's channel enum is a `BlockChannel` like the classes it wraps (its members dispatch by `switch`).
extension AnyBlockChannel: BlockChannel {}
