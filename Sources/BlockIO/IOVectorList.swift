#if canImport(Glibc)
import Glibc
#endif

/// A non-owning view of a scatter-gather list: an array of `iovec` that point into
/// guest memory (or any other memory the caller keeps alive while the view is used).
///
/// Front-ends fill one per queue slot from preallocated storage, so building a view
/// never allocates. The SCSI core and the back-ends read and write the memory in place.
public struct IOVectorList: @unchecked Sendable {
    /// First element of the `iovec` array, or nil when `count` is 0.
    public var base: UnsafeMutablePointer<iovec>?
    /// Number of valid elements at `base`.
    public var count: Int

    /// Creates a view over `count` iovecs starting at `base`.
    public init(base: UnsafeMutablePointer<iovec>?, count: Int) {
        self.base = count > 0 ? base : nil
        self.count = count > 0 ? count : 0
    }

    /// A list with no buffers.
    public static var empty: IOVectorList { IOVectorList(base: nil, count: 0) }

    /// Sum of all element lengths in bytes.
    public var totalLength: Int {
        var total = 0
        var i = 0
        while i < count {
            total &+= base![i].iov_len
            i += 1
        }
        return total
    }

    /// The i-th element.
    @inlinable
    public subscript(i: Int) -> iovec {
        precondition(i >= 0 && i < count, "iovec index out of range")
        return base![i]
    }

    /// Copies bytes out of the list, starting `offset` bytes into it, into `destination`.
    /// Returns the number of bytes copied (less than `destination.count` at the end of the list).
    @discardableResult
    public func gather(from offset: Int, into destination: UnsafeMutableRawBufferPointer) -> Int {
        guard let base, let dst = destination.baseAddress, destination.count > 0, offset >= 0 else { return 0 }
        var skip = offset
        var copied = 0
        var i = 0
        while i < count && copied < destination.count {
            let element = base[i]
            i += 1
            if skip >= element.iov_len { skip -= element.iov_len; continue }
            guard let src = element.iov_base else { skip = 0; continue }
            let n = min(element.iov_len - skip, destination.count - copied)
            (dst + copied).copyMemory(from: UnsafeRawPointer(src) + skip, byteCount: n)
            copied += n
            skip = 0
        }
        return copied
    }

    /// Copies `source` into the list starting `offset` bytes into it.
    /// Returns the number of bytes written (less than `source.count` at the end of the list).
    @discardableResult
    public func scatter(at offset: Int, from source: UnsafeRawBufferPointer) -> Int {
        guard let base, let src = source.baseAddress, source.count > 0, offset >= 0 else { return 0 }
        var skip = offset
        var copied = 0
        var i = 0
        while i < count && copied < source.count {
            let element = base[i]
            i += 1
            if skip >= element.iov_len { skip -= element.iov_len; continue }
            guard let dst = element.iov_base else { skip = 0; continue }
            let n = min(element.iov_len - skip, source.count - copied)
            (dst + skip).copyMemory(from: src + copied, byteCount: n)
            copied += n
            skip = 0
        }
        return copied
    }

    /// Fills `length` bytes starting at `offset` with zeroes. Returns the bytes written.
    @discardableResult
    public func zero(from offset: Int, length: Int) -> Int {
        guard let base, length > 0, offset >= 0 else { return 0 }
        var skip = offset
        var done = 0
        var i = 0
        while i < count && done < length {
            let element = base[i]
            i += 1
            if skip >= element.iov_len { skip -= element.iov_len; continue }
            guard let dst = element.iov_base else { skip = 0; continue }
            let n = min(element.iov_len - skip, length - done)
            (dst + skip).initializeMemory(as: UInt8.self, repeating: 0, count: n)
            done += n
            skip = 0
        }
        return done
    }
}

/// Owned, fixed-capacity storage for iovecs, allocated once per queue slot and reused for
/// every request that slot carries (no per-I/O allocation).
public struct IOVectorStorage: ~Copyable, @unchecked Sendable {
    /// Element storage.
    public let elements: UnsafeMutablePointer<iovec>
    /// Number of elements `elements` can hold.
    public let capacity: Int

    /// Allocates room for `capacity` iovecs.
    public init(capacity: Int) {
        precondition(capacity > 0)
        self.capacity = capacity
        self.elements = .allocate(capacity: capacity)
        self.elements.initialize(repeating: iovec(iov_base: nil, iov_len: 0), count: capacity)
    }

    deinit { elements.deallocate() }

    /// A view of the first `count` elements.
    public func view(count: Int) -> IOVectorList {
        precondition(count >= 0 && count <= capacity)
        return IOVectorList(base: elements, count: count)
    }
}
