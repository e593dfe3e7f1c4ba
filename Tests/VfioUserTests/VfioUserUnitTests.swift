import CSystem
import GuestMemoryMap
import Testing
@testable import VfioUser
#if canImport(Glibc)
import Glibc
#endif

@Suite struct GuestMemoryTests {
    func memfd(_ size: Int) -> Int32 {
        let fd = csys_memfd_create("gm", 0)
        _ = ftruncate(fd, off_t(size))
        return fd
    }

    @Test func translateChecksBoundsPermissionsAndOverflow() throws {
        let m = DMAWindows()
        try m.map(address: 0x10000, size: 0x4000, fileOffset: 0, readable: true, writable: true, fd: memfd(0x4000))
        try m.map(address: 0x20000, size: 0x1000, fileOffset: 0, readable: true, writable: false, fd: memfd(0x1000))
        #expect(m.translate(0x10000, length: 0x4000, write: true) != nil)
        #expect(m.translate(0x10000, length: 0x4001, write: true) == nil)
        #expect(m.translate(0xFFFF, length: 1, write: false) == nil)
        #expect(m.translate(0x13FFF, length: 1, write: false) != nil)
        #expect(m.translate(0x14000, length: 1, write: false) == nil)
        #expect(m.translate(0x20000, length: 16, write: false) != nil)
        #expect(m.translate(0x20000, length: 16, write: true) == nil)  // read-only window
        #expect(m.translate(UInt64.max, length: 2, write: false) == nil)
        #expect(m.translate(0x10000, length: UInt64.max, write: false) == nil)
    }

    @Test func piecesSpanAdjacentWindowsButNotGaps() throws {
        let m = DMAWindows()
        try m.map(address: 0x10000, size: 0x1000, fileOffset: 0, readable: true, writable: true, fd: memfd(0x1000))
        try m.map(address: 0x11000, size: 0x1000, fileOffset: 0, readable: true, writable: true, fd: memfd(0x1000))
        var pieces = 0
        #expect(m.forEachPiece(0x10800, length: 0x1000, write: true) { _, n in pieces += 1; return n > 0 })
        #expect(pieces == 2)
        #expect(!m.forEachPiece(0x11800, length: 0x1000, write: true) { _, _ in true })
        let src: [UInt8] = [1, 2, 3, 4]
        #expect(src.withUnsafeBytes { m.write(0x10FFE, from: $0) })
        var dst = [UInt8](repeating: 0, count: 4)
        #expect(dst.withUnsafeMutableBytes { m.read(0x10FFE, into: $0) })
        #expect(dst == src)
    }

    @Test func mapRejectsOverlapMisalignmentOverflowAndShortFiles() throws {
        let m = DMAWindows()
        try m.map(address: 0x10000, size: 0x2000, fileOffset: 0, readable: true, writable: true, fd: memfd(0x2000))
        #expect(throws: DMAMapError.self) { try m.map(address: 0x11000, size: 0x1000, fileOffset: 0, readable: true, writable: true, fd: self.memfd(0x1000)) }
        #expect(throws: DMAMapError.self) { try m.map(address: 0x20001, size: 0x1000, fileOffset: 0, readable: true, writable: true, fd: -1) }
        #expect(throws: DMAMapError.self) { try m.map(address: UInt64.max - 0xFFF, size: 0x2000, fileOffset: 0, readable: true, writable: true, fd: -1) }
        #expect(throws: DMAMapError.self) { try m.map(address: 0x40000, size: 0x2000, fileOffset: 0, readable: true, writable: true, fd: self.memfd(0x1000)) }
        // Without an fd the window is recorded but never translates.
        try m.map(address: 0x50000, size: 0x1000, fileOffset: 0, readable: true, writable: true, fd: -1)
        #expect(m.translate(0x50000, length: 1, write: false) == nil)
        #expect(throws: DMAMapError.self) { try m.unmap(address: 0x10000, size: 0x1000) }
        try m.unmap(address: 0x10000, size: 0x2000)
        #expect(m.translate(0x10000, length: 1, write: false) == nil)
    }
}

@Suite struct GuestMemoryRemoteTests {
    func memfd(_ size: Int) -> Int32 {
        let fd = csys_memfd_create("gm", 0)
        _ = ftruncate(fd, off_t(size))
        return fd
    }

