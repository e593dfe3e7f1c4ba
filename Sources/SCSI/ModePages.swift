import BlockIO

/// Page control of MODE SENSE.
enum PageControl: UInt8 {
    case current = 0
    case changeable = 1
    case defaultValues = 2
    case saved = 3
}

/// The mode pages of a direct-access logical unit: 01h read-write error recovery, 08h caching,
/// 0Ah control, 1Ch informational exceptions control (all subpage 00h). None is saveable (PS = 0).
enum ModePages {
    /// Page codes in the order MODE SENSE returns them for 3Fh.
    static let codes: [UInt8] = [0x01, 0x08, 0x0A, 0x1C]

    /// Default parameters of a unit with `geometry`.
    static func defaults(_ geometry: BlockGeometry) -> ModeParameters {
        var mode = ModeParameters()
        mode.writeCacheEnabled = geometry.volatileWriteCache
        return mode
    }

    /// The page `code` (header included) for page control `pc`; nil for an unknown page.
    static func page(_ code: UInt8, _ pc: PageControl, mode current: ModeParameters, geometry: BlockGeometry) -> [UInt8]? {
        let changeable = pc == .changeable
        let mode = pc == .defaultValues ? defaults(geometry) : current
        switch code {
        case 0x01:  // read-write error recovery
            var p = [UInt8](repeating: 0, count: 12)
            p[0] = 0x01
            p[1] = 0x0A
            p[2] = changeable ? 0xC0 : (mode.automaticWriteReallocation ? 0x80 : 0) | (mode.automaticReadReallocation ? 0x40 : 0)
            return p
        case 0x08:  // caching
            var p = [UInt8](repeating: 0, count: 20)
            p[0] = 0x08
            p[1] = 0x12
            if changeable {
                p[2] = (geometry.volatileWriteCache ? 0x04 : 0) | 0x01
            } else {
                p[2] = (mode.writeCacheEnabled ? 0x04 : 0) | (mode.readCacheDisabled ? 0x01 : 0)
            }
            return p
        case 0x0A:  // control
            var p = [UInt8](repeating: 0, count: 12)
            p[0] = 0x0A
            p[1] = 0x0A
            if changeable {
                p[2] = 0x04         // D_SENSE
                p[3] = 0xF0         // QUEUE ALGORITHM MODIFIER (0 or 1)
            } else {
                p[2] = 0x02 | (mode.descriptorSense ? 0x04 : 0)  // GLTSD (no log pages), D_SENSE
                p[3] = (mode.queueAlgorithmModifier & 0x0F) << 4  // QERR 00b
                p[4] = mode.softwareWriteProtect ? 0x08 : 0
                p[5] = 0x40         // TAS: tasks aborted by another nexus's action complete with TASK ABORTED
            }
            return p
        case 0x1C:  // informational exceptions control
            var p = [UInt8](repeating: 0, count: 12)
            p[0] = 0x1C
            p[1] = 0x0A
            if changeable {
                p[2] = 0x08         // DEXCPT
                p[3] = 0x0F         // MRIE (0...6)
            } else {
                p[2] = mode.disableExceptionControl ? 0x08 : 0
                p[3] = mode.informationalExceptionsReportingMethod & 0x0F
            }
            return p
        default:
            return nil
        }
    }

