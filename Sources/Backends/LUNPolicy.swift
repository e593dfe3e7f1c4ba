import BlockIO
#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// Per-LUN quality-of-service limits: operations and bytes per second, 0 meaning "no limit".
///
/// Reads and writes count (pass-through commands by their data direction); flush, discard and write-zeroes
/// are never throttled. A request must fit every limit that applies to it (the total one and the one of its
/// direction). Unused capacity accumulates for `burstMilliseconds`, so after an idle period a LUN may run
/// `limit x burst` operations (bytes) at once before it is held to its rate.
public struct QoSLimits: Sendable, Equatable {
    /// Reads plus writes per second.
    public var iops: UInt64
    /// Reads per second.
    public var readIOPS: UInt64
    /// Writes per second.
    public var writeIOPS: UInt64
    /// Bytes read plus written per second.
    public var bandwidth: UInt64
    /// Bytes read per second.
    public var readBandwidth: UInt64
    /// Bytes written per second.
    public var writeBandwidth: UInt64
    /// How long unused capacity accumulates, in milliseconds (0: none, the rate is held strictly).
    public var burstMilliseconds: UInt64

    /// Default burst: one second, as QEMU's throttling groups.
    public static let defaultBurstMilliseconds: UInt64 = 1000

    /// No limit.
    public static let unlimited = QoSLimits()

    /// Creates limits (0: unlimited).
    public init(iops: UInt64 = 0, readIOPS: UInt64 = 0, writeIOPS: UInt64 = 0, bandwidth: UInt64 = 0,
                readBandwidth: UInt64 = 0, writeBandwidth: UInt64 = 0,
                burstMilliseconds: UInt64 = QoSLimits.defaultBurstMilliseconds) {
        self.iops = iops
        self.readIOPS = readIOPS
        self.writeIOPS = writeIOPS
        self.bandwidth = bandwidth
        self.readBandwidth = readBandwidth
        self.writeBandwidth = writeBandwidth
        self.burstMilliseconds = burstMilliseconds
    }

    /// Whether no limit is set.
    public var isUnlimited: Bool {
        iops == 0 && readIOPS == 0 && writeIOPS == 0 && bandwidth == 0 && readBandwidth == 0 && writeBandwidth == 0
    }

    /// The six rates in `RateBuckets` order: iops, read iops, write iops, bandwidth, read, write bandwidth.
    var rates: [UInt64] { [iops, readIOPS, writeIOPS, bandwidth, readBandwidth, writeBandwidth] }
}

/// What a LUN does when its back-end runs out of space (ENOSPC / EDQUOT on a write: a thin file whose
/// filesystem is full).
public enum SpaceExhaustionPolicy: String, Sendable, CaseIterable, Equatable {
    /// Fail the write at once with DATA PROTECT / SPACE ALLOCATION FAILED WRITE PROTECT (27h/07h).
    case report
    /// Hold the write and retry it periodically for a bounded time (dm-thin's queue_if_no_space,
    /// QEMU's werror=enospc with a bound); after the bound it fails as with `report`.
    case hold
}

/// The generic cell rate algorithm on one shared "theoretical arrival time", lock-free.
///
/// Each request reserves `cost` nanoseconds of the bucket's time line; it may start at
/// `max(now, tat - burst)`, and the time line advances to `max(tat, now) + cost`. Over any interval the
/// started work is at most `rate x (interval + burst)`; after idle, `burst` worth starts at once.
public enum RateMath {
    /// One reservation: where the bucket's time line ends after it, and when the request may start.
    @inline(__always)
    public static func reserve(tat: UInt64, now: UInt64, cost: UInt64, burst: UInt64) -> (tat: UInt64, start: UInt64) {
        let start = tat > burst &+ now ? tat &- burst : now
        return (max(tat, now) &+ cost, start)
    }

    /// Nanoseconds of a bucket's time line that `units` (operations or bytes) take at `rate` per second.
    @inline(__always)
    public static func cost(units: UInt64, rate: UInt64) -> UInt64 {
        guard rate > 0 else { return 0 }
        let (high, low) = units.multipliedFullWidth(by: 1_000_000_000)
        if high >= rate { return .max / 4 }
        return rate.dividingFullWidth((high, low)).quotient
    }
}

/// The policies of one LUN, shared by every channel (every queue thread) of the LUN: QoS rate buckets
/// (atomics, no lock per request) and the out-of-space policy, with their counters.
///
/// `PolicyChannel` consults it per request only when `flags` says a policy is on; with no limit and the
/// `report` policy a request costs one relaxed atomic load.
public final class LUNPolicy: Sendable {
    /// `flags` bit: a QoS limit is set.
    public static let throttling: UInt8 = 1
    /// `flags` bit: the out-of-space policy is `hold`.
    public static let holdingOnENOSPC: UInt8 = 2

