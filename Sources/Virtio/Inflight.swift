#if canImport(Glibc)
import Glibc
#endif

/// In-flight tracking for one split virtqueue, in shared memory the VMM keeps across back-end
/// restarts (vhost-user INFLIGHT_SHMFD).
///
/// Layout per queue (vhost-user spec, split rings): a 16-byte header `features u64, version u16,
/// desc_num u16, last_batch_head u16, used_idx u16`, then `desc_num` 16-byte entries
/// `inflight u8, padding[5], next u16, counter u64`. A descriptor is marked when popped and cleared
/// once its used entry is published; a restarted back-end resubmits the marked ones in pop order.
public final class InflightQueueRegion: @unchecked Sendable {
    /// Bytes needed for a queue of `size` descriptors.
    public static func byteCount(queueSize size: Int) -> Int { 16 + 16 * size }

    /// Start of the header.
    public let base: UnsafeMutableRawPointer
    /// Descriptors tracked.
    public let size: Int
    /// Keeps the shared mapping alive while a ring uses this region.
    public var owner: AnyObject?
    private var counter: UInt64 = 1
    /// Heads pushed since the last publish (cleared once their used entries are visible).
    private let batch: UnsafeMutablePointer<UInt16>
    private var batchCount = 0

    /// Wraps the region at `base` for a queue of `size` descriptors. When the header's size does not
    /// match (a fresh or foreign region), the region is reset.
    public init(base: UnsafeMutableRawPointer, size: Int) {
        self.base = base
        self.size = size
        batch = .allocate(capacity: max(1, size))
        if descNum != UInt16(truncatingIfNeeded: size) || version != 1 {
            base.initializeMemory(as: UInt8.self, repeating: 0, count: Self.byteCount(queueSize: size))
            base.storeBytes(of: UInt16(1), toByteOffset: 8, as: UInt16.self)
            base.storeBytes(of: UInt16(truncatingIfNeeded: size), toByteOffset: 10, as: UInt16.self)
        }
        var maxCounter: UInt64 = 0
        for i in 0..<size where isInflight(UInt16(i)) { maxCounter = max(maxCounter, counterOf(UInt16(i))) }
        counter = maxCounter + 1
    }

    deinit { batch.deallocate() }

    private var version: UInt16 { base.load(fromByteOffset: 8, as: UInt16.self) }
    private var descNum: UInt16 { base.load(fromByteOffset: 10, as: UInt16.self) }
    /// The used index the region last saw published.
    public var usedIndex: UInt16 {
        get { base.load(fromByteOffset: 14, as: UInt16.self) }
        set { base.storeBytes(of: newValue, toByteOffset: 14, as: UInt16.self) }
    }

    @inline(__always) private func entry(_ head: UInt16) -> UnsafeMutableRawPointer { base + 16 + 16 * Int(head) }

    /// Whether `head` is marked in flight.
    public func isInflight(_ head: UInt16) -> Bool { Int(head) < size && entry(head).load(as: UInt8.self) != 0 }
    private func counterOf(_ head: UInt16) -> UInt64 { entry(head).load(fromByteOffset: 8, as: UInt64.self) }

    /// Marks `head` popped.
    @inline(__always)
    public func begin(_ head: UInt16) {
        guard Int(head) < size else { return }
        let e = entry(head)
        e.storeBytes(of: counter, toByteOffset: 8, as: UInt64.self)
        counter &+= 1
        e.storeBytes(of: UInt8(1), as: UInt8.self)
    }

    /// Records that `head` is about to get a used entry.
    @inline(__always)
    public func willComplete(_ head: UInt16) {
        base.storeBytes(of: head, toByteOffset: 12, as: UInt16.self)
    }

    /// Records that `head`'s used entry is written (not yet published).
    @inline(__always)
    public func completed(_ head: UInt16) {
        guard batchCount < size else { return }
        batch[batchCount] = head
        batchCount += 1
    }

