import CSystem
import Logging
import SystemErrors
import EventLoop
import GuestMemoryMap
import VfioUser
import Virtio
import VirtioDevices
#if canImport(Glibc)
import Glibc
#endif

/// Split rings over guest RAM that came without an fd (QEMU with plain `-m`): the DMA windows are reachable only
/// through VFIO_USER_DMA_READ / DMA_WRITE messages, which the server sends from its loop thread, while the device
/// runs its rings on its own threads through pointers. So the device works on a shadow copy of guest memory and
/// this class, on the server's loop thread, keeps the two in step:
///
/// - Shadow: one memfd indexed by guest physical address (file offset = address), mapped once per DMA window
///   (`shadowTable`). Mappings of the same address share pages, so the shadow survives windows being unmapped,
///   split or merged and mapped again while rings run. Pages exist only where the device or a copy touched them.
/// - Kick (a notify-region write): the avail ring is read from the guest (one DMA_READ), then the descriptor table
///   (one DMA_READ: after the avail ring, so that every chain published there has its descriptors in the copy),
///   then each new chain is walked in that private copy (bounded: loops, indirect tables read then walked,
///   every buffer checked against the DMA windows and the shadow, `maxChainReadBytes`), its indirect table and
///   device-readable buffers are copied into the shadow, and its descriptors too. Only then are the avail entries
///   written into the shadow, its `idx` last with a release store: the device sees the bytes the guest wrote. A
///   chain refused here gets a zero-length head descriptor in the shadow: the device fails that request.
/// - Completions: the device's call fd is an eventfd watched here. For every used entry published in the shadow
///   since the last time, the device-writable buffers of its chain (recorded at the kick) are written to the guest
///   with DMA_WRITE (exactly those bytes; nothing for a zero-length completion), then the used elements, then the
///   used `idx` on its own. `used->flags` is never written (the device's VRING_USED_F_NO_NOTIFY would stop the
///   guest's kicks, and only kicks make this side look at the avail ring). Then the interrupt is raised.
/// - Notification suppression: EVENT_IDX and packed rings are not offered in this mode (the function masks them)
///   and the shadow's avail flags stay 0, so the device signals after every flush that published used entries.
///   The device's adaptive polling and watchdog see only the shadow (harmless: the avail side moves only here).
/// - A DMA message that fails (error reply, timeout, broken stream) marks the device DEVICE_NEEDS_RESET (`fail`).
///   A ring or buffer outside the windows while the windows change waits for the next memory change.
///
/// Every call is on the server's loop thread. DMA waits handle client messages inline: a kick that arrives
/// during a wait is queued (`pending`) and handled after the current one; a reset during a wait deactivates the
/// queue (`PlainQueue.active`), which every step re-checks.
final class PlainMemoryRings {
    /// Readable bytes one chain may make this side copy (a virtio-scsi max_sectors of 0xFFFF is 32 MiB).
    static let maxChainReadBytes: UInt64 = 64 << 20

    let windows: DMAWindows
    let loop: EventLoop
    private let note: (Logger.Level, String) -> Void
    private let fail: (String) -> Void
    private let raise: (Int) -> Void
    /// The shadow file: byte n is guest physical address n.
    private let shadowFD: Int32
    private var shadowFileSize: UInt64 = 0
    /// The memory table the device's rings use (set by the function whenever the device gets one).
    var deviceTable = GuestMemory()
    private var queues: [PlainQueue?]
    /// Depth of kick/completion work in progress (a DMA wait may bring another kick: it is queued).
    private var depth = 0
    private var broken = false
    private var continuationScheduled = false
    private var lastServed = 0
    /// Counts for the log and tests.
    private(set) var chains = 0
    private(set) var refusedChains = 0
    private(set) var completions = 0
    private(set) var reads = 0
    private(set) var writes = 0

    init(queueCount: Int, windows: DMAWindows, loop: EventLoop, note: @escaping (Logger.Level, String) -> Void,
         fail: @escaping (String) -> Void, raise: @escaping (Int) -> Void) throws(VfioUserError) {
        self.windows = windows
        self.loop = loop
        self.note = note
        self.fail = fail
        self.raise = raise
        queues = Array(repeating: nil, count: queueCount)
        shadowFD = csys_memfd_create("scsigate-shadow", 0)
        guard shadowFD >= 0 else { throw .systemCall(SystemCallError("memfd_create", errno: errno, context: "the shadow memory file")) }
    }

