import BlockIO
import Synchronization

// The SPC-4 / SBC-3 command layer of a direct-access logical unit.
//
// Front-ends drive it with `SCSITarget.execute(_:view:)` and `SCSITarget.resume(_:with:)`:
//
//     var disposition = target.execute(&task, view: &view)
//     // .submit(request): queue `request` on back-end `task.backendID`; when it completes:
//     disposition = target.resume(&task, with: result)    // may submit again (multi-step commands)
//     // .complete: send task.status, task.sense, task.dataInLength (residual: task.dataInResidual)
//     // and, when task.taskManagementRequest != nil (PREEMPT AND ABORT), apply it to the task sets first.
//
// Commands: TEST UNIT READY, REQUEST SENSE, INQUIRY (VPD 00h 80h 83h 86h B0h B1h B2h), REPORT LUNS,
// REPORT SUPPORTED OPERATION CODES, READ CAPACITY(10/16), READ/WRITE(6/10/12/16), WRITE AND VERIFY(10/12/16),
// VERIFY(10/12/16), COMPARE AND WRITE, ORWRITE(16), WRITE SAME(10/16), UNMAP, SYNCHRONIZE CACHE(10/16), GET LBA STATUS,
// PRE-FETCH(10/16), READ DEFECT DATA(10/12),
// START STOP UNIT, PREVENT ALLOW MEDIUM REMOVAL, MODE SENSE/SELECT(6/10), PERSISTENT RESERVE IN/OUT,
// RESERVE/RELEASE(6/10). `CommandTable` lists them with their CDB usage masks: any bit outside a mask
// (reserved fields, RDPROTECT/WRPROTECT, ANCHOR, NACA...) is INVALID FIELD IN CDB pointing at that bit.
//
// Multi-step commands keep their state in `SCSITask.step` and a `ScratchBuffer` (never READ/WRITE):
// VERIFY and WRITE AND VERIFY with BYTCHK read back in chunks of 1 MiB; COMPARE AND WRITE reads, compares
// and writes from a copy of the data-out buffer; ORWRITE reads, ORs in the data-out and writes back per 1 MiB
// chunk; WRITE SAME with a non-zero pattern writes 1 MiB chunks;
// UNMAP sends one discard per descriptor. Back-end errors become sense in `BackendErrorMapping` only.

/// Command-layer state of a logical unit that only rare commands touch.
struct MediumState: Sendable {
    /// Nexuses that issued PREVENT ALLOW MEDIUM REMOVAL with PREVENT = 1.
    var preventing: Set<ITNexus> = []
    /// When the COMPARE AND WRITE in progress started (monotonic nanoseconds); nil when none is.
    var compareAndWriteSince: UInt64? = nil
}

/// Kinds of multi-step commands, kept in `TaskStep.multi(kind:...)`.
enum MultiStepKind {
    static let verify: UInt8 = 1
    static let writeAndVerify: UInt8 = 2
    static let compareAndWrite: UInt8 = 3
    static let writeSamePattern: UInt8 = 4
    static let unmap: UInt8 = 5
    static let orWrite: UInt8 = 6
    /// A command sent unchanged to a remote device server (`SCSIPassThrough`).
    static let passThrough: UInt8 = 7
}

extension SCSITarget {
    /// Starts a command: decodes the CDB, answers emulated commands at once (`.complete`, with data-in,
    /// status and sense filled in `task`) or asks for back-end I/O (`.submit`, with `task.backendID` set);
    /// the front-end then calls `resume(_:with:)` with the request's result.
    ///
    /// Checks run in SAM/SPC order: logical unit present, pending unit attention, reservation conflict,
    /// operation code, then the command's own fields. READ and WRITE take no lock and allocate nothing
    /// unless a unit attention or a reservation is pending: their request's buffers are `task.dataIn` /
    /// `task.dataOut` themselves.
    public func execute(_ task: inout SCSITask, view: inout LUNMapView) -> TaskDisposition {
        refresh(&view)
        task.status = .good
        task.sense.length = 0
        task.dataInLength = 0
        task.dataOutLength = 0
        task.step = .none
        if task.scratch != nil { task.scratch = nil }
        if task.taskManagementBox != nil { task.taskManagementBox = nil }
        let opcode = task.cdb.opcode
        guard let lun = task.lun, let unit = view.unit(lun) else {
            task.unit = nil
            executeWithoutUnit(&task, view: view)
            return .complete
        }
        task.unit = unit
        task.backendID = unit.backendID
        task.lunGeneration = unit.generation
        let exempt = opcode == Opcode.inquiry || opcode == Opcode.reportLUNs || opcode == Opcode.requestSense
        if !exempt && unit.unitAttentions.mayHavePending(for: task.nexus),
           let condition = unit.unitAttentions.takeNext(for: task.nexus) {
            task.fail(.check(.unitAttention, condition), format: unit.senseFormat)
            return .complete
        }
        if unit.reservations.isReserved && unit.reservations.conflicts(task.cdb, from: task.nexus) {
            task.fail(.reservationConflict, format: unit.senseFormat)
            return .complete
        }
        do throws(SCSIError) {
            return try dispatch(&task, unit: unit, view: view)
        } catch {
            task.fail(error, format: unit.senseFormat)
            return .complete
        }
    }

