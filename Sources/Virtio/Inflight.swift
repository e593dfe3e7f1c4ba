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