    deinit {
        for q in queues { q?.deactivate(loop) }
        close(shadowFD)
    }

    /// One line for the log: what the mode cost so far.
    var summary: String {
        func perRequest(_ count: Int) -> String {
            let tenths = completions > 0 ? (count * 10 + completions / 2) / completions : 0
            return "\(tenths / 10).\(tenths % 10)"
        }
        return "guest RAM without fd: \(chains) requests copied in (\(refusedChains) refused), \(completions) completed; "
            + "\(reads) guest reads and \(writes) guest writes (\(perRequest(reads)) and \(perRequest(writes)) per request)"
    }

    // MARK: Shadow memory

    /// A memory table with a shadow region per DMA window (user address = guest physical address). Regions of
    /// `previous` with the same address and size are kept; new ones map the same shadow pages.
    func shadowTable(reusing previous: [GuestMemory]) -> GuestMemory {
        var regions: [MappedGuestRegion] = []
        let end = windows.regions.map(\.end).max() ?? 0
        if end > shadowFileSize {
            guard end <= UInt64(Int64.max / 2), ftruncate(shadowFD, off_t(end)) == 0 else {
                note(.error, "the shadow of guest memory cannot grow to 0x\(String(end, radix: 16)) bytes (errno \(errno))")
                return GuestMemory(regions: [])
            }
            shadowFileSize = end
        }
        for w in windows.regions {
            let d = GuestMemoryRegionDescriptor(guestPhysicalAddress: w.address, size: w.size, userAddress: w.address, mmapOffset: w.address)
            if let same = previous.lazy.flatMap(\.regions).first(where: { $0.descriptor == d }) {
                regions.append(same)
                continue
            }
            do {
                regions.append(try MappedGuestRegion(d, fd: shadowFD, index: regions.count))
            } catch {
                note(.error, "shadow of DMA window 0x\(String(w.address, radix: 16)) +0x\(String(w.size, radix: 16)) cannot be mapped: \(error)")
            }
        }
        return GuestMemory(regions: regions)
    }

    /// Calls `body(host, guest, count)` for each piece of `length` bytes at guest `address` in `table`'s regions;
    /// false when a byte lies in none (or `body` returned false).
    private func forEachShadowPiece(_ table: GuestMemory, _ address: UInt64, _ length: UInt64,
                                    _ body: (UnsafeMutableRawPointer, UInt64, Int) -> Bool) -> Bool {
        var addr = address
        var remaining = length
        var pieces = 0
        while remaining > 0 {
            pieces += 1
            guard pieces <= table.regionCount + 1,
                  let r = table.regions.first(where: { addr >= $0.descriptor.guestPhysicalAddress && addr - $0.descriptor.guestPhysicalAddress < $0.descriptor.size })
            else { return false }
            let offset = addr - r.descriptor.guestPhysicalAddress
            let n = min(remaining, r.descriptor.size - offset)
            if !body(r.host + Int(offset), addr, Int(n)) { return false }
            remaining -= n
            addr &+= n
        }
        return true
    }

    /// Whether `length` bytes at `address` are in DMA windows with the access (no message sent).
    private func inWindows(_ address: UInt64, _ length: UInt64, write: Bool) -> Bool {
        windows.forEachRange(address, length: length, write: write) { _, _, _ in true }
    }

    private enum Copy { case done, outside, failed }

    /// Guest <-> shadow for `length` bytes at `address` (`toGuest`: DMA_WRITE from the shadow, else DMA_READ into it),
    /// or guest <-> `buffer` (a private copy) when given. `.outside` when a byte is not in a window with the access.
    private func copy(_ address: UInt64, _ length: UInt64, toGuest: Bool, buffer: UnsafeMutableRawPointer? = nil) -> Copy {
        guard inWindows(address, length, write: toGuest) else { return .outside }
        func move(_ host: UnsafeMutableRawPointer, _ guest: UInt64, _ n: Int) -> Bool {
            if toGuest {
                writes += 1
                return windows.write(guest, from: UnsafeRawBufferPointer(start: host, count: n))
            }
            reads += 1
            return windows.read(guest, into: UnsafeMutableRawBufferPointer(start: host, count: n))
        }
        let ok = buffer.map { move($0, address, Int(length)) } ?? forEachShadowPiece(deviceTable, address, length, move)
        if ok { return .done }
        return inWindows(address, length, write: toGuest) ? .failed : .outside
    }