    /// Continues a command after its back-end request completed: submits the next request of a
    /// multi-step command or completes the task (status, sense, data-in length).
    public func resume(_ task: inout SCSITask, with result: BlockResult) -> TaskDisposition {
        guard let unit = task.unit else {
            task.step = .none
            task.fail(.check(.hardwareError, .internalTargetFailure), format: .fixed)
            return .complete
        }
        if result.remoteBlockCount != 0 { followRemoteCapacity(unit, blockCount: result.remoteBlockCount) }
        do throws(SCSIError) {
            switch task.step {
            case .none:
                throw SCSIError.check(.hardwareError, .internalTargetFailure)
            case let .single(op, lba, blocks):
                task.step = .none
                try completeSingle(&task, unit: unit, op: op, lba: lba, blocks: blocks, result: result)
                return .complete
            case let .multi(kind, stage, lba, blocks, cursor):
                switch kind {
                case MultiStepKind.verify:
                    return try resumeVerify(&task, unit: unit, stage: stage, lba: lba, blocks: blocks, cursor: cursor, result: result)
                case MultiStepKind.writeAndVerify:
                    return try resumeWriteAndVerify(&task, unit: unit, stage: stage, lba: lba, blocks: blocks, cursor: cursor, result: result)
                case MultiStepKind.compareAndWrite:
                    return try resumeCompareAndWrite(&task, unit: unit, stage: stage, lba: lba, blocks: blocks, result: result)
                case MultiStepKind.writeSamePattern:
                    return try resumeWriteSame(&task, unit: unit, lba: lba, blocks: blocks, cursor: cursor, result: result)
                case MultiStepKind.unmap:
                    return try resumeUnmap(&task, unit: unit, count: blocks, cursor: cursor, result: result)
                case MultiStepKind.passThrough:
                    return try resumePassThrough(&task, unit: unit, stage: stage, length: blocks, result: result)
                case MultiStepKind.orWrite:
                    return try resumeOrWrite(&task, unit: unit, stage: stage, lba: lba, blocks: blocks, cursor: cursor,
                                             result: result)
                default:
                    throw SCSIError.check(.hardwareError, .internalTargetFailure)
                }
            }
        } catch {
            task.step = .none
            task.scratch = nil
            task.fail(error, format: unit.senseFormat)
            return .complete
        }
    }

    /// Completes a one-request command: errno to sense, short transfers, data-in length.
    private func completeSingle(_ task: inout SCSITask, unit: LogicalUnit, op: BlockOperation, lba: UInt64,
                                blocks: UInt64, result: BlockResult) throws(SCSIError) {
        if result.errno != 0 { throw backendError(result, op: op, lba: op == .flush ? nil : lba) }
        let blockSize = UInt64(unit.blockSize)
        let expected = blocks &* blockSize
        switch op {
        case .read:
            let got = min(result.bytesTransferred, expected)
            task.dataInLength = Int(got)
            if got < expected {
                // The back-end ended early: the medium ends before the range (LUN shrunk under us).
                throw SCSIError.check(.illegalRequest, .lbaOutOfRange, information: lba &+ got / blockSize)
            }
        case .write:
            task.dataOutLength = Int(min(result.bytesTransferred, expected))
            if result.bytesTransferred < expected {
                let firstUnwritten = lba &+ result.bytesTransferred / blockSize
                if lba &+ blocks > unit.blockCount {
                    throw SCSIError.check(.illegalRequest, .lbaOutOfRange, information: firstUnwritten)
                }
                throw SCSIError.check(.mediumError, .writeError, information: firstUnwritten)
            }
        case .flush, .discard, .writeZeroes:
            break
        }
    }

    /// The error for a failed back-end request: the remote device server's status and sense unchanged
    /// when the back-end reports them (`BlockResult.remote`), else the errno mapping (with the LBA in
    /// INFORMATION for medium errors).
    func backendError(_ result: BlockResult, op: BlockOperation, lba: UInt64?) -> SCSIError {
        if result.remote.isPresent { return Self.remoteError(result.remote) }
        return backendError(result.errno, op: op, lba: lba)
    }