    /// Applies the changeable fields of a validated page to `mode`; throws for values out of range.
    /// `at` is the page's offset in the parameter list (for field pointers).
    static func apply(_ p: ArraySlice<UInt8>, to mode: inout ModeParameters, at: Int) throws(SCSIError) {
        let b = p.startIndex
        switch p[b] & 0x3F {
        case 0x01:
            mode.automaticWriteReallocation = p[b + 2] & 0x80 != 0
            mode.automaticReadReallocation = p[b + 2] & 0x40 != 0
        case 0x08:
            mode.writeCacheEnabled = p[b + 2] & 0x04 != 0
            mode.readCacheDisabled = p[b + 2] & 0x01 != 0
        case 0x0A:
            let qam = p[b + 3] >> 4
            if qam > 1 { throw .invalidFieldInParameterList(byte: at + 3, bit: 7 - (qam.leadingZeroBitCount - 4)) }
            mode.queueAlgorithmModifier = qam
            mode.descriptorSense = p[b + 2] & 0x04 != 0
        case 0x1C:
            let mrie = p[b + 3] & 0x0F
            if mrie > 6 { throw .invalidFieldInParameterList(byte: at + 3, bit: 3) }
            mode.informationalExceptionsReportingMethod = mrie
            mode.disableExceptionControl = p[b + 2] & 0x08 != 0
        default:
            break
        }
    }
}

extension SCSITarget {
    /// MODE SENSE(6/10): header, optional short or long block descriptor, the requested pages.
    func modeSense(_ task: inout SCSITask, unit: LogicalUnit) throws(SCSIError) {
        let cdb = task.cdb
        let ten = cdb.opcode == Opcode.modeSense10
        let disableBlockDescriptors = cdb[1] & 0x08 != 0
        let longLBA = ten && cdb[1] & 0x10 != 0
        let pc = PageControl(rawValue: cdb[2] >> 6)!
        let code = cdb[2] & 0x3F
        let subpage = cdb[3]
        let allocation = ten ? Int(cdb.be16(7)) : Int(cdb[4])
        if pc == .saved { throw .check(.illegalRequest, .savingParametersNotSupported) }
        let codes: [UInt8] = code == 0x3F ? ModePages.codes : [code]
        guard code == 0x3F || ModePages.codes.contains(code) else { throw .invalidFieldInCDB(byte: 2, bit: 5) }
        guard subpage == 0x00 || subpage == 0xFF else { throw .invalidFieldInCDB(byte: 3) }
        let g = unit.geometry
        let mode = unit.mode
        var pages: [UInt8] = []
        for c in codes { pages += ModePages.page(c, pc, mode: mode, geometry: g)! }

        var descriptor: [UInt8] = []
        if !disableBlockDescriptors {
            let blocks = unit.blockCount
            if longLBA {
                descriptor = [UInt8](repeating: 0, count: 16)
                descriptor.putBE64(blocks, at: 0)
                descriptor.putBE32(g.logicalBlockSize, at: 12)
            } else {
                descriptor = [UInt8](repeating: 0, count: 8)
                descriptor.putBE32(blocks > 0xFFFF_FFFF ? 0xFFFF_FFFF : UInt32(blocks), at: 0)
                descriptor.putBE32(g.logicalBlockSize & 0x00FF_FFFF, at: 4)
                descriptor[4] = 0
            }
        }
        let deviceSpecific: UInt8 = (unit.isReadOnly ? 0x80 : 0) | 0x10  // WP, DPOFUA
        var data: [UInt8]
        if ten {
            data = [0, 0, 0, deviceSpecific, longLBA && !disableBlockDescriptors ? 0x01 : 0, 0, 0, 0]
            data.putBE16(UInt16(descriptor.count), at: 6)
            data += descriptor + pages
            data.putBE16(UInt16(data.count - 2), at: 0)
        } else {
            data = [0, 0, deviceSpecific, UInt8(descriptor.count)] + descriptor + pages
            data[0] = UInt8(data.count - 1)
        }
        task.respond(data, allocationLength: allocation)
    }