    /// The used index `usedIndex` is visible to the driver: clear the batch's marks.
    @inline(__always)
    public func published(usedIndex index: UInt16) {
        var i = 0
        while i < batchCount {
            entry(batch[i]).storeBytes(of: UInt8(0), as: UInt8.self)
            i += 1
        }
        batchCount = 0
        usedIndex = index
    }

    /// After a restart: clears marks of requests whose used entries were published after the region
    /// last recorded the used index (`usedRing` entry `i` holds an id), then returns the heads still
    /// in flight in the order they were popped.
    public func recover(publishedUsedIndex: UInt16, usedID: (UInt16) -> UInt16) -> [UInt16] {
        var i = usedIndex
        var steps = 0
        while i != publishedUsedIndex && steps < size {
            let id = usedID(i)
            if Int(id) < size { entry(id).storeBytes(of: UInt8(0), as: UInt8.self) }
            i &+= 1
            steps += 1
        }
        usedIndex = publishedUsedIndex
        var heads: [(UInt64, UInt16)] = []
        for h in 0..<size where isInflight(UInt16(h)) { heads.append((counterOf(UInt16(h)), UInt16(h))) }
        heads.sort { $0.0 < $1.0 }
        return heads.map(\.1)
    }
}

/// One descriptor of a chain as the packed in-flight region saved it.
public struct SavedPackedDescriptor: Sendable, Equatable {
    public var address: UInt64
    public var length: UInt32
    public var flags: UInt16
    public var id: UInt16
}

/// In-flight tracking for one packed virtqueue (vhost-user INFLIGHT_SHMFD, "Inflight I/O tracking").
///
/// Layout per queue: a 32-byte header `features u64, version u16, desc_num u16, free_head u16,
/// old_free_head u16, used_idx u16, old_used_idx u16, used_wrap_counter u8, old_used_wrap_counter u8,
/// padding[7]`, then `desc_num` 32-byte entries `inflight u8, padding u8, next u16, last u16, num u16,
/// counter u64, id u16, flags u16, len u32, addr u64`. Entries not in use form a free list through
/// `next`. Popping a chain copies each of its descriptors into a free entry (the head entry marked in
/// flight with its `num`, `last` and `counter`); returning it links its entries back into the free
/// list, then the used position and the `old_*` snapshot are updated. A restarted back-end rolls back
/// a half-done update, clears the marks of free entries and resubmits the marked heads in pop order
/// from the saved descriptors (the ring's own descriptors may have been overwritten meanwhile).
///
/// The region is shared with the VMM and trusted no more than the guest: every index read from it is
/// bounds-checked and every list walk is bounded by the queue size.
public final class InflightPackedRegion: @unchecked Sendable {
    /// Bytes needed for a queue of `size` descriptors.
    public static func byteCount(queueSize size: Int) -> Int { 32 + 32 * size }

    /// Start of the header.
    public let base: UnsafeMutableRawPointer
    /// Descriptors tracked.
    public let size: Int
    /// Keeps the shared mapping alive while a ring uses this region.
    public var owner: AnyObject?
    private var counter: UInt64 = 1
    /// Per buffer id: the head entry that tracks it (0xFFFF: none).
    private let entryOfID: UnsafeMutablePointer<UInt16>
    /// The region was kept by a previous back-end (version and size matched): its used position is the device's.
    public let adopted: Bool

    /// Wraps the region at `base`; a fresh or foreign region (version or size not matching) is reset
    /// with an empty free list and the ring's used position.
    public init(base: UnsafeMutableRawPointer, size: Int, usedPosition: UInt16, usedWrap: Bool) {
        self.base = base
        self.size = size
        entryOfID = .allocate(capacity: max(1, size))
        entryOfID.initialize(repeating: 0xFFFF, count: max(1, size))
        adopted = base.load(fromByteOffset: 10, as: UInt16.self) == UInt16(truncatingIfNeeded: size)
            && base.load(fromByteOffset: 8, as: UInt16.self) == 1 && size <= 0x7FFF
        if !adopted {
            reset(usedPosition: usedPosition, usedWrap: usedWrap)
        }
        var maxCounter: UInt64 = 0
        for e in 0..<size where entry(e).load(as: UInt8.self) != 0 {
            maxCounter = max(maxCounter, entry(e).load(fromByteOffset: 8, as: UInt64.self))
        }
        counter = maxCounter &+ 1
    }

