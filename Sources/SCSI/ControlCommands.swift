import BlockIO

extension LogicalUnit {
    /// Ends the medium removal prevention of `nexus` (I_T nexus loss, I_T NEXUS RESET), or of every nexus
    /// when `nexus` is nil (LOGICAL UNIT RESET, power on), as SPC-4 PREVENT ALLOW MEDIUM REMOVAL requires.
    public func clearMediumRemovalPrevention(for nexus: ITNexus?) {
        mediumState.withLock { state in
            if let nexus { state.preventing.remove(nexus) } else { state.preventing.removeAll() }
        }
    }

    /// Whether some nexus prevents medium removal.
    public var isMediumRemovalPrevented: Bool { mediumState.withLock { !$0.preventing.isEmpty } }
}

extension SCSITarget {
    /// REPORT LUNS: SELECT REPORT 00h and 02h list every LUN, 01h (well-known LUNs) lists none. The LUN
    /// LIST LENGTH field gives the full list even when the allocation length truncates it.
    func reportLUNs(_ task: inout SCSITask, view: LUNMapView) throws(SCSIError) {
        try CommandTable.checkReservedBits(task.cdb, [0xFF, 0, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0])
        let select = task.cdb[2]
        guard select <= 0x02 else { throw .invalidFieldInCDB(byte: 2) }
        let allocation = task.cdb.be32(6)
        if allocation < 16 { throw .invalidFieldInCDB(byte: 6) }
        let numbers = select == 0x01 ? [] : view.numbers
        var data = [UInt8](repeating: 0, count: 8 + 8 * numbers.count)
        data.putBE32(UInt32(8 * numbers.count), at: 0)
        for (i, lun) in numbers.enumerated() { data.putBE64(lun.samEncoding, at: 8 + 8 * i) }
        task.respond(data, allocationLength: Int(allocation))
    }

    /// REQUEST SENSE: the highest-priority pending unit attention (taken off the board) or NO SENSE,
    /// in the format the DESC bit asks for.
    func requestSense(_ task: inout SCSITask, unit: LogicalUnit) {
        let format: SenseFormat = task.cdb[1] & 0x01 != 0 ? .descriptor : .fixed
        let sense: SenseData
        if unit.unitAttentions.mayHavePending(for: task.nexus), let ua = unit.unitAttentions.takeNext(for: task.nexus) {
            sense = SenseData(key: .unitAttention, ua)
        } else {
            sense = SenseData(key: .noSense, .noAdditionalSense)
        }
        var bytes = SenseBytes()
        sense.encode(format, into: &bytes)
        task.respond(bytes.array, allocationLength: Int(task.cdb[4]))
    }

    /// READ CAPACITY(10): last LBA (FFFFFFFFh when it does not fit) and block length.
    func readCapacity10(_ task: inout SCSITask, unit: LogicalUnit) throws(SCSIError) {
        if task.cdb[8] & 0x01 == 0 && task.cdb.be32(2) != 0 { throw .invalidFieldInCDB(byte: 2) }
        let last = unit.blockCount &- 1
        var data = [UInt8](repeating: 0, count: 8)
        data.putBE32(last >= 0xFFFF_FFFF ? 0xFFFF_FFFF : UInt32(last), at: 0)
        data.putBE32(unit.blockSize, at: 4)
        task.respond(data, allocationLength: 8)
    }

    /// READ CAPACITY(16): last LBA, block length, logical blocks per physical block exponent, LBPME
    /// and LBPRZ; allocation length honoured.
    func readCapacity16(_ task: inout SCSITask, unit: LogicalUnit) throws(SCSIError) {
        if task.cdb[14] & 0x01 == 0 && task.cdb.be64(2) != 0 { throw .invalidFieldInCDB(byte: 2) }
        let g = unit.geometry
        var data = [UInt8](repeating: 0, count: 32)
        data.putBE64(unit.blockCount &- 1, at: 0)
        data.putBE32(g.logicalBlockSize, at: 8)
        let ratio = max(1, g.physicalBlockSize / max(g.logicalBlockSize, 1))
        data[13] = UInt8(ratio.trailingZeroBitCount & 0x0F)
        if g.supportsDiscard {
            data[14] = 0x80 | (g.discardReadsZeroes ? 0x40 : 0)
        }
        task.respond(data, allocationLength: Int(task.cdb.be32(10)))
    }

