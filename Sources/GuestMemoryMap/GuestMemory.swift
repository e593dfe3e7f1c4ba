import CSystem
#if canImport(Glibc)
import Glibc
#endif

/// One guest memory region as the VMM describes it (vhost-user SET_MEM_TABLE / ADD_MEM_REG, or a vfio-user DMA
/// window with an fd, whose user address is its IOVA).
public struct GuestMemoryRegionDescriptor: Sendable, Equatable {
    /// Guest physical address of the first byte.
    public var guestPhysicalAddress: UInt64
    /// Size in bytes.
    public var size: UInt64
    /// Address of the region in the VMM's own address space (used for ring addresses).
    public var userAddress: UInt64
    /// Offset of the region inside the file descriptor.
    public var mmapOffset: UInt64

    /// Creates a descriptor.
    public init(guestPhysicalAddress: UInt64, size: UInt64, userAddress: UInt64, mmapOffset: UInt64) {
        self.guestPhysicalAddress = guestPhysicalAddress
        self.size = size
        self.userAddress = userAddress
        self.mmapOffset = mmapOffset
    }
}

/// Why a memory region could not be mapped or changed.
public enum GuestMemoryError: Error, Equatable, Sendable, CustomStringConvertible {
    case zeroSize(index: Int)
    case addressOverflow(index: Int)
    case overlap(index: Int)
    case tooManyRegions(limit: Int)
    case fileTooSmall(index: Int, fileSize: Int64, needed: UInt64)
    case badFileDescriptor(index: Int, errno: Int32)
    case mmapFailed(index: Int, errno: Int32)
    case noSuchRegion

    public var description: String {
        switch self {
        case let .zeroSize(i): return "region \(i) has size 0"
        case let .addressOverflow(i): return "region \(i): address + size overflows"
        case let .overlap(i): return "region \(i) overlaps another region"
        case let .tooManyRegions(limit): return "more than \(limit) memory regions"
        case let .fileTooSmall(i, size, needed): return "region \(i): fd is \(size) bytes, region needs \(needed)"
        case let .badFileDescriptor(i, e): return "region \(i): fstat failed (errno \(e))"
        case let .mmapFailed(i, e): return "region \(i): mmap failed (errno \(e))"
        case .noSuchRegion: return "no matching memory region"
        }
    }
}

/// One mapped region, shared by every memory table that holds it (reference counted): unmapped when the last
/// table holding it goes away, so I/O in flight against an old table outlives the region's removal.
public final class MappedGuestRegion: @unchecked Sendable {
    /// What the VMM said.
    public let descriptor: GuestMemoryRegionDescriptor
    /// Host address of the region's first byte.
    public let host: UnsafeMutableRawPointer
    /// The device may read the region (a vfio-user window's READ flag; always for vhost-user).
    public let readable: Bool
    /// The device may write the region (mapped read-only otherwise).
    public let writable: Bool
    private let mapBase: UnsafeMutableRawPointer
    private let mapLength: Int

    /// Maps `descriptor` from `fd` (shared; writable only when `writable`). The fd is not kept.
    public init(_ descriptor: GuestMemoryRegionDescriptor, fd: Int32, index: Int = 0,
                readable: Bool = true, writable: Bool = true) throws(GuestMemoryError) {
        guard descriptor.size > 0 else { throw .zeroSize(index: index) }
        let (gpaEnd, o1) = descriptor.guestPhysicalAddress.addingReportingOverflow(descriptor.size - 1)
        let (_, o2) = descriptor.userAddress.addingReportingOverflow(descriptor.size - 1)
        let (mapEnd, o3) = descriptor.mmapOffset.addingReportingOverflow(descriptor.size)
        _ = gpaEnd
        guard !o1, !o2, !o3, mapEnd <= UInt64(Int.max / 2) else { throw .addressOverflow(index: index) }
        let fileSize = csys_fd_size(fd)
        guard fileSize >= 0 else { throw .badFileDescriptor(index: index, errno: Int32(-fileSize)) }
        // A mapping past the end of the file would fault (SIGBUS) on access: refuse it up front.
        guard UInt64(fileSize) >= mapEnd else { throw .fileTooSmall(index: index, fileSize: fileSize, needed: mapEnd) }
        // The offset need not be page aligned: map from 0 and skip (as front-ends expect).
        let length = Int(mapEnd)
        let p = mmap(nil, length, PROT_READ | (writable ? PROT_WRITE : 0), MAP_SHARED, fd, 0)
        guard let p, p != MAP_FAILED else { throw .mmapFailed(index: index, errno: errno) }
        self.descriptor = descriptor
        self.readable = readable
        self.writable = writable
        self.mapBase = p
        self.mapLength = length
        self.host = p + Int(descriptor.mmapOffset)
    }