    // MARK: Queues

    /// Prepares the shadow of a split ring about to start (before the device reads it): avail flags and index 0
    /// (nothing published yet), used flags 0, used index as the guest has it (returned; nil: the reason is logged).
    func prepareShadow(_ index: Int, size: Int, desc: UInt64, avail: UInt64, used: UInt64) -> UInt16? {
        guard index < queues.count, !broken else { return nil }
        stop(index)
        guard let shadowAvail = deviceTable.pointer(guestPhysical: avail, length: UInt64(4 + 2 * size)),
              let shadowUsed = deviceTable.pointer(guestPhysical: used, length: UInt64(4 + 8 * size)),
              deviceTable.pointer(guestPhysical: desc, length: UInt64(16 * size)) != nil else {
            note(.error, "queue \(index): its ring is outside the DMA windows")
            return nil
        }
        var guestUsed: UInt16 = 0
        switch withUnsafeMutableBytes(of: &guestUsed, { copy(used + 2, 2, toGuest: false, buffer: $0.baseAddress!) }) {
        case .done: break
        case .outside:
            note(.error, "queue \(index): its used ring is not in a DMA window")
            return nil
        case .failed:
            fail("queue \(index): DMA_READ of the used index failed")
            return nil
        }
        csys_store_release_u16(shadowAvail, 0)
        csys_store_release_u16(shadowAvail + 2, 0)
        csys_store_release_u16(shadowUsed, 0)
        csys_store_release_u16(shadowUsed + 2, guestUsed)
        return UInt16(littleEndian: guestUsed)
    }

    /// Starts watching the split ring `prepareShadow` prepared. Returns the call fd the device signals (owned by
    /// the caller, watched here until `stop`), or nil (the reason is logged).
    func start(_ index: Int, size: Int, desc: UInt64, avail: UInt64, used: UInt64, segments: Int, kickFD: Int32,
               usedIndex: UInt16) -> Int32? {
        guard index < queues.count, !broken else { return nil }
        stop(index)
        let call = csys_eventfd(0, 1)
        guard call >= 0 else {
            note(.error, "queue \(index): cannot create its completion eventfd (errno \(errno))")
            return nil
        }
        let q = PlainQueue(index: index, size: size, desc: desc, avail: avail, used: used, segments: segments, kickFD: kickFD,
                           callFD: call, usedIndex: usedIndex)
        do {
            // Weak: a reset handled inside a DMA wait may drop this object; `run` holds it while it works.
            try loop.register(fd: call) { [weak self, weak q] _ in
                guard let q, q.active else { return }
                var v: UInt64 = 0
                _ = csys_eventfd_drain(q.callFD, &v)
                q.completionPending = true
                self?.run()
            }
        } catch {
            close(call)
            note(.error, "queue \(index): cannot watch its completion eventfd: \(error)")
            return nil
        }
        queues[index] = q
        return call
    }

    /// Stops watching queue `index` (before the device stops it; its call fd is closed by the caller).
    func stop(_ index: Int) {
        guard index < queues.count, let q = queues[index] else { return }
        q.deactivate(loop)
        queues[index] = nil
    }

    /// The driver notified queue `index`: copy what it made available into the shadow, then kick the device.
    func kicked(_ index: Int) {
        guard index < queues.count, let q = queues[index] else { return }
        q.kickPending = true
        run()
    }

    /// The DMA windows changed (the device may have a new table): retry work that waited for memory, from the
    /// loop (not inside the DMA_MAP/UNMAP handler, whose client awaits its reply before it answers DMA).
    func memoryChanged() {
        var any = false
        for case let q? in queues where q.waitsForMemory {
            q.waitsForMemory = false
            any = true
        }
        if any { scheduleContinuation() }
    }

    private func scheduleContinuation() {
        guard !continuationScheduled else { return }
        continuationScheduled = true
        let task = PlainLoopTask { [weak self] in
            guard let self else { return }
            self.continuationScheduled = false
            self.run()
        }
        loop.execute { task.body() }
    }

