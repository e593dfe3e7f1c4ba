import CSystem
import GuestMemoryMap
#if canImport(Glibc)
import Glibc
#endif

/// A dirty-page log shared with the VMM for live migration (vhost-user SET_LOG_BASE with
/// VHOST_USER_PROTOCOL_F_LOG_SHMFD): bit `n` of the bitmap (byte `n / 8`, bit `n % 8`) stands for the
/// 4 KiB guest physical page `n`. The VMM reads and clears the bitmap while the device writes guest
/// memory, so bits are only ever set with an atomic fetch-or. Pages past the end of the bitmap are not
/// logged (the VMM sizes the log for all of guest memory and resizes it before memory grows).
public final class DirtyLog: @unchecked Sendable {
    /// log2 of the page size the bitmap counts in (VHOST_LOG_PAGE, 4 KiB).
    public static let pageShift: UInt64 = 12
    /// Bytes of bitmap.
    public let size: Int
    private let bitmap: UnsafeMutablePointer<UInt8>
    private let mapBase: UnsafeMutableRawPointer
    private let mapLength: Int

    /// Why a log could not be mapped.
    public struct Failure: Error, CustomStringConvertible, Sendable {
        public var description: String
    }

    /// Maps `size` bytes of bitmap at `offset` in `fd` (shared, read-write). The fd is closed in every case.
    public init(fd: Int32, size: UInt64, offset: UInt64) throws(Failure) {
        defer { close(fd) }
        let (end, overflow) = offset.addingReportingOverflow(size)
        guard size > 0, !overflow, end <= UInt64(Int.max / 2) else {
            throw Failure(description: "log size \(size) offset \(offset) is invalid")
        }
        let fileSize = csys_fd_size(fd)
        guard fileSize >= 0 else { throw Failure(description: "log fd: fstat failed (errno \(-fileSize))") }
        // A mapping past the end of the file would fault (SIGBUS) when a bit is set: refuse it up front.
        guard UInt64(fileSize) >= end else { throw Failure(description: "log fd is \(fileSize) bytes, the log needs \(end)") }
        guard let p = mmap(nil, Int(end), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), p != MAP_FAILED else {
            throw Failure(description: "log mmap of \(end) bytes: errno \(errno)")
        }
        mapBase = p
        mapLength = Int(end)
        bitmap = (p + Int(offset)).assumingMemoryBound(to: UInt8.self)
        self.size = Int(size)
    }

    deinit { munmap(mapBase, mapLength) }

    /// Marks every page that `length` bytes at guest physical `address` touch.
    @inline(__always)
    public func mark(guestPhysical address: UInt64, length: UInt64) {
        guard length > 0 else { return }
        let (last, overflow) = address.addingReportingOverflow(length - 1)
        var page = address >> Self.pageShift
        let lastPage = overflow ? UInt64.max >> Self.pageShift : last >> Self.pageShift
        let pages = UInt64(size) << 3
        while page <= lastPage && page < pages {
            csys_atomic_or_u8(bitmap + Int(page >> 3), UInt8(1) << UInt8(page & 7))
            page += 1
        }
    }

    /// Whether page `page` is marked (tests and diagnostics).
    public func isMarked(page: UInt64) -> Bool {
        guard page < UInt64(size) << 3 else { return false }
        return bitmap[Int(page >> 3)] & (UInt8(1) << UInt8(page & 7)) != 0
    }

    /// The marked page numbers, in order (tests and diagnostics).
    public var markedPages: [UInt64] {
        var out: [UInt64] = []
        for byte in 0..<size where bitmap[byte] != 0 {
            for bit in 0..<8 where bitmap[byte] & (1 << bit) != 0 { out.append(UInt64(byte) << 3 | UInt64(bit)) }
        }
        return out
    }

    /// Clears the bitmap, as the VMM does when it has synchronised it (tests).
    public func clear() { bitmap.update(repeating: 0, count: size) }
}

extension GuestMemory {
    /// Guest physical address of host pointer `host` when it lies inside a region (reverse of `translate`).
    public func guestPhysical(host: UnsafeRawPointer) -> UInt64? {
        for r in regions {
            let start = UnsafeRawPointer(r.host)
            if host >= start, host < start + Int(r.descriptor.size) { return r.descriptor.guestPhysicalAddress + UInt64(host - start) }
        }
        return nil
    }

    /// Guest physical address of VMM user address `address` when it lies inside a region.
    public func guestPhysical(userAddress address: UInt64) -> UInt64? {
        for r in regions where address >= r.descriptor.userAddress && address - r.descriptor.userAddress < r.descriptor.size {
            return r.descriptor.guestPhysicalAddress + (address - r.descriptor.userAddress)
        }
        return nil
    }
}