    /// Checks the result of one back-end request of a multi-request command (`lba`: its first block,
    /// `bytes`: its length): a failed request becomes ``backendError(_:op:lba:)``; a short read means the
    /// medium ends early (LBA OUT OF RANGE), a short write is a WRITE ERROR, both with the first block not
    /// transferred in INFORMATION.
    func checkStepResult(_ result: BlockResult, op: BlockOperation, lba: UInt64, bytes: UInt64,
                         blockSize: UInt64) throws(SCSIError) {
        if result.errno != 0 { throw backendError(result, op: op, lba: lba) }
        guard result.bytesTransferred < bytes else { return }
        let firstMissing = lba &+ result.bytesTransferred / blockSize
        if op == .read { throw .check(.illegalRequest, .lbaOutOfRange, information: firstMissing) }
        throw .check(.mediumError, .writeError, information: firstMissing)
    }

    /// The error for a failed back-end request, with the LBA in INFORMATION for medium errors.
    func backendError(_ code: Int32, op: BlockOperation, lba: UInt64?) -> SCSIError {
        var error = BackendErrorMapping.error(errno: code, operation: op)
        if let lba, error.sense?.key == .mediumError { error.sense?.information = lba }
        return error
    }

    /// Commands addressed to a LUN that is not in the map.
    private func executeWithoutUnit(_ task: inout SCSITask, view: LUNMapView) {
        do throws(SCSIError) {
            switch task.cdb.opcode {
            case Opcode.inquiry:
                try CommandTable.checkReservedBits(task.cdb, [0xFF, 0x01, 0xFF, 0xFF, 0xFF, 0])
                if task.cdb[1] & 0x01 != 0 { throw SCSIError.logicalUnitNotSupported }
                if task.cdb[2] != 0 { throw SCSIError.invalidFieldInCDB(byte: 2) }
                task.respond(InquiryData.standard(identity: nil, geometry: nil),
                             allocationLength: Int(task.cdb.be16(3)))
            case Opcode.reportLUNs:
                try reportLUNs(&task, view: view)
            case Opcode.requestSense:
                try CommandTable.checkReservedBits(task.cdb, [0xFF, 0x01, 0, 0, 0xFF, 0])
                let format: SenseFormat = task.cdb[1] & 0x01 != 0 ? .descriptor : .fixed
                var bytes = SenseBytes()
                let n = SenseData(key: .illegalRequest, .logicalUnitNotSupported).encode(format, into: &bytes)
                task.respond(Array(bytes.array.prefix(n)), allocationLength: Int(task.cdb[4]))
            default:
                throw SCSIError.logicalUnitNotSupported
            }
        } catch {
            task.fail(error, format: .fixed)
        }
    }

    /// Routes a command for a present logical unit, after the UA and reservation checks.
    @inline(__always)
    private func dispatch(_ task: inout SCSITask, unit: LogicalUnit, view: LUNMapView) throws(SCSIError) -> TaskDisposition {
        switch task.cdb.opcode {
        case Opcode.read10, Opcode.read16, Opcode.read12, Opcode.read6:
            return try read(&task, unit: unit)
        case Opcode.write10, Opcode.write16, Opcode.write12, Opcode.write6:
            return try write(&task, unit: unit)
        default:
            break
        }
        guard let descriptor = CommandTable.descriptor(for: task.cdb) else {
            if CommandTable.hasServiceActions(task.cdb.opcode) { throw .invalidFieldInCDB(byte: 1, bit: 4) }
            throw .invalidOpcode
        }
        try CommandTable.checkReservedBits(task.cdb, descriptor.usage)
        switch task.cdb.opcode {
        case Opcode.testUnitReady:
            return .complete
        case Opcode.requestSense:
            requestSense(&task, unit: unit)
            return .complete
        case Opcode.inquiry:
            try inquiry(&task, unit: unit)
            return .complete
        case Opcode.reportLUNs:
            try reportLUNs(&task, view: view)
            unit.unitAttentions.remove(.reportedLUNsDataHasChanged, for: task.nexus)
            return .complete
        case Opcode.maintenanceIn:
            try reportSupportedOperationCodes(&task)
            return .complete
        case Opcode.serviceActionIn16:
            if task.cdb[1] & 0x1F == Opcode.readCapacity16 {
                try readCapacity16(&task, unit: unit)
            } else {
                try getLBAStatus(&task, unit: unit)
            }
            return .complete
        case Opcode.readCapacity10:
            try readCapacity10(&task, unit: unit)
            return .complete
        case Opcode.modeSense6, Opcode.modeSense10:
            try modeSense(&task, unit: unit)
            return .complete
        case Opcode.modeSelect6, Opcode.modeSelect10:
            try modeSelect(&task, unit: unit)
            return .complete
        case Opcode.startStopUnit:
            try startStopUnit(&task, unit: unit)
            return .complete
        case Opcode.preventAllowMediumRemoval:
            try preventAllowMediumRemoval(&task, unit: unit)
            return .complete
        case Opcode.synchronizeCache10, Opcode.synchronizeCache16:
            return try synchronizeCache(&task, unit: unit)
        case Opcode.verify10, Opcode.verify12, Opcode.verify16:
            return try verify(&task, unit: unit)
        case Opcode.preFetch10, Opcode.preFetch16:
            try preFetch(&task, unit: unit)
            return .complete
        case Opcode.readDefectData10, Opcode.readDefectData12:
            try readDefectData(&task)
            return .complete
        case Opcode.writeAndVerify10, Opcode.writeAndVerify12, Opcode.writeAndVerify16:
            return try writeAndVerify(&task, unit: unit)
        case Opcode.compareAndWrite:
            if unit.passesThroughCommands { return try compareAndWritePassThrough(&task, unit: unit) }
            return try compareAndWrite(&task, unit: unit)
        case Opcode.orWrite16:
            return try orWrite(&task, unit: unit)
        case Opcode.writeSame10, Opcode.writeSame16:
            return try writeSame(&task, unit: unit)
        case Opcode.unmap:
            return try unmap(&task, unit: unit)
        case Opcode.persistentReserveIn:
            if unit.remotePersistentReservations { return persistentReserveInPassThrough(&task) }
            try persistentReserveIn(&task, unit: unit)
            return .complete
        case Opcode.persistentReserveOut:
            if unit.remotePersistentReservations { return try persistentReserveOutPassThrough(&task) }
            try persistentReserveOut(&task, unit: unit)
            return .complete
        case Opcode.reserve6, Opcode.reserve10:
            try ReservationState.validateReserveRelease(task.cdb)
            try unit.reservations.reserve(from: task.nexus)
            return .complete
        case Opcode.release6, Opcode.release10:
            try ReservationState.validateReserveRelease(task.cdb)
            unit.reservations.release(from: task.nexus)
            return .complete
        default:
            throw .invalidOpcode
        }
    }
}

