import BlockIO
#if canImport(Glibc)
import Glibc
#endif

// Commands a remote device server must execute itself, and the remote's status and sense.
//
// A logical unit whose back-end reaches a remote SCSI target (`LogicalUnit.passesThroughCommands`)
// sends COMPARE AND WRITE unchanged: emulated here (read, compare, write) it would not be atomic for the
// other hosts sharing the remote LUN. When the remote implements persistent reservations
// (`LogicalUnit.remotePersistentReservations`, probed at login), PERSISTENT RESERVE IN/OUT pass through
// too, so that every host sees the same registrations and reservation; otherwise the local emulation
// (`ReservationState`) answers them. Every other command keeps its local implementation.
//
// A failed request whose `BlockResult.remote` is present reaches the initiator unchanged: CHECK
// CONDITION with the remote's sense key, ASC/ASCQ, INFORMATION and sense-key specific bytes (in the
// format the initiator chose with D_SENSE), BUSY, TASK SET FULL, RESERVATION CONFLICT, TASK ABORTED.
// A remote CAPACITY DATA HAS CHANGED comes back as `BlockResult.remoteBlockCount` (the back-end re-read
// the capacity and retried the command) and becomes this target's resize event.

extension SCSIPassThrough {
    /// The first (up to 16) bytes of `cdb`.
    init(_ cdb: CDB) {
        var head: UInt64 = 0, tail: UInt64 = 0
        for i in 0..<16 {
            let b = UInt64(cdb[i])
            if i < 8 { head = head << 8 | b } else { tail = tail << 8 | b }
        }
        self.init(head: head, tail: tail, length: UInt8(min(cdb.length, 16)))
    }
}

extension SCSITarget {
    /// The initiator-visible error for a remote device server's status and sense.
    static func remoteError(_ remote: RemoteSCSIStatus) -> SCSIError {
        switch remote.status {
        case SCSIStatus.checkCondition.rawValue:
            let key = SenseKey(rawValue: remote.senseKey) ?? .hardwareError
            let sks: SenseKeySpecific? = remote.senseKeySpecific & 0x80_0000 != 0
                ? .raw(UInt8(truncatingIfNeeded: remote.senseKeySpecific >> 16),
                       UInt8(truncatingIfNeeded: remote.senseKeySpecific >> 8),
                       UInt8(truncatingIfNeeded: remote.senseKeySpecific))
                : nil
            return SCSIError(sense: SenseData(key: key, AdditionalSense(remote.additionalSenseCode, remote.additionalSenseCodeQualifier),
                                              information: remote.hasInformation ? remote.information : nil,
                                              senseKeySpecific: sks))
        case SCSIStatus.busy.rawValue, SCSIStatus.acaActive.rawValue:
            return SCSIError(status: .busy, sense: nil)
        case SCSIStatus.reservationConflict.rawValue:
            return .reservationConflict
        case SCSIStatus.taskSetFull.rawValue:
            return SCSIError(status: .taskSetFull, sense: nil)
        case SCSIStatus.taskAborted.rawValue:
            return SCSIError(status: .taskAborted, sense: nil)
        default:
            // An unknown status: the initiator retries later.
            return SCSIError(status: .busy, sense: nil)
        }
    }

    /// The remote LUN's capacity changed (the back-end re-read it): the same resize event an operator
    /// resize raises (CAPACITY DATA HAS CHANGED for every nexus, `.capacityChanged` for the front-ends).
    func followRemoteCapacity(_ unit: LogicalUnit, blockCount: UInt64) {
        followCapacity(of: unit, blockCount: blockCount)
    }

    /// Follows a back-end's new capacity (a remote LUN resized on its target): when `unit` is still
    /// this target's LUN and `blockCount` differs, resizes it (shrinking allowed: the remote already
    /// did), raising CAPACITY DATA HAS CHANGED and `.capacityChanged`. Returns whether it resized.
    @discardableResult
    public func followCapacity(of unit: LogicalUnit, blockCount: UInt64) -> Bool {
        guard blockCount > 0, blockCount != unit.blockCount, logicalUnit(unit.number) === unit else { return false }
        do throws(LUNTableError) {
            try resize(unit.number, blockCount: blockCount, allowShrink: true)
            return true
        } catch {
            return false
        }
    }