    private let flagsAtomic: Atomic<UInt8>
    /// Per bucket (iops, read iops, write iops, bandwidth, read bandwidth, write bandwidth): the
    /// theoretical arrival time and the rate (0: no limit).
    private let tat: InlineArray<6, Atomic<UInt64>>
    private let rate: InlineArray<6, Atomic<UInt64>>
    private let burst: Atomic<UInt64>
    private let holdNanoseconds: Atomic<UInt64>
    private let current: Mutex<(QoSLimits, SpaceExhaustionPolicy, Int)>
    /// Called (from a queue thread, rarely) for the out-of-space transitions worth a log line.
    private let log: @Sendable (String) -> Void

    private let throttledRequestsAtomic = Atomic<UInt64>(0)
    private let throttledNanosecondsAtomic = Atomic<UInt64>(0)
    private let spaceHeldWritesAtomic = Atomic<UInt64>(0)
    private let spaceResumedWritesAtomic = Atomic<UInt64>(0)
    private let spaceFailedWritesAtomic = Atomic<UInt64>(0)
    private let spaceHeldNowAtomic = Atomic<Int>(0)
    private let timeoutLogged = Atomic<Bool>(false)

    /// How often held writes are retried while space is short.
    public let spaceRetryNanoseconds: UInt64

    /// Creates the policy of a LUN.
    public init(limits: QoSLimits = .unlimited, outOfSpace: SpaceExhaustionPolicy = .report, holdSeconds: Int = 20,
                spaceRetryMilliseconds: UInt64 = 250, log: @escaping @Sendable (String) -> Void = { _ in }) {
        flagsAtomic = Atomic(0)
        tat = InlineArray { _ in Atomic<UInt64>(0) }
        rate = InlineArray { _ in Atomic<UInt64>(0) }
        burst = Atomic(0)
        holdNanoseconds = Atomic(0)
        current = Mutex((limits, outOfSpace, holdSeconds))
        spaceRetryNanoseconds = max(1, spaceRetryMilliseconds) * 1_000_000
        self.log = log
        setLimits(limits)
        setOutOfSpace(outOfSpace, holdSeconds: holdSeconds)
    }

    /// Which policies are on (`throttling`, `holdingOnENOSPC`); 0 on a LUN without any (one relaxed load).
    @inline(__always) public var flags: UInt8 { flagsAtomic.load(ordering: .relaxed) }

    /// The QoS limits in force.
    public var limits: QoSLimits { current.withLock { $0.0 } }
    /// The out-of-space policy and its bound in seconds.
    public var outOfSpace: (policy: SpaceExhaustionPolicy, holdSeconds: Int) { current.withLock { ($0.1, $0.2) } }

    /// Replaces the QoS limits (control plane; takes effect for the next request on every queue). The
    /// buckets start over, full: requests already held keep the start time they were given.
    public func setLimits(_ limits: QoSLimits) {
        current.withLock { state in
            state.0 = limits
            let rates = limits.rates
            for i in 0..<6 {
                rate[i].store(rates[i], ordering: .relaxed)
                tat[i].store(0, ordering: .relaxed)
            }
            burst.store(limits.burstMilliseconds &* 1_000_000, ordering: .relaxed)
            updateFlags(bit: Self.throttling, on: !limits.isUnlimited)
        }
    }

    /// Sets the out-of-space policy (`holdSeconds`: the bound of `hold`).
    public func setOutOfSpace(_ policy: SpaceExhaustionPolicy, holdSeconds: Int) {
        current.withLock { state in
            state.1 = policy
            state.2 = holdSeconds
            holdNanoseconds.store(UInt64(max(0, holdSeconds)) &* 1_000_000_000, ordering: .relaxed)
            updateFlags(bit: Self.holdingOnENOSPC, on: policy == .hold)
        }
    }

    private func updateFlags(bit: UInt8, on: Bool) {
        var old = flagsAtomic.load(ordering: .relaxed)
        while true {
            let new = on ? old | bit : old & ~bit
            let (done, seen) = flagsAtomic.compareExchange(expected: old, desired: new, ordering: .releasing)
            if done { return }
            old = seen
        }
    }

