import BlockIO

/// One event-loop thread's back-end channels, one per LUN back-end that thread serves, in the shape of
/// SPDK's per-thread LUN I/O channels (lib/scsi/lun.c): a LUN's channel is opened on the thread's first I/O
/// to it, the requests in flight on it are counted, it is retired when its LUN leaves the map (no new
/// command reaches it) and closed once nothing of it is in flight, and every channel closes when the
/// thread stops. The device models (virtio-scsi per queue group, PVSCSI per adapter) hold one table per
/// thread; it is used on that thread only (no locks).
///
/// A LUN's entry is named by its index (a "use"), which the device keeps per request: the data path goes
/// from a use to its channel by array index, with no hashing, allocation or reference counting of its own.
/// Entries are created on a back-end's first command (control path: its counters are looked up then), and
/// a closed entry's index is reused.
public final class LUNChannelTable<Channel: BlockChannel> {
    struct Entry {
        /// The LUN's `backendID` (-1: free entry).
        var backendID = -1
        /// The channel, once opened (never again after retirement).
        var channel: Channel? = nil
        /// The LUN's counters per queue of the device (nil where there are none).
        var counters: UnsafeMutablePointer<IOCounters?>? = nil
        /// Commands begun on this LUN and not yet answered.
        var tasks = 0
        /// Requests submitted on `channel` and not yet reaped.
        var submitted = 0
        /// Submitted since the last commit (listed in `dirty`).
        var dirty = false
        /// Its LUN left the map: no new command reaches it; it closes when idle.
        var retired = false
    }

    private let open: (Int) throws -> Channel
    private let countersProvider: ((_ backendID: Int, _ queue: Int) -> IOCounters?)?
    private let queues: Int
    private var entries: [Entry] = []
    private var freeEntries: [Int] = []
    /// Entry index of the live (not retired) use of each back-end id, -1 when none.
    private var useOfBackend: [Int32] = []
    private var dirty: [Int] = []
    /// Retired entries not yet closed.
    public private(set) var retiredCount = 0

    /// Called when a channel with a completion fd opens (fd, use): the loop starts watching the fd.
    public var watch: ((Int32, Int) -> Void)?
    /// Called before a channel with a completion fd closes: the loop stops watching the fd.
    public var unwatch: ((Int32) -> Void)?
    /// Called when `open` fails (backendID, error); the command then fails like a failed request.
    public var openFailed: ((Int, any Error) -> Void)?

    /// A table whose channels come from `open(backendID)` (called on this thread, on a LUN's first I/O; it
    /// may throw) and whose LUNs are counted in `counters(backendID, queue)` for each of `queues` queues.
    public init(queues: Int = 1, open: @escaping (Int) throws -> Channel,
                counters: ((_ backendID: Int, _ queue: Int) -> IOCounters?)? = nil) {
        self.open = open
        self.queues = max(1, queues)
        countersProvider = counters
        entries.reserveCapacity(64)
        freeEntries.reserveCapacity(64)
        dirty.reserveCapacity(64)
        useOfBackend.reserveCapacity(256)
    }

    deinit {
        for i in entries.indices { releaseCounters(i) }
    }

    // MARK: Uses

    /// The live use of `backendID` on this thread, or -1.
    @inline(__always)
    public func existingUse(_ backendID: Int) -> Int {
        backendID >= 0 && backendID < useOfBackend.count ? Int(useOfBackend[backendID]) : -1
    }

    /// The live use of `backendID`, created (with its counters, without a channel yet) on first need;
    /// -1 for an id outside 0..<65536.
    @inline(__always)
    public func use(for backendID: Int) -> Int {
        let existing = existingUse(backendID)
        if existing >= 0 { return existing }
        guard backendID >= 0 && backendID < 1 << 16 else { return -1 }
        return makeUse(backendID)
    }

    private func makeUse(_ backendID: Int) -> Int {
        var entry = Entry()
        entry.backendID = backendID
        let counters = UnsafeMutablePointer<IOCounters?>.allocate(capacity: queues)
        counters.initialize(repeating: nil, count: queues)
        if let countersProvider {
            for queue in 0..<queues { counters[queue] = countersProvider(backendID, queue) }
        }
        entry.counters = counters
        let index: Int
        if let free = freeEntries.popLast() {
            index = free
            entries[index] = entry
        } else {
            index = entries.count
            entries.append(entry)
        }
        while useOfBackend.count <= backendID { useOfBackend.append(-1) }
        useOfBackend[backendID] = Int32(index)
        return index
    }

    private func releaseCounters(_ index: Int) {
        guard let counters = entries[index].counters else { return }
        counters.deinitialize(count: queues)
        counters.deallocate()
        entries[index].counters = nil
    }

    /// The `backendID` of a use.
    public func backendID(_ use: Int) -> Int { entries[use].backendID }

    /// The LUN's counters for `queue` (nil when not counted).
    @inline(__always)
    public func counters(_ use: Int, queue: Int = 0) -> IOCounters? {
        guard queue >= 0 && queue < queues, use < entries.count, let counters = entries[use].counters else { return nil }
        return counters[queue]
    }

    // MARK: Channels

    /// The channel of a use, opened on first I/O (never again once the use is retired); nil when it cannot
    /// be opened (`openFailed` was told) or is retired.
    @inline(__always)
    public func channel(_ use: Int) -> Channel? {
        if let c = entries[use].channel { return c }
        return openChannel(use)
    }

