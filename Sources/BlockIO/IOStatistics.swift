#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// What kind of command a completion was, for the per-class counters.
public enum IOCommandClass: UInt8, Sendable, CaseIterable {
    /// READ 6/10/12/16, virtio-blk IN.
    case read
    /// WRITE 6/10/12/16, WRITE AND VERIFY, WRITE SAME, virtio-blk OUT / WRITE_ZEROES.
    case write
    /// SYNCHRONIZE CACHE, virtio-blk FLUSH.
    case flush
    /// UNMAP, virtio-blk DISCARD.
    case discard
    /// Everything else (INQUIRY, TEST UNIT READY, MODE SENSE, ...).
    case other

    /// The spelling used in stats output (`op` label in Prometheus).
    public var name: String {
        switch self {
        case .read: return "read"
        case .write: return "write"
        case .flush: return "flush"
        case .discard: return "discard"
        case .other: return "other"
        }
    }
}

/// Where each counter lives inside one queue slot of a `LUNIOStatistics` block (64 UInt64 words,
/// 512 bytes, cache-line aligned).
public enum IOCounterIndex {
    /// Commands started (`IOCounters.begin()`); in flight = started - completed.
    public static let started = 0
    /// Commands completed (`IOCounters.record`).
    public static let completed = 1
    /// First of the per-class command counters (`IOCommandClass.rawValue` is the offset).
    public static let classBase = 2
    /// Bytes read.
    public static let readBytes = 7
    /// Bytes written.
    public static let writeBytes = 8
    /// Sum of the completion latencies, in nanoseconds.
    public static let latencySumNanos = 9
    /// Completions with status BUSY (08h).
    public static let busy = 10
    /// Completions with status RESERVATION CONFLICT (18h).
    public static let reservationConflict = 11
    /// Completions with status TASK SET FULL (28h).
    public static let taskSetFull = 12
    /// Completions with status TASK ABORTED (40h).
    public static let taskAborted = 13
    /// Completions with any other non-GOOD status except CHECK CONDITION.
    public static let otherStatus = 14
    /// First of the 16 CHECK CONDITION counters, one per sense key.
    public static let senseKeyBase = 16
    /// First of the latency histogram buckets.
    public static let latencyBucketBase = 32
    /// Words per queue slot.
    public static let stride = 64
}

/// The latency histogram: log2 buckets of nanoseconds.
///
/// Bucket 0 counts latencies below 2^10 ns (1.024 µs); bucket i (1...24) counts latencies in
/// [2^(9+i), 2^(10+i)) ns; bucket 25 counts everything from 2^34 ns (17.2 s) up. So the finite upper
/// bounds run from about 1 µs to about 17 s, doubling.
public enum LatencyHistogram {
    /// Number of buckets (the last one is open-ended).
    public static let bucketCount = 26
    /// Exclusive upper bound of bucket `i` in nanoseconds (nil for the last, open-ended bucket).
    public static func upperBoundNanos(_ i: Int) -> UInt64? {
        i < bucketCount - 1 ? UInt64(1) << UInt64(10 + i) : nil
    }

    /// The bucket of a latency.
    @inline(__always)
    public static func bucket(nanos: UInt64) -> Int {
        if nanos < 1024 { return 0 }
        let bits = UInt64.bitWidth - nanos.leadingZeroBitCount  // 11 for 1024...2047
        return min(bits - 10, bucketCount - 1)
    }
}

/// The counters of one LUN instance, one preallocated 512-byte slot per queue (or queue group) of its
/// controller.
///
/// Data path contract: each queue slot is written by exactly one thread (the event-loop thread that owns
/// that queue), with relaxed atomic load + store (a plain `mov` on x86-64: no lock prefix, no
/// allocation, no contention). The control thread reads every slot with relaxed loads and sums them;
/// a read may see one command's counters half-updated, never a torn word.
///
/// The gateway creates one block per LUN when the LUN is added (so a LUN removed and added again starts
/// from zero) and drops it when the LUN is removed; a front-end keeps its `IOCounters` (which retain the
/// block) as long as it keeps the LUN's channel.
public final class LUNIOStatistics: @unchecked Sendable {
    /// Queue slots (a front-end passes queue indexes 0..<queueCount).
    public let queueCount: Int
    private let words: UnsafeMutablePointer<Atomic<UInt64>>

    /// Allocates zeroed counters for `queues` queues (at least 1).
    public init(queues: Int) {
        queueCount = max(1, queues)
        let count = queueCount * IOCounterIndex.stride
        let raw = UnsafeMutableRawPointer.allocate(byteCount: count * MemoryLayout<UInt64>.stride, alignment: 64)
        words = raw.bindMemory(to: Atomic<UInt64>.self, capacity: count)
        for i in 0..<count { (words + i).initialize(to: Atomic<UInt64>(0)) }
    }