    deinit { munmap(mapBase, mapLength) }
}

/// Result of translating a guest buffer into host iovecs.
public enum TranslationResult: Equatable, Sendable {
    /// The buffer was appended as this many iovecs.
    case ok(Int)
    /// Part of the buffer is outside every region (or the address overflows, or lacks the access).
    case outOfRange
    /// The buffer needs more iovecs than the caller has room for.
    case tooManySegments
}

/// The translation half of a `GuestMemory` table: a flat, sorted copy of its regions' hot fields (no reference
/// counting: a trivial value of two words). Valid only while the `GuestMemory` it came from is alive; a holder that
/// translates per request (`VfioUser.DMAWindows`) keeps the table and uses this, so that no request retains anything.
/// Every guest-physical lookup is an inlinable binary search that checks bounds, overflow and the region's access.
public struct GuestMemoryLookup {
    /// The hot fields of one region.
    @usableFromInline
    struct Entry {
        @usableFromInline var gpa: UInt64
        @usableFromInline var size: UInt64
        @usableFromInline var uaddr: UInt64
        @usableFromInline var host: UnsafeMutableRawPointer
        @usableFromInline var readable: Bool
        @usableFromInline var writable: Bool

        @inlinable @inline(__always)
        func allows(write: Bool) -> Bool { write ? writable : readable }
    }

    /// Sorted by guest physical address.
    @usableFromInline let entries: UnsafePointer<Entry>
    @usableFromInline let count: Int

    init(entries: UnsafePointer<Entry>, count: Int) {
        self.entries = entries
        self.count = count
    }

    /// The entry holding guest physical `address` (binary search for the last region starting at or below it).
    @inlinable @inline(__always)
    func entry(containing address: UInt64) -> Entry? {
        var lo = 0
        var hi = count
        while lo < hi {
            let mid = (lo + hi) >> 1
            if entries[mid].gpa <= address { lo = mid + 1 } else { hi = mid }
        }
        guard lo > 0 else { return nil }
        let e = entries[lo - 1]
        return address &- e.gpa < e.size ? e : nil
    }

    /// Host pointer for `length` bytes at guest physical `address`, only if they lie within one region that allows
    /// the access (reading, or writing when `write`).
    @inlinable @inline(__always)
    public func pointer(guestPhysical address: UInt64, length: UInt64, write: Bool = false) -> UnsafeMutableRawPointer? {
        guard let e = entry(containing: address), e.allows(write: write) else { return nil }
        let offset = address &- e.gpa
        return length <= e.size &- offset ? e.host + Int(offset) : nil
    }

