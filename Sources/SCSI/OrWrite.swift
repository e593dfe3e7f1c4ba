import BlockIO

extension SCSITarget {
    /// ORWRITE(16): for each chunk of at most 1 MiB, reads the blocks into a scratch buffer, ORs the
    /// matching data-out bytes into them and writes the result back (FUA when FUA = 1 or the write cache
    /// is off). ORPROTECT must be 0 (no protection information; usage mask). The command holds the logical
    /// unit's COMPARE AND WRITE exclusion from the first read to the last write, so ORWRITEs and COMPARE
    /// AND WRITEs of one logical unit never interleave (a second one meanwhile gets BUSY); against plain
    /// WRITEs the read-modify-write is best effort, as for COMPARE AND WRITE.
    func orWrite(_ task: inout SCSITask, unit: LogicalUnit) throws(SCSIError) -> TaskDisposition {
        if unit.isReadOnly { throw .writeProtected }
        let fields = TransferFields(task.cdb)
        try checkTransferLimit(fields, unit: unit)
        try checkRange(lba: fields.lba, blocks: fields.blocks, capacity: unit.blockCount)
        if fields.blocks == 0 { return .complete }
        let blockSize = UInt64(unit.blockSize)
        let bytes = fields.blocks &* blockSize
        if UInt64(task.dataOut.totalLength) < bytes { throw .invalidFieldInCDB(byte: fields.lengthByte) }
        if !acquireCompareAndWrite(unit) { throw SCSIError(status: .busy, sense: nil) }
        let chunk = Int(min(fields.blocks, chunkBlocks(blockSize)) &* blockSize)
        task.scratch = ScratchBuffer(byteCount: 2 * chunk)
        task.dataOutLength = Int(bytes)
        let fua: UInt8 = task.cdb[1] & 0x08 != 0 ? 1 : 0
        return orWriteRead(&task, fua: fua, lba: fields.lba, blocks: fields.blocks, cursor: 0, blockSize: blockSize)
    }

    /// Reads the chunk at `cursor` into the first half of the scratch buffer.
    private func orWriteRead(_ task: inout SCSITask, fua: UInt8, lba: UInt64, blocks: UInt64, cursor: UInt64,
                             blockSize: UInt64) -> TaskDisposition {
        let n = min(blocks - cursor, chunkBlocks(blockSize))
        task.step = .multi(kind: MultiStepKind.orWrite, stage: fua, lba: lba, blocks: blocks, cursor: cursor)
        return .submit(BlockRequest(operation: .read, offset: (lba &+ cursor) &* blockSize, length: n &* blockSize,
                                    buffers: task.scratch!.list(offset: 0, length: Int(n &* blockSize))))
    }

    func resumeOrWrite(_ task: inout SCSITask, unit: LogicalUnit, stage: UInt8, lba: UInt64, blocks: UInt64,
                       cursor: UInt64, result: BlockResult) throws(SCSIError) -> TaskDisposition {
        try holdingCompareAndWrite(unit) { () throws(SCSIError) -> TaskDisposition in
            try orWriteStep(&task, unit: unit, stage: stage, lba: lba, blocks: blocks, cursor: cursor, result: result)
        }
    }

    /// Stage bit 7 clear: the read of the chunk at `cursor` completed; OR and write it. Set: the write
    /// completed; read the next chunk or complete. Bit 0 is FUA.
    private func orWriteStep(_ task: inout SCSITask, unit: LogicalUnit, stage: UInt8, lba: UInt64, blocks: UInt64,
                             cursor: UInt64, result: BlockResult) throws(SCSIError) -> TaskDisposition {
        let blockSize = UInt64(unit.blockSize)
        let n = min(blocks - cursor, chunkBlocks(blockSize))
        let bytes = Int(n &* blockSize)
        guard let scratch = task.scratch else { throw .check(.hardwareError, .internalTargetFailure) }
        if stage & 0x80 == 0 {
            try checkStepResult(result, op: .read, lba: lba &+ cursor, bytes: UInt64(bytes), blockSize: blockSize)
            let chunk = scratch.memory.count / 2
            let incoming = UnsafeMutableRawBufferPointer(rebasing: scratch.memory[chunk ..< chunk + bytes])
            guard task.dataOut.gather(from: Int(cursor &* blockSize), into: incoming) == bytes else {
                throw .invalidFieldInCDB(byte: TransferFields(task.cdb).lengthByte)
            }
            let medium = scratch.memory.baseAddress!
            let data = incoming.baseAddress!
            var i = 0
            while i + 8 <= bytes {
                let word = medium.loadUnaligned(fromByteOffset: i, as: UInt64.self)
                    | data.loadUnaligned(fromByteOffset: i, as: UInt64.self)
                medium.storeBytes(of: word, toByteOffset: i, as: UInt64.self)
                i += 8
            }
            while i < bytes {
                medium.storeBytes(of: medium.load(fromByteOffset: i, as: UInt8.self) | data.load(fromByteOffset: i, as: UInt8.self),
                                  toByteOffset: i, as: UInt8.self)
                i += 1
            }
            task.step = .multi(kind: MultiStepKind.orWrite, stage: stage | 0x80, lba: lba, blocks: blocks, cursor: cursor)
            return .submit(BlockRequest(operation: .write, offset: (lba &+ cursor) &* blockSize, length: UInt64(bytes),
                                        buffers: scratch.list(offset: 0, length: bytes),
                                        forceUnitAccess: stage & 0x01 != 0 || unit.writeThrough))
        }
        try checkStepResult(result, op: .write, lba: lba &+ cursor, bytes: UInt64(bytes), blockSize: blockSize)
        let next = cursor &+ n
        if next < blocks {
            return orWriteRead(&task, fua: stage & 0x01, lba: lba, blocks: blocks, cursor: next, blockSize: blockSize)
        }
        task.step = .none
        task.scratch = nil
        return .complete
    }
}
