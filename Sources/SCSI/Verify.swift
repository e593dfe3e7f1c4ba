import BlockIO
#if canImport(Glibc)
import Glibc
#endif

/// Largest NUMBER OF LOGICAL BLOCKS of COMPARE AND WRITE (B0h MAXIMUM COMPARE AND WRITE LENGTH).
let maximumCompareAndWriteBlocks: UInt8 = 128

extension SCSITarget {
    /// Blocks per scratch-buffer request for `blockSize`.
    func chunkBlocks(_ blockSize: UInt64) -> UInt64 { max(1, UInt64(scratchChunkBytes) / blockSize) }

    /// VERIFY(10/16). BYTCHK 00b reads the range back (the medium is readable), 01b compares it with the
    /// data-out buffer, 11b compares every block with the single data-out block. Reads go through a
    /// scratch buffer in chunks of at most 1 MiB.
    func verify(_ task: inout SCSITask, unit: LogicalUnit) throws(SCSIError) -> TaskDisposition {
        let byteCheck = (task.cdb[1] >> 1) & 0x03
        if byteCheck == 2 { throw .invalidFieldInCDB(byte: 1, bit: 2) }
        let fields = TransferFields(task.cdb)
        try checkRange(lba: fields.lba, blocks: fields.blocks, capacity: unit.blockCount)
        if fields.blocks == 0 { return .complete }
        let blockSize = UInt64(unit.blockSize)
        let needed: UInt64 = byteCheck == 0 ? 0 : (byteCheck == 1 ? fields.blocks &* blockSize : blockSize)
        if UInt64(task.dataOut.totalLength) < needed { throw .invalidFieldInCDB(byte: fields.lengthByte) }
        task.dataOutLength = Int(needed)
        return startVerifyReads(&task, stage: byteCheck, lba: fields.lba, blocks: fields.blocks, blockSize: blockSize)
    }

    /// Allocates the scratch buffer (read area, then compare area) and reads the first chunk.
    private func startVerifyReads(_ task: inout SCSITask, stage: UInt8, lba: UInt64, blocks: UInt64,
                                  blockSize: UInt64) -> TaskDisposition {
        let chunk = Int(min(blocks, chunkBlocks(blockSize)) &* blockSize)
        let compareArea = stage == 1 ? chunk : (stage == 3 ? Int(blockSize) : 0)
        let scratch = ScratchBuffer(byteCount: chunk + compareArea)
        if stage == 3 {
            task.dataOut.gather(from: 0, into: UnsafeMutableRawBufferPointer(rebasing: scratch.memory[chunk ..< chunk + Int(blockSize)]))
        }
        task.scratch = scratch
        return verifyRead(&task, stage: stage, lba: lba, blocks: blocks, cursor: 0, blockSize: blockSize)
    }

    private func verifyRead(_ task: inout SCSITask, stage: UInt8, lba: UInt64, blocks: UInt64, cursor: UInt64,
                            blockSize: UInt64) -> TaskDisposition {
        let n = min(blocks - cursor, chunkBlocks(blockSize))
        task.step = .multi(kind: MultiStepKind.verify, stage: stage, lba: lba, blocks: blocks, cursor: cursor)
        return .submit(BlockRequest(operation: .read, offset: (lba &+ cursor) &* blockSize, length: n &* blockSize,
                                    buffers: task.scratch!.list(offset: 0, length: Int(n &* blockSize))))
    }

