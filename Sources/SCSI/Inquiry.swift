import BlockIO

/// Builders of INQUIRY data: standard data and the vital product data pages.
enum InquiryData {
    /// VPD pages this device server returns, ascending.
    static let supportedPages: [UInt8] = [0x00, 0x80, 0x83, 0x86, 0xB0, 0xB1, 0xB2]

    /// Standard INQUIRY data (96 bytes): direct-access device, SPC-4, HiSup, response data format 2,
    /// CmdQue, version descriptors SAM-5, SPC-4, SBC-3. With `identity` nil (no logical unit at the
    /// LUN) the peripheral qualifier is 3 and the device type 1Fh, the rest unchanged.
    static func standard(identity: LogicalUnitIdentity?, geometry: BlockGeometry?) -> [UInt8] {
        var d = [UInt8](repeating: 0, count: 96)
        d[0] = identity == nil ? 0x7F : 0x00
        d[1] = 0x00          // RMB = 0
        d[2] = 0x06          // SPC-4
        d[3] = 0x12          // NormACA 0, HiSup 1, response data format 2
        d[4] = UInt8(96 - 5)  // additional length
        d[5] = 0x00          // SCCS, ACC, TPGS, 3PC, PROTECT: none
        d[6] = 0x00
        d[7] = 0x02          // CmdQue
        let id = identity ?? LogicalUnitIdentity(serial: "", naa: 0)
        d.replaceSubrange(8 ..< 16, with: [UInt8].ascii(id.vendor, width: 8))
        d.replaceSubrange(16 ..< 32, with: [UInt8].ascii(id.product, width: 16))
        d.replaceSubrange(32 ..< 36, with: [UInt8].ascii(id.revision, width: 4))
        d.putBE16(0x00A0, at: 58)  // SAM-5
        d.putBE16(0x0460, at: 60)  // SPC-4
        d.putBE16(0x04C0, at: 62)  // SBC-3
        return d
    }

    /// A VPD page with its 4-byte header; nil for an unsupported page code.
    static func page(_ code: UInt8, unit: LogicalUnit, nexus: ITNexus) -> [UInt8]? {
        let body: [UInt8]
        switch code {
        case 0x00: body = supportedPages
        case 0x80: body = [UInt8].ascii(unit.identity.serial, width: min(unit.identity.serial.utf8.count, 252))
        case 0x83: body = deviceIdentification(unit.identity, nexus: nexus)
        case 0x86: body = extendedInquiry(unit.geometry)
        case 0xB0: body = blockLimits(unit.geometry)
        case 0xB1: body = blockDeviceCharacteristics()
        case 0xB2: body = logicalBlockProvisioning(unit.geometry)
        default: return nil
        }
        var page: [UInt8] = [0x00, code, 0, 0]
        page.putBE16(UInt16(body.count), at: 2)
        return page + body
    }

    /// 83h designators: NAA IEEE Registered (NAA 5) for the logical unit, T10 vendor ID (vendor +
    /// serial) for the logical unit, relative target port.
    static func deviceIdentification(_ id: LogicalUnitIdentity, nexus: ITNexus) -> [UInt8] {
        var d: [UInt8] = []
        // NAA: code set binary, association LU, type NAA; NAA field forced to 5 (IEEE Registered).
        d += [0x01, 0x03, 0x00, 0x08]
        var naa = [UInt8](repeating: 0, count: 8)
        naa.putBE64((id.naa & 0x0FFF_FFFF_FFFF_FFFF) | 0x5000_0000_0000_0000, at: 0)
        d += naa
        // T10 vendor ID: code set ASCII, association LU, type 1.
        let serial = [UInt8].ascii(id.serial, width: min(id.serial.utf8.count, 200))
        let t10 = [UInt8].ascii(id.vendor, width: 8) + serial
        d += [0x02, 0x01, 0x00, UInt8(t10.count)] + t10
        // Relative target port: code set binary, association target port, type 4.
        var port: [UInt8] = [0x01, 0x14, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00]
        port.putBE16(nexus.targetPort, at: 6)
        d += port
        return d
    }

    /// 86h: simple, ordered and head of queue task attributes; V_SUP when the back-end caches writes.
    static func extendedInquiry(_ g: BlockGeometry) -> [UInt8] {
        var d = [UInt8](repeating: 0, count: 60)
        d[1] = 0x07  // HEADSUP, ORDSUP, SIMPSUP
        d[2] = g.volatileWriteCache ? 0x01 : 0x00  // V_SUP
        return d
    }

    /// B0h block limits.
    static func blockLimits(_ g: BlockGeometry) -> [UInt8] {
        var d = [UInt8](repeating: 0, count: 60)
        let blockSize = max(g.logicalBlockSize, 1)
        d[0] = 0x01  // WSNZ
        d[1] = maximumCompareAndWriteBlocks
        d.putBE16(UInt16(clamping: max(1, g.physicalBlockSize / blockSize)), at: 2)  // optimal transfer length granularity
        let maxTransfer = g.maxTransferBytes / blockSize
        d.putBE32(maxTransfer, at: 4)
        d.putBE32(maxTransfer, at: 8)  // optimal transfer length
        if g.supportsDiscard {
            d.putBE32(ProvisioningLimits.maximumUnmapBlocks, at: 16)
            d.putBE32(ProvisioningLimits.maximumUnmapDescriptors, at: 20)
            let granularity = g.discardGranularity == 0 ? 1 : max(1, g.discardGranularity / blockSize)
            d.putBE32(granularity, at: 24)
            d.putBE32(0x8000_0000, at: 28)  // UGAVALID, alignment 0
        }
        d.putBE64(ProvisioningLimits.maximumWriteSameBlocks, at: 32)
        return d
    }

    /// B1h: non-rotating medium.
    static func blockDeviceCharacteristics() -> [UInt8] {
        var d = [UInt8](repeating: 0, count: 60)
        d.putBE16(0x0001, at: 0)
        return d
    }

    /// B2h logical block provisioning: UNMAP and WRITE SAME(10/16) with UNMAP when the back-end
    /// discards, LBPRZ when discarded blocks read as zeroes, thin provisioning type.
    static func logicalBlockProvisioning(_ g: BlockGeometry) -> [UInt8] {
        var d: [UInt8] = [0, 0, 0, 0]
        if g.supportsDiscard {
            d[1] = 0x80 | 0x40 | 0x20 | (g.discardReadsZeroes ? 0x04 : 0)
            d[2] = 0x02  // thin provisioned
        }
        return d
    }
}

extension SCSITarget {
    /// INQUIRY: standard data or a VPD page, truncated to the allocation length.
    func inquiry(_ task: inout SCSITask, unit: LogicalUnit) throws(SCSIError) {
        let evpd = task.cdb[1] & 0x01 != 0
        let code = task.cdb[2]
        let allocation = Int(task.cdb.be16(3))
        if !evpd {
            if code != 0 { throw .invalidFieldInCDB(byte: 2) }
            task.respond(InquiryData.standard(identity: unit.identity, geometry: unit.geometry), allocationLength: allocation)
            return
        }
        guard let page = InquiryData.page(code, unit: unit, nexus: task.nexus) else { throw .invalidFieldInCDB(byte: 2) }
        task.respond(page, allocationLength: allocation)
    }
}
