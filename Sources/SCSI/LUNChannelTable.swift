import BlockIO
#if canImport(Glibc)
import Glibc
#endif

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
///
/// The table is generic over the channel type, and device models run it unspecialized (their own generic
/// classes are called through the event loop). So the per-request paths (`beginTask`, `endTask`, `submit`,
/// `reap`, `commit`) never touch a type built from `Channel` (`Channel?`, an entry holding one, an array of
/// those): Swift looks such a type's metadata up in a global cache on every use, a few hundred instructions
/// each. Entries are a non-generic struct, and the channels sit in a buffer of their own, valid where
/// `Entry.open` is set.
public final class LUNChannelTable<Channel: BlockChannel> {
    typealias Entry = LUNChannelEntry

    private let open: (Int) throws -> Channel
    private let countersProvider: ((_ backendID: Int, _ queue: Int) -> IOCounters?)?
    private let queues: Int
    // The state below is used on the table's thread only, and no access to it spans a call that could
    // reach it again (a handler called from `reap` gets no `inout` to it): Swift's dynamic exclusivity
    // checks (a thread-local access set, about 100 instructions per access, several per request) are off
    // for it, as for the device models' own per-thread state.
    @exclusivity(unchecked) private var entries: [Entry] = []
    /// The open channels, by entry index (initialized where `entries[i].open`); `channelCapacity` slots.
    @exclusivity(unchecked) private var channelBuffer: UnsafeMutablePointer<Channel>
    private var channelCapacity: Int
    private var freeEntries: [Int] = []
    /// Entry index of the live (not retired) use of each back-end id, -1 when none.
    @exclusivity(unchecked) private var useOfBackend: [Int32] = []
    @exclusivity(unchecked) private var dirty: [Int] = []
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
        channelCapacity = 64
        channelBuffer = .allocate(capacity: channelCapacity)
        freeEntries.reserveCapacity(64)
        dirty.reserveCapacity(64)
        useOfBackend.reserveCapacity(256)
    }

    deinit {
        for i in entries.indices {
            releaseCounters(i)
            if entries[i].open { (channelBuffer + i).deinitialize(count: 1) }
        }
        channelBuffer.deallocate()
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
            if entries.count > channelCapacity { growChannelBuffer() }
        }
        while useOfBackend.count <= backendID { useOfBackend.append(-1) }
        useOfBackend[backendID] = Int32(index)
        return index
    }

    /// Doubles the channel buffer, moving the open channels (control path: a new use).
    private func growChannelBuffer() {
        let capacity = channelCapacity * 2
        let buffer = UnsafeMutablePointer<Channel>.allocate(capacity: capacity)
        for i in 0..<channelCapacity where i < entries.count && entries[i].open {
            (buffer + i).moveInitialize(from: channelBuffer + i, count: 1)
        }
        channelBuffer.deallocate()
        channelBuffer = buffer
        channelCapacity = capacity
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
        guard entries[use].open || openChannel(use) else { return nil }
        return channelBuffer[use]
    }

    /// Opens the channel of a use (its LUN's first I/O on this thread); false when it cannot be opened
    /// (`openFailed` was told) or the use is retired.
    private func openChannel(_ use: Int) -> Bool {
        guard !entries[use].retired, entries[use].backendID >= 0 else { return false }
        do {
            let c = try open(entries[use].backendID)
            (channelBuffer + use).initialize(to: c)
            entries[use].open = true
            if c.completionFD >= 0 { watch?(c.completionFD, use) }
            return true
        } catch {
            openFailed?(entries[use].backendID, error)
            return false
        }
    }

    /// The channel of a use if it is open (task management, quiesce: never opens one).
    @inline(__always)
    public func openedChannel(_ use: Int) -> Channel? {
        use >= 0 && use < entries.count && entries[use].open ? channelBuffer[use] : nil
    }

    /// Submits `request` on the use's channel (opened on first I/O) and counts it (see `submitted`): the
    /// data path's way to submit, with no `Channel?` on the way. Returns 0, EIO when the channel cannot be
    /// opened or the use is retired, or the channel's errno (the request was then not queued).
    @inline(__always)
    public func submit(_ request: BlockRequest, token: UInt64, use: Int) -> Int32 {
        guard use >= 0, entries[use].open || openChannel(use) else { return EIO }
        let rc = channelBuffer[use].submit(request, token: token)
        if rc == 0 { submitted(use) }
        return rc
    }

    /// The uses whose channel is open (including those of removed LUNs still draining).
    public var openUses: [Int] { entries.indices.filter { entries[$0].open } }

    /// Open channels (including those of removed LUNs still draining).
    public var openChannelCount: Int { entries.reduce(0) { $0 + ($1.open ? 1 : 0) } }

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
            if entries[use].open {
                let c = channelBuffer[use]
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
        guard entries[use].open else { return 0 }
        let c = channelBuffer[use]
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
        if entries[index].open {
            let c = (channelBuffer + index).move()
            entries[index].open = false
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

/// One use of a `LUNChannelTable` (not generic: see the table's note on metadata).
struct LUNChannelEntry {
    /// The LUN's `backendID` (-1: free entry).
    var backendID = -1
    /// The channel is open: the table's channel buffer holds it at this entry's index (never again after
    /// retirement).
    var open = false
    /// The LUN's counters per queue of the device (nil where there are none).
    var counters: UnsafeMutablePointer<IOCounters?>? = nil
    /// Commands begun on this LUN and not yet answered.
    var tasks = 0
    /// Requests submitted on the channel and not yet reaped.
    var submitted = 0
    /// Submitted since the last commit (listed in `dirty`).
    var dirty = false
    /// Its LUN left the map: no new command reaches it; it closes when idle.
    var retired = false
}
