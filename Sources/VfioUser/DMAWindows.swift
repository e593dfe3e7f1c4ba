import CSystem
import GuestMemoryMap
#if canImport(Glibc)
import Glibc
import SystemErrors
#endif

/// Why a DMA_MAP or DMA_UNMAP was refused; carries the errno for the reply.
public struct DMAMapError: Error, Sendable, Equatable, CustomStringConvertible {
    public var errno: Int32
    public var reason: String
    public init(_ errno: Int32, _ reason: String) {
        self.errno = errno
        self.reason = reason
    }

    /// The window [`address`, +`size`) at `fileOffset` could not be mapped.
    init(_ error: GuestMemoryError, address: UInt64, size: UInt64, fileOffset: UInt64) {
        let window = "DMA_MAP window 0x\(String(address, radix: 16)) +0x\(String(size, radix: 16))"
        switch error {
        case let .fileTooSmall(_, fileSize, _):
            self.init(EINVAL, "\(window) at offset 0x\(String(fileOffset, radix: 16)) extends past the end of its file (0x\(String(fileSize, radix: 16)) bytes)")
        case let .badFileDescriptor(_, e): self.init(EBADF, SystemCallError("fstat", errno: e, context: window).description)
        case let .mmapFailed(_, e): self.init(SystemCallError("mmap", errno: e == 0 ? EINVAL : e, context: window))
        default: self.init(EINVAL, "\(window): \(error)")
        }
    }

    /// A refusal because `error`'s system call failed: its errno for the reply, its description as the reason.
    public init(_ error: SystemCallError) { self.init(error.errno, error.description) }
    public var description: String { reason }
}

/// One DMA window the client exported with VFIO_USER_DMA_MAP.
public struct DMARegion: @unchecked Sendable {
    /// Guest (IOVA) start address.
    public var address: UInt64
    /// Length in bytes.
    public var size: UInt64
    /// Client allows device reads.
    public var readable: Bool
    /// Client allows device writes.
    public var writable: Bool
    /// The window's mapping when the client sent an fd (reference counted: shared with every `GuestMemory` table
    /// built from it, so a device holding an older table keeps it mapped after an unmap until its requests are
    /// done). Nil without an fd: such memory is only reachable through VFIO_USER_DMA_READ/WRITE messages
    /// (`DMAWindows.remote`), never through a pointer.
    public var mapped: MappedGuestRegion?

    /// Host address of the mapping, or nil for an fd-less window.
    public var host: UnsafeMutableRawPointer? { mapped?.host }
    /// Exclusive end (no overflow: checked at map time).
    public var end: UInt64 { address + size }
}

/// The guest memory the client has exported: a sorted, non-overlapping set of DMA windows. The windows with an fd
/// are mapped once each (`MappedGuestRegion`) and form `table`, the `GuestMemory` every pointer translation goes
/// through (PVSCSI's `translate`/`forEachPiece`, the virtio-pci function's rings); fd-less windows are reached by
/// message (`remote`, `read`/`write`/`forEachRange`). Every access checks bounds, overflow and the window's access;
/// nothing outside a mapped window is ever touched.
///
/// Owned by the server's event-loop thread.
public final class DMAWindows: @unchecked Sendable {
    /// Largest number of windows (QEMU's default max_dma_maps is 65535; a PVSCSI guest needs a handful).
    public static let maxRegions = 1024
    /// DMA page size (alignment of address, size and file offset).
    public static let pageSize: UInt64 = 4096

    public private(set) var regions: [DMARegion] = []
    /// The windows with an fd as a memory table (user address = IOVA), rebuilt on every map and unmap. A holder keeps
    /// its windows mapped for as long as it keeps the table.
    public private(set) var table = GuestMemory()
    /// `table`'s lookup (valid while `table` is held): what each translation uses, so that none retains the table.
    private var lookup: GuestMemoryLookup
    /// Windows without an fd (reachable only through `remote`).
    public private(set) var remoteRegionCount = 0
    /// Carries accesses to fd-less windows as DMA_READ/DMA_WRITE messages (set by the server). Nil: such
    /// accesses fail. Called on the loop thread only, never for fd-mapped memory.
    public var remote: RemoteDMA? = nil
    /// While set, unmapped windows stay mapped in this process (a device access in progress may still use
    /// them) until `releaseHeldUnmaps`; they are gone from `regions` and `table` at once.
    public var holdUnmaps = false
    private var held: [MappedGuestRegion] = []

    public init() {
        lookup = table.lookup
        regions.reserveCapacity(16)
    }

