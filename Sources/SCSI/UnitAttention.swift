import Synchronization

/// Which I_T nexuses a unit attention is established for.
public enum UnitAttentionScope: Sendable, Equatable {
    /// Every nexus, including ones not yet seen.
    case all
    /// Every nexus except the one given (the one whose action caused it), including ones not yet seen.
    case allExcept(ITNexus)
    /// One nexus.
    case only(ITNexus)
}

/// Unit attention conditions of one logical unit, kept per I_T nexus with SPC-4 priority rules.
///
/// Rules (SAM-5 5.14, SPC-4 4.5 / 5.14):
/// - A condition is kept at most once per nexus (establishing it again is a no-op).
/// - The power-on / reset class (ASC 29h) is reported first. Establishing it clears the conditions
///   queued before it for that nexus (the initiator must rediscover everything after a reset anyway);
///   conditions established after it are kept and reported after it, oldest first. While a 29h
///   condition is pending, a second 29h condition is not queued (the first already says "reset").
/// - Each nexus queues at most `queueCapacity` conditions. On overflow the oldest condition of the lowest
///   rank not above the new one's is dropped (rank: 29h > reservation/commands-cleared 2Ah/03h-05h, 2Fh >
///   others); if every queued condition outranks the new one, the new one is dropped.
/// - `.all` and `.allExcept` also apply to nexuses not seen yet: the board keeps the queue a brand-new
///   nexus starts with. By default that queue holds POWER ON, RESET, OR BUS DEVICE RESET OCCURRED
///   (29h/00h), so each nexus's first command that is not exempt from unit attentions reports it once;
///   conditions established later for every nexus queue behind it (a nexus that so far sent only
///   INQUIRY or REPORT LUNS, which do not make it "seen", must still learn that the LUN inventory
///   changed). A nexus becomes seen on its first `takeNext`, `peekNext`, `remove`, `clear` or on a scope
///   naming it.
///
/// Thread-safe. `mayHavePending(for:)` is lock-free (a fixed table of per-nexus atomic counters, probed
/// without a lock); everything else takes a mutex and is off the per-I/O path.
public final class UnitAttentionBoard: Sendable {
    /// Most conditions kept per nexus.
    public static let queueCapacity = 8
    /// Nexuses tracked by the lock-free table; beyond that, `mayHavePending` answers `true` for the others.
    static let tableSize = 64

    private struct State {
        /// Queues of nexuses seen so far.
        var queues: [ITNexus: [AdditionalSense]] = [:]
        /// Index in the lock-free table of each known nexus (absent when the table was full).
        var tableIndex: [ITNexus: Int] = [:]
        /// The queue a nexus starts with when it is first seen.
        var newcomerQueue: [AdditionalSense] = []
    }

    private let state: Mutex<State>
    // Lock-free table: slot i holds a nexus when keyPort[i] is targetPort + 1; 0 marks a never-used slot
    // (ends a probe), `tombstone` a forgotten one (probing continues; `claimSlot` may reuse it).
    private let keyInitiator: InlineArray<64, Atomic<UInt64>>
    private let keyPort: InlineArray<64, Atomic<UInt32>>
    private let pendingCount: InlineArray<64, Atomic<Int>>

    /// Creates a board. With `establishPowerOn` (the default, as at LU creation or hot-add), every nexus's
    /// first command sees POWER ON, RESET, OR BUS DEVICE RESET OCCURRED.
    public init(establishPowerOn: Bool = true) {
        var initial = State()
        if establishPowerOn { initial.newcomerQueue = [.powerOnResetOrBusDeviceReset] }
        state = Mutex(initial)
        keyInitiator = InlineArray { _ in Atomic(0) }
        keyPort = InlineArray { _ in Atomic(0) }
        pendingCount = InlineArray { _ in Atomic(0) }
    }

    // MARK: Public API

    /// Establishes `condition` for the nexuses in `scope`.
    public func establish(_ condition: AdditionalSense, for scope: UnitAttentionScope) {
        state.withLock { s in
            switch scope {
            case .all:
                for nexus in Array(s.queues.keys) { add(condition, to: nexus, in: &s) }
                _ = Self.insert(condition, into: &s.newcomerQueue)
            case .allExcept(let excluded):
                register(excluded, in: &s)
                for nexus in Array(s.queues.keys) where nexus != excluded { add(condition, to: nexus, in: &s) }
                _ = Self.insert(condition, into: &s.newcomerQueue)
            case .only(let nexus):
                register(nexus, in: &s)
                add(condition, to: nexus, in: &s)
            }
        }
    }