    func resumeVerify(_ task: inout SCSITask, unit: LogicalUnit, stage: UInt8, lba: UInt64, blocks: UInt64,
                      cursor: UInt64, result: BlockResult) throws(SCSIError) -> TaskDisposition {
        let blockSize = UInt64(unit.blockSize)
        let n = min(blocks - cursor, chunkBlocks(blockSize))
        let bytes = Int(n &* blockSize)
        try checkStepResult(result, op: .read, lba: lba &+ cursor, bytes: UInt64(bytes), blockSize: blockSize)
        guard let scratch = task.scratch else { throw .check(.hardwareError, .internalTargetFailure) }
        let chunk = Int(min(blocks, chunkBlocks(blockSize)) &* blockSize)
        let medium = scratch.bytes(offset: 0, length: bytes)
        let base = Int(cursor &* blockSize)
        switch stage {
        case 1:
            let expected = UnsafeMutableRawBufferPointer(rebasing: scratch.memory[chunk ..< chunk + bytes])
            guard task.dataOut.gather(from: base, into: expected) == bytes else {
                throw .invalidFieldInCDB(byte: TransferFields(task.cdb).lengthByte)
            }
            if let at = firstMismatch(medium, UnsafeRawBufferPointer(expected)) {
                throw .check(.miscompare, .miscompareDuringVerify, information: UInt64(base + at))
            }
        case 3:
            let pattern = scratch.bytes(offset: chunk, length: Int(blockSize))
            var block = 0
            while block < Int(n) {
                let start = block * Int(blockSize)
                let one = UnsafeRawBufferPointer(rebasing: medium[start ..< start + Int(blockSize)])
                if let at = firstMismatch(one, pattern) {
                    throw .check(.miscompare, .miscompareDuringVerify, information: UInt64(base + start + at))
                }
                block += 1
            }
        default:
            break
        }
        let next = cursor &+ n
        if next < blocks {
            return verifyRead(&task, stage: stage, lba: lba, blocks: blocks, cursor: next, blockSize: blockSize)
        }
        task.step = .none
        task.scratch = nil
        return .complete
    }

    /// WRITE AND VERIFY(10/16): a FUA write from the data-out buffer; with BYTCHK = 1 the range is then
    /// read back and compared with the data-out buffer. With BYTCHK = 0 the FUA write (stable before
    /// completion, errors reported) stands for the medium verification.
    func writeAndVerify(_ task: inout SCSITask, unit: LogicalUnit) throws(SCSIError) -> TaskDisposition {
        if unit.isReadOnly { throw .writeProtected }
        let fields = TransferFields(task.cdb)
        try checkTransferLimit(fields, unit: unit)
        try checkRange(lba: fields.lba, blocks: fields.blocks, capacity: unit.blockCount)
        if fields.blocks == 0 { return .complete }
        let blockSize = UInt64(unit.blockSize)
        let bytes = fields.blocks &* blockSize
        if UInt64(task.dataOut.totalLength) < bytes { throw .invalidFieldInCDB(byte: fields.lengthByte) }
        let byteCheck = task.cdb[1] & 0x02 != 0
        task.step = byteCheck
            ? .multi(kind: MultiStepKind.writeAndVerify, stage: 0, lba: fields.lba, blocks: fields.blocks, cursor: 0)
            : .single(op: .write, lba: fields.lba, blocks: fields.blocks)
        return .submit(BlockRequest(operation: .write, offset: fields.lba &* blockSize, length: bytes,
                                    buffers: task.dataOut, forceUnitAccess: true))
    }

    func resumeWriteAndVerify(_ task: inout SCSITask, unit: LogicalUnit, stage: UInt8, lba: UInt64, blocks: UInt64,
                              cursor: UInt64, result: BlockResult) throws(SCSIError) -> TaskDisposition {
        let blockSize = UInt64(unit.blockSize)
        let bytes = blocks &* blockSize
        try checkStepResult(result, op: .write, lba: lba, bytes: bytes, blockSize: blockSize)
        task.dataOutLength = Int(bytes)
        return startVerifyReads(&task, stage: 1, lba: lba, blocks: blocks, blockSize: blockSize)
    }

    /// COMPARE AND WRITE: reads N blocks, compares them with the first half of the data-out buffer and,
    /// when equal, writes the second half. The data-out buffer is copied once at the start so the guest
    /// cannot change it between compare and write. COMPARE AND WRITEs of one logical unit run one at a
    /// time (another one meanwhile gets BUSY and is retried by the initiator), so they are atomic with
    /// respect to each other; against plain WRITEs from other queues atomicity is best effort (a WRITE to
    /// the same blocks between the read and the write is not excluded). A COMPARE AND WRITE that never
    /// resumes (front-end dropped it) stops excluding others after `compareAndWriteLease` nanoseconds.
    func compareAndWrite(_ task: inout SCSITask, unit: LogicalUnit) throws(SCSIError) -> TaskDisposition {
        if unit.isReadOnly { throw .writeProtected }
        let lba = task.cdb.be64(2)
        let count = task.cdb[13]
        if count > maximumCompareAndWriteBlocks { throw .invalidFieldInCDB(byte: 13) }
        try checkRange(lba: lba, blocks: UInt64(count), capacity: unit.blockCount)
        if count == 0 { return .complete }
        let blockSize = Int(unit.blockSize)
        let half = Int(count) * blockSize
        if task.dataOut.totalLength < 2 * half { throw .invalidFieldInCDB(byte: 13) }
        if !acquireCompareAndWrite(unit) { throw SCSIError(status: .busy, sense: nil) }
        let scratch = ScratchBuffer(byteCount: 3 * half)
        task.dataOut.gather(from: 0, into: UnsafeMutableRawBufferPointer(rebasing: scratch.memory[half ..< 3 * half]))
        task.scratch = scratch
        task.dataOutLength = 2 * half
        let fua: UInt8 = task.cdb[1] & 0x08 != 0 ? 1 : 0
        task.step = .multi(kind: MultiStepKind.compareAndWrite, stage: fua, lba: lba, blocks: UInt64(count), cursor: 0)
        return .submit(BlockRequest(operation: .read, offset: lba &* UInt64(blockSize), length: UInt64(half),
                                    buffers: scratch.list(offset: 0, length: half)))
    }