    deinit { entryOfID.deallocate() }

    @inline(__always) private func load16(_ offset: Int) -> UInt16 { base.load(fromByteOffset: offset, as: UInt16.self) }
    @inline(__always) private func store16(_ offset: Int, _ v: UInt16) { base.storeBytes(of: v, toByteOffset: offset, as: UInt16.self) }
    @inline(__always) private func entry(_ e: Int) -> UnsafeMutableRawPointer { base + 32 + 32 * e }
    @inline(__always) private func next(_ e: Int) -> Int { Int(entry(e).load(fromByteOffset: 2, as: UInt16.self)) }

    private var freeHead: Int {
        get { Int(load16(12)) }
        set { store16(12, UInt16(truncatingIfNeeded: newValue)) }
    }
    private var oldFreeHead: Int {
        get { Int(load16(14)) }
        set { store16(14, UInt16(truncatingIfNeeded: newValue)) }
    }
    /// The used position (bits 0-14) the region last recorded, and its wrap counter.
    public var usedPosition: UInt16 { load16(16) }
    public var usedWrap: Bool { base.load(fromByteOffset: 20, as: UInt8.self) != 0 }
    private var oldUsedPosition: UInt16 { load16(18) }
    private var oldUsedWrap: Bool { base.load(fromByteOffset: 21, as: UInt8.self) != 0 }

    private func reset(usedPosition: UInt16, usedWrap: Bool) {
        base.initializeMemory(as: UInt8.self, repeating: 0, count: Self.byteCount(queueSize: size))
        store16(8, 1)
        store16(10, UInt16(truncatingIfNeeded: size))
        for e in 0..<size { entry(e).storeBytes(of: UInt16(truncatingIfNeeded: e + 1), toByteOffset: 2, as: UInt16.self) }
        store16(16, usedPosition)
        store16(18, usedPosition)
        base.storeBytes(of: UInt8(usedWrap ? 1 : 0), toByteOffset: 20, as: UInt8.self)
        base.storeBytes(of: UInt8(usedWrap ? 1 : 0), toByteOffset: 21, as: UInt8.self)
        for id in 0..<size { entryOfID[id] = 0xFFFF }
    }

    /// Records a popped chain of `count` ring descriptors (read through `descriptor(k)`) with buffer
    /// `id`. Returns false when the free list cannot hold it (a corrupt region); tracking is then
    /// reset for the ring's current used position.
    @discardableResult
    public func begin(id: UInt16, count: Int, usedPosition: UInt16, usedWrap: Bool,
                      descriptor: (Int) -> SavedPackedDescriptor) -> Bool {
        guard Int(id) < size, count >= 1 else { return false }
        let head = oldFreeHead
        var free = freeHead
        guard head < size, free == head else {
            reset(usedPosition: usedPosition, usedWrap: usedWrap)
            return begin(id: id, count: count, usedPosition: usedPosition, usedWrap: usedWrap, descriptor: descriptor)
        }
        // Check the free list is long enough before writing anything.
        var probe = free
        for _ in 0..<count {
            guard probe < size else {
                reset(usedPosition: usedPosition, usedWrap: usedWrap)
                return false
            }
            probe = next(probe)
        }
        let h = entry(head)
        h.storeBytes(of: UInt16(0), toByteOffset: 6, as: UInt16.self)
        h.storeBytes(of: counter, toByteOffset: 8, as: UInt64.self)
        counter &+= 1
        h.storeBytes(of: UInt8(1), as: UInt8.self)
        for k in 0..<count {
            let d = descriptor(k)
            if k == count - 1 { h.storeBytes(of: UInt16(truncatingIfNeeded: free), toByteOffset: 4, as: UInt16.self) }
            h.storeBytes(of: h.load(fromByteOffset: 6, as: UInt16.self) &+ 1, toByteOffset: 6, as: UInt16.self)
            let f = entry(free)
            f.storeBytes(of: d.address, toByteOffset: 24, as: UInt64.self)
            f.storeBytes(of: d.length, toByteOffset: 20, as: UInt32.self)
            f.storeBytes(of: d.flags, toByteOffset: 18, as: UInt16.self)
            f.storeBytes(of: d.id, toByteOffset: 16, as: UInt16.self)
            free = next(free)
            freeHead = free
        }
        oldFreeHead = free
        entryOfID[Int(id)] = UInt16(head)
        return true
    }