    /// Does the pending kicks and completions, unless called inside one (a DMA wait handled a message): the
    /// outer call picks the new work up before it returns. Bounded per call; the rest continues from the loop.
    private func run() {
        guard depth == 0 else { return }
        depth += 1
        defer { depth -= 1 }
        var rounds = 0
        while !broken {
            // Round robin from the queue after the last one served.
            var found: PlainQueue? = nil
            for k in 1...queues.count {
                if let q = queues[(lastServed + k) % queues.count], q.kickPending || q.completionPending, !q.waitsForMemory {
                    found = q
                    break
                }
            }
            guard let q = found else { return }
            lastServed = q.index
            rounds += 1
            if rounds > 4 * queues.count + 64 {
                scheduleContinuation()
                return
            }
            if q.completionPending {
                q.completionPending = false
                complete(q)
            } else {
                q.kickPending = false
                copyAvailable(q)
                if q.active && !q.waitsForMemory { _ = csys_eventfd_signal(q.kickFD, 1) }
            }
        }
    }

    private func dmaFailed(_ q: PlainQueue, _ what: String) {
        guard !broken else { return }
        broken = true
        fail("queue \(q.index): \(what) failed (guest RAM without fd is reached by DMA message)")
    }

    /// Waits for the next memory change (a ring or a buffer is outside the windows while they change).
    private func waitForMemory(_ q: PlainQueue, kick: Bool) {
        if !q.waitsForMemory { note(.info, "queue \(q.index): guest memory it needs is outside the DMA windows for now; waiting for the next map") }
        q.waitsForMemory = true
        if kick { q.kickPending = true } else { q.completionPending = true }
    }

    // MARK: Driver to device

    private func copyAvailable(_ q: PlainQueue) {
        let size = q.size
        switch copy(q.avail, UInt64(4 + 2 * size), toGuest: false, buffer: q.availCopy) {
        case .done: break
        case .outside: return waitForMemory(q, kick: true)
        case .failed: return dmaFailed(q, "DMA_READ of the avail ring")
        }
        guard q.active else { return }
        let guestIndex = UInt16(littleEndian: q.availCopy.load(fromByteOffset: 2, as: UInt16.self))
        let count = Int(guestIndex &- q.published)
        guard count > 0 else { return }
        guard let shadowAvail = deviceTable.pointer(guestPhysical: q.avail, length: UInt64(4 + 2 * size)),
              let shadowDesc = deviceTable.pointer(guestPhysical: q.desc, length: UInt64(16 * size)) else {
            return waitForMemory(q, kick: true)
        }
        if count > size {
            // More than the ring holds: the device finds the jump and breaks the queue.
            csys_store_release_u16(shadowAvail + 2, guestIndex.littleEndian)
            q.published = guestIndex
            return
        }
        switch copy(q.desc, UInt64(16 * size), toGuest: false, buffer: q.descCopy) {
        case .done: break
        case .outside: return waitForMemory(q, kick: true)
        case .failed: return dmaFailed(q, "DMA_READ of the descriptor table")
        }
        guard q.active else { return }
        var ready = 0
        while ready < count {
            let position = Int((q.published &+ UInt16(ready)) % UInt16(size))
            let head = UInt16(littleEndian: q.availCopy.load(fromByteOffset: 4 + 2 * position, as: UInt16.self))
            let result = Int(head) < size ? prepare(q, head: Int(head), shadowDesc: shadowDesc) : .done  // the device refuses the entry
            guard q.active else { return }
            if result == .outside { waitForMemory(q, kick: true); break }
            if result == .failed { return dmaFailed(q, "DMA_READ of a request's buffers") }
            let entry = q.availCopy.load(fromByteOffset: 4 + 2 * position, as: UInt16.self)
            shadowAvail.storeBytes(of: entry, toByteOffset: 4 + 2 * position, as: UInt16.self)
            ready += 1
        }
        guard ready > 0 else { return }
        q.published &+= UInt16(ready)
        csys_store_release_u16(shadowAvail + 2, q.published.littleEndian)
    }

