#if canImport(Glibc)
import Glibc
#endif

/// Nanoseconds on CLOCK_MONOTONIC.
@inline(__always)
func monotonicNanoseconds() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
}

/// A fixed-capacity FIFO of slot indices, allocated once (no per-I/O allocation).
struct SlotRing: ~Copyable {
    private let storage: UnsafeMutablePointer<Int32>
    let capacity: Int
    private var head = 0
    private(set) var count = 0

    init(capacity: Int) {
        self.capacity = capacity
        storage = .allocate(capacity: capacity)
        storage.initialize(repeating: -1, count: capacity)
    }

    deinit { storage.deallocate() }

    var isEmpty: Bool { count == 0 }

    /// Appends `index`; returns false when full (never happens when each slot is queued at most once).
    @discardableResult
    mutating func push(_ index: Int32) -> Bool {
        guard count < capacity else { return false }
        storage[(head + count) % capacity] = index
        count += 1
        return true
    }

    /// Removes the oldest index.
    mutating func pop() -> Int32? {
        guard count > 0 else { return nil }
        let value = storage[head]
        head = (head + 1) % capacity
        count -= 1
        return value
    }
}
