import BlockIO

/// Logical block provisioning limits reported in the Block Limits VPD page (B0h) and enforced here.
enum ProvisioningLimits {
    /// MAXIMUM UNMAP LBA COUNT: most blocks one UNMAP descriptor may name (1 Mi blocks: 512 MiB at
    /// 512-byte blocks, a bounded amount of back-end work per descriptor).
    static let maximumUnmapBlocks: UInt32 = 0x0010_0000
    /// MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT.
    static let maximumUnmapDescriptors: UInt32 = 256
    /// MAXIMUM WRITE SAME LENGTH: the largest count WRITE SAME(10) can express, so that WRITE SAME(10)
    /// and WRITE SAME(16) share one limit.
    static let maximumWriteSameBlocks: UInt64 = 0xFFFF
}

extension SCSITarget {
    /// WRITE SAME(10/16). An all-zero block (or NDOB = 1) becomes one write-zeroes request (the back-end
    /// may deallocate when UNMAP = 1); any other pattern, or zeroes on a back-end without write-zeroes, is
    /// written from a scratch buffer filled with the block, 1 MiB at a time. NUMBER OF LOGICAL BLOCKS 0 is
    /// refused (B0h WSNZ = 1); ANCHOR = 1 is refused by the CDB usage mask. Unless NDOB = 1 the data-out
    /// buffer must hold exactly one logical block: any other size is INVALID FIELD IN CDB (the initiator's
    /// expected transfer length disagrees with the CDB).
    func writeSame(_ task: inout SCSITask, unit: LogicalUnit) throws(SCSIError) -> TaskDisposition {
        if unit.isReadOnly { throw .writeProtected }
        let fields = TransferFields(task.cdb)
        let unmapBit = task.cdb[1] & 0x08 != 0
        let noDataOut = task.cdb.opcode == Opcode.writeSame16 && task.cdb[1] & 0x01 != 0
        let geometry = unit.geometry
        if unmapBit && !geometry.supportsDiscard { throw .invalidFieldInCDB(byte: 1, bit: 3) }
        if fields.blocks == 0 || fields.blocks > ProvisioningLimits.maximumWriteSameBlocks {
            throw .invalidFieldInCDB(byte: fields.lengthByte)
        }
        try checkRange(lba: fields.lba, blocks: fields.blocks, capacity: unit.blockCount)
        let blockSize = Int(unit.blockSize)
        let chunk = Int(min(fields.blocks, chunkBlocks(UInt64(blockSize)))) * blockSize
        var isZero = true
        var scratch: ScratchBuffer? = nil
        if !noDataOut {
            if task.dataOut.totalLength != blockSize { throw .invalidFieldInCDB(byte: fields.lengthByte) }
            let buffer = ScratchBuffer(byteCount: chunk)
            task.dataOut.gather(from: 0, into: UnsafeMutableRawBufferPointer(rebasing: buffer.memory[0 ..< blockSize]))
            task.dataOutLength = blockSize
            isZero = buffer.memory[0 ..< blockSize].allSatisfy { $0 == 0 }
            scratch = buffer
        }
        let offset = fields.lba &* UInt64(blockSize)
        let bytes = fields.blocks &* UInt64(blockSize)
        if isZero && geometry.supportsWriteZeroes {
            task.step = .single(op: .writeZeroes, lba: fields.lba, blocks: fields.blocks)
            return .submit(BlockRequest(operation: .writeZeroes, offset: offset, length: bytes, mayUnmap: unmapBit))
        }
        let buffer = scratch ?? ScratchBuffer(byteCount: chunk)
        // Replicate the first block over the chunk.
        var at = blockSize
        while at < chunk {
            let n = min(at, chunk - at)
            (buffer.memory.baseAddress! + at).copyMemory(from: buffer.memory.baseAddress!, byteCount: n)
            at += n
        }
        task.scratch = buffer
        return writeSameChunk(&task, unit: unit, lba: fields.lba, blocks: fields.blocks, cursor: 0)
    }

    private func writeSameChunk(_ task: inout SCSITask, unit: LogicalUnit, lba: UInt64, blocks: UInt64,
                                cursor: UInt64) -> TaskDisposition {
        let blockSize = UInt64(unit.blockSize)
        let n = min(blocks - cursor, chunkBlocks(blockSize))
        task.step = .multi(kind: MultiStepKind.writeSamePattern, stage: 0, lba: lba, blocks: blocks, cursor: cursor)
        return .submit(BlockRequest(operation: .write, offset: (lba &+ cursor) &* blockSize, length: n &* blockSize,
                                    buffers: task.scratch!.list(offset: 0, length: Int(n &* blockSize)),
                                    forceUnitAccess: unit.writeThrough))
    }