    /// Walks chain `head` in the private copies, checks it, copies its indirect table, readable buffers and
    /// descriptors into the shadow and records its writable buffers. A malformed chain is refused (zero-length
    /// head in the shadow).
    private func prepare(_ q: PlainQueue, head: Int, shadowDesc: UnsafeMutableRawPointer) -> Copy {
        chains += 1
        var table = UnsafeRawPointer(q.descCopy)
        var tableSize = q.size
        var index = head
        var walked = 0
        var visited = 0
        var inIndirect = false
        var sawWritable = false
        var readBytes: UInt64 = 0
        var readCount = 0
        var writeCount = 0
        let writable = q.writable + head * q.segments
        var indirect: (address: UInt64, length: Int)? = nil
        func refuse() -> Copy {
            refusedChains += 1
            q.writableCount[head] = 0
            (shadowDesc + 16 * head).initializeMemory(as: UInt8.self, repeating: 0, count: 16)
            return .done
        }
        while true {
            guard index < tableSize else { return refuse() }
            walked += 1
            guard walked <= tableSize else { return refuse() }
            if !inIndirect {
                q.visited[visited] = UInt16(index)
                visited += 1
            }
            let d = table + 16 * index
            let addr = UInt64(littleEndian: d.loadUnaligned(as: UInt64.self))
            let len = UInt32(littleEndian: d.loadUnaligned(fromByteOffset: 8, as: UInt32.self))
            let flags = UInt16(littleEndian: d.loadUnaligned(fromByteOffset: 12, as: UInt16.self))
            let next = UInt16(littleEndian: d.loadUnaligned(fromByteOffset: 14, as: UInt16.self))
            if flags & 4 != 0 {
                guard !inIndirect, walked == 1, flags & 1 == 0, len > 0, len % 16 == 0, Int(len / 16) <= q.segments,
                      deviceTable.pointer(guestPhysical: addr, length: UInt64(len)) != nil,
                      inWindows(addr, UInt64(len), write: false) else { return refuse() }
                let got = copy(addr, UInt64(len), toGuest: false, buffer: q.indirectCopy)
                guard got == .done, q.active else { return got == .done ? .done : got }
                indirect = (addr, Int(len))
                table = UnsafeRawPointer(q.indirectCopy)
                tableSize = Int(len / 16)
                index = 0
                walked = 0
                inIndirect = true
                continue
            }
            guard len > 0 else { return refuse() }
            let isWritable = flags & 2 != 0
            if isWritable {
                sawWritable = true
            } else if sawWritable {
                return refuse()
            }
            guard inWindows(addr, UInt64(len), write: isWritable),
                  forEachShadowPiece(deviceTable, addr, UInt64(len), { _, _, _ in true }) else { return refuse() }
            if isWritable {
                guard writeCount < q.segments else { return refuse() }
                writable[writeCount] = PlainRange(address: addr, length: len)
                writeCount += 1
            } else {
                readBytes += UInt64(len)
                guard readCount < q.segments, readBytes <= Self.maxChainReadBytes else { return refuse() }
                q.reads[readCount] = PlainRange(address: addr, length: len)
                readCount += 1
            }
            guard flags & 1 != 0 else { break }
            index = Int(next)
        }
        if let (addr, len) = indirect {
            _ = forEachShadowPiece(deviceTable, addr, UInt64(len)) { host, guest, n in
                host.copyMemory(from: q.indirectCopy + Int(guest - addr), byteCount: n)
                return true
            }
        }
        for i in 0..<readCount {
            let got = copy(q.reads[i].address, UInt64(q.reads[i].length), toGuest: false)
            guard got == .done, q.active else { return got }
        }
        for i in 0..<visited {
            let at = 16 * Int(q.visited[i])
            (shadowDesc + at).copyMemory(from: q.descCopy + at, byteCount: 16)
        }
        q.writableCount[head] = UInt16(writeCount)
        return .done
    }

    // MARK: Device to driver