    /// Adds a window. With `fd` >= 0 the window is mmap'ed (the fd is closed by this call either way).
    public func map(address: UInt64, size: UInt64, fileOffset: UInt64, readable: Bool, writable: Bool,
                    fd: Int32) throws(DMAMapError) {
        defer { if fd >= 0 { close(fd) } }
        guard size > 0 else { throw DMAMapError(EINVAL, "DMA_MAP size 0") }
        let (end, overflow) = address.addingReportingOverflow(size)
        guard !overflow else { throw DMAMapError(EINVAL, "DMA_MAP address 0x\(String(address, radix: 16)) + size overflows") }
        guard address % Self.pageSize == 0, size % Self.pageSize == 0, fileOffset % Self.pageSize == 0 else {
            throw DMAMapError(EINVAL, "DMA_MAP address/size/offset not 4 KiB aligned")
        }
        guard size <= UInt64(Int.max), fileOffset <= UInt64(Int64.max) else { throw DMAMapError(EINVAL, "DMA_MAP size too large") }
        guard regions.count < Self.maxRegions else { throw DMAMapError(ENOSPC, "too many DMA windows") }
        for r in regions where address < r.end && r.address < end {
            throw DMAMapError(EEXIST, "DMA_MAP [0x\(String(address, radix: 16)), +0x\(String(size, radix: 16))) overlaps an existing window")
        }
        var mapped: MappedGuestRegion? = nil
        if fd >= 0 {
            let descriptor = GuestMemoryRegionDescriptor(guestPhysicalAddress: address, size: size, userAddress: address, mmapOffset: fileOffset)
            do {
                mapped = try MappedGuestRegion(descriptor, fd: fd, readable: readable, writable: writable)
            } catch {
                throw DMAMapError(error, address: address, size: size, fileOffset: fileOffset)
            }
        }
        let index = regions.firstIndex { $0.address > address } ?? regions.count
        regions.insert(DMARegion(address: address, size: size, readable: readable, writable: writable, mapped: mapped), at: index)
        if mapped == nil { remoteRegionCount += 1 } else { rebuildTable() }
    }

    /// Removes the window that exactly matches `address` and `size`.
    public func unmap(address: UInt64, size: UInt64) throws(DMAMapError) {
        guard let i = regions.firstIndex(where: { $0.address == address && $0.size == size }) else {
            throw DMAMapError(EINVAL, "DMA_UNMAP [0x\(String(address, radix: 16)), +0x\(String(size, radix: 16))) matches no window")
        }
        release(regions.remove(at: i))
        rebuildTable()
    }

    private func release(_ r: DMARegion) {
        if let m = r.mapped {
            if holdUnmaps { held.append(m) }
        } else {
            remoteRegionCount -= 1
        }
    }

    private func rebuildTable() {
        table = GuestMemory(regions: regions.compactMap(\.mapped))
        lookup = table.lookup
    }

    /// Unmaps the windows kept by `holdUnmaps` (unless a memory table still holds them).
    public func releaseHeldUnmaps() {
        held.removeAll()
    }

    /// Removes every window.
    public func unmapAll() {
        for r in regions { release(r) }
        if !holdUnmaps { releaseHeldUnmaps() }
        regions.removeAll(keepingCapacity: true)
        remoteRegionCount = 0
        rebuildTable()
    }

    /// The host address of `length` bytes at guest `address` when they lie inside ONE mapped window with
    /// the needed access; nil otherwise (unmapped, fd-less window, overflow, or no write permission).
    @inline(__always)
    public func translate(_ address: UInt64, length: UInt64, write: Bool) -> UnsafeMutableRawPointer? {
        lookup.pointer(guestPhysical: address, length: length, write: write)
    }

    /// Like `translate`, but a range may span adjacent windows: calls `body` with each host piece in order.
    /// Returns false (after possibly calling `body` for a prefix) when any byte is not accessible.
    @inline(__always)
    public func forEachPiece(_ address: UInt64, length: UInt64, write: Bool,
                             _ body: (UnsafeMutableRawPointer, Int) -> Bool) -> Bool {
        lookup.forEachPiece(guestPhysical: address, length: length, write: write, body)
    }

    /// Whether `length` bytes at `address` lie inside ONE fd-less window with the needed access (reachable
    /// only through `remote`).
    public func isRemote(_ address: UInt64, length: UInt64, write: Bool) -> Bool {
        guard remoteRegionCount > 0, let r = window(containing: address) else { return false }
        let (last, overflow) = address.addingReportingOverflow(length == 0 ? 0 : length - 1)
        guard !overflow, last < r.end, r.host == nil else { return false }
        return write ? r.writable : r.readable
    }