    /// Lock-free check: might `nexus` have a pending unit attention? `false` is exact for a nexus the
    /// board has seen (as of the last completed update); a nexus never seen answers `true` so that its
    /// first command takes the slow path and gets its initial conditions.
    @inline(__always) public func mayHavePending(for nexus: ITNexus) -> Bool {
        guard let slot = lookup(nexus) else { return true }
        return pendingCount[slot].load(ordering: .acquiring) != 0
    }

    /// Removes and returns the highest-priority pending unit attention for `nexus`, if any
    /// (what CHECK CONDITION or REQUEST SENSE reports).
    public func takeNext(for nexus: ITNexus) -> AdditionalSense? {
        state.withLock { s in
            register(nexus, in: &s)
            guard var queue = s.queues[nexus], !queue.isEmpty else { return nil }
            let first = queue.removeFirst()
            s.queues[nexus] = queue
            publish(nexus, in: s)
            return first
        }
    }

    /// Returns the highest-priority pending unit attention without removing it.
    public func peekNext(for nexus: ITNexus) -> AdditionalSense? {
        state.withLock { s in
            register(nexus, in: &s)
            return s.queues[nexus]?.first
        }
    }

    /// Removes one specific condition for `nexus` (REPORT LUNS clears REPORTED LUNS DATA HAS CHANGED);
    /// returns whether it was pending.
    @discardableResult
    public func remove(_ condition: AdditionalSense, for nexus: ITNexus) -> Bool {
        state.withLock { s in
            register(nexus, in: &s)
            guard var queue = s.queues[nexus], let i = queue.firstIndex(of: condition) else { return false }
            queue.remove(at: i)
            s.queues[nexus] = queue
            publish(nexus, in: s)
            return true
        }
    }

    /// Clears every unit attention of `nexus` (the nexus counts as seen afterwards).
    public func clear(for nexus: ITNexus) {
        state.withLock { s in
            register(nexus, in: &s)
            s.queues[nexus] = []
            publish(nexus, in: s)
        }
    }

    /// Drops everything kept for `nexus` (call when the I_T nexus is gone for good, e.g. the front-end's
    /// connection closed), so that nexus churn does not grow the board. If the same nexus comes back it is
    /// new again: it starts with the conditions pending for new nexuses (POWER ON, RESET... by default).
    public func forget(_ nexus: ITNexus) {
        state.withLock { s in
            guard s.queues.removeValue(forKey: nexus) != nil else { return }
            if let slot = s.tableIndex.removeValue(forKey: nexus) {
                pendingCount[slot].store(Int.max, ordering: .relaxed)
                keyPort[slot].store(Self.tombstone, ordering: .releasing)
            }
        }
    }

    /// Number of nexuses the board keeps state for.
    public var knownNexusCount: Int { state.withLock { $0.queues.count } }

    /// Pending conditions of `nexus` in reporting order (for tests, logs and QUERY ASYNCHRONOUS EVENT).
    public func pending(for nexus: ITNexus) -> [AdditionalSense] {
        state.withLock { s in
            if let queue = s.queues[nexus] { return queue }
            return s.newcomerQueue
        }
    }

    /// The conditions a nexus not yet seen will start with.
    public var pendingForNewNexuses: [AdditionalSense] { state.withLock { $0.newcomerQueue } }

    // MARK: Queue rules

    /// Reporting rank: higher is more important.
    static func rank(_ c: AdditionalSense) -> Int {
        switch (c.code, c.qualifier) {
        case (0x29, _): return 2
        case (0x2A, 0x03), (0x2A, 0x04), (0x2A, 0x05), (0x2F, _): return 1
        default: return 0
        }
    }

    /// Inserts `condition` into `queue` by the rules above; returns whether the queue changed.
    static func insert(_ condition: AdditionalSense, into queue: inout [AdditionalSense],
                       capacity: Int = queueCapacity) -> Bool {
        if queue.contains(condition) { return false }
        if condition.code == 0x29 {
            if queue.contains(where: { $0.code == 0x29 }) { return false }
            queue.removeAll(keepingCapacity: true)
            queue.append(condition)
            return true
        }
        if queue.count < capacity {
            queue.append(condition)
            return true
        }
        let newRank = rank(condition)
        var victim: Int? = nil
        var victimRank = Int.max
        for (i, c) in queue.enumerated() {
            let r = rank(c)
            if r <= newRank && r < victimRank {
                victim = i
                victimRank = r
            }
        }
        guard let victim else { return false }
        queue.remove(at: victim)
        queue.append(condition)
        return true
    }