    /// Appends host iovecs for the guest buffer (`address`, `length`) at `vectors[start...]`, splitting it
    /// where it crosses regions; every piece must allow the access (`write`: the device writes the buffer). Never
    /// writes at or past `capacity`.
    @inlinable @inline(__always)
    public func translate(guestPhysical address: UInt64, length: UInt32, write: Bool, into vectors: UnsafeMutablePointer<iovec>,
                          start: Int, capacity: Int) -> TranslationResult {
        var address = address
        var remaining = UInt64(length)
        var n = start
        while remaining > 0 {
            guard let e = entry(containing: address), e.allows(write: write) else { return .outOfRange }
            let offset = address &- e.gpa
            let chunk = min(remaining, e.size &- offset)
            guard n < capacity else { return .tooManySegments }
            vectors[n] = iovec(iov_base: e.host + Int(offset), iov_len: Int(chunk))
            n += 1
            remaining -= chunk
            let (next, overflow) = address.addingReportingOverflow(chunk)
            if overflow && remaining > 0 { return .outOfRange }
            address = next
        }
        return .ok(n - start)
    }

    /// Calls `body` with the host piece of each region the guest range (`address`, `length`) crosses, in order; every
    /// piece must allow the access. False (after possibly calling `body` for a prefix) when a byte is outside every
    /// region or lacks the access, or `body` returned false.
    @inlinable @inline(__always)
    public func forEachPiece(guestPhysical address: UInt64, length: UInt64, write: Bool,
                             _ body: (UnsafeMutableRawPointer, Int) -> Bool) -> Bool {
        var address = address
        var remaining = length
        while remaining > 0 {
            guard let e = entry(containing: address), e.allows(write: write) else { return false }
            let offset = address &- e.gpa
            let n = min(remaining, e.size &- offset)
            guard n <= UInt64(Int.max), body(e.host + Int(offset), Int(n)) else { return false }
            remaining -= n
            let (next, overflow) = address.addingReportingOverflow(n)
            if overflow && remaining > 0 { return false }
            address = next
        }
        return true
    }

    /// Host pointer for `length` bytes at VMM user address `address` (ring addresses), within one region the device
    /// may read and write. A linear scan: rings are resolved when they start, not per request.
    func pointer(userAddress address: UInt64, length: UInt64) -> UnsafeMutableRawPointer? {
        var i = 0
        while i < count {
            let e = entries[i]
            i += 1
            if address >= e.uaddr && e.readable && e.writable {
                let offset = address &- e.uaddr
                if offset < e.size && length <= e.size &- offset { return e.host + Int(offset) }
            }
        }
        return nil
    }
}

/// A guest's memory table: the mapped regions, with checked translation of guest physical and VMM user addresses
/// into host pointers. Immutable; a table change builds a new one. The one guest-memory type of both transports:
/// the vhost-user memory table (SET_MEM_TABLE, ADD/REM_MEM_REG) and the vfio-user DMA windows with an fd
/// (`VfioUser.DMAWindows.table`) each produce it; virtqueues and the PVSCSI device translate through it.
///
/// Guest physical lookups (`lookup`) are a binary search over the regions sorted by guest address, with no
/// allocation and no reference counting; every lookup checks bounds, overflow and the region's access.
public final class GuestMemory: @unchecked Sendable {
    /// The mapped regions, in table order.
    public let regions: [MappedGuestRegion]
    /// The regions' hot fields, sorted by guest address (owned by this table).
    public let lookup: GuestMemoryLookup

    /// An empty table.
    public convenience init() { self.init(regions: []) }

    /// A table of already-mapped regions. Overlapping guest ranges are rejected by `map` and `adding`; a caller of
    /// this initializer must not pass overlapping ones (a lookup would then find one of them, still bounds-checked).
    public init(regions: [MappedGuestRegion]) {
        self.regions = regions
        let entries = UnsafeMutablePointer<GuestMemoryLookup.Entry>.allocate(capacity: max(1, regions.count))
        for (i, r) in regions.sorted(by: { $0.descriptor.guestPhysicalAddress < $1.descriptor.guestPhysicalAddress }).enumerated() {
            entries[i] = GuestMemoryLookup.Entry(gpa: r.descriptor.guestPhysicalAddress, size: r.descriptor.size,
                                                 uaddr: r.descriptor.userAddress, host: r.host, readable: r.readable, writable: r.writable)
        }
        lookup = GuestMemoryLookup(entries: entries, count: regions.count)
    }