    func resumeWriteSame(_ task: inout SCSITask, unit: LogicalUnit, lba: UInt64, blocks: UInt64, cursor: UInt64,
                         result: BlockResult) throws(SCSIError) -> TaskDisposition {
        let blockSize = UInt64(unit.blockSize)
        let n = min(blocks - cursor, chunkBlocks(blockSize))
        try checkStepResult(result, op: .write, lba: lba &+ cursor, bytes: n &* blockSize, blockSize: blockSize)
        let next = cursor &+ n
        if next < blocks { return writeSameChunk(&task, unit: unit, lba: lba, blocks: blocks, cursor: next) }
        task.step = .none
        task.scratch = nil
        return .complete
    }

    /// UNMAP: validates the whole parameter list (header lengths, descriptor count, every range), then
    /// sends one discard request per non-empty descriptor. The list is copied once so the guest cannot
    /// change it after validation.
    func unmap(_ task: inout SCSITask, unit: LogicalUnit) throws(SCSIError) -> TaskDisposition {
        let geometry = unit.geometry
        if !geometry.supportsDiscard { throw .invalidOpcode }
        if unit.isReadOnly { throw .writeProtected }
        let listLength = Int(task.cdb.be16(7))
        if listLength == 0 { return .complete }
        if listLength < 8 { throw .check(.illegalRequest, .parameterListLengthError) }
        guard let list = task.gatherDataOut(listLength) else { throw .check(.illegalRequest, .parameterListLengthError) }
        task.dataOutLength = listLength
        let dataLength = Int(list.readBE16(0))
        let descriptorLength = Int(list.readBE16(2))
        if dataLength < 6 || dataLength + 2 > listLength { throw .check(.illegalRequest, .parameterListLengthError) }
        if descriptorLength + 8 > listLength || descriptorLength + 6 > dataLength {
            throw .check(.illegalRequest, .parameterListLengthError)
        }
        let count = descriptorLength / 16
        if count > Int(ProvisioningLimits.maximumUnmapDescriptors) { throw .invalidFieldInParameterList(byte: 2) }
        let capacity = unit.blockCount
        var i = 0
        while i < count {
            let at = 8 + 16 * i
            let lba = list.readBE64(at)
            let blocks = list.readBE32(at + 8)
            if blocks > ProvisioningLimits.maximumUnmapBlocks { throw .invalidFieldInParameterList(byte: at + 8) }
            try checkRange(lba: lba, blocks: UInt64(blocks), capacity: capacity)
            i += 1
        }
        let scratch = ScratchBuffer(byteCount: 8 + 16 * count)
        list.withUnsafeBytes { raw in
            scratch.memory.copyMemory(from: UnsafeRawBufferPointer(rebasing: raw[0 ..< 8 + 16 * count]))
        }
        task.scratch = scratch
        return unmapNext(&task, unit: unit, count: UInt64(count), from: 0)
    }

    /// Submits the discard of the first non-empty descriptor at or after `index`, or completes.
    private func unmapNext(_ task: inout SCSITask, unit: LogicalUnit, count: UInt64, from index: UInt64) -> TaskDisposition {
        guard let scratch = task.scratch else { return .complete }
        let blockSize = UInt64(unit.blockSize)
        var i = index
        while i < count {
            let at = 8 + 16 * Int(i)
            let descriptor = Array(scratch.bytes(offset: at, length: 16))
            let lba = descriptor.readBE64(0)
            let blocks = UInt64(descriptor.readBE32(8))
            if blocks != 0 {
                task.step = .multi(kind: MultiStepKind.unmap, stage: 0, lba: lba, blocks: count, cursor: i)
                return .submit(BlockRequest(operation: .discard, offset: lba &* blockSize, length: blocks &* blockSize))
            }
            i += 1
        }
        task.step = .none
        task.scratch = nil
        return .complete
    }

    func resumeUnmap(_ task: inout SCSITask, unit: LogicalUnit, count: UInt64, cursor: UInt64,
                     result: BlockResult) throws(SCSIError) -> TaskDisposition {
        if result.errno != 0 {
            var lba: UInt64 = 0
            if case let .multi(_, _, l, _, _) = task.step { lba = l }
            throw backendError(result, op: .discard, lba: lba)
        }
        return unmapNext(&task, unit: unit, count: count, from: cursor &+ 1)
    }
}