    private func openChannel(_ use: Int) -> Channel? {
        guard !entries[use].retired, entries[use].backendID >= 0 else { return nil }
        do {
            let c = try open(entries[use].backendID)
            entries[use].channel = c
            if c.completionFD >= 0 { watch?(c.completionFD, use) }
            return c
        } catch {
            openFailed?(entries[use].backendID, error)
            return nil
        }
    }

    /// The channel of a use if it is open (task management, quiesce: never opens one).
    @inline(__always)
    public func openedChannel(_ use: Int) -> Channel? {
        use >= 0 && use < entries.count ? entries[use].channel : nil
    }

    /// The uses whose channel is open (including those of removed LUNs still draining).
    public var openUses: [Int] { entries.indices.filter { entries[$0].channel != nil } }

    /// Open channels (including those of removed LUNs still draining).
    public var openChannelCount: Int { entries.reduce(0) { $0 + ($1.channel == nil ? 0 : 1) } }

    // MARK: In-flight counting

    /// A command began on the use's LUN (it counts until `endTask`).
    @inline(__always)
    public func beginTask(_ use: Int) { entries[use].tasks += 1 }

    /// The command's answer was sent (nothing after `closeAll` forgot the use).
    @inline(__always)
    public func endTask(_ use: Int) {
        if use < entries.count { entries[use].tasks -= 1 }
    }

    /// A request was submitted on the use's channel: it counts until reaped, and the channel is committed
    /// by the next `commit`.
    @inline(__always)
    public func submitted(_ use: Int) {
        entries[use].submitted += 1
        if !entries[use].dirty {
            entries[use].dirty = true
            dirty.append(use)
        }
    }

    /// Requests submitted on the use's channel and not yet reaped.
    public func inFlight(_ use: Int) -> Int { entries[use].submitted }

    /// Commands begun on the use's LUN and not yet answered.
    public func tasks(_ use: Int) -> Int { entries[use].tasks }

    /// Commits every channel submitted to since the last commit; returns whether one of them completes on
    /// commit (`BlockChannel.completesOnCommit`: the caller then delivers at once, with no wake-up).
    @inline(__always)
    public func commit() -> Bool {
        var synchronous = false
        for use in dirty {
            entries[use].dirty = false
            if let c = entries[use].channel {
                c.commit()
                if c.completesOnCommit { synchronous = true }
            }
        }
        dirty.removeAll(keepingCapacity: true)
        return synchronous
    }

    /// Delivers the completions of one use's channel (`polling`: those found without a system call) to
    /// `handler`; each counts out of the use's in-flight requests before `handler` sees it.
    @inline(__always)
    public func reap(_ use: Int, polling: Bool, _ handler: (UInt64, BlockResult) -> Void) -> Int {
        guard let c = entries[use].channel else { return 0 }
        func deliver(_ token: UInt64, _ result: BlockResult) {
            entries[use].submitted -= 1
            handler(token, result)
        }
        return polling ? c.poll(deliver) : c.reap(deliver)
    }

    /// Delivers the completions of every open channel (see `reap(_:polling:_:)`); `handler` gets the use too.
    /// Returns whether any arrived.
    @inline(__always)
    public func deliver(polling: Bool, _ handler: (Int, UInt64, BlockResult) -> Void) -> Bool {
        var any = false
        var i = 0
        let count = entries.count
        while i < count {
            let use = i
            i += 1
            if reap(use, polling: polling, { handler(use, $0, $1) }) > 0 { any = true }
        }
        return any
    }

    // MARK: Retirement and shutdown

    /// Retires the uses whose back-end no LUN of `view` names any more (after a LUN was removed): new
    /// commands can no longer reach them, and each closes once its last command was answered and its last
    /// request reaped (now, for the idle ones).
    public func retireUnmapped(_ view: LUNMapView, closed: (Int) -> Void = { _ in }) {
        var named = Set<Int>()
        for lun in view.numbers { if let unit = view.unit(lun) { named.insert(unit.backendID) } }
        for i in entries.indices where entries[i].backendID >= 0 && !entries[i].retired && !named.contains(entries[i].backendID) {
            entries[i].retired = true
            retiredCount += 1
            useOfBackend[entries[i].backendID] = -1
        }
        closeIdleRetired(closed)
    }

    /// Closes every retired use with nothing in flight: its completion fd leaves the loop, the channel
    /// closes (releasing the back-end) and the entry is freed. `closed` sees each back-end id.
    public func closeIdleRetired(_ closed: (Int) -> Void = { _ in }) {
        guard retiredCount > 0 else { return }
        for i in entries.indices where entries[i].retired && entries[i].tasks <= 0 && entries[i].submitted <= 0 {
            let id = entries[i].backendID
            free(i)
            retiredCount -= 1
            closed(id)
        }
    }

    private func free(_ index: Int) {
        if let c = entries[index].channel {
            if c.completionFD >= 0 { unwatch?(c.completionFD) }
            c.close()
        }
        releaseCounters(index)
        entries[index] = Entry()
        freeEntries.append(index)
    }

    /// The thread is stopping (its queues drained): closes every channel and forgets every use.
    public func closeAll() {
        for i in entries.indices where entries[i].backendID >= 0 { free(i) }
        entries.removeAll()
        freeEntries.removeAll()
        useOfBackend.removeAll()
        dirty.removeAll()
        retiredCount = 0
    }
}