    /// Buffer `id` is about to be returned; `usedPosition`/`usedWrap` are the ring's used position after
    /// it. Call before its used descriptor's flags are written, then `completed(id:)` after.
    @inline(__always)
    public func willComplete(id: UInt16, usedPosition: UInt16, usedWrap: Bool) {
        guard Int(id) < size else { return }
        let e = Int(entryOfID[Int(id)])
        guard e < size else { return }
        let last = Int(entry(e).load(fromByteOffset: 4, as: UInt16.self))
        guard last < size else { return }
        entry(last).storeBytes(of: UInt16(truncatingIfNeeded: freeHead), toByteOffset: 2, as: UInt16.self)
        freeHead = e
        store16(16, usedPosition)
        base.storeBytes(of: UInt8(usedWrap ? 1 : 0), toByteOffset: 20, as: UInt8.self)
    }

    /// Buffer `id`'s used descriptor is written: clear its mark and take the new snapshot.
    @inline(__always)
    public func completed(id: UInt16) {
        guard Int(id) < size else { return }
        let e = Int(entryOfID[Int(id)])
        entryOfID[Int(id)] = 0xFFFF
        if e < size { entry(e).storeBytes(of: UInt8(0), as: UInt8.self) }
        oldFreeHead = freeHead
        store16(18, load16(16))
        base.storeBytes(of: base.load(fromByteOffset: 20, as: UInt8.self), toByteOffset: 21, as: UInt8.self)
    }

    /// What a restarted back-end resubmits: for each buffer still in flight (in pop order) its id, head
    /// entry and saved descriptors' count; plus the used position to continue at and the ring entries
    /// the resubmitted chains occupy.
    public struct Recovery: Sendable {
        public var buffers: [(id: UInt16, entry: UInt16, count: UInt16)] = []
        public var usedPosition: UInt16 = 0
        public var usedWrap = true
        public var ringEntries = 0
    }