    /// The window holding `address` (binary search for the last window starting at or below it), or nil.
    private func window(containing address: UInt64) -> DMARegion? {
        var lo = 0
        var hi = regions.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if regions[mid].address <= address { lo = mid + 1 } else { hi = mid }
        }
        guard lo > 0, address < regions[lo - 1].end else { return nil }
        return regions[lo - 1]
    }

    /// Walks `length` bytes at `address` window by window: `body(host, guestAddress, offset, count)` gets the host
    /// pointer of fd-mapped pieces and nil for fd-less ones. False when a byte is unmapped or lacks the access.
    private func forEachSegment(_ address: UInt64, length: UInt64, write: Bool,
                                _ body: (UnsafeMutableRawPointer?, UInt64, Int, Int) -> Bool) -> Bool {
        var addr = address
        var remaining = length
        var done = 0
        var guardCount = 0
        while remaining > 0 {
            guardCount += 1
            if guardCount > Self.maxRegions { return false }
            guard let r = window(containing: addr) else { return false }
            if write ? !r.writable : !r.readable { return false }
            let n = min(r.end - addr, remaining)
            guard n <= UInt64(Int.max) else { return false }
            if !body(r.host.map { $0 + Int(addr - r.address) }, addr, done, Int(n)) { return false }
            remaining -= n
            done += Int(n)
            let (next, o) = addr.addingReportingOverflow(n)
            if o && remaining > 0 { return false }
            addr = next
        }
        return true
    }

    /// Walks `length` bytes at `address` window by window: `body(host, guestAddress, count)` gets the host pointer
    /// of fd-mapped pieces and nil for fd-less ones (reach those with `read`/`write`). False when a byte is not
    /// in a window with the access, or `body` returned false.
    @inline(__always)
    public func forEachRange(_ address: UInt64, length: UInt64, write: Bool,
                             _ body: (UnsafeMutableRawPointer?, UInt64, Int) -> Bool) -> Bool {
        forEachSegment(address, length: length, write: write) { host, guest, _, n in body(host, guest, n) }
    }

    /// Copies guest memory into `destination` (fd-less windows through DMA_READ); false if not entirely
    /// mapped/readable or a DMA_READ failed.
    public func read(_ address: UInt64, into destination: UnsafeMutableRawBufferPointer) -> Bool {
        guard let dst = destination.baseAddress else { return destination.count == 0 }
        return forEachSegment(address, length: UInt64(destination.count), write: false) { host, guest, offset, n in
            if let p = host {
                (dst + offset).copyMemory(from: p, byteCount: n)
                return true
            }
            guard let remote else { return false }
            return remote.read(guest, into: UnsafeMutableRawBufferPointer(start: dst + offset, count: n))
        }
    }

    /// Copies `source` into guest memory (fd-less windows through DMA_WRITE); false if not entirely
    /// mapped/writable or a DMA_WRITE failed (a prefix may be written).
    public func write(_ address: UInt64, from source: UnsafeRawBufferPointer) -> Bool {
        guard let src = source.baseAddress else { return source.count == 0 }
        return forEachSegment(address, length: UInt64(source.count), write: true) { host, guest, offset, n in
            if let p = host {
                p.copyMemory(from: src + offset, byteCount: n)
                return true
            }
            guard let remote else { return false }
            return remote.write(guest, from: UnsafeRawBufferPointer(start: src + offset, count: n))
        }
    }
}

/// Guest memory access by message, for DMA windows the client exported without an fd
/// (VFIO_USER_DMA_READ / VFIO_USER_DMA_WRITE). Each call is synchronous and bounded in time.
public final class RemoteDMA: @unchecked Sendable {
    let readBody: (UInt64, UnsafeMutableRawBufferPointer) -> Bool
    let writeBody: (UInt64, UnsafeRawBufferPointer) -> Bool

    public init(read: @escaping (UInt64, UnsafeMutableRawBufferPointer) -> Bool,
                write: @escaping (UInt64, UnsafeRawBufferPointer) -> Bool) {
        readBody = read
        writeBody = write
    }

    /// Reads `destination.count` bytes at guest `address`; false on any failure.
    public func read(_ address: UInt64, into destination: UnsafeMutableRawBufferPointer) -> Bool { readBody(address, destination) }
    /// Writes `source` at guest `address`; false on any failure.
    public func write(_ address: UInt64, from source: UnsafeRawBufferPointer) -> Bool { writeBody(address, source) }
}