    private func complete(_ q: PlainQueue) {
        let size = q.size
        guard let shadowUsed = deviceTable.pointer(guestPhysical: q.used, length: UInt64(4 + 8 * size)) else {
            return waitForMemory(q, kick: false)
        }
        let usedIndex = UInt16(littleEndian: csys_load_acquire_u16(shadowUsed + 2))
        let count = Int(usedIndex &- q.written)
        if count > 0 {
            guard count <= size else { return dmaFailed(q, "used ring check (\(count) new entries)") }
            for k in 0..<count {
                let e = shadowUsed + 4 + 8 * Int((q.written &+ UInt16(k)) % UInt16(size))
                let id = Int(UInt32(littleEndian: e.load(as: UInt32.self)))
                let length = UInt32(littleEndian: e.load(fromByteOffset: 4, as: UInt32.self))
                guard id < size, length > 0 else { continue }
                let ranges = q.writable + id * q.segments
                var i = 0
                let n = Int(q.writableCount[id])
                while i < n {
                    // Adjacent buffers in one message.
                    let start = ranges[i].address
                    var end = start &+ UInt64(ranges[i].length)
                    i += 1
                    while i < n && ranges[i].address == end { end &+= UInt64(ranges[i].length); i += 1 }
                    switch copy(start, end &- start, toGuest: true) {
                    case .done: break
                    case .outside: return waitForMemory(q, kick: false)
                    case .failed: return dmaFailed(q, "DMA_WRITE of a request's data")
                    }
                    guard q.active else { return }
                }
            }
            // Used elements, then (on its own, after them) the used index. Never the flags.
            let first = Int(q.written % UInt16(size))
            let head = min(count, size - first)
            for (from, n) in [(first, head), (0, count - head)] where n > 0 {
                switch copy(q.used + 4 + UInt64(8 * from), UInt64(8 * n), toGuest: true) {
                case .done: break
                case .outside: return waitForMemory(q, kick: false)
                case .failed: return dmaFailed(q, "DMA_WRITE of used ring entries")
                }
                guard q.active else { return }
            }
            var index = usedIndex.littleEndian
            switch withUnsafeMutableBytes(of: &index, { copy(q.used + 2, 2, toGuest: true, buffer: $0.baseAddress!) }) {
            case .done: break
            case .outside: return waitForMemory(q, kick: false)
            case .failed: return dmaFailed(q, "DMA_WRITE of the used index")
            }
            guard q.active else { return }
            q.written = usedIndex
            completions += count
        }
        raise(q.index)
    }
}

/// A guest buffer: address and length.
struct PlainRange {
    var address: UInt64
    var length: UInt32
}

/// The state of one running split ring in plain-memory mode (loop thread).
final class PlainQueue {
    let index: Int
    let size: Int
    let desc: UInt64
    let avail: UInt64
    let used: UInt64
    /// Most descriptors (and buffers) of one chain.
    let segments: Int
    let kickFD: Int32
    let callFD: Int32
    /// Avail index written into the shadow; used index written to the guest.
    var published: UInt16 = 0
    var written: UInt16
    var active = true
    var kickPending = false
    var completionPending = false
    var waitsForMemory = false
    /// Private copies of the guest's avail ring, descriptor table and one indirect table.
    let availCopy: UnsafeMutableRawPointer
    let descCopy: UnsafeMutableRawPointer
    let indirectCopy: UnsafeMutableRawPointer
    /// Per chain head: its device-writable buffers (`segments` each) and their count.
    let writable: UnsafeMutablePointer<PlainRange>
    let writableCount: UnsafeMutablePointer<UInt16>
    /// The chain being prepared: main-table descriptors walked and readable buffers.
    let visited: UnsafeMutablePointer<UInt16>
    let reads: UnsafeMutablePointer<PlainRange>

    init(index: Int, size: Int, desc: UInt64, avail: UInt64, used: UInt64, segments: Int, kickFD: Int32, callFD: Int32, usedIndex: UInt16) {
        self.index = index
        self.size = size
        self.desc = desc
        self.avail = avail
        self.used = used
        self.segments = max(1, segments)
        self.kickFD = kickFD
        self.callFD = callFD
        written = usedIndex
        availCopy = .allocate(byteCount: 4 + 2 * size, alignment: 16)
        descCopy = .allocate(byteCount: 16 * size, alignment: 16)
        indirectCopy = .allocate(byteCount: 16 * self.segments, alignment: 16)
        writable = .allocate(capacity: size * self.segments)
        writableCount = .allocate(capacity: size)
        writableCount.initialize(repeating: 0, count: size)
        visited = .allocate(capacity: size)
        reads = .allocate(capacity: self.segments)
    }

    deinit {
        availCopy.deallocate()
        descCopy.deallocate()
        indirectCopy.deallocate()
        writable.deallocate()
        writableCount.deallocate()
        visited.deallocate()
        reads.deallocate()
    }

    func deactivate(_ loop: EventLoop) {
        guard active else { return }
        active = false
        loop.unregister(fd: callFD)
    }
}

/// A closure handed to the event loop (non-generic, so the @Sendable wrapper captures no generic metatype).
private final class PlainLoopTask: @unchecked Sendable {
    let body: () -> Void
    init(_ body: @escaping () -> Void) { self.body = body }
}