    deinit {
        let count = queueCount * IOCounterIndex.stride
        words.deinitialize(count: count)
        UnsafeMutableRawPointer(words).deallocate()
    }

    /// The counters of queue `queue`, for the one thread that owns that queue. Call when setting up
    /// the queue (not per I/O); traps when `queue` is out of range.
    public func counters(queue: Int) -> IOCounters {
        precondition(queue >= 0 && queue < queueCount, "queue \(queue) out of range 0..<\(queueCount)")
        return IOCounters(owner: self, base: words + queue * IOCounterIndex.stride)
    }

    /// A consistent-enough copy of queue `queue`'s counters (relaxed loads).
    public func snapshot(queue: Int) -> IOStatisticsSnapshot {
        precondition(queue >= 0 && queue < queueCount)
        var snapshot = IOStatisticsSnapshot()
        let base = words + queue * IOCounterIndex.stride
        for i in 0..<IOCounterIndex.stride { snapshot.words[i] = base[i].load(ordering: .relaxed) }
        return snapshot
    }

    /// The counters summed over every queue.
    public func snapshot() -> IOStatisticsSnapshot {
        var total = IOStatisticsSnapshot()
        for queue in 0..<queueCount { total.add(snapshot(queue: queue)) }
        return total
    }

    /// Commands started and not yet completed, over every queue (0 unless the front-end calls `begin`).
    public var inFlight: Int { snapshot().inFlight }
}

/// One queue's counters in a `LUNIOStatistics` block: what a front-end's event-loop thread updates.
///
/// Single writer: only the thread that owns the queue may call the mutating methods. Every method is
/// inlinable, lock-free and allocation-free.
public struct IOCounters: @unchecked Sendable {
    /// Keeps the block alive while a front-end holds these counters.
    public let owner: LUNIOStatistics
    @usableFromInline let base: UnsafeMutablePointer<Atomic<UInt64>>

    init(owner: LUNIOStatistics, base: UnsafeMutablePointer<Atomic<UInt64>>) {
        self.owner = owner
        self.base = base
    }

    @inline(__always) @usableFromInline
    func bump(_ index: Int, by amount: UInt64 = 1) {
        let word = base + index
        word.pointee.store(word.pointee.load(ordering: .relaxed) &+ amount, ordering: .relaxed)
    }

    /// Counts a command as started (before it is submitted). Optional: it makes `inFlight` meaningful,
    /// which `lun.remove` with `wait_ms` uses to wait for in-flight I/O.
    @inlinable @inline(__always)
    public func begin() { bump(IOCounterIndex.started) }

    /// Counts a completed command.
    ///
    /// - Parameters:
    ///   - command: the command's class.
    ///   - bytes: data transferred (read bytes for `.read`, written bytes for `.write`; ignored otherwise).
    ///   - latencyNanos: time from arrival to completion (`IOCounters.now()` differences).
    ///   - status: SAM status byte (0 GOOD, 02h CHECK CONDITION, 08h BUSY, 18h RESERVATION CONFLICT,
    ///     28h TASK SET FULL, 40h TASK ABORTED). virtio-blk front-ends pass 02h with sense key 03h
    ///     (MEDIUM ERROR) for VIRTIO_BLK_S_IOERR and 05h (ILLEGAL REQUEST) for VIRTIO_BLK_S_UNSUPP.
    ///   - senseKey: the sense key of a CHECK CONDITION (low 4 bits used).
    @inlinable @inline(__always)
    public func record(command: IOCommandClass, bytes: Int, latencyNanos: UInt64, status: UInt8 = 0,
                       senseKey: UInt8 = 0) {
        bump(IOCounterIndex.completed)
        bump(IOCounterIndex.classBase + Int(command.rawValue))
        if bytes > 0 {
            if command == .read {
                bump(IOCounterIndex.readBytes, by: UInt64(bytes))
            } else if command == .write {
                bump(IOCounterIndex.writeBytes, by: UInt64(bytes))
            }
        }
        bump(IOCounterIndex.latencySumNanos, by: latencyNanos)
        bump(IOCounterIndex.latencyBucketBase + LatencyHistogram.bucket(nanos: latencyNanos))
        if status != 0 {
            switch status {
            case 0x02: bump(IOCounterIndex.senseKeyBase + Int(senseKey & 0x0F))
            case 0x08: bump(IOCounterIndex.busy)
            case 0x18: bump(IOCounterIndex.reservationConflict)
            case 0x28: bump(IOCounterIndex.taskSetFull)
            case 0x40: bump(IOCounterIndex.taskAborted)
            default: bump(IOCounterIndex.otherStatus)
            }
        }
    }

