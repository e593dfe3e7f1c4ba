import BlockIO
#if canImport(Glibc)
import Glibc
#endif

/// Per-command limits of the remote LUN (from VPD B0h), applied by the channel when it turns a request into
/// commands.
struct ISCSITransferLimits: Equatable {
    /// The remote's MAXIMUM TRANSFER LENGTH in bytes (0: none).
    var remoteMaxTransferBytes: UInt64 = 0
    /// Blocks per UNMAP command.
    var maxUnmapBlocks: UInt64 = ISCSIGeometryDiscovery.defaultBlocksPerCommand
    /// Blocks per WRITE SAME(16) command.
    var maxWriteSameBlocks: UInt64 = ISCSIGeometryDiscovery.defaultBlocksPerCommand

    /// Largest READ/WRITE sent as one command: the remote's limit, else the largest whole-block
    /// 32-bit transfer; `override` (non-zero, tests) lowers it.
    static func maxIOBytes(blockSize: UInt64, remoteMaxTransferBytes: UInt64, override: UInt64) -> UInt64 {
        let limit = remoteMaxTransferBytes == 0 ? UInt64(UInt32.max) & ~(blockSize - 1) : remoteMaxTransferBytes
        return override != 0 ? min(override, limit) : limit
    }
}

/// The SCSI command that carries the next part of a block request to the remote. Pure: decided from the
/// request, how many of its bytes are done and the remote's limits (`ISCSIChannel+Commands.swift` hands it
/// to libiscsi, which encodes the CDB).
enum ISCSICommand: Equatable {
    /// READ(16) of `bytes` at `lba`. `split`: one part of a transfer above the limit (or a later part),
    /// on iovecs cut from the request's by `ISCSITransferSplit`; else on the request's iovecs as they are.
    case read16(lba: UInt64, bytes: UInt64, split: Bool)
    /// WRITE(16), as `read16`, with FUA when the request asks.
    case write16(lba: UInt64, bytes: UInt64, split: Bool, forceUnitAccess: Bool)
    case synchronizeCache16
    /// UNMAP with one descriptor.
    case unmap(lba: UInt64, blocks: UInt64)
    /// WRITE SAME(16) of one zero block; UNMAP bit when the request allows deallocation.
    case writeSame16(lba: UInt64, blocks: UInt64, unmap: Bool)

    /// The next command for `request` (not a pass-through) once `done` bytes of it completed.
    /// `blockSize` divides offsets and lengths (checked at submission).
    static func next(for request: BlockRequest, done: UInt64, blockSize: UInt64, maxIOBytes: UInt64,
                     limits: ISCSITransferLimits) -> ISCSICommand {
        let lba = (request.offset + done) / blockSize
        let remaining = request.length - done
        switch request.operation {
        case .read, .write:
            let split = request.length > maxIOBytes || done > 0
            let bytes = split ? min(remaining, maxIOBytes) : request.length
            return request.operation == .read
                ? .read16(lba: lba, bytes: bytes, split: split)
                : .write16(lba: lba, bytes: bytes, split: split, forceUnitAccess: request.forceUnitAccess)
        case .flush:
            return .synchronizeCache16
        case .discard:
            return .unmap(lba: lba, blocks: min(remaining / blockSize, limits.maxUnmapBlocks))
        case .writeZeroes:
            return .writeSame16(lba: lba, blocks: min(remaining / blockSize, limits.maxWriteSameBlocks),
                                unmap: request.mayUnmap)
        }
    }
}

/// A pass-through request (`BlockRequest.passThrough`: COMPARE AND WRITE, PERSISTENT RESERVE IN/OUT)
/// as libiscsi's generic command wants it: the CDB bytes unchanged, a direction and the transfer length.
struct ISCSIPassThroughCommand {
    enum Direction: Equatable { case none, read, write }

    /// The CDB in wire order (up to 16 bytes; `cdbLength` of them count).
    var cdb: (UInt64, UInt64)
    var cdbLength: Int
    var direction: Direction
    /// Data-in or data-out bytes (0 without data).
    var transferLength: UInt64

    init(_ request: BlockRequest) {
        let command = request.passThrough
        cdb = (command.head.bigEndian, command.tail.bigEndian)
        cdbLength = Int(command.length)
        switch request.operation {
        case .read: direction = .read
        case .write: direction = .write
        default: direction = .none
        }
        transferLength = direction == .none ? 0 : request.length
    }
}

/// Cuts part of a request's scatter-gather list into a preallocated iovec array (for the parts of a
/// transfer above the remote's limit, and pass-through buffers longer than the transfer). Pure.
enum ISCSITransferSplit {
    /// Fills `out` (room for `capacity` entries) with up to `upTo` bytes of `buffers` starting at byte `from`.
    /// With `wholeBlocks` the part ends on a `blockSize` boundary: when the entries run out in the middle of
    /// a block, the tail is trimmed. Returns the entries used and the bytes they cover.
    static func part(of buffers: IOVectorList, from: UInt64, upTo: UInt64, blockSize: UInt64, wholeBlocks: Bool,
                     into out: UnsafeMutablePointer<iovec>, capacity: Int) -> (count: Int, bytes: UInt64) {
        var skip = from
        var remaining = upTo
        var used = 0
        var covered: UInt64 = 0
        var i = 0
        while i < buffers.count && remaining > 0 && used < capacity {
            let v = buffers[i]
            i += 1
            let length = UInt64(v.iov_len)
            if skip >= length { skip -= length; continue }
            let take = min(length - skip, remaining)
            out[used] = iovec(iov_base: v.iov_base.map { $0 + Int(skip) }, iov_len: Int(take))
            skip = 0
            remaining -= take
            covered += take
            used += 1
        }
        let whole = wholeBlocks ? covered - covered % blockSize : covered
        var excess = covered - whole
        while excess > 0 && used > 0 {
            let last = UInt64(out[used - 1].iov_len)
            if last <= excess { excess -= last; used -= 1 } else { out[used - 1].iov_len = Int(last - excess); excess = 0 }
        }
        return (used, whole)
    }
}
