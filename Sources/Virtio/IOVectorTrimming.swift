import BlockIO
#if canImport(Glibc)
import Glibc
#endif

extension IOVectorList {
    /// The list without its first `bytes` bytes, adjusting the element where the cut falls in place
    /// (the elements belong to a request slot). Nil when the list is shorter than `bytes`.
    public func droppingPrefix(_ bytes: Int) -> IOVectorList? {
        guard bytes >= 0 else { return nil }
        if bytes == 0 { return self }
        guard let base else { return nil }
        var skip = bytes
        var i = 0
        while i < count {
            let len = base[i].iov_len
            if skip < len {
                base[i].iov_base = base[i].iov_base.map { $0 + skip }
                base[i].iov_len = len - skip
                return IOVectorList(base: base + i, count: count - i)
            }
            skip -= len
            i += 1
            if skip == 0 { return IOVectorList(base: base + i, count: count - i) }
        }
        return nil
    }

    /// The list without its last `bytes` bytes (the element where the cut falls is shortened in place).
    /// Nil when the list is shorter than `bytes`.
    public func droppingSuffix(_ bytes: Int) -> IOVectorList? {
        guard bytes >= 0 else { return nil }
        if bytes == 0 { return self }
        guard let base else { return nil }
        var cut = bytes
        var n = count
        while n > 0 {
            let len = base[n - 1].iov_len
            if cut < len {
                base[n - 1].iov_len = len - cut
                return IOVectorList(base: base, count: n)
            }
            cut -= len
            n -= 1
            if cut == 0 { return IOVectorList(base: base, count: n) }
        }
        return nil
    }

    /// Copies the iovecs covering the first `bytes` bytes into `destination` (the last one shortened),
    /// so those bytes can be written later after the list itself was trimmed. Returns the number of
    /// iovecs, or nil when the list is shorter or more than `capacity` iovecs are needed.
    public func copyPrefix(_ bytes: Int, into destination: UnsafeMutablePointer<iovec>, capacity: Int) -> Int? {
        guard let base, bytes > 0 else { return bytes == 0 ? 0 : nil }
        var remaining = bytes
        var i = 0
        while i < count && remaining > 0 {
            guard i < capacity else { return nil }
            let len = min(base[i].iov_len, remaining)
            destination[i] = iovec(iov_base: base[i].iov_base, iov_len: len)
            remaining -= len
            i += 1
        }
        return remaining == 0 ? i : nil
    }

    /// Host pointer to the last byte of the list (virtio-blk status byte), nil when empty.
    public var lastByte: UnsafeMutableRawPointer? {
        guard let base else { return nil }
        var n = count
        while n > 0 {
            let e = base[n - 1]
            if e.iov_len > 0, let p = e.iov_base { return p + (e.iov_len - 1) }
            n -= 1
        }
        return nil
    }
}
