/// What a block request asks a back-end to do.
public enum BlockOperation: UInt8, Sendable {
    /// Read `length` bytes at `offset` into the buffers.
    case read
    /// Write `length` bytes from the buffers at `offset`.
    case write
    /// Make every completed write stable (fdatasync / SYNCHRONIZE CACHE).
    case flush
    /// Deallocate `length` bytes at `offset`; later reads return zeroes or old data per the back-end's geometry.
    case discard
    /// Write zeroes over `length` bytes at `offset` (deallocating when `mayUnmap` and the back-end can).
    case writeZeroes
}

/// One vectored I/O request from a front-end or the SCSI core to a back-end.
/// Offsets and lengths are in bytes and always multiples of the logical block size.
public struct BlockRequest: Sendable {
    /// The operation.
    public var operation: BlockOperation
    /// Byte offset on the LUN.
    public var offset: UInt64
    /// Byte count (for read and write: how much of `buffers` to transfer).
    public var length: UInt64
    /// Data buffers (read: filled; write: source). Empty for flush, discard, write-zeroes.
    public var buffers: IOVectorList
    /// Force unit access: the write is stable before it completes.
    public var forceUnitAccess: Bool
    /// For write-zeroes: the back-end may deallocate instead of writing.
    public var mayUnmap: Bool

    /// Creates a request.
    public init(operation: BlockOperation, offset: UInt64, length: UInt64, buffers: IOVectorList = .empty,
                forceUnitAccess: Bool = false, mayUnmap: Bool = false) {
        self.operation = operation
        self.offset = offset
        self.length = length
        self.buffers = buffers
        self.forceUnitAccess = forceUnitAccess
        self.mayUnmap = mayUnmap
    }
}

/// The outcome of a block request.
public struct BlockResult: Sendable, Equatable {
    /// 0 on success, otherwise a positive errno value (EIO, ENOSPC, EROFS, ...).
    public var errno: Int32
    /// Bytes transferred (read/write); a short read or write leaves this below the request length.
    public var bytesTransferred: UInt64

    /// Creates a result.
    public init(errno: Int32, bytesTransferred: UInt64) {
        self.errno = errno
        self.bytesTransferred = bytesTransferred
    }

    /// A successful result for `bytes` bytes.
    public static func success(_ bytes: UInt64) -> BlockResult { BlockResult(errno: 0, bytesTransferred: bytes) }
    /// A failed result.
    public static func failure(_ errno: Int32) -> BlockResult { BlockResult(errno: errno, bytesTransferred: 0) }
    /// Whether the request succeeded.
    public var succeeded: Bool { errno == 0 }
}

/// Size and capabilities of a LUN as its back-end reports them.
public struct BlockGeometry: Sendable, Equatable {
    /// Logical block size in bytes (512 or 4096).
    public var logicalBlockSize: UInt32
    /// Physical block size in bytes (>= logical, a power-of-two multiple of it).
    public var physicalBlockSize: UInt32
    /// Number of logical blocks.
    public var blockCount: UInt64
    /// Writes are refused.
    public var readOnly: Bool
    /// Discard (UNMAP / BLKDISCARD / punch hole) is supported.
    public var supportsDiscard: Bool
    /// Write-zeroes is supported natively (otherwise the caller writes zero buffers).
    public var supportsWriteZeroes: Bool
    /// After discard, reads return zeroes (LBPRZ).
    public var discardReadsZeroes: Bool
    /// The back-end has a volatile write cache that flush makes stable (WCE).
    public var volatileWriteCache: Bool
    /// Largest single transfer in bytes the back-end accepts (0: no limit).
    public var maxTransferBytes: UInt32
    /// Discard granularity in bytes (0: logical block size).
    public var discardGranularity: UInt32

    /// Creates a geometry.
    public init(logicalBlockSize: UInt32, physicalBlockSize: UInt32, blockCount: UInt64, readOnly: Bool = false,
                supportsDiscard: Bool = true, supportsWriteZeroes: Bool = true, discardReadsZeroes: Bool = true,
                volatileWriteCache: Bool = true, maxTransferBytes: UInt32 = 0, discardGranularity: UInt32 = 0) {
        self.logicalBlockSize = logicalBlockSize
        self.physicalBlockSize = physicalBlockSize
        self.blockCount = blockCount
        self.readOnly = readOnly
        self.supportsDiscard = supportsDiscard
        self.supportsWriteZeroes = supportsWriteZeroes
        self.discardReadsZeroes = discardReadsZeroes
        self.volatileWriteCache = volatileWriteCache
        self.maxTransferBytes = maxTransferBytes
        self.discardGranularity = discardGranularity
    }

    /// Capacity in bytes.
    public var capacityBytes: UInt64 { blockCount &* UInt64(logicalBlockSize) }
}