    /// Reserves the request's share of every applicable rate bucket; returns when it may start
    /// (`<= now`: at once). Lock-free: one compare-and-swap per applicable bucket.
    @inline(__always)
    public func admit(_ request: BlockRequest, now: UInt64) -> UInt64 {
        let read: Bool
        switch request.operation {
        case .read: read = true
        case .write: read = false
        case .flush, .discard, .writeZeroes: return now
        }
        let burstNanoseconds = burst.load(ordering: .relaxed)
        var start = now
        // Bucket order: iops, read iops, write iops, bandwidth, read bandwidth, write bandwidth.
        start = max(start, take(0, units: 1, now: now, burst: burstNanoseconds))
        start = max(start, take(read ? 1 : 2, units: 1, now: now, burst: burstNanoseconds))
        start = max(start, take(3, units: request.length, now: now, burst: burstNanoseconds))
        start = max(start, take(read ? 4 : 5, units: request.length, now: now, burst: burstNanoseconds))
        if start > now {
            throttledRequestsAtomic.add(1, ordering: .relaxed)
            throttledNanosecondsAtomic.add(start - now, ordering: .relaxed)
        }
        return start
    }

    @inline(__always)
    private func take(_ index: Int, units: UInt64, now: UInt64, burst: UInt64) -> UInt64 {
        let r = rate[index].load(ordering: .relaxed)
        guard r > 0 else { return now }
        let cost = RateMath.cost(units: units, rate: r)
        var old = tat[index].load(ordering: .relaxed)
        while true {
            let (newTAT, start) = RateMath.reserve(tat: old, now: now, cost: cost, burst: burst)
            let (done, seen) = tat[index].compareExchange(expected: old, desired: newTAT, ordering: .relaxed)
            if done { return start }
            old = seen
        }
    }

    // MARK: Out of space

    /// The bound of the `hold` policy in nanoseconds.
    @inline(__always) public var holdBoundNanoseconds: UInt64 { holdNanoseconds.load(ordering: .relaxed) }

    /// A write failed for lack of space and is now held (called once per write, at its first failure).
    public func noteSpaceHeld() {
        spaceHeldWritesAtomic.add(1, ordering: .relaxed)
        if spaceHeldNowAtomic.add(1, ordering: .relaxed).newValue == 1 {
            timeoutLogged.store(false, ordering: .relaxed)
            log("out of space: holding writes, retrying every \(spaceRetryNanoseconds / 1_000_000) ms for up to \(holdBoundNanoseconds / 1_000_000_000) s")
        }
    }

    /// A held write ended: it succeeded on a retry (`resumed`) or failed (after the bound, or cancelled).
    public func noteSpaceHoldEnded(resumed: Bool) {
        if resumed {
            spaceResumedWritesAtomic.add(1, ordering: .relaxed)
        } else {
            spaceFailedWritesAtomic.add(1, ordering: .relaxed)
            if !timeoutLogged.exchange(true, ordering: .relaxed) {
                log("out of space: a held write found no space within \(holdBoundNanoseconds / 1_000_000_000) s; reporting SPACE ALLOCATION FAILED WRITE PROTECT")
            }
        }
        if spaceHeldNowAtomic.subtract(1, ordering: .relaxed).newValue == 0 && resumed {
            log("space available again: held writes completed")
        }
    }

    /// The counters.
    public var snapshot: LUNPolicySnapshot {
        LUNPolicySnapshot(throttledRequests: throttledRequestsAtomic.load(ordering: .relaxed),
                          throttledNanoseconds: throttledNanosecondsAtomic.load(ordering: .relaxed),
                          spaceHeldWrites: spaceHeldWritesAtomic.load(ordering: .relaxed),
                          spaceResumedWrites: spaceResumedWritesAtomic.load(ordering: .relaxed),
                          spaceFailedWrites: spaceFailedWritesAtomic.load(ordering: .relaxed),
                          spaceHeldNow: max(0, spaceHeldNowAtomic.load(ordering: .relaxed)))
    }
}

/// The counters of a `LUNPolicy`.
public struct LUNPolicySnapshot: Sendable, Equatable {
    /// Requests that had to wait for their QoS limit.
    public var throttledRequests: UInt64 = 0
    /// Their total wait, in nanoseconds.
    public var throttledNanoseconds: UInt64 = 0
    /// Writes held because the back-end was out of space (`hold` policy).
    public var spaceHeldWrites: UInt64 = 0
    /// Held writes that succeeded on a retry.
    public var spaceResumedWrites: UInt64 = 0
    /// Held writes that still found no space after the bound and failed.
    public var spaceFailedWrites: UInt64 = 0
    /// Writes held right now.
    public var spaceHeldNow: Int = 0

    /// All zero.
    public init() {}

    /// Creates a snapshot.
    public init(throttledRequests: UInt64, throttledNanoseconds: UInt64, spaceHeldWrites: UInt64,
                spaceResumedWrites: UInt64, spaceFailedWrites: UInt64, spaceHeldNow: Int) {
        self.throttledRequests = throttledRequests
        self.throttledNanoseconds = throttledNanoseconds
        self.spaceHeldWrites = spaceHeldWrites
        self.spaceResumedWrites = spaceResumedWrites
        self.spaceFailedWrites = spaceFailedWrites
        self.spaceHeldNow = spaceHeldNow
    }
}
