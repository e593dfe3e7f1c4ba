#if canImport(Glibc)
import Glibc
#endif
import BlockIO
import CSystem

/// A back-end without storage, for benchmarks: every request completes as soon as it is committed.
///
/// Reads leave the caller's buffers untouched (no data is produced, nothing is zeroed) and report the
/// requested length, clipped at the capacity; writes, flushes, discards and write-zeroes succeed without
/// touching memory. It is synchronous: its channels have no completion fd, and the committed requests
/// are delivered by the next `reap` (callers reap right after `commit`, with no wake-up round trip).
public final class NullBackend: BlockBackend, @unchecked Sendable {
    /// The per-thread channel type.
    public typealias Channel = NullChannel

    /// The spec this back-end was created from.
    public let spec: BackendSpec
    /// Size and capabilities (capacity from `spec.size`).
    public let geometry: BlockGeometry

    /// Creates a null back-end of `spec.size` bytes.
    public init(spec: BackendSpec) throws(BackendOpenError) {
        let name = spec.path.isEmpty ? "null" : spec.path
        guard spec.logicalBlockSize == 512 || spec.logicalBlockSize == 4096 else {
            throw .invalidBlockSize(path: name, blockSize: spec.logicalBlockSize)
        }
        if let physical = spec.physicalBlockSize,
           !BackendSpec.isValidPhysicalBlockSize(physical, logical: spec.logicalBlockSize) {
            throw .invalidPhysicalBlockSize(path: name, physical: physical, logical: spec.logicalBlockSize)
        }
        guard spec.size > 0, spec.size % UInt64(spec.logicalBlockSize) == 0 else {
            throw .sizeNotMultipleOfBlockSize(path: name, size: spec.size, blockSize: spec.logicalBlockSize)
        }
        guard (1...4096).contains(spec.queueDepth) else {
            throw .invalidTuning(path: name, reason: "queue depth \(spec.queueDepth) is outside 1...4096")
        }
        self.spec = spec
        self.geometry = BlockGeometry(logicalBlockSize: spec.logicalBlockSize, physicalBlockSize: spec.physicalBlockSize ?? spec.logicalBlockSize,
                                      blockCount: spec.size / UInt64(spec.logicalBlockSize), readOnly: spec.readOnly,
                                      supportsDiscard: true, supportsWriteZeroes: true, discardReadsZeroes: false,
                                      volatileWriteCache: false, maxTransferBytes: FileBackend.maxTransferBytes)
    }

    /// Creates a channel.
    public func makeChannel() throws(BlockBackendError) -> NullChannel {
        try NullChannel(geometry: geometry, queueDepth: spec.queueDepth)
    }
}

/// A ``NullBackend`` channel: a preallocated ring of completed results, ready on `commit`.
/// Like ``FileChannel``, it may be handed to another thread but is used by one thread at a time.
public final class NullChannel: BlockChannel, @unchecked Sendable {
    private let capacityBytes: UInt64
    private let blockSize: UInt64
    private let readOnly: Bool
    private let depth: Int
    private let tokens: UnsafeMutablePointer<UInt64>
    private let results: UnsafeMutablePointer<BlockResult>
    private var head = 0
    private var committed = 0
    private var count = 0
    /// None (-1): committed requests are complete; `reap` delivers them.
    public var completionFD: Int32 { -1 }

    init(geometry: BlockGeometry, queueDepth: Int) throws(BlockBackendError) {
        capacityBytes = geometry.capacityBytes
        blockSize = UInt64(geometry.logicalBlockSize)
        readOnly = geometry.readOnly
        depth = queueDepth
        tokens = .allocate(capacity: queueDepth)
        tokens.initialize(repeating: 0, count: queueDepth)
        results = .allocate(capacity: queueDepth)
        results.initialize(repeating: .success(0), count: queueDepth)
    }

    deinit {
        tokens.deallocate()
        results.deallocate()
    }

    /// Requests queued or completed but not yet reaped.
    public var inFlight: Int { count }

    /// Nothing to release: the buffers go with the last reference.
    public func close() {}

    /// Queues a request; same refusals as ``FileChannel/submit(_:token:)`` (EAGAIN, EINVAL, EROFS, ERANGE).
    public func submit(_ request: BlockRequest, token: UInt64) -> Int32 {
        guard count < depth else { return EAGAIN }
        let offset = request.offset
        let length = request.length
        var bytes: UInt64 = 0
        switch request.operation {
        case .read, .write, .discard, .writeZeroes:
            if request.operation != .read && readOnly { return EROFS }
            guard offset % blockSize == 0, length % blockSize == 0 else { return EINVAL }
            if request.operation == .read || request.operation == .write {
                guard length <= UInt64(FileBackend.maxTransferBytes),
                      request.buffers.totalLength >= Int(length) else { return EINVAL }
            }
            if request.operation == .read {
                bytes = offset >= capacityBytes ? 0 : min(length, capacityBytes - offset)
            } else {
                guard offset <= capacityBytes, length <= capacityBytes - offset else { return ERANGE }
                bytes = length
            }
        case .flush:
            bytes = 0
        }
        let position = (head + count) % depth
        tokens[position] = token
        results[position] = .success(bytes)
        count += 1
        return 0
    }

    /// Makes the queued requests complete (`reap` delivers them).
    public func commit() {
        committed = count
    }

    /// Delivers the committed completions.
    public func reap(_ handler: (UInt64, BlockResult) -> Void) -> Int {
        var delivered = 0
        while committed > 0 {
            let token = tokens[head]
            let result = results[head]
            head = head + 1 == depth ? 0 : head + 1
            committed -= 1
            count -= 1
            delivered += 1
            handler(token, result)
        }
        return delivered
    }
}
