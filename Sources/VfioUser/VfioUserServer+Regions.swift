import CSystem
import EventLoop
#if canImport(Glibc)
import Glibc
#endif

/// Region access (compare libvfio-user's pci.c and region handling): REGION_INFO (with the sparse-mmap
/// synchronous-writes page), REGION_READ, REGION_WRITE and REGION_WRITE_MULTI, each access checked
/// against the region's size and flags.
extension VfioUserServer {
    /// Size and access flags of a region.
    private func regionInfo(_ index: Int) -> (size: UInt64, flags: UInt32) {
        if index == VfioPCIRegion.config { return (UInt64(PCIConfigSpace.size), 0x3) }
        if index >= 0 && index < 6 && index < device.configSpace.bars.count {
            let bar = device.configSpace.bars[index]
            return bar.size > 0 ? (UInt64(bar.size), 0x3) : (0, 0)
        }
        return (0, 0)
    }

    func handleGetRegionInfo(_ h: VfioUserHeader, _ p: PayloadReader) {
        guard p.count >= 32, let argsz = p.u32(0), let index = p.u32(8) else { fail(h, EINVAL, "GET_REGION_INFO payload shorter than 32 bytes"); return }
        guard argsz >= 32 else { fail(h, EINVAL, "GET_REGION_INFO argsz \(argsz)"); return }
        guard index < UInt32(VfioPCIRegion.count) else { fail(h, EINVAL, "GET_REGION_INFO index \(index)"); return }
        let info = regionInfo(Int(index))
        // The synchronous-writes page: a sparse mmap area (one page of a private memfd) in that BAR. Also with
        // guest memory reached by DMA messages: a synchronous write is acknowledged early when the device needs
        // DMA meanwhile (no deadlock).
        var area: UInt64? = nil
        if let page = device.synchronousWritesPage, page.bar == Int(index), info.size > 0,
           page.offset % 4096 == 0, page.offset + 4096 <= info.size, preparedSyncPage(size: page.offset + 4096) {
            area = page.offset
        }
        let flagMMAP: UInt32 = 1 << 2, flagCaps: UInt32 = 1 << 3
        let needed: UInt32 = area == nil ? 32 : 64
        let withCaps = area != nil && argsz >= needed
        offeredMappedPage = area != nil || (offeredMappedPage && Int(index) != device.synchronousWritesPage?.bar)
        if h.wantsNoReply { return }
        var w = PayloadWriter(UnsafeMutableRawBufferPointer(rebasing: replyBuffer[VfioUserHeader.size...]))
        w.u32(needed)
        w.u32(info.flags | (area != nil ? flagMMAP | flagCaps : 0))  // READ | WRITE; MMAP only for that page
        w.u32(index)
        w.u32(area != nil ? 32 : 0)  // where the capability is (QEMU checks it even when argsz was too small)
        w.u64(info.size)
        w.u64(0)
        if withCaps, let offset = area {
            w.u16(1)  // VFIO_REGION_INFO_CAP_SPARSE_MMAP
            w.u16(1)
            w.u32(0)
            w.u32(1)  // one area
            w.u32(0)
            w.u64(offset)
            w.u64(4096)
        }
        let header = VfioUserHeader(messageID: h.messageID, command: h.command, size: UInt32(VfioUserHeader.size + w.length),
                                    flags: VfioUserHeader.typeReply)
        header.encode(into: replyBuffer)
        var fd = syncPageFD
        send(VfioUserHeader.size + w.length, fds: withCaps ? withUnsafePointer(to: &fd) { $0 } : nil, fdCount: withCaps ? 1 : 0)
        if withCaps { log.debug("vfio-user: region \(index): page 0x\(String(area!, radix: 16)) offered for mmap (the client then sends BAR writes synchronously)") }
    }

    /// Creates (once) the memfd behind the synchronous-writes page.
    private func preparedSyncPage(size: UInt64) -> Bool {
        if syncPageFD >= 0 { return true }
        let fd = csys_memfd_create("scsigate-vfio-user-page", 0)
        guard fd >= 0 else { return false }
        guard ftruncate(fd, off_t(size)) == 0 else { close(fd); return false }
        syncPageFD = fd
        return true
    }

    /// Checks a region access; returns the region size or nil after replying with an error.
    private func checkAccess(_ h: VfioUserHeader, region: UInt32, offset: UInt64, count: UInt32) -> Bool {
        guard region < UInt32(VfioPCIRegion.count) else { fail(h, EINVAL, "region index \(region)"); return false }
        let info = regionInfo(Int(region))
        guard info.size > 0 else { fail(h, EINVAL, "region \(region) not implemented"); return false }
        guard count > 0, Int(count) <= Self.maxDataTransfer else { fail(h, EINVAL, "region access count \(count)"); return false }
        let (end, overflow) = offset.addingReportingOverflow(UInt64(count))
        guard !overflow, end <= info.size else {
            fail(h, EINVAL, "region \(region) access [0x\(String(offset, radix: 16)), +\(count)) beyond size 0x\(String(info.size, radix: 16))")
            return false
        }
        if Int(region) != VfioPCIRegion.config && !(count == 1 || count == 2 || count == 4 || count == 8) {
            fail(h, EINVAL, "BAR access of \(count) bytes (1, 2, 4 or 8 supported)")
            return false
        }
        return true
    }