    // MARK: Internals (called with the lock held)

    private func register(_ nexus: ITNexus, in s: inout State) {
        guard s.queues[nexus] == nil else { return }
        s.queues[nexus] = s.newcomerQueue
        if let slot = claimSlot(for: nexus) { s.tableIndex[nexus] = slot }
        publish(nexus, in: s)
    }

    private func add(_ condition: AdditionalSense, to nexus: ITNexus, in s: inout State) {
        guard var queue = s.queues[nexus] else { return }
        if Self.insert(condition, into: &queue) {
            s.queues[nexus] = queue
            publish(nexus, in: s)
        }
    }

    private func publish(_ nexus: ITNexus, in s: State) {
        guard let slot = s.tableIndex[nexus] else { return }
        pendingCount[slot].store(s.queues[nexus]?.count ?? 0, ordering: .releasing)
    }

    @inline(__always) private static func home(_ nexus: ITNexus) -> Int {
        let h = (nexus.initiator ^ (UInt64(nexus.targetPort) << 48)) &* 0x9E37_79B9_7F4A_7C15
        return Int(truncatingIfNeeded: h >> 58)  // 6 bits: 0..<64
    }

    /// `keyPort` of a slot whose nexus was forgotten: probing continues past it, claiming may reuse it.
    private static let tombstone: UInt32 = .max

    /// Lock-free probe for `nexus`'s slot.
    @inline(__always) private func lookup(_ nexus: ITNexus) -> Int? {
        var i = Self.home(nexus)
        let port = UInt32(nexus.targetPort) + 1
        for _ in 0..<Self.tableSize {
            let p = keyPort[i].load(ordering: .acquiring)
            if p == 0 { return nil }
            if p == port && keyInitiator[i].load(ordering: .relaxed) == nexus.initiator { return i }
            i = (i + 1) & (Self.tableSize - 1)
        }
        return nil
    }

    /// Claims a free (or forgotten) slot for `nexus` (lock held, so there is a single writer). The count
    /// is stored before the key is published, so a reader that finds the key sees a valid count; a reader
    /// racing with the reuse of a forgotten slot at worst misses and takes the slow path.
    private func claimSlot(for nexus: ITNexus) -> Int? {
        var i = Self.home(nexus)
        for _ in 0..<Self.tableSize {
            let p = keyPort[i].load(ordering: .relaxed)
            if p == 0 || p == Self.tombstone {
                pendingCount[i].store(Int.max, ordering: .relaxed)  // "maybe" until published
                keyInitiator[i].store(nexus.initiator, ordering: .relaxed)
                keyPort[i].store(UInt32(nexus.targetPort) + 1, ordering: .releasing)
                return i
            }
            i = (i + 1) & (Self.tableSize - 1)
        }
        return nil
    }
}

extension UnitAttentionBoard {
    /// Whether `cdb` runs despite a pending unit attention (SPC-4 5.14 / SAM-5 5.14 with UA_INTLCK_CTRL
    /// = 00b): INQUIRY, REPORT LUNS and REQUEST SENSE. (REQUEST SENSE then reports and clears the
    /// condition with `takeNext`; a successful REPORT LUNS clears REPORTED LUNS DATA HAS CHANGED with
    /// `remove(_:for:)`.)
    @inline(__always)
    public static func isExempt(_ cdb: CDB) -> Bool {
        switch cdb.opcode {
        case 0x12, 0xA0, 0x03: return true
        default: return false
        }
    }

    /// The check the command layer makes before running `cdb` from `nexus`: nil (lock-free when nothing
    /// is pending) when the command may run, else CHECK CONDITION, UNIT ATTENTION with the
    /// highest-priority condition, which is thereby reported and cleared.
    @inline(__always)
    public func check(_ cdb: CDB, from nexus: ITNexus) -> SCSIError? {
        guard mayHavePending(for: nexus), !Self.isExempt(cdb) else { return nil }
        guard let condition = takeNext(for: nexus) else { return nil }
        return .check(.unitAttention, condition)
    }
}