    deinit { UnsafeMutablePointer(mutating: lookup.entries).deallocate() }

    /// Maps a whole table (SET_MEM_TABLE). On error nothing stays mapped. The fds are not closed.
    public static func map(_ table: [(GuestMemoryRegionDescriptor, Int32)], limit: Int) throws(GuestMemoryError) -> GuestMemory {
        guard table.count <= limit else { throw .tooManyRegions(limit: limit) }
        var mapped: [MappedGuestRegion] = []
        for (i, (d, fd)) in table.enumerated() {
            mapped.append(try MappedGuestRegion(d, fd: fd, index: i))
        }
        if let bad = firstOverlap(mapped) { throw .overlap(index: bad) }
        return GuestMemory(regions: mapped)
    }

    /// A new table with `region` added (ADD_MEM_REG).
    public func adding(_ region: MappedGuestRegion, limit: Int) throws(GuestMemoryError) -> GuestMemory {
        guard regions.count < limit else { throw .tooManyRegions(limit: limit) }
        let all = regions + [region]
        if Self.firstOverlap(all) != nil { throw .overlap(index: regions.count) }
        return GuestMemory(regions: all)
    }

    /// A new table without the region matching `descriptor`'s guest address, size and user address (REM_MEM_REG).
    public func removing(_ descriptor: GuestMemoryRegionDescriptor) throws(GuestMemoryError) -> GuestMemory {
        guard let i = regions.firstIndex(where: {
            $0.descriptor.guestPhysicalAddress == descriptor.guestPhysicalAddress && $0.descriptor.size == descriptor.size
                && $0.descriptor.userAddress == descriptor.userAddress
        }) else { throw .noSuchRegion }
        var r = regions
        r.remove(at: i)
        return GuestMemory(regions: r)
    }

    /// Index (in table order) of a region whose guest-physical or user range overlaps an earlier one.
    private static func firstOverlap(_ regions: [MappedGuestRegion]) -> Int? {
        for i in regions.indices {
            let a = regions[i].descriptor
            for j in 0..<i {
                let b = regions[j].descriptor
                if a.guestPhysicalAddress < b.guestPhysicalAddress &+ b.size && b.guestPhysicalAddress < a.guestPhysicalAddress &+ a.size { return i }
                if a.userAddress < b.userAddress &+ b.size && b.userAddress < a.userAddress &+ a.size { return i }
            }
        }
        return nil
    }

    /// Number of regions.
    public var regionCount: Int { lookup.count }

    /// Host pointer for `length` bytes at guest physical `address` within one region that allows the access.
    @inlinable @inline(__always)
    public func pointer(guestPhysical address: UInt64, length: UInt64, write: Bool = false) -> UnsafeMutableRawPointer? {
        lookup.pointer(guestPhysical: address, length: length, write: write)
    }

    /// Host pointer for `length` bytes at VMM user address `address` (ring addresses), within one region the device
    /// may read and write.
    public func pointer(userAddress address: UInt64, length: UInt64) -> UnsafeMutableRawPointer? {
        lookup.pointer(userAddress: address, length: length)
    }

    /// `GuestMemoryLookup.translate`.
    @inlinable @inline(__always)
    public func translate(guestPhysical address: UInt64, length: UInt32, write: Bool, into vectors: UnsafeMutablePointer<iovec>,
                          start: Int, capacity: Int) -> TranslationResult {
        lookup.translate(guestPhysical: address, length: length, write: write, into: vectors, start: start, capacity: capacity)
    }

    /// `GuestMemoryLookup.forEachPiece`.
    @inlinable @inline(__always)
    public func forEachPiece(guestPhysical address: UInt64, length: UInt64, write: Bool,
                             _ body: (UnsafeMutableRawPointer, Int) -> Bool) -> Bool {
        lookup.forEachPiece(guestPhysical: address, length: length, write: write, body)
    }
}
