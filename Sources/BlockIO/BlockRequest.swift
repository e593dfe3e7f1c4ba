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

/// A SCSI command that a back-end reaching a remote SCSI target sends unchanged (COMPARE AND WRITE and
/// PERSISTENT RESERVE IN/OUT, which must execute atomically or be shared on the remote LUN).
/// Carried inline in `BlockRequest` (no allocation); `length == 0` means "not a pass-through".
///
/// The request's `operation` gives the data direction: `.read` (data-in into `buffers`), `.write`
/// (data-out from `buffers`) or `.flush` (no data); its `length` is the expected transfer in bytes and
/// `offset` is unused. The result carries the remote's status and sense (`BlockResult.remote`).
/// Only back-ends whose geometry says `supportsPassThrough` accept it; the SCSI core sends it to no other.
public struct SCSIPassThrough: Sendable, Equatable {
    /// CDB bytes 0-7, big-endian (byte 0 is the top byte).
    public var head: UInt64
    /// CDB bytes 8-15, big-endian (byte 8 is the top byte).
    public var tail: UInt64
    /// CDB length in bytes (6...16), 0 when not a pass-through.
    public var length: UInt8

    /// Not a pass-through.
    public static let none = SCSIPassThrough(head: 0, tail: 0, length: 0)

    /// A pass-through of the CDB bytes packed big-endian in `head` and `tail`, `length` (6...16) long.
    public init(head: UInt64, tail: UInt64, length: UInt8) {
        self.head = head
        self.tail = tail
        self.length = length
    }

    /// A pass-through of the first `count` (<= 16) bytes of `cdb`.
    public init(cdb: UnsafeRawBufferPointer) {
        let n = min(cdb.count, 16)
        var h: UInt64 = 0, t: UInt64 = 0
        for i in 0..<16 {
            let b = i < n ? UInt64(cdb[i]) : 0
            if i < 8 { h = h << 8 | b } else { t = t << 8 | b }
        }
        self.init(head: h, tail: t, length: UInt8(n))
    }

    /// Whether this is a pass-through command.
    @inline(__always) public var isPresent: Bool { length != 0 }

    /// CDB byte `i` (0...15).
    public subscript(i: Int) -> UInt8 {
        i < 8 ? UInt8(truncatingIfNeeded: head >> UInt64(56 - 8 * i))
              : UInt8(truncatingIfNeeded: tail >> UInt64(56 - 8 * (i - 8)))
    }
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
    /// A SCSI command to send unchanged to a remote target (see `SCSIPassThrough`); `.none` for block I/O.
    public var passThrough: SCSIPassThrough = .none

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

    /// A pass-through request: `command` sent unchanged, data-in (`.read`), data-out (`.write`) or none
    /// (`.flush`) of `length` bytes through `buffers`.
    public static func passThrough(_ command: SCSIPassThrough, direction: BlockOperation, length: UInt64,
                                   buffers: IOVectorList = .empty) -> BlockRequest {
        var request = BlockRequest(operation: direction, offset: 0, length: length, buffers: buffers)
        request.passThrough = command
        return request
    }
}

/// The SCSI status and sense a remote device server (an iSCSI target behind the back-end) returned
/// for a request, carried inline in `BlockResult` so that the SCSI core can report it to the initiator
/// unchanged. `status == 0` (GOOD) means "none": the result's errno alone describes the outcome.
public struct RemoteSCSIStatus: Sendable, Equatable {
    /// SAM status byte (0x02 CHECK CONDITION, 0x08 BUSY, 0x18 RESERVATION CONFLICT, 0x28 TASK SET FULL...).
    public var status: UInt8
    /// Sense key (CHECK CONDITION only).
    public var senseKey: UInt8
    /// Additional sense code.
    public var additionalSenseCode: UInt8
    /// Additional sense code qualifier.
    public var additionalSenseCodeQualifier: UInt8
    /// INFORMATION field of the sense data (LBA in error, miscompare offset); valid when `hasInformation`.
    public var information: UInt64
    /// Whether `information` is valid.
    public var hasInformation: Bool
    /// Sense-key specific bytes as `0x00SSKKKK` with SKSV (bit 23) set, or 0 when none.
    public var senseKeySpecific: UInt32

    /// Creates a status report.
    public init(status: UInt8, senseKey: UInt8 = 0, additionalSenseCode: UInt8 = 0,
                additionalSenseCodeQualifier: UInt8 = 0, information: UInt64? = nil, senseKeySpecific: UInt32 = 0) {
        self.status = status
        self.senseKey = senseKey
        self.additionalSenseCode = additionalSenseCode
        self.additionalSenseCodeQualifier = additionalSenseCodeQualifier
        self.information = information ?? 0
        self.hasInformation = information != nil
        self.senseKeySpecific = senseKeySpecific
    }

    /// No remote status.
    public static let none = RemoteSCSIStatus(status: 0)

    /// Whether a remote status is present.
    @inline(__always) public var isPresent: Bool { status != 0 }