    /// GET LBA STATUS: LBA status descriptors from the starting LBA on (the first one starts exactly there),
    /// as many as the allocation length holds, at most `maximumLBAStatusDescriptors`. On a thin-provisioned
    /// unit (LBPME = 1) with a back-end allocation query, each extent is "mapped" (0h) or "deallocated" (1h)
    /// as the back-end reports it (a partly deallocated block counts as mapped); otherwise one descriptor
    /// covers the rest of the LUN (at most FFFFFFFFh blocks) as "mapped or unknown".
    func getLBAStatus(_ task: inout SCSITask, unit: LogicalUnit) throws(SCSIError) {
        let lba = task.cdb.be64(2)
        let allocation = Int(task.cdb.be32(10))
        let capacity = unit.blockCount
        if lba >= capacity { throw .lbaOutOfRange }
        let blockSize = UInt64(unit.blockSize)
        let query = unit.geometry.supportsDiscard ? unit.allocationQuery : nil
        let room = allocation >= 24 ? min(Self.maximumLBAStatusDescriptors, (allocation - 8) / 16) : 1
        var data = [UInt8](repeating: 0, count: 8)
        var count = 0
        var previous: (lba: UInt64, blocks: UInt64, state: UInt8)? = nil
        var at = lba
        var queries = 0
        while at < capacity && queries < 4 * Self.maximumLBAStatusDescriptors {
            queries += 1
            let remaining = min(capacity - at, UInt64(UInt32.max))
            var blocks = remaining
            var state: UInt8 = 0
            if let query, let extent = query(at &* blockSize, remaining &* blockSize), extent.length > 0 {
                let length = min(extent.length, remaining &* blockSize)
                if extent.state == .deallocated && length >= blockSize {
                    blocks = length / blockSize
                    state = 1
                } else if extent.state == .mapped {
                    blocks = (length + blockSize - 1) / blockSize
                } else {
                    blocks = 1  // a hole smaller than a block: the block still holds data
                }
            }
            if let p = previous, p.state == state, p.blocks + blocks <= UInt64(UInt32.max) {
                previous = (p.lba, p.blocks + blocks, state)
            } else {
                if let p = previous {
                    if count == room { break }
                    Self.appendLBAStatus(&data, p)
                    count += 1
                }
                previous = (at, blocks, state)
            }
            at += blocks
            if query == nil { break }
        }
        if let p = previous, count < room {
            Self.appendLBAStatus(&data, p)
            count += 1
        }
        data.putBE32(UInt32(4 + 16 * count), at: 0)
        task.respond(data, allocationLength: allocation)
    }

    /// Most LBA status descriptors one GET LBA STATUS returns (each may cost a back-end query).
    static let maximumLBAStatusDescriptors = 64

    private static func appendLBAStatus(_ data: inout [UInt8], _ d: (lba: UInt64, blocks: UInt64, state: UInt8)) {
        var descriptor = [UInt8](repeating: 0, count: 16)
        descriptor.putBE64(d.lba, at: 0)
        descriptor.putBE32(UInt32(d.blocks), at: 8)
        descriptor[12] = d.state
        data += descriptor
    }

    /// READ DEFECT DATA(10/12): a virtual medium has no defects, so both the primary and the grown defect
    /// lists are empty. The header echoes the requested lists as valid (PLISTV/GLISTV) and the requested
    /// address format (an empty list is valid in every format); the reserved format 111b is refused.
    func readDefectData(_ task: inout SCSITask) throws(SCSIError) {
        let twelve = task.cdb.opcode == Opcode.readDefectData12
        let flagsByte = twelve ? 1 : 2
        let flags = task.cdb[flagsByte] & 0x1F
        if flags & 0x07 == 0x07 { throw .invalidFieldInCDB(byte: flagsByte, bit: 2) }
        let allocation = twelve ? Int(task.cdb.be32(6)) : Int(task.cdb.be16(7))
        var header = [UInt8](repeating: 0, count: twelve ? 8 : 4)
        header[1] = flags  // PLISTV = REQ_PLIST, GLISTV = REQ_GLIST, format; list length 0 (12: generation 0)
        task.respond(header, allocationLength: allocation)
    }

    /// START STOP UNIT: accepted (the unit stays ready); an eject (LOEJ = 1, START = 0, POWER CONDITION 0)
    /// while some nexus prevents medium removal fails with MEDIUM REMOVAL PREVENTED.
    func startStopUnit(_ task: inout SCSITask, unit: LogicalUnit) throws(SCSIError) {
        let b4 = task.cdb[4]
        let powerCondition = b4 >> 4
        let loadEject = b4 & 0x02 != 0
        let start = b4 & 0x01 != 0
        if powerCondition == 0 && loadEject && !start {
            let prevented = unit.mediumState.withLock { !$0.preventing.isEmpty }
            if prevented { throw .check(.illegalRequest, .mediumRemovalPrevented) }
        }
    }

