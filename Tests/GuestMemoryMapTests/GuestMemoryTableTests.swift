import CSystem
import GuestMemoryMap
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The one guest-memory type: lookups over many regions given in any order, access checks, pieces across
/// adjacent regions, and mappings that live as long as a table holds them.
@Suite struct GuestMemoryTableTests {
    /// A memfd of `size` bytes (closed by the caller).
    func memfd(_ size: Int) -> Int32 {
        let fd = csys_memfd_create("gm", 0)
        _ = ftruncate(fd, off_t(size))
        return fd
    }

    func region(_ gpa: UInt64, _ size: UInt64, fd: Int32, offset: UInt64 = 0, writable: Bool = true,
                readable: Bool = true) throws -> MappedGuestRegion {
        try MappedGuestRegion(GuestMemoryRegionDescriptor(guestPhysicalAddress: gpa, size: size, userAddress: gpa, mmapOffset: offset),
                              fd: fd, readable: readable, writable: writable)
    }

    @Test func lookupsFindEveryRegionGivenInAnyOrder() throws {
        let fd = memfd(64 * 4096)
        defer { close(fd) }
        // 64 one-page regions with one-page holes between them, in a scrambled order.
        let order = (0..<64).map { ($0 * 37) % 64 }
        let regions = try order.map { try region(0x100000 + UInt64($0) * 0x2000, 0x1000, fd: fd, offset: UInt64($0) * 0x1000) }
        let m = GuestMemory(regions: regions)
        #expect(m.regionCount == 64)
        for i in 0..<64 {
            let gpa = 0x100000 + UInt64(i) * 0x2000
            let p = try #require(m.pointer(guestPhysical: gpa + 8, length: 8))
            p.storeBytes(of: UInt64(i), as: UInt64.self)
            #expect(m.pointer(guestPhysical: gpa + 0x1000, length: 1) == nil)  // the hole after it
            #expect(m.pointer(guestPhysical: gpa + 0xFFF, length: 2) == nil)  // runs into the hole
        }
        // Each region is its own page of the file, whatever the order of the table.
        let whole = try #require(mmap(nil, 64 * 4096, PROT_READ, MAP_SHARED, fd, 0))
        defer { munmap(whole, 64 * 4096) }
        for i in 0..<64 { #expect(whole.load(fromByteOffset: i * 4096 + 8, as: UInt64.self) == UInt64(i)) }
        #expect(m.pointer(guestPhysical: 0xFFFFF, length: 1) == nil)
        #expect(m.pointer(guestPhysical: UInt64.max, length: 1) == nil)
    }

    @Test func accessIsCheckedPerRegion() throws {
        let fd = memfd(0x3000)
        defer { close(fd) }
        let rw = try region(0x10000, 0x1000, fd: fd)
        let ro = try region(0x11000, 0x1000, fd: fd, offset: 0x1000, writable: false)
        let m = GuestMemory(regions: [ro, rw])
        #expect(m.pointer(guestPhysical: 0x11000, length: 16) != nil)
        #expect(m.pointer(guestPhysical: 0x11000, length: 16, write: true) == nil)
        let v = UnsafeMutablePointer<iovec>.allocate(capacity: 4)
        defer { v.deallocate() }
        // A device-writable buffer may not reach into the read-only region; a device-readable one may.
        #expect(m.translate(guestPhysical: 0x10FF0, length: 0x20, write: true, into: v, start: 0, capacity: 4) == .outOfRange)
        #expect(m.translate(guestPhysical: 0x10FF0, length: 0x20, write: false, into: v, start: 0, capacity: 4) == .ok(2))
        #expect(v[0].iov_len == 0x10 && v[1].iov_len == 0x10)
        // Rings need a region the device may read and write.
        #expect(m.pointer(userAddress: 0x10000, length: 64) != nil)
        #expect(m.pointer(userAddress: 0x11000, length: 64) == nil)
    }

    @Test func piecesFollowAdjacentRegionsAndStopAtGaps() throws {
        let fd = memfd(0x3000)
        defer { close(fd) }
        let m = GuestMemory(regions: [try region(0x21000, 0x1000, fd: fd, offset: 0x1000), try region(0x20000, 0x1000, fd: fd)])
        var pieces: [Int] = []
        #expect(m.forEachPiece(guestPhysical: 0x20800, length: 0x1000, write: true) { _, n in pieces.append(n); return true })
        #expect(pieces == [0x800, 0x800])
        #expect(!m.forEachPiece(guestPhysical: 0x21800, length: 0x1000, write: false) { _, _ in true })
        #expect(!m.forEachPiece(guestPhysical: 0x20000, length: 0x10, write: false) { _, _ in false })
        #expect(!m.forEachPiece(guestPhysical: UInt64.max - 1, length: 4, write: false) { _, _ in true })
    }

    @Test func aRegionStaysMappedWhileATableHoldsIt() throws {
        let fd = memfd(0x1000)
        defer { close(fd) }
        var table: GuestMemory? = GuestMemory(regions: [try region(0x1000, 0x1000, fd: fd)])
        let p = try #require(table?.pointer(guestPhysical: 0x1000, length: 4, write: true))
        let next = try #require(table).removing(try #require(table?.regions.first?.descriptor))
        #expect(next.regionCount == 0)
        p.storeBytes(of: UInt32(0xABCD), as: UInt32.self)  // the old table still holds the mapping
        #expect(p.load(as: UInt32.self) == 0xABCD)
        table = nil
        _ = table
    }
}