    func handleRegionRead(_ h: VfioUserHeader, _ p: PayloadReader) {
        guard p.count >= 16, let offset = p.u64(0), let region = p.u32(8), let count = p.u32(12) else {
            fail(h, EINVAL, "REGION_READ payload shorter than 16 bytes")
            return
        }
        guard checkAccess(h, region: region, offset: offset, count: count) else { return }
        var ok = true
        reply(h) { w in
            w.u64(offset)
            w.u32(region)
            w.u32(count)
            guard let out = w.space(Int(count)) else { return }
            if Int(region) == VfioPCIRegion.config {
                device.configWillRead(offset: Int(offset), count: Int(count))
                ok = device.configSpace.read(offset: Int(offset), into: out)
            } else {
                let v = device.barRead(bar: Int(region), offset: offset, count: Int(count))
                for i in 0..<Int(count) { out[i] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(i))) }
            }
        }
        if !ok { log.warning("vfio-user: config read out of range") }
    }

    private func performWrite(region: UInt32, offset: UInt64, count: UInt32, data: UnsafeRawBufferPointer, posted: Bool) {
        if Int(region) == VfioPCIRegion.config {
            if device.configSpace.write(offset: Int(offset), from: data) { device.configDidWrite(offset: Int(offset), count: Int(count)) }
        } else {
            var v: UInt64 = 0
            for i in 0..<Int(count) { v |= UInt64(data[i]) << (8 * UInt64(i)) }
            device.barWrite(bar: Int(region), offset: offset, count: Int(count), value: v, posted: posted)
        }
    }

    func handleRegionWrite(_ h: VfioUserHeader, _ p: PayloadReader) {
        guard p.count >= 16, let offset = p.u64(0), let region = p.u32(8), let count = p.u32(12) else {
            fail(h, EINVAL, "REGION_WRITE payload shorter than 16 bytes")
            return
        }
        guard checkAccess(h, region: region, offset: offset, count: count) else { return }
        guard let data = p.slice(16, Int(count)), p.count == 16 + Int(count) else {
            fail(h, EINVAL, "REGION_WRITE payload \(p.count) bytes does not match count \(count)")
            return
        }
        // A synchronous BAR write is acknowledged early if the device needs DMA by message meanwhile (`transfer`):
        // QEMU answers DMA_READ/WRITE only once the vCPU waiting for this reply has let go of its lock.
        if !h.wantsNoReply && Int(region) != VfioPCIRegion.config { pendingWriteAck = (h, offset, region, count) }
        performWrite(region: region, offset: offset, count: count, data: data, posted: h.wantsNoReply)
        if h.wantsNoReply || Int(region) == VfioPCIRegion.config || pendingWriteAck != nil {
            pendingWriteAck = nil
            reply(h) { w in
                w.u64(offset)
                w.u32(region)
                w.u32(count)
            }
        }
    }

    /// Sends the reply of the synchronous BAR write being handled, if not sent yet (before a DMA wait).
    func acknowledgeWriteEarly() {
        guard let ack = pendingWriteAck else { return }
        pendingWriteAck = nil
        writesAcknowledgedEarly += 1
        reply(ack.header) { w in
            w.u64(ack.offset)
            w.u32(ack.region)
            w.u32(ack.count)
        }
    }

    func handleRegionWriteMulti(_ h: VfioUserHeader, _ p: PayloadReader) {
        guard let n = p.u64(0), n > 0, n <= 256 else { fail(h, EINVAL, "REGION_WRITE_MULTI count"); return }
        guard p.count >= 8 + Int(n) * 24 else { fail(h, EINVAL, "REGION_WRITE_MULTI payload shorter than its count"); return }
        for i in 0..<Int(n) {
            let base = 8 + i * 24
            guard let offset = p.u64(base), let region = p.u32(base + 8), let count = p.u32(base + 12),
                  count <= 8, let data = p.slice(base + 16, Int(count)) else { fail(h, EINVAL, "REGION_WRITE_MULTI entry \(i)"); return }
            guard checkAccess(h, region: region, offset: offset, count: count) else { return }
            performWrite(region: region, offset: offset, count: count, data: data, posted: true)
        }
        reply(h) { w in w.u64(n) }
    }
}