    func resumeCompareAndWrite(_ task: inout SCSITask, unit: LogicalUnit, stage: UInt8, lba: UInt64, blocks: UInt64,
                               result: BlockResult) throws(SCSIError) -> TaskDisposition {
        try holdingCompareAndWrite(unit) { () throws(SCSIError) -> TaskDisposition in
            try compareAndWriteStep(&task, unit: unit, stage: stage, lba: lba, blocks: blocks, result: result)
        }
    }

    private func compareAndWriteStep(_ task: inout SCSITask, unit: LogicalUnit, stage: UInt8, lba: UInt64, blocks: UInt64,
                                     result: BlockResult) throws(SCSIError) -> TaskDisposition {
        let blockSize = UInt64(unit.blockSize)
        let half = Int(blocks &* blockSize)
        guard let scratch = task.scratch else { throw .check(.hardwareError, .internalTargetFailure) }
        if stage & 0x80 == 0 {
            // The read completed: compare.
            try checkStepResult(result, op: .read, lba: lba, bytes: UInt64(half), blockSize: blockSize)
            if let at = firstMismatch(scratch.bytes(offset: 0, length: half), scratch.bytes(offset: half, length: half)) {
                throw .check(.miscompare, .miscompareDuringVerify, information: UInt64(at))
            }
            task.step = .multi(kind: MultiStepKind.compareAndWrite, stage: stage | 0x80, lba: lba, blocks: blocks, cursor: 0)
            return .submit(BlockRequest(operation: .write, offset: lba &* blockSize, length: UInt64(half),
                                        buffers: scratch.list(offset: 2 * half, length: half),
                                        forceUnitAccess: stage & 0x01 != 0 || unit.writeThrough))
        }
        try checkStepResult(result, op: .write, lba: lba, bytes: UInt64(half), blockSize: blockSize)
        task.step = .none
        task.scratch = nil
        return .complete
    }
}

/// How long a COMPARE AND WRITE may hold its logical unit's exclusion without completing.
let compareAndWriteLease: UInt64 = 30_000_000_000

private func monotonicNanoseconds() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
}

extension SCSITarget {
    /// Takes the logical unit's COMPARE AND WRITE exclusion; false when another one holds it.
    func acquireCompareAndWrite(_ unit: LogicalUnit) -> Bool {
        let now = monotonicNanoseconds()
        return unit.mediumState.withLock { state in
            if let since = state.compareAndWriteSince, now &- since < compareAndWriteLease { return false }
            state.compareAndWriteSince = now
            return true
        }
    }

    /// Releases the exclusion.
    func releaseCompareAndWrite(_ unit: LogicalUnit) {
        unit.mediumState.withLock { $0.compareAndWriteSince = nil }
    }

    /// Runs one step of a command that holds the exclusion (COMPARE AND WRITE, ORWRITE) and releases it
    /// when the command completes or fails; a step that submits more I/O keeps it.
    func holdingCompareAndWrite(_ unit: LogicalUnit,
                                _ step: () throws(SCSIError) -> TaskDisposition) throws(SCSIError) -> TaskDisposition {
        do throws(SCSIError) {
            let disposition = try step()
            if case .complete = disposition { releaseCompareAndWrite(unit) }
            return disposition
        } catch {
            releaseCompareAndWrite(unit)
            throw error
        }
    }
}