    /// Recovers after a restart: `usedFlags(position)` reads the flags of the ring descriptor at a
    /// position (to tell whether the last used write became visible). Clears the marks of free entries,
    /// drops inconsistent heads, and returns the buffers to resubmit; with none, the region is reset for the
    /// position it recorded, or, when fresh or inconsistent, for `fallbackUsedPosition`/`fallbackUsedWrap`
    /// (the ring base the VMM gave).
    public func recover(fallbackUsedPosition: UInt16, fallbackUsedWrap: Bool, usedFlags: (UInt16) -> UInt16) -> Recovery {
        var result = Recovery()
        guard Int(usedPosition) < size, Int(oldUsedPosition) < size else {
            reset(usedPosition: fallbackUsedPosition, usedWrap: fallbackUsedWrap)
            result.usedPosition = fallbackUsedPosition
            result.usedWrap = fallbackUsedWrap
            return result
        }
        if usedPosition != oldUsedPosition || usedWrap != oldUsedWrap {
            // Was the used write at old_used_idx made visible? Still "available" for the old wrap means no.
            let flags = usedFlags(oldUsedPosition)
            let avail = flags & 0x80 != 0
            let used = flags & 0x8000 != 0
            let stillAvailable = avail == oldUsedWrap && used != oldUsedWrap
            if !stillAvailable {
                oldFreeHead = freeHead
                store16(18, usedPosition)
                base.storeBytes(of: UInt8(usedWrap ? 1 : 0), toByteOffset: 21, as: UInt8.self)
            }
        }
        freeHead = oldFreeHead
        store16(16, oldUsedPosition)
        base.storeBytes(of: UInt8(oldUsedWrap ? 1 : 0), toByteOffset: 20, as: UInt8.self)
        // Entries on the free list are not in flight.
        var e = freeHead
        var steps = 0
        while e < size && steps < size {
            entry(e).storeBytes(of: UInt8(0), as: UInt8.self)
            e = next(e)
            steps += 1
        }
        var heads: [(UInt64, UInt16, UInt16, UInt16)] = []
        var seen = [Bool](repeating: false, count: size)
        for h in 0..<size where entry(h).load(as: UInt8.self) != 0 {
            let p = entry(h)
            let num = Int(p.load(fromByteOffset: 6, as: UInt16.self))
            let last = Int(p.load(fromByteOffset: 4, as: UInt16.self))
            // Walk the chain's entries: it must end at `last` after `num` steps.
            var at = h
            var ok = num >= 1 && num <= size
            if ok {
                for k in 0..<num {
                    guard at < size else { ok = false; break }
                    if k == num - 1 { ok = at == last } else { at = next(at) }
                }
            }
            let id = ok ? entry(last).load(fromByteOffset: 16, as: UInt16.self) : 0xFFFF
            guard ok, Int(id) < size, !seen[Int(id)] else {
                p.storeBytes(of: UInt8(0), as: UInt8.self)
                continue
            }
            seen[Int(id)] = true
            heads.append((p.load(fromByteOffset: 8, as: UInt64.self), id, UInt16(h), UInt16(num)))
        }
        heads.sort { $0.0 < $1.0 }
        for (_, id, h, num) in heads {
            entryOfID[Int(id)] = h
            result.buffers.append((id, h, num))
            result.ringEntries += Int(num)
        }
        if result.buffers.isEmpty || result.ringEntries > size {
            // Nothing to resubmit. A region a previous back-end kept (`adopted`) still knows where the
            // device stopped; the VMM may not: QEMU cannot read a dead back-end's packed ring position and hands
            // back the stale base it last set (a gateway killed under a packed virtio-scsi guest came back
            // looking at descriptors the driver had long reused, and the guest hung). A fresh region (all
            // zero) takes the VMM's base.
            let kept = result.buffers.isEmpty && adopted
            let position = kept ? usedPosition : fallbackUsedPosition
            let wrap = kept ? usedWrap : fallbackUsedWrap
            reset(usedPosition: position, usedWrap: wrap)
            return Recovery(buffers: [], usedPosition: position, usedWrap: wrap, ringEntries: 0)
        }
        result.usedPosition = usedPosition
        result.usedWrap = usedWrap
        return result
    }

    /// The `k`-th saved descriptor of the chain whose head entry is `entry` (nil when the links are bad).
    public func savedDescriptor(entry head: UInt16, _ k: Int) -> SavedPackedDescriptor? {
        var at = Int(head)
        var i = 0
        while i < k {
            guard at < size else { return nil }
            at = next(at)
            i += 1
        }
        guard at < size else { return nil }
        let p = entry(at)
        return SavedPackedDescriptor(address: p.load(fromByteOffset: 24, as: UInt64.self), length: p.load(fromByteOffset: 20, as: UInt32.self),
                                     flags: p.load(fromByteOffset: 18, as: UInt16.self), id: p.load(fromByteOffset: 16, as: UInt16.self))
    }
}