    /// MODE SELECT(6/10): PF must be 1 and SP 0; the parameter list is checked byte by byte against the
    /// changeable masks (a non-changeable field must keep its current value); a block descriptor must
    /// carry the LU's block length. A change raises MODE PARAMETERS CHANGED for the other nexuses.
    func modeSelect(_ task: inout SCSITask, unit: LogicalUnit) throws(SCSIError) {
        let cdb = task.cdb
        let ten = cdb.opcode == Opcode.modeSelect10
        if cdb[1] & 0x10 == 0 { throw .invalidFieldInCDB(byte: 1, bit: 4) }
        if cdb[1] & 0x01 != 0 { throw .invalidFieldInCDB(byte: 1, bit: 0) }
        let length = ten ? Int(cdb.be16(7)) : Int(cdb[4])
        if length == 0 { return }
        let headerLength = ten ? 8 : 4
        if length < headerLength { throw .check(.illegalRequest, .parameterListLengthError) }
        guard let list = task.gatherDataOut(length) else { throw .check(.illegalRequest, .parameterListLengthError) }
        task.dataOutLength = length
        let mediumTypeByte = ten ? 2 : 1
        if list[mediumTypeByte] != 0 { throw .invalidFieldInParameterList(byte: mediumTypeByte) }
        let descriptorLength = ten ? Int(list.readBE16(6)) : Int(list[3])
        let longLBA = ten && list[4] & 0x01 != 0
        if ten && list[4] & 0xFE != 0 { throw .invalidFieldInParameterList(byte: 4, bit: 7 - list[4].leadingZeroBitCount) }
        let validLengths = longLBA ? [0, 16] : [0, 8]
        if !validLengths.contains(descriptorLength) { throw .invalidFieldInParameterList(byte: ten ? 6 : 3) }
        if headerLength + descriptorLength > length { throw .check(.illegalRequest, .parameterListLengthError) }
        let g = unit.geometry
        if descriptorLength > 0 {
            let at = headerLength
            let blocks = unit.blockCount
            if longLBA {
                let count = list.readBE64(at)
                if count != 0 && count != blocks { throw .invalidFieldInParameterList(byte: at) }
                for i in 8 ..< 12 where list[at + i] != 0 { throw .invalidFieldInParameterList(byte: at + i) }
                if list.readBE32(at + 12) != g.logicalBlockSize { throw .invalidFieldInParameterList(byte: at + 12) }
            } else {
                let count = UInt64(list.readBE32(at))
                if count != 0 && count != min(blocks, 0xFFFF_FFFF) { throw .invalidFieldInParameterList(byte: at) }
                if list[at + 4] != 0 { throw .invalidFieldInParameterList(byte: at + 4) }
                let blockLength = UInt32(list[at + 5]) << 16 | UInt32(list[at + 6]) << 8 | UInt32(list[at + 7])
                if blockLength != g.logicalBlockSize { throw .invalidFieldInParameterList(byte: at + 5) }
            }
        }
        let changed = try unit.updateMode { mode throws(SCSIError) in
            var p = headerLength + descriptorLength
            while p < length {
                if p + 2 > length { throw .check(.illegalRequest, .parameterListLengthError) }
                if list[p] & 0x40 != 0 { throw .invalidFieldInParameterList(byte: p, bit: 6) }  // no subpages
                let code = list[p] & 0x3F
                guard let current = ModePages.page(code, .current, mode: mode, geometry: g),
                      let mask = ModePages.page(code, .changeable, mode: mode, geometry: g) else {
                    throw .invalidFieldInParameterList(byte: p, bit: 5)
                }
                if Int(list[p + 1]) != current.count - 2 { throw .invalidFieldInParameterList(byte: p + 1) }
                if p + current.count > length { throw .check(.illegalRequest, .parameterListLengthError) }
                for i in 2 ..< current.count {
                    let diff = (list[p + i] ^ current[i]) & ~mask[i]
                    if diff != 0 { throw .invalidFieldInParameterList(byte: p + i, bit: 7 - diff.leadingZeroBitCount) }
                }
                try ModePages.apply(list[p ..< p + current.count], to: &mode, at: p)
                p += current.count
            }
        }
        if changed { unit.unitAttentions.establish(.modeParametersChanged, for: .allExcept(task.nexus)) }
    }
}