    /// Parses raw sense data (fixed 70h/71h or descriptor 72h/73h format) into `status` CHECK CONDITION.
    /// Returns nil when the bytes are not sense data.
    public static func checkCondition(sense bytes: UnsafeRawBufferPointer) -> RemoteSCSIStatus? {
        guard bytes.count >= 2 else { return nil }
        let code = bytes[0] & 0x7F
        switch code {
        case 0x70, 0x71:
            guard bytes.count >= 3 else { return nil }
            var r = RemoteSCSIStatus(status: 0x02, senseKey: bytes[2] & 0x0F)
            if bytes.count >= 14 {
                r.additionalSenseCode = bytes[12]
                r.additionalSenseCodeQualifier = bytes[13]
            }
            if bytes[0] & 0x80 != 0 && bytes.count >= 7 {
                r.information = UInt64(bytes[3]) << 24 | UInt64(bytes[4]) << 16 | UInt64(bytes[5]) << 8 | UInt64(bytes[6])
                r.hasInformation = true
            }
            if bytes.count >= 18 && bytes[15] & 0x80 != 0 {
                r.senseKeySpecific = UInt32(bytes[15]) << 16 | UInt32(bytes[16]) << 8 | UInt32(bytes[17])
            }
            return r
        case 0x72, 0x73:
            guard bytes.count >= 4 else { return nil }
            var r = RemoteSCSIStatus(status: 0x02, senseKey: bytes[1] & 0x0F, additionalSenseCode: bytes[2],
                                     additionalSenseCodeQualifier: bytes[3])
            let end = bytes.count >= 8 ? min(bytes.count, 8 + Int(bytes[7])) : bytes.count
            var at = 8
            while at + 2 <= end {
                let type = bytes[at]
                let length = Int(bytes[at + 1])
                let next = at + 2 + length
                guard next <= end else { break }
                if type == 0x00 && length >= 10 && bytes[at + 2] & 0x80 != 0 {
                    var v: UInt64 = 0
                    for i in 0..<8 { v = v << 8 | UInt64(bytes[at + 4 + i]) }
                    r.information = v
                    r.hasInformation = true
                } else if type == 0x02 && length >= 6 && bytes[at + 4] & 0x80 != 0 {
                    r.senseKeySpecific = UInt32(bytes[at + 4]) << 16 | UInt32(bytes[at + 5]) << 8 | UInt32(bytes[at + 6])
                }
                at = next
            }
            return r
        default:
            return nil
        }
    }
}

/// The outcome of a block request.
public struct BlockResult: Sendable, Equatable {
    /// 0 on success, otherwise a positive errno value (EIO, ENOSPC, EROFS, ...).
    public var errno: Int32
    /// Bytes transferred (read/write); a short read or write leaves this below the request length.
    public var bytesTransferred: UInt64
    /// The remote device server's status and sense, when the back-end is a remote SCSI target and the
    /// failure (or a pass-through command's outcome) came from it; `.none` otherwise.
    public var remote: RemoteSCSIStatus = .none
    /// After the remote reported CAPACITY DATA HAS CHANGED: the LUN's new number of logical blocks,
    /// which the back-end re-read before completing the request (0: no capacity change).
    public var remoteBlockCount: UInt64 = 0

    /// Creates a result.
    public init(errno: Int32, bytesTransferred: UInt64) {
        self.errno = errno
        self.bytesTransferred = bytesTransferred
    }

    /// Creates a result carrying the remote device server's status and sense.
    public init(errno: Int32, bytesTransferred: UInt64, remote: RemoteSCSIStatus, remoteBlockCount: UInt64 = 0) {
        self.errno = errno
        self.bytesTransferred = bytesTransferred
        self.remote = remote
        self.remoteBlockCount = remoteBlockCount
    }

    /// A successful result for `bytes` bytes.
    public static func success(_ bytes: UInt64) -> BlockResult { BlockResult(errno: 0, bytesTransferred: bytes) }
    /// A failed result.
    public static func failure(_ errno: Int32) -> BlockResult { BlockResult(errno: errno, bytesTransferred: 0) }
    /// A failed result with the remote's status and sense.
    public static func failure(_ errno: Int32, remote: RemoteSCSIStatus) -> BlockResult {
        BlockResult(errno: errno, bytesTransferred: 0, remote: remote)
    }
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
    /// The back-end sends `SCSIPassThrough` requests to a remote device server.
    public var supportsPassThrough: Bool = false
    /// The remote device server implements COMPARE AND WRITE (probed at login with REPORT SUPPORTED
    /// OPERATION CODES): the SCSI core passes it through, so it is atomic for every host sharing the LUN.
    public var remoteCompareAndWrite: Bool = false
    /// The remote device server implements PERSISTENT RESERVE IN/OUT (probed at login): the SCSI core
    /// passes them through so that every host sharing the remote LUN sees the same registrations.
    public var remotePersistentReservations: Bool = false

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