    /// CLOCK_MONOTONIC in nanoseconds (vDSO, no system call): take it when a command arrives and pass
    /// `now() - arrival` as `latencyNanos`.
    @inlinable @inline(__always)
    public static func now() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
    }
}

/// A copy of the counters of one queue, one LUN, or a sum of them (control plane, read side).
public struct IOStatisticsSnapshot: Sendable, Equatable {
    /// The raw words, laid out as `IOCounterIndex` says.
    public var words: [UInt64]

    /// All zero.
    public init() { words = Array(repeating: 0, count: IOCounterIndex.stride) }

    /// Adds `other` word by word.
    public mutating func add(_ other: IOStatisticsSnapshot) {
        for i in 0..<IOCounterIndex.stride { words[i] &+= other.words[i] }
    }

    /// Commands started (0 unless the front-end calls `begin`).
    public var started: UInt64 { words[IOCounterIndex.started] }
    /// Commands completed.
    public var commands: UInt64 { words[IOCounterIndex.completed] }
    /// Commands started and not yet completed (never negative).
    public var inFlight: Int { started > commands ? Int(started - commands) : 0 }
    /// Completed commands of one class.
    public func commands(_ kind: IOCommandClass) -> UInt64 { words[IOCounterIndex.classBase + Int(kind.rawValue)] }
    /// Bytes read.
    public var readBytes: UInt64 { words[IOCounterIndex.readBytes] }
    /// Bytes written.
    public var writeBytes: UInt64 { words[IOCounterIndex.writeBytes] }
    /// Sum of latencies in nanoseconds.
    public var latencySumNanos: UInt64 { words[IOCounterIndex.latencySumNanos] }
    /// CHECK CONDITION completions with sense key `key` (0...15).
    public func errors(senseKey key: Int) -> UInt64 { words[IOCounterIndex.senseKeyBase + (key & 0x0F)] }
    /// Every CHECK CONDITION completion.
    public var checkConditions: UInt64 { (0..<16).reduce(0) { $0 &+ errors(senseKey: $1) } }
    /// BUSY completions.
    public var busy: UInt64 { words[IOCounterIndex.busy] }
    /// RESERVATION CONFLICT completions.
    public var reservationConflicts: UInt64 { words[IOCounterIndex.reservationConflict] }
    /// TASK SET FULL completions.
    public var taskSetFull: UInt64 { words[IOCounterIndex.taskSetFull] }
    /// TASK ABORTED completions.
    public var taskAborted: UInt64 { words[IOCounterIndex.taskAborted] }
    /// Other non-GOOD completions.
    public var otherStatus: UInt64 { words[IOCounterIndex.otherStatus] }
    /// Every completion that was not GOOD.
    public var errors: UInt64 { checkConditions &+ busy &+ reservationConflicts &+ taskSetFull &+ taskAborted &+ otherStatus }
    /// Count in latency bucket `i` (see `LatencyHistogram`).
    public func latencyBucket(_ i: Int) -> UInt64 { words[IOCounterIndex.latencyBucketBase + i] }

    /// An upper estimate of the latency quantile `q` (0...1) in nanoseconds: the upper bound of the
    /// bucket holding it (the last bucket reports its lower bound). nil with no completions.
    public func latencyQuantileNanos(_ q: Double) -> UInt64? {
        let total = (0..<LatencyHistogram.bucketCount).reduce(UInt64(0)) { $0 &+ latencyBucket($1) }
        guard total > 0 else { return nil }
        let rank = max(1, UInt64((Double(total) * min(max(q, 0), 1)).rounded(.up)))
        var seen: UInt64 = 0
        for i in 0..<LatencyHistogram.bucketCount {
            seen &+= latencyBucket(i)
            if seen >= rank {
                return LatencyHistogram.upperBoundNanos(i) ?? (UInt64(1) << 34)
            }
        }
        return UInt64(1) << 34
    }
}

/// SCSI sense key names (SPC-4 table 49), for stats output.
public enum SenseKeyName {
    /// The name of sense key `key` (0...15), as in `MEDIUM ERROR`.
    public static func name(_ key: Int) -> String {
        let names = ["NO SENSE", "RECOVERED ERROR", "NOT READY", "MEDIUM ERROR", "HARDWARE ERROR", "ILLEGAL REQUEST",
                     "UNIT ATTENTION", "DATA PROTECT", "BLANK CHECK", "VENDOR SPECIFIC", "COPY ABORTED",
                     "ABORTED COMMAND", "RESERVED 0CH", "VOLUME OVERFLOW", "MISCOMPARE", "COMPLETED"]
        return names[key & 0x0F]
    }
}