    /// PREVENT ALLOW MEDIUM REMOVAL: PREVENT 0 or 1, tracked per I_T nexus.
    func preventAllowMediumRemoval(_ task: inout SCSITask, unit: LogicalUnit) throws(SCSIError) {
        let prevent = task.cdb[4] & 0x03
        if prevent > 1 { throw .invalidFieldInCDB(byte: 4, bit: 1) }
        let nexus = task.nexus
        unit.mediumState.withLock { state in
            if prevent == 1 { state.preventing.insert(nexus) } else { state.preventing.remove(nexus) }
        }
    }

    /// PERSISTENT RESERVE IN: the reservation state's parameter data, truncated to the allocation length.
    func persistentReserveIn(_ task: inout SCSITask, unit: LogicalUnit) throws(SCSIError) {
        let data = try unit.reservations.persistentReserveIn(task.cdb, from: task.nexus)
        task.respond(data, allocationLength: Int(task.cdb.be16(7)))
    }

    /// PERSISTENT RESERVE OUT: gathers the parameter list (at most 64 KiB), applies it and establishes the
    /// unit attentions it asks for. Tasks to abort (PREEMPT AND ABORT) live in the front-end's task sets:
    /// the plan is handed back in `task.taskManagementRequest`.
    func persistentReserveOut(_ task: inout SCSITask, unit: LogicalUnit) throws(SCSIError) {
        let length = task.cdb.be32(5)
        if length > 65536 { throw .check(.illegalRequest, .parameterListLengthError) }
        let available = min(Int(length), task.dataOut.totalLength)
        let parameters = task.gatherDataOut(available) ?? []
        task.dataOutLength = parameters.count
        let effects = try unit.reservations.persistentReserveOut(task.cdb, parameters: parameters, from: task.nexus)
        for (condition, scope) in effects.unitAttentions { unit.unitAttentions.establish(condition, for: scope) }
        if !effects.abortTasksOf.isEmpty, let lun = task.lun {
            task.taskManagementBox = TaskManagementPlanBox(TaskManagementPlan.preemptAndAbort(effects, lun: lun, from: task.nexus))
        }
    }

    /// REPORT SUPPORTED OPERATION CODES (MAINTENANCE IN 0Ch): reporting options 0 (all), 1 (opcode),
    /// 2 (opcode and service action) and 3 (either), with command timeouts descriptors when RCTD = 1.
    func reportSupportedOperationCodes(_ task: inout SCSITask) throws(SCSIError) {
        let cdb = task.cdb
        let timeouts = cdb[2] & 0x80 != 0
        let option = cdb[2] & 0x07
        let opcode = cdb[3]
        let action = cdb.be16(4)
        let allocation = Int(cdb.be32(6))
        var data: [UInt8] = []
        switch option {
        case 0:
            data = [0, 0, 0, 0]
            for d in CommandTable.all {
                var entry = [UInt8](repeating: 0, count: 8)
                entry[0] = d.opcode
                entry.putBE16(UInt16(d.serviceAction ?? 0), at: 2)
                entry[5] = (timeouts ? 0x02 : 0) | (d.serviceAction != nil ? 0x01 : 0)
                entry.putBE16(UInt16(d.cdbLength), at: 6)
                data += entry
                if timeouts { data += Self.timeoutsDescriptor(d) }
            }
            data.putBE32(UInt32(data.count - 4), at: 0)
        case 1, 2, 3:
            let hasActions = CommandTable.hasServiceActions(opcode)
            if option == 1 && hasActions { throw .invalidFieldInCDB(byte: 2) }
            if option == 2 && !hasActions && CommandTable.indexByOpcode[Int(opcode)] >= 0 { throw .invalidFieldInCDB(byte: 2) }
            // Without service actions the REQUESTED SERVICE ACTION field is ignored.
            let match = CommandTable.all.first { d in
                d.opcode == opcode && (hasActions ? UInt16(d.serviceAction!) == action : true)
            }
            if let d = match {
                data = [0, (timeouts ? 0x80 : 0) | 0x03, 0, 0]
                data.putBE16(UInt16(d.cdbLength), at: 2)
                var usage = d.usage
                if let sa = d.serviceAction { usage[1] = (usage[1] & 0xE0) | sa }
                usage[0] = d.opcode
                data += usage
                if timeouts { data += Self.timeoutsDescriptor(d) }
            } else {
                data = [0, 0x01, 0, 0]  // not supported
            }
        default:
            throw .invalidFieldInCDB(byte: 2)
        }
        task.respond(data, allocationLength: allocation)
    }

    /// The 12-byte command timeouts descriptor.
    private static func timeoutsDescriptor(_ d: CommandDescriptor) -> [UInt8] {
        var t = [UInt8](repeating: 0, count: 12)
        t.putBE16(0x0A, at: 0)
        t.putBE32(d.nominalTimeout, at: 4)
        t.putBE32(d.recommendedTimeout, at: 8)
        return t
    }
}