    @Test func fdLessWindowsGoThroughTheRemoteAccessorPieceByPiece() throws {
        let m = DMAWindows()
        // [0x10000, 0x11000) mapped, [0x11000, 0x13000) without fd (served from `backing`), adjacent.
        try m.map(address: 0x10000, size: 0x1000, fileOffset: 0, readable: true, writable: true, fd: memfd(0x1000))
        try m.map(address: 0x11000, size: 0x2000, fileOffset: 0, readable: true, writable: true, fd: -1)
        #expect(m.remoteRegionCount == 1)
        var backing = [UInt8](repeating: 0, count: 0x2000)
        var calls: [(UInt64, Int)] = []
        let remote = RemoteDMA(read: { address, buffer in
            calls.append((address, buffer.count))
            let o = Int(address - 0x11000)
            for i in 0..<buffer.count { buffer[i] = backing[o + i] }
            return true
        }, write: { address, buffer in
            calls.append((address, buffer.count))
            let o = Int(address - 0x11000)
            for i in 0..<buffer.count { backing[o + i] = buffer[i] }
            return true
        })
        // Without an accessor, fd-less memory is unreachable.
        let src = [UInt8](0..<32)
        #expect(!src.withUnsafeBytes { m.write(0x10FF0, from: $0) })
        m.remote = remote
        #expect(src.withUnsafeBytes { m.write(0x10FF0, from: $0) })
        #expect(calls.count == 1 && calls[0].0 == 0x11000 && calls[0].1 == 16)
        #expect(Array(backing[0..<16]) == Array(src[16..<32]))
        var back = [UInt8](repeating: 0, count: 32)
        #expect(back.withUnsafeMutableBytes { m.read(0x10FF0, into: $0) })
        #expect(back == src)
        // Pointer translation never hands out fd-less memory; isRemote and forEachRange tell them apart.
        #expect(m.translate(0x11000, length: 16, write: false) == nil)
        #expect(m.isRemote(0x11000, length: 0x2000, write: true))
        #expect(!m.isRemote(0x10000, length: 16, write: false))
        #expect(!m.isRemote(0x12FFF, length: 2, write: false))  // runs past the window
        var kinds: [Bool] = []
        #expect(m.forEachRange(0x10800, length: 0x1000, write: false) { host, _, _ in kinds.append(host != nil); return true })
        #expect(kinds == [true, false])
        // A failing accessor fails the access.
        m.remote = RemoteDMA(read: { _, _ in false }, write: { _, _ in false })
        #expect(!back.withUnsafeMutableBytes { m.read(0x11000, into: $0) })
        try m.unmap(address: 0x11000, size: 0x2000)
        #expect(m.remoteRegionCount == 0)
    }

    @Test func heldUnmapsStayMappedUntilReleased() throws {
        let m = DMAWindows()
        try m.map(address: 0x10000, size: 0x1000, fileOffset: 0, readable: true, writable: true, fd: memfd(0x1000))
        let p = try #require(m.translate(0x10000, length: 4, write: true))
        m.holdUnmaps = true
        try m.unmap(address: 0x10000, size: 0x1000)
        #expect(m.translate(0x10000, length: 4, write: true) == nil)
        p.storeBytes(of: UInt32(7), as: UInt32.self)  // still mapped in this process: no fault
        m.holdUnmaps = false
        m.releaseHeldUnmaps()
    }
}

@Suite struct PCIConfigSpaceTests {
    func space() -> PCIConfigSpace {
        PCIConfigSpace(identity: PCIIdentity(vendorID: 0x15AD, deviceID: 0x07C0, subsystemVendorID: 0x15AD, subsystemID: 0x07C0,
                                             classCode: 0x010000, revision: 2),
                       bars: [PCIBAR(size: 0x8000), .none, PCIBAR(size: 0x100, isIO: true)],
                       msix: MSIXLayout(vectors: 4, tableBAR: 0, tableOffset: 0x6000, pbaBAR: 0, pbaOffset: 0x7000))
    }

    func write32(_ s: inout PCIConfigSpace, _ o: Int, _ v: UInt32) {
        withUnsafeBytes(of: v.littleEndian) { _ = s.write(offset: o, from: $0) }
    }

    @Test func barSizingReadsBackTheSizeMask() {
        var s = space()
        write32(&s, 0x10, 0xFFFF_FFFF)
        #expect(s.u32(0x10) == 0xFFFF_8000)
        write32(&s, 0x18, 0xFFFF_FFFF)
        #expect(s.u32(0x18) == 0xFFFF_FF01)  // I/O BAR keeps its type bit
        write32(&s, 0x14, 0xFFFF_FFFF)
        #expect(s.u32(0x14) == 0)  // unimplemented BAR
    }

