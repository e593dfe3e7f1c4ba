import BlockIO
#if canImport(Glibc)
import Glibc
#endif

/// The LBA, transfer length and field positions of a READ/WRITE-family CDB.
struct TransferFields {
    var lba: UInt64
    var blocks: UInt64
    /// CDB byte of the transfer length field (for the field pointer).
    var lengthByte: Int

    /// Decodes the 10/12/16-byte layouts (LBA at byte 2) and READ/WRITE(6).
    @inline(__always)
    init(_ cdb: CDB) {
        switch cdb.opcode {
        case Opcode.read6, Opcode.write6:
            lba = UInt64(cdb.be24(1) & 0x1F_FFFF)
            let n = cdb[4]
            blocks = n == 0 ? 256 : UInt64(n)
            lengthByte = 4
        case Opcode.read12, Opcode.write12, Opcode.verify12, Opcode.writeAndVerify12:
            lba = UInt64(cdb.be32(2))
            blocks = UInt64(cdb.be32(6))
            lengthByte = 6
        case Opcode.read16, Opcode.write16, Opcode.verify16, Opcode.writeAndVerify16, Opcode.writeSame16,
             Opcode.synchronizeCache16, Opcode.preFetch16, Opcode.orWrite16:
            lba = cdb.be64(2)
            blocks = UInt64(cdb.be32(10))
            lengthByte = 10
        default:  // 10-byte layouts
            lba = UInt64(cdb.be32(2))
            blocks = UInt64(cdb.be16(7))
            lengthByte = 7
        }
    }
}

extension SCSITarget {
    /// Rejects reserved bits of a READ/WRITE CDB without touching the command table (hot path):
    /// byte 1 allows DPO, FUA, FUA_NV (RDPROTECT/WRPROTECT must be 0: no protection information),
    /// the group number byte allows bits 4-0, CONTROL must be 0 (NACA unsupported).
    @inline(__always)
    private func checkTransferCDB(_ cdb: CDB) throws(SCSIError) {
        let length: Int
        switch cdb.opcode {
        case Opcode.read6, Opcode.write6:
            if cdb[5] != 0 { throw .invalidFieldInCDB(byte: 5, bit: 7 - cdb[5].leadingZeroBitCount) }
            return
        case Opcode.read10, Opcode.write10: length = 10
        case Opcode.read12, Opcode.write12, Opcode.verify12, Opcode.writeAndVerify12: length = 12
        default: length = 16
        }
        let flags = cdb[1] & ~0x1A
        if flags != 0 { throw .invalidFieldInCDB(byte: 1, bit: 7 - flags.leadingZeroBitCount) }
        let groupByte = length == 10 ? 6 : length - 2
        let group = cdb[groupByte] & ~0x1F
        if group != 0 { throw .invalidFieldInCDB(byte: groupByte, bit: 7 - group.leadingZeroBitCount) }
        let control = cdb[length - 1]
        if control != 0 { throw .invalidFieldInCDB(byte: length - 1, bit: 7 - control.leadingZeroBitCount) }
    }

    /// LBA OUT OF RANGE unless `lba ..< lba + blocks` lies within the capacity (overflow-safe).
    @inline(__always)
    func checkRange(lba: UInt64, blocks: UInt64, capacity: UInt64) throws(SCSIError) {
        if lba > capacity || blocks > capacity &- lba { throw .lbaOutOfRange }
    }

    /// INVALID FIELD IN CDB when the transfer exceeds B0h MAXIMUM TRANSFER LENGTH.
    @inline(__always)
    func checkTransferLimit(_ fields: TransferFields, unit: LogicalUnit) throws(SCSIError) {
        let limit = unit.maximumTransferBlocks
        if limit != 0 && fields.blocks > UInt64(limit) { throw .invalidFieldInCDB(byte: fields.lengthByte) }
    }