    /// COMPARE AND WRITE sent unchanged to the remote, with the initiator's data-out buffers (verify and
    /// write data); the remote executes it atomically and answers MISCOMPARE itself.
    func compareAndWritePassThrough(_ task: inout SCSITask, unit: LogicalUnit) throws(SCSIError) -> TaskDisposition {
        if unit.isReadOnly { throw .writeProtected }
        let lba = task.cdb.be64(2)
        let count = task.cdb[13]
        if count > maximumCompareAndWriteBlocks { throw .invalidFieldInCDB(byte: 13) }
        try checkRange(lba: lba, blocks: UInt64(count), capacity: unit.blockCount)
        if count == 0 { return .complete }
        let bytes = 2 * UInt64(count) * UInt64(unit.blockSize)
        if UInt64(task.dataOut.totalLength) < bytes { throw .invalidFieldInCDB(byte: 13) }
        task.step = .multi(kind: MultiStepKind.passThrough, stage: Self.compareAndWriteStage, lba: lba, blocks: bytes, cursor: 0)
        return .submit(.passThrough(SCSIPassThrough(task.cdb), direction: .write, length: bytes, buffers: task.dataOut))
    }

    /// PERSISTENT RESERVE IN sent unchanged to the remote; its parameter data lands in the data-in buffers.
    func persistentReserveInPassThrough(_ task: inout SCSITask) -> TaskDisposition {
        let length = min(UInt64(task.cdb.be16(7)), UInt64(task.dataIn.totalLength))
        task.step = .multi(kind: MultiStepKind.passThrough, stage: 0, lba: 0, blocks: length, cursor: 0)
        return .submit(.passThrough(SCSIPassThrough(task.cdb), direction: length == 0 ? .flush : .read,
                                    length: length, buffers: task.dataIn))
    }

    /// PERSISTENT RESERVE OUT sent unchanged to the remote with its parameter list. The remote keeps the
    /// registrations and the reservation of every host sharing the LUN.
    func persistentReserveOutPassThrough(_ task: inout SCSITask) throws(SCSIError) -> TaskDisposition {
        let length = UInt64(task.cdb.be32(5))
        if length > 65536 || UInt64(task.dataOut.totalLength) < length {
            throw .check(.illegalRequest, .parameterListLengthError)
        }
        task.step = .multi(kind: MultiStepKind.passThrough, stage: 1, lba: 0, blocks: length, cursor: 0)
        return .submit(.passThrough(SCSIPassThrough(task.cdb), direction: length == 0 ? .flush : .write,
                                    length: length, buffers: task.dataOut))
    }

    /// `TaskStep.multi` stage of a COMPARE AND WRITE pass-through (data-out, may fall back to emulation).
    static let compareAndWriteStage: UInt8 = 2

    /// Continues a pass-through command. A COMPARE AND WRITE the remote rejects as an unknown operation
    /// code (although it listed it as supported) is emulated instead, now and from then on.
    func resumePassThrough(_ task: inout SCSITask, unit: LogicalUnit, stage: UInt8, length: UInt64,
                           result: BlockResult) throws(SCSIError) -> TaskDisposition {
        if stage == Self.compareAndWriteStage && result.remote.status == SCSIStatus.checkCondition.rawValue
            && result.remote.senseKey == SenseKey.illegalRequest.rawValue
            && result.remote.additionalSenseCode == 0x20 && result.remote.additionalSenseCodeQualifier == 0 {
            unit.stopCompareAndWritePassThrough()
            task.step = .none
            return try compareAndWrite(&task, unit: unit)
        }
        if stage == Self.compareAndWriteStage && result.errno == EINVAL && !result.remote.isPresent {
            // The back-end could not send this one as it is (e.g. too many buffer segments): emulate it.
            task.step = .none
            return try compareAndWrite(&task, unit: unit)
        }
        try resumePassThrough(&task, dataIn: stage == 0, length: length, result: result)
        return .complete
    }

    /// Completes a pass-through command: the remote's status and sense, or GOOD with the data moved.
    func resumePassThrough(_ task: inout SCSITask, dataIn: Bool, length: UInt64, result: BlockResult) throws(SCSIError) {
        task.step = .none
        if result.errno != 0 {
            if result.remote.isPresent { throw Self.remoteError(result.remote) }
            throw BackendErrorMapping.error(errno: result.errno, operation: dataIn ? .read : .write)
        }
        let moved = Int(min(result.bytesTransferred, length))
        if dataIn { task.dataInLength = moved } else { task.dataOutLength = moved }
    }
}