// MARK: - Task helpers

extension SCSITask {
    /// Ends the task with `error`'s status and sense (encoded in `format`).
    mutating func fail(_ error: SCSIError, format: SenseFormat) {
        status = error.status
        if let sense = error.sense {
            sense.encode(format, into: &self.sense)
        } else {
            self.sense.length = 0
        }
    }

    /// Sends `data` as data-in, truncated to `allocationLength` and to the data-in buffers.
    mutating func respond(_ data: [UInt8], allocationLength: Int) {
        let n = Swift.min(data.count, allocationLength)
        guard n > 0 else {
            dataInLength = 0
            return
        }
        dataInLength = data.withUnsafeBytes { raw in
            dataIn.scatter(at: 0, from: UnsafeRawBufferPointer(rebasing: raw[0..<n]))
        }
    }

    /// The first `count` bytes of data-out, or nil when the initiator sent fewer.
    func gatherDataOut(_ count: Int) -> [UInt8]? {
        guard count >= 0 else { return nil }
        if count == 0 { return [] }
        var bytes = [UInt8](repeating: 0, count: count)
        let got = bytes.withUnsafeMutableBytes { dataOut.gather(from: 0, into: $0) }
        return got == count ? bytes : nil
    }
}

// MARK: - Byte building

extension Array where Element == UInt8 {
    mutating func putBE16(_ v: UInt16, at i: Int) {
        self[i] = UInt8(v >> 8)
        self[i + 1] = UInt8(truncatingIfNeeded: v)
    }

    mutating func putBE32(_ v: UInt32, at i: Int) {
        putBE16(UInt16(v >> 16), at: i)
        putBE16(UInt16(truncatingIfNeeded: v), at: i + 2)
    }

    mutating func putBE64(_ v: UInt64, at i: Int) {
        putBE32(UInt32(v >> 32), at: i)
        putBE32(UInt32(truncatingIfNeeded: v), at: i + 4)
    }

    func readBE16(_ i: Int) -> UInt16 { UInt16(self[i]) << 8 | UInt16(self[i + 1]) }
    func readBE32(_ i: Int) -> UInt32 { UInt32(readBE16(i)) << 16 | UInt32(readBE16(i + 2)) }
    func readBE64(_ i: Int) -> UInt64 { UInt64(readBE32(i)) << 32 | UInt64(readBE32(i + 4)) }

    /// `text` as space-padded printable ASCII of exactly `width` bytes (other characters become spaces).
    static func ascii(_ text: String, width: Int) -> [UInt8] {
        var out = [UInt8](repeating: 0x20, count: width)
        var i = 0
        for b in text.utf8 {
            guard i < width else { break }
            out[i] = (b >= 0x20 && b < 0x7F) ? b : 0x20
            i += 1
        }
        return out
    }
}