    /// READ(6/10/12/16): one read request straight into `task.dataIn`. A data-in buffer smaller than the
    /// transfer gets the whole blocks that fit (the rest is the residual).
    @inline(__always)
    func read(_ task: inout SCSITask, unit: LogicalUnit) throws(SCSIError) -> TaskDisposition {
        try checkTransferCDB(task.cdb)
        let fields = TransferFields(task.cdb)
        try checkTransferLimit(fields, unit: unit)
        try checkRange(lba: fields.lba, blocks: fields.blocks, capacity: unit.blockCount)
        let blockSize = UInt64(unit.blockSize)
        let room = UInt64(task.dataIn.totalLength) / blockSize
        let blocks = min(fields.blocks, room)
        if blocks == 0 { return .complete }
        task.step = .single(op: .read, lba: fields.lba, blocks: blocks)
        return .submit(BlockRequest(operation: .read, offset: fields.lba &* blockSize, length: blocks &* blockSize,
                                    buffers: task.dataIn))
    }

    /// WRITE(6/10/12/16): one write request straight from `task.dataOut`, forced to stable storage when
    /// FUA is set or the write cache is disabled.
    @inline(__always)
    func write(_ task: inout SCSITask, unit: LogicalUnit) throws(SCSIError) -> TaskDisposition {
        try checkTransferCDB(task.cdb)
        if unit.isReadOnly { throw .writeProtected }
        let fields = TransferFields(task.cdb)
        try checkTransferLimit(fields, unit: unit)
        try checkRange(lba: fields.lba, blocks: fields.blocks, capacity: unit.blockCount)
        if fields.blocks == 0 { return .complete }
        let blockSize = UInt64(unit.blockSize)
        let bytes = fields.blocks &* blockSize
        // Never read beyond the initiator's buffers.
        if UInt64(task.dataOut.totalLength) < bytes { throw .invalidFieldInCDB(byte: fields.lengthByte) }
        let fua = (task.cdb.opcode != Opcode.write6 && task.cdb[1] & 0x08 != 0) || unit.writeThrough
        task.step = .single(op: .write, lba: fields.lba, blocks: fields.blocks)
        return .submit(BlockRequest(operation: .write, offset: fields.lba &* blockSize, length: bytes,
                                    buffers: task.dataOut, forceUnitAccess: fua))
    }

    /// SYNCHRONIZE CACHE(10/16): a flush of the whole back-end (the range is checked, not used).
    /// IMMED = 1 is accepted; the command still completes only once the flush did.
    func synchronizeCache(_ task: inout SCSITask, unit: LogicalUnit) throws(SCSIError) -> TaskDisposition {
        let fields = TransferFields(task.cdb)
        try checkRange(lba: fields.lba, blocks: fields.blocks, capacity: unit.blockCount)
        task.step = .single(op: .flush, lba: fields.lba, blocks: 0)
        return .submit(BlockRequest(operation: .flush, offset: 0, length: 0))
    }
}

extension SCSITarget {
    /// PRE-FETCH(10/16): checks the range and completes with GOOD. This device server keeps no cache of
    /// its own to load (the back-end's caching is outside its control), and SBC-3 answers GOOD, not
    /// CONDITION MET, when the blocks cannot all be placed in the cache. IMMED is accepted either way.
    func preFetch(_ task: inout SCSITask, unit: LogicalUnit) throws(SCSIError) {
        let fields = TransferFields(task.cdb)
        try checkRange(lba: fields.lba, blocks: fields.blocks, capacity: unit.blockCount)
    }
}

// MARK: - Scratch-buffer I/O for the multi-step commands

/// Bytes of scratch memory a multi-step command uses per back-end request.
let scratchChunkBytes = 1 << 20

extension ScratchBuffer {
    /// A one-element iovec list over `length` bytes at `offset` of the scratch memory.
    func list(offset: Int, length: Int) -> IOVectorList {
        precondition(offset >= 0 && length >= 0 && offset + length <= memory.count)
        iovecs.elements[0] = iovec(iov_base: memory.baseAddress.map { $0 + offset }, iov_len: length)
        return iovecs.view(count: 1)
    }

    /// The scratch bytes `offset ..< offset + length`.
    func bytes(offset: Int, length: Int) -> UnsafeRawBufferPointer {
        UnsafeRawBufferPointer(rebasing: memory[offset ..< offset + length])
    }
}

/// Offset of the first byte where `a` and `b` differ (over their common length), or nil.
func firstMismatch(_ a: UnsafeRawBufferPointer, _ b: UnsafeRawBufferPointer) -> Int? {
    let n = min(a.count, b.count)
    var i = 0
    while i < n {
        if a[i] != b[i] { return i }
        i += 1
    }
    return nil
}