    @Test func identityIsReadOnlyAndStatusBitsAreWriteOneToClear() {
        var s = space()
        write32(&s, 0, 0xFFFF_FFFF)
        #expect(s.u32(0) == 0x07C0_15AD)
        write32(&s, 0x04, 0xFFFF_0407)
        #expect(s.command == 0x0407)
        #expect(s.u16(0x06) == 0x0010)  // capability list bit survives, nothing else set
        write32(&s, 0x08, 0)
        #expect(s.u32(0x08) == 0x0100_0002)
    }

    @Test func msixCapabilityDescribesTableAndPBAAndEnables() {
        var s = space()
        #expect(s.u16(0x06) & 0x10 != 0)
        #expect(s.u32(0x34) & 0xFF == 0x40)
        #expect(s.u16(0x42) & 0x7FF == 3)
        #expect(s.u32(0x44) == 0x6000)
        #expect(s.u32(0x48) == 0x7000)
        #expect(!s.msixEnabled)
        withUnsafeBytes(of: UInt16(0x8000).littleEndian) { _ = s.write(offset: 0x42, from: $0) }
        #expect(s.msixEnabled)
        #expect(s.u16(0x42) & 0x7FF == 3)  // table size is read-only
        s.reset()
        #expect(!s.msixEnabled)
    }

    @Test func outOfRangeAccessesAreRefused() {
        var s = space()
        var buf = [UInt8](repeating: 0, count: 8)
        #expect(!buf.withUnsafeMutableBytes { s.read(offset: 252, into: $0) })
        #expect(!buf.withUnsafeBytes { s.write(offset: -1, from: $0) })
        #expect(buf.withUnsafeMutableBytes { s.read(offset: 248, into: $0) })
    }
}

@Suite struct CapabilityJSONTests {
    func check(_ s: String) -> Int? {
        let bytes = Array(s.utf8) + [0]
        return bytes.withUnsafeBytes { CapabilityJSON.validate($0) }
    }

    @Test func validatesBoundedBalancedObjects() {
        #expect(check("{\"capabilities\":{\"max_msg_fds\":8}}") != nil)
        #expect(check("{\"a\":\"}}}\"}") != nil)  // braces inside strings
        #expect(check("{") == nil)
        #expect(check("}{") == nil)
        #expect(check("[1,2]") == nil)
        #expect(check("\"{}\"") == nil)
        #expect(check(String(repeating: "{\"a\":", count: 20) + "1" + String(repeating: "}", count: 20)) == nil)  // too deep
        #expect(check("{\"a\":\"" + String(repeating: "x", count: 5000) + "\"}") == nil)  // too long
        let noNul = Array("{}".utf8)
        #expect(noNul.withUnsafeBytes { CapabilityJSON.validate($0) } == nil)
        let embedded = Array("{}".utf8) + [0, 0x7B, 0]
        #expect(embedded.withUnsafeBytes { CapabilityJSON.validate($0) } == nil)
    }

    @Test func extractsUnsignedValues() {
        let text = Array("{\"capabilities\":{\"max_msg_fds\" : 16,\"max_data_xfer_size\":1048576,\"big\":99999999999999999999999}}".utf8)
        text.withUnsafeBytes { t in
            #expect(CapabilityJSON.unsignedValue(of: "max_msg_fds", in: t) == 16)
            #expect(CapabilityJSON.unsignedValue(of: "max_data_xfer_size", in: t) == 1_048_576)
            #expect(CapabilityJSON.unsignedValue(of: "big", in: t) == nil)  // overflow
            #expect(CapabilityJSON.unsignedValue(of: "absent", in: t) == nil)
        }
    }
}

@Suite struct InterruptControllerTests {
    func fired(_ fd: Int32) -> Bool {
        var v: UInt64 = 0
        return csys_eventfd_drain(fd, &v) == 0
    }

    @Test func intxIsAutoMaskedUntilUnmask() {
        let c = InterruptController(msixVectors: 1)
        let fd = csys_eventfd(0, 1)
        let mine = dup(fd)
        defer { close(mine) }
        c.assign(index: VfioPCIIRQ.intx, vector: 0, fd: fd)
        c.setINTx(true)
        #expect(fired(mine))
        c.setINTx(true)
        #expect(!fired(mine))  // masked after the first trigger
        c.unmask(index: VfioPCIIRQ.intx, vector: 0)
        #expect(fired(mine))  // level still high: fires again
        c.setINTx(false)
        c.unmask(index: VfioPCIIRQ.intx, vector: 0)
        #expect(!fired(mine))
    }

