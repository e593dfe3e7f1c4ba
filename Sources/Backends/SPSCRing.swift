import Synchronization

/// A bounded single-producer/single-consumer ring of 32-bit slot indices, preallocated.
///
/// The producer publishes an index with a sequentially consistent store of `tail`; the consumer reads it
/// after loading `tail`, so everything the producer wrote to the slot before `push` is visible to the
/// consumer after `pop` (and the same holds in the other direction through `head`).
final class SPSCRing: @unchecked Sendable {
    private let storage: UnsafeMutablePointer<UInt32>
    private let mask: Int
    /// Capacity (a power of two).
    let capacity: Int
    private let head = Atomic<Int>(0)
    private let tail = Atomic<Int>(0)

    /// Creates a ring holding at least `minimumCapacity` entries.
    init(minimumCapacity: Int) {
        var size = 1
        while size < minimumCapacity { size <<= 1 }
        capacity = size
        mask = size - 1
        storage = .allocate(capacity: size)
        storage.initialize(repeating: 0, count: size)
    }

    deinit { storage.deallocate() }

    /// Producer side: appends `value`; false when full.
    @inline(__always)
    func push(_ value: UInt32) -> Bool {
        let t = tail.load(ordering: .relaxed)
        let h = head.load(ordering: .acquiring)
        if t &- h >= capacity { return false }
        storage[t & mask] = value
        tail.store(t &+ 1, ordering: .sequentiallyConsistent)
        return true
    }

    /// Consumer side: removes the oldest value, or nil when empty.
    @inline(__always)
    func pop() -> UInt32? {
        let h = head.load(ordering: .relaxed)
        let t = tail.load(ordering: .sequentiallyConsistent)
        if h == t { return nil }
        let value = storage[h & mask]
        head.store(h &+ 1, ordering: .releasing)
        return value
    }

    /// Consumer side: whether the ring is empty (sequentially consistent load of the producer index).
    @inline(__always)
    var isEmpty: Bool {
        head.load(ordering: .relaxed) == tail.load(ordering: .sequentiallyConsistent)
    }
}
