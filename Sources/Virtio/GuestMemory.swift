import CSystem
#if canImport(Glibc)
import Glibc
#endif

/// One guest memory region as the VMM describes it (vhost-user SET_MEM_TABLE / ADD_MEM_REG).
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

/// One mapped region; unmapped when the last memory table holding it goes away.
public final class MappedGuestRegion: @unchecked Sendable {
    /// What the VMM said.
    public let descriptor: GuestMemoryRegionDescriptor
    /// Host address of the region's first byte.
    public let host: UnsafeMutableRawPointer
    private let mapBase: UnsafeMutableRawPointer
    private let mapLength: Int

    /// Maps `descriptor` from `fd` (shared, read-write). The fd is not kept.
    public init(_ descriptor: GuestMemoryRegionDescriptor, fd: Int32, index: Int = 0) throws(GuestMemoryError) {
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
        let p = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        guard let p, p != MAP_FAILED else { throw .mmapFailed(index: index, errno: errno) }
        self.descriptor = descriptor
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
    /// Part of the buffer is outside every region (or the address overflows).
    case outOfRange
    /// The buffer needs more iovecs than the caller has room for.
    case tooManySegments
}

/// A guest's memory table: the mapped regions, with checked translation of guest physical and
/// VMM user addresses into host pointers. Immutable; a table change builds a new one.
public final class GuestMemory: @unchecked Sendable {
    /// Flat copy of the hot fields for translation (no ARC in the loop).
    private struct Entry {
        var gpa: UInt64
        var size: UInt64
        var uaddr: UInt64
        var host: UnsafeMutableRawPointer
    }

    /// The mapped regions, in table order.
    public let regions: [MappedGuestRegion]
    private let entries: UnsafeMutablePointer<Entry>
    private let count: Int

    /// An empty table.
    public convenience init() { self.init(regions: []) }

    /// A table of already-mapped regions. Overlapping guest ranges are rejected by `validated`.
    public init(regions: [MappedGuestRegion]) {
        self.regions = regions
        count = regions.count
        entries = .allocate(capacity: max(1, regions.count))
        for (i, r) in regions.enumerated() {
            entries[i] = Entry(gpa: r.descriptor.guestPhysicalAddress, size: r.descriptor.size,
                               uaddr: r.descriptor.userAddress, host: r.host)
        }
    }

    deinit { entries.deallocate() }

    /// Maps a whole table (SET_MEM_TABLE). On error nothing stays mapped. The fds are not closed.
    public static func map(_ table: [(GuestMemoryRegionDescriptor, Int32)], limit: Int) throws(GuestMemoryError) -> GuestMemory {
        guard table.count <= limit else { throw .tooManyRegions(limit: limit) }
        var mapped: [MappedGuestRegion] = []
        for (i, (d, fd)) in table.enumerated() {
            mapped.append(try MappedGuestRegion(d, fd: fd, index: i))
        }
        let memory = GuestMemory(regions: mapped)
        if let bad = memory.firstOverlap() { throw .overlap(index: bad) }
        return memory
    }

    /// A new table with `region` added (ADD_MEM_REG).
    public func adding(_ region: MappedGuestRegion, limit: Int) throws(GuestMemoryError) -> GuestMemory {
        guard regions.count < limit else { throw .tooManyRegions(limit: limit) }
        let memory = GuestMemory(regions: regions + [region])
        if memory.firstOverlap() != nil { throw .overlap(index: regions.count) }
        return memory
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

    /// Index of a region whose guest-physical or user range overlaps an earlier one.
    private func firstOverlap() -> Int? {
        for i in 0..<count {
            for j in 0..<i {
                let a = entries[i], b = entries[j]
                if a.gpa < b.gpa &+ b.size && b.gpa < a.gpa &+ a.size { return i }
                if a.uaddr < b.uaddr &+ b.size && b.uaddr < a.uaddr &+ a.size { return i }
            }
        }
        return nil
    }

    /// Number of regions.
    public var regionCount: Int { count }

    /// Host pointer for `length` bytes at guest physical `address`, only if they lie within one region.
    @inline(__always)
    public func pointer(guestPhysical address: UInt64, length: UInt64) -> UnsafeMutableRawPointer? {
        var i = 0
        while i < count {
            let e = entries[i]
            i += 1
            if address >= e.gpa {
                let offset = address &- e.gpa
                if offset < e.size && length <= e.size &- offset { return e.host + Int(offset) }
            }
        }
        return nil
    }

    /// Host pointer for `length` bytes at VMM user address `address` (ring addresses), within one region.
    public func pointer(userAddress address: UInt64, length: UInt64) -> UnsafeMutableRawPointer? {
        var i = 0
        while i < count {
            let e = entries[i]
            i += 1
            if address >= e.uaddr {
                let offset = address &- e.uaddr
                if offset < e.size && length <= e.size &- offset { return e.host + Int(offset) }
            }
        }
        return nil
    }

    /// Appends host iovecs for the guest buffer (`address`, `length`) at `vectors[start...]`, splitting it
    /// where it crosses regions. Never writes at or past `capacity`.
    @inline(__always)
    public func translate(guestPhysical address: UInt64, length: UInt32, into vectors: UnsafeMutablePointer<iovec>,
                          start: Int, capacity: Int) -> TranslationResult {
        var address = address
        var remaining = UInt64(length)
        var n = start
        while remaining > 0 {
            var found = false
            var i = 0
            while i < count {
                let e = entries[i]
                i += 1
                guard address >= e.gpa else { continue }
                let offset = address &- e.gpa
                guard offset < e.size else { continue }
                let chunk = min(remaining, e.size &- offset)
                guard n < capacity else { return .tooManySegments }
                vectors[n] = iovec(iov_base: e.host + Int(offset), iov_len: Int(chunk))
                n += 1
                remaining -= chunk
                let (next, overflow) = address.addingReportingOverflow(chunk)
                if overflow && remaining > 0 { return .outOfRange }
                address = next
                found = true
                break
            }
            if !found { return .outOfRange }
        }
        return .ok(n - start)
    }
}
