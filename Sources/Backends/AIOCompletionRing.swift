import CLibAIO
import CSystem

/// The completion ring the kernel shares with an AIO context (`struct aio_ring` of fs/aio.c, mapped at
/// the context's address): io_getevents reads it in the kernel; this reads it in user space (no system
/// call per completion), as the kernel allows: it takes the consumer index (`head`) from the ring.
///
/// Trusted only when its header is the known one (magic 0xa10a10a1, no incompatible features, a
/// 32-byte header, a ring size the context could have); indexes are checked on every read.
struct AIOCompletionRing {
    private let base: UnsafeMutableRawPointer
    private let entries: UInt32

    static let magic: UInt32 = 0xa10a_10a1
    static let headerBytes = 32

    /// The ring of `context`, or nil when its header is not the known one.
    init?(_ context: io_context_t) {
        let p = UnsafeMutableRawPointer(context)
        // id, nr, head, tail, magic, compat_features, incompat_features, header_length
        let nr = p.load(fromByteOffset: 4, as: UInt32.self)
        guard p.load(fromByteOffset: 16, as: UInt32.self) == Self.magic,
              p.load(fromByteOffset: 24, as: UInt32.self) == 0,
              p.load(fromByteOffset: 28, as: UInt32.self) == UInt32(Self.headerBytes),
              nr > 0, nr <= 1 << 20,
              MemoryLayout<io_event>.stride == 32 else { return nil }
        base = p
        entries = nr
    }

    /// Copies up to `capacity` completions into `events` and gives their ring entries back to the
    /// kernel. Returns how many (0 when none, or when the indexes are out of range: then the caller's
    /// io_getevents path or a later read finds them).
    @inline(__always)
    func pop(into events: UnsafeMutablePointer<io_event>, capacity: Int) -> Int {
        var head = csys_load_relaxed_u32(base + 8)
        let tail = csys_load_acquire_u32(base + 12)
        guard head != tail, head < entries, tail < entries else { return 0 }
        let ring = (base + Self.headerBytes).assumingMemoryBound(to: io_event.self)
        var n = 0
        while head != tail && n < capacity {
            events[n] = ring[Int(head)]
            head = head + 1 == entries ? 0 : head + 1
            n += 1
        }
        csys_store_release_u32(base + 8, head)
        return n
    }
}