    @Test func maskedMSIXVectorRemembersPendingTrigger() {
        let c = InterruptController(msixVectors: 2)
        let fd = csys_eventfd(0, 1)
        let mine = dup(fd)
        defer { close(mine) }
        c.assign(index: VfioPCIIRQ.msix, vector: 1, fd: fd)
        #expect(c.msixActive)
        c.mask(index: VfioPCIIRQ.msix, vector: 1)
        c.signalMSIX(1)
        #expect(!fired(mine))
        c.unmask(index: VfioPCIIRQ.msix, vector: 1)
        #expect(fired(mine))
        c.signalMSIX(7)  // out of range: ignored
        c.reset()
        #expect(!c.msixActive)
    }

    @Test func msiVectorSignalsMasksAndResets() {
        let c = InterruptController(msixVectors: 1, msiVectors: 1)
        #expect(c.count(for: VfioPCIIRQ.msi) == 1)
        #expect(InterruptController(msixVectors: 1).count(for: VfioPCIIRQ.msi) == 0)
        let fd = csys_eventfd(0, 1)
        let mine = dup(fd)
        defer { close(mine) }
        c.assign(index: VfioPCIIRQ.msi, vector: 0, fd: fd)
        #expect(c.msiActive && !c.msixActive)
        c.signalMSI(0)
        #expect(fired(mine))
        c.mask(index: VfioPCIIRQ.msi, vector: 0)
        c.signalMSI(0)
        #expect(!fired(mine))
        c.unmask(index: VfioPCIIRQ.msi, vector: 0)
        #expect(fired(mine))
        c.signalMSI(1)  // out of range: ignored
        c.disableAll(index: VfioPCIIRQ.msi)
        #expect(!c.msiActive)
    }
}

@Suite struct MSICapabilityTests {
    @Test func msiCapabilityIsChainedAfterMSIXAndOnlyItsFieldsAreWritable() {
        var s = PCIConfigSpace(identity: PCIIdentity(vendorID: 0x15AD, deviceID: 0x07C0, subsystemVendorID: 0x15AD,
                                                     subsystemID: 0x07C0, classCode: 0x010000, revision: 2),
                               bars: [PCIBAR(size: 0x8000)],
                               msix: MSIXLayout(vectors: 1, tableBAR: 0, tableOffset: 0x6000, pbaBAR: 0, pbaOffset: 0x7000),
                               msi: true)
        #expect(s.u16(0x06) & 0x10 != 0)
        #expect(s.u32(0x34) & 0xFF == 0x40)
        #expect(s.u16(0x40) == 0x5011)  // MSI-X, next 0x50
        #expect(s.u16(0x50) == 0x0005)  // MSI, end of list
        #expect(s.u16(0x52) == 0x0080)  // 64-bit, one vector
        #expect(!s.msiEnabled)
        // Enable, and try to ask for 32 vectors (multiple message enable): only the enable bit sticks.
        _ = withUnsafeBytes(of: UInt16(0x0071).littleEndian) { s.write(offset: 0x52, from: $0) }
        #expect(s.msiEnabled)
        #expect(s.u16(0x52) == 0x0081)
        _ = withUnsafeBytes(of: UInt32(0xFEE0_0003).littleEndian) { s.write(offset: 0x54, from: $0) }
        _ = withUnsafeBytes(of: UInt32(0x1).littleEndian) { s.write(offset: 0x58, from: $0) }
        _ = withUnsafeBytes(of: UInt16(0x4041).littleEndian) { s.write(offset: 0x5C, from: $0) }
        #expect(s.u32(0x54) == 0xFEE0_0000)  // dword aligned
        #expect(s.u32(0x58) == 1)
        #expect(s.u16(0x5C) == 0x4041)
        _ = withUnsafeBytes(of: UInt16(0xFFFF).littleEndian) { s.write(offset: 0x50, from: $0) }
        #expect(s.u16(0x50) == 0x0005)  // ID and next pointer are read-only
        s.reset()
        #expect(!s.msiEnabled)
        // Without MSI-X the MSI capability heads the list.
        let alone = PCIConfigSpace(identity: PCIIdentity(vendorID: 1, deviceID: 2, subsystemVendorID: 1, subsystemID: 2,
                                                         classCode: 0, revision: 0),
                                   bars: [PCIBAR(size: 0x1000)], msix: nil, msi: true)
        #expect(alone.u32(0x34) & 0xFF == 0x50)
    }
}
