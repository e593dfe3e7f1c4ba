import BlockIO
import CSystem
import GuestMemoryMap
import Testing
import Virtio
#if canImport(Glibc)
import Glibc
#endif

/// Guest memory for ring tests: one memfd region (and optionally a second one right after it).
final class RingMemory {
    let fds: [Int32]
    let regionSize: Int
    let memory: GuestMemory
    let gpaBase: UInt64 = 0x4000_0000
    let userBase: UInt64 = 0x7000_0000_0000
    private var next = 0

    init(regionSize: Int = 1 << 20, regions: Int = 1) throws {
        self.regionSize = regionSize
        var fds: [Int32] = []
        var table: [(GuestMemoryRegionDescriptor, Int32)] = []
        for i in 0..<regions {
            let fd = csys_memfd_create("ring", 0)
            _ = ftruncate(fd, off_t(regionSize))
            fds.append(fd)
            let off = UInt64(i * regionSize)
            table.append((GuestMemoryRegionDescriptor(guestPhysicalAddress: gpaBase + off, size: UInt64(regionSize),
                                                      userAddress: userBase + off, mmapOffset: 0), fd))
        }
        self.fds = fds
        memory = try GuestMemory.map(table, limit: 8)
    }

    deinit { for fd in fds { close(fd) } }

    func alloc(_ n: Int, align: Int = 16) -> UInt64 {
        next = (next + align - 1) & ~(align - 1)
        let at = next
        next += n
        return gpaBase + UInt64(at)
    }

    func host(_ gpa: UInt64) -> UnsafeMutableRawPointer { memory.pointer(guestPhysical: gpa, length: 1)! }
    func user(_ gpa: UInt64) -> UInt64 { userBase + (gpa - gpaBase) }
}

/// Driver side of a split ring.
struct SplitDriver {
    let m: RingMemory
    let size: Int
    let desc: UInt64, avail: UInt64, used: UInt64
    var availIdx: UInt16 = 0

    init(_ m: RingMemory, size: Int) {
        self.m = m
        self.size = size
        desc = m.alloc(16 * size)
        avail = m.alloc(6 + 2 * size)
        used = m.alloc(6 + 8 * size)
    }

    var addresses: VirtqueueAddresses { VirtqueueAddresses(descriptorTable: m.user(desc), driverArea: m.user(avail), deviceArea: m.user(used)) }

    func set(_ i: Int, _ addr: UInt64, _ len: UInt32, _ flags: UInt16, _ next: UInt16, table: UInt64? = nil) {
        let d = m.host(table ?? desc) + 16 * i
        d.storeBytes(of: addr, as: UInt64.self)
        d.storeBytes(of: len, toByteOffset: 8, as: UInt32.self)
        d.storeBytes(of: flags, toByteOffset: 12, as: UInt16.self)
        d.storeBytes(of: next, toByteOffset: 14, as: UInt16.self)
    }

    mutating func publish(_ head: UInt16) {
        m.host(avail).storeBytes(of: head, toByteOffset: 4 + 2 * Int(availIdx % UInt16(size)), as: UInt16.self)
        availIdx &+= 1
        m.host(avail).storeBytes(of: availIdx, toByteOffset: 2, as: UInt16.self)
    }

    var usedIdx: UInt16 { m.host(used).load(fromByteOffset: 2, as: UInt16.self) }
    func usedElem(_ i: Int) -> (UInt32, UInt32) {
        let e = m.host(used) + 4 + 8 * (i % size)
        return (e.load(as: UInt32.self), e.load(fromByteOffset: 4, as: UInt32.self))
    }
    func setUsedEvent(_ v: UInt16) { m.host(avail).storeBytes(of: v, toByteOffset: 4 + 2 * size, as: UInt16.self) }
    func setNoInterrupt(_ on: Bool) { m.host(avail).storeBytes(of: on ? UInt16(1) : 0, as: UInt16.self) }
    var usedFlags: UInt16 { m.host(used).load(as: UInt16.self) }
    var availEvent: UInt16 { m.host(used).load(fromByteOffset: 4 + 8 * size, as: UInt16.self) }
}

extension VirtqueuePopResult {
    var chain: DescriptorChain? { if case let .chain(c) = self { return c } else { return nil } }
    var invalidError: DescriptorChainError? { if case let .invalid(_, _, e) = self { return e } else { return nil } }
    var isEmpty: Bool { if case .empty = self { return true } else { return false } }
    var isBroken: Bool { if case .broken = self { return true } else { return false } }
}

@Suite struct SplitVirtqueueTests {
    @Test func popsChainIntoSlotIovecsAndPushesUsed() throws {
        let m = try RingMemory()
        var d = SplitDriver(m, size: 8)
        let a = m.alloc(100), b = m.alloc(200), c = m.alloc(50)
        d.set(3, a, 100, 1, 5)
        d.set(5, b, 200, 1 | 2, 6)
        d.set(6, c, 50, 2, 0)
        d.publish(3)
        let q = try Virtqueue(size: 8, options: VirtqueueOptions(), addresses: d.addresses, memory: m.memory, base: 0, segmentsPerSlot: 8)
        #expect(q.hasAvailable)
        let chain = try #require(q.pop().chain)
        #expect(chain.head == 3)
        #expect(chain.readableCount == 1 && chain.writableCount == 2)
        #expect(chain.readableBytes == 100 && chain.writableBytes == 250)
        #expect(chain.readable[0].iov_base == m.host(a))
        #expect(chain.writable[1].iov_base == m.host(c) && chain.writable[1].iov_len == 50)
        #expect(chain.vectors == q.vectors(of: 3))
        #expect(q.pop().isEmpty)
        #expect(q.inFlight == 1)
        q.push(head: 3, length: 250)
        #expect(d.usedIdx == 0)  // not published before flush
        #expect(q.flush())  // no suppression: interrupt wanted
        #expect(d.usedIdx == 1)
        #expect(d.usedElem(0) == (3, 250))
        #expect(q.ringBase == 1)
        #expect(q.inFlight == 0)
    }

    @Test func indirectTableAndNegotiation() throws {
        let m = try RingMemory()
        var d = SplitDriver(m, size: 4)
        let table = m.alloc(48)
        let x = m.alloc(16), y = m.alloc(4096), z = m.alloc(1)
        d.set(0, x, 16, 1, 1, table: table)
        d.set(1, y, 4096, 1, 2, table: table)
        d.set(2, z, 1, 2, 0, table: table)
        d.set(0, table, 48, 4, 0)
        d.publish(0)
        d.publish(0)
        let q = try Virtqueue(size: 4, options: VirtqueueOptions(indirect: true), addresses: d.addresses, memory: m.memory, base: 0, segmentsPerSlot: 8)
        let chain = try #require(q.pop().chain)
        #expect(chain.readableCount == 2 && chain.writableCount == 1 && chain.readableBytes == 4112)
        q.push(head: 0, length: 1)
        _ = q.flush()
        // Without the feature, INDIRECT is refused.
        let q2 = try Virtqueue(size: 4, options: VirtqueueOptions(), addresses: d.addresses, memory: m.memory, base: 1, segmentsPerSlot: 8)
        #expect(q2.pop().invalidError == .misplacedIndirect)
        // Nested indirect.
        d.set(1, table, 48, 4, 0, table: table)
        let q3 = try Virtqueue(size: 4, options: VirtqueueOptions(indirect: true), addresses: d.addresses, memory: m.memory, base: 1, segmentsPerSlot: 8)
        #expect(q3.pop().invalidError == .nestedIndirect)
    }

    @Test func malformedChains() throws {
        let m = try RingMemory()
        var d = SplitDriver(m, size: 8)
        let a = m.alloc(64)
        d.set(0, a, 64, 1, 1); d.set(1, a, 64, 1, 0)  // loop
        d.set(2, a, 0, 0, 0)  // zero length
        d.set(3, m.gpaBase + UInt64(m.regionSize) - 10, 64, 0, 0)  // runs off memory
        d.set(4, a, 64, 1, 9)  // next out of table
        d.set(5, a, 64, 3, 6); d.set(6, a, 64, 0, 0)  // readable after writable
        for h: UInt16 in [0, 2, 3, 4, 5] { d.publish(h) }
        let q = try Virtqueue(size: 8, options: VirtqueueOptions(), addresses: d.addresses, memory: m.memory, base: 0, segmentsPerSlot: 16)
        #expect(q.pop().invalidError == .loop)
        #expect(q.pop().invalidError == .zeroLength)
        #expect(q.pop().invalidError == .outOfGuestMemory)
        #expect(q.pop().invalidError == .descriptorOutOfTable(9))
        #expect(q.pop().invalidError == .readableAfterWritable)
        // Too many segments for the slot.
        for i in 0..<5 { d.set(i, a, 8, 1, UInt16(i + 1)) }
        d.set(5, a, 8, 0, 0)
        d.publish(0)
        for h: UInt16 in [0, 2, 3, 4, 5] { q.push(head: h, length: 0) }
        let small = try Virtqueue(size: 8, options: VirtqueueOptions(), addresses: d.addresses, memory: m.memory, base: 5, segmentsPerSlot: 4)
        #expect(small.pop().invalidError == .tooManySegments)
        #expect(!q.isBroken && !small.isBroken)
    }

    @Test func availJumpAndBadHeadBreakTheQueue() throws {
        let m = try RingMemory()
        var d = SplitDriver(m, size: 8)
        m.host(d.avail).storeBytes(of: UInt16(9), toByteOffset: 2, as: UInt16.self)
        let q = try Virtqueue(size: 8, options: VirtqueueOptions(), addresses: d.addresses, memory: m.memory, base: 0, segmentsPerSlot: 4)
        #expect(q.pop().isBroken)
        #expect(q.isBroken && q.brokenReason.contains("jumped"))
        #expect(!q.hasAvailable)
        d.availIdx = 0
        d.publish(8)
        let q2 = try Virtqueue(size: 8, options: VirtqueueOptions(), addresses: d.addresses, memory: m.memory, base: 0, segmentsPerSlot: 4)
        #expect(q2.pop().isBroken)
    }

    @Test func ringSetupChecks() throws {
        let m = try RingMemory()
        let d = SplitDriver(m, size: 8)
        #expect(throws: VirtqueueSetupError.badSize(6)) {
            try Virtqueue(size: 6, options: VirtqueueOptions(), addresses: d.addresses, memory: m.memory, base: 0, segmentsPerSlot: 4)
        }
        let outside = VirtqueueAddresses(descriptorTable: 0x1000, driverArea: d.addresses.driverArea, deviceArea: d.addresses.deviceArea)
        #expect(throws: VirtqueueSetupError.ringOutsideMemory(area: "descriptor table")) {
            try Virtqueue(size: 8, options: VirtqueueOptions(), addresses: outside, memory: m.memory, base: 0, segmentsPerSlot: 4)
        }
        let lastBytes = VirtqueueAddresses(descriptorTable: m.user(m.gpaBase) + UInt64(m.regionSize) - 64, driverArea: d.addresses.driverArea,
                                           deviceArea: d.addresses.deviceArea)
        #expect(throws: VirtqueueSetupError.ringOutsideMemory(area: "descriptor table")) {
            try Virtqueue(size: 8, options: VirtqueueOptions(), addresses: lastBytes, memory: m.memory, base: 0, segmentsPerSlot: 4)
        }
    }

    @Test func eventIndexAndNoInterruptSuppression() throws {
        let m = try RingMemory()
        var d = SplitDriver(m, size: 8)
        let a = m.alloc(16)
        for i in 0..<8 { d.set(i, a, 16, 2, 0) }
        let q = try Virtqueue(size: 8, options: VirtqueueOptions(eventIndex: true), addresses: d.addresses, memory: m.memory, base: 0, segmentsPerSlot: 4)
        // used_event = 1: interrupt only once the used index passes 1.
        d.setUsedEvent(1)
        for h: UInt16 in [0, 1, 2] { d.publish(h) }
        _ = q.pop(); q.push(head: 0, length: 16)
        #expect(!q.flush())  // used idx 1: event 1 not crossed yet
        _ = q.pop(); q.push(head: 1, length: 16)
        #expect(q.flush())  // used idx 2 crosses 1
        _ = q.pop(); q.push(head: 2, length: 16)
        #expect(!q.flush())  // already signalled past the event
        // Kick suppression: re-enabling writes avail_event = next avail index and re-checks.
        #expect(!q.enableNotificationsAndCheck())
        #expect(d.availEvent == 3)
        d.publish(3)
        #expect(q.enableNotificationsAndCheck())

        // Without EVENT_IDX: VRING_AVAIL_F_NO_INTERRUPT and VRING_USED_F_NO_NOTIFY.
        var d2 = SplitDriver(m, size: 8)
        for i in 0..<8 { d2.set(i, a, 16, 2, 0) }
        let q2 = try Virtqueue(size: 8, options: VirtqueueOptions(), addresses: d2.addresses, memory: m.memory, base: 0, segmentsPerSlot: 4)
        d2.setNoInterrupt(true)
        d2.publish(0)
        _ = q2.pop(); q2.push(head: 0, length: 1)
        #expect(!q2.flush())
        d2.setNoInterrupt(false)
        d2.publish(1)
        _ = q2.pop(); q2.push(head: 1, length: 1)
        #expect(q2.flush())
        q2.disableNotifications()
        #expect(d2.usedFlags == 1)
        #expect(!q2.enableNotificationsAndCheck())
        #expect(d2.usedFlags == 0)
    }

    @Test func inflightRegionResubmitsAfterRestart() throws {
        let m = try RingMemory()
        var d = SplitDriver(m, size: 8)
        let a = m.alloc(16)
        for i in 0..<8 { d.set(i, a, 16, 2, 0) }
        let regionMemory = UnsafeMutableRawPointer.allocate(byteCount: InflightQueueRegion.byteCount(queueSize: 8), alignment: 64)
        regionMemory.initializeMemory(as: UInt8.self, repeating: 0, count: InflightQueueRegion.byteCount(queueSize: 8))
        defer { regionMemory.deallocate() }
        do {
            let q = try Virtqueue(size: 8, options: VirtqueueOptions(), addresses: d.addresses, memory: m.memory, base: 0, segmentsPerSlot: 4)
            #expect(q.attachInflight(InflightQueueRegion(base: regionMemory, size: 8)) == 0)
            for h: UInt16 in [4, 2, 6] { d.publish(h) }
            for _ in 0..<3 { _ = q.pop() }
            q.push(head: 2, length: 16)
            _ = q.flush()
            // The back-end "dies" with 4 and 6 in flight.
        }
        #expect(d.usedIdx == 1)
        // A new back-end starts from the used index the front-end saw and resubmits 4 then 6.
        let q = try Virtqueue(size: 8, options: VirtqueueOptions(), addresses: d.addresses, memory: m.memory, base: 1, segmentsPerSlot: 4)
        #expect(q.attachInflight(InflightQueueRegion(base: regionMemory, size: 8)) == 2)
        #expect(q.pop().chain?.head == 4)
        #expect(q.pop().chain?.head == 6)
        #expect(q.pop().isEmpty)
        #expect(q.ringBase == 3)
    }

    @Test func buffersSplitAcrossRegions() throws {
        let m = try RingMemory(regionSize: 1 << 16, regions: 2)
        var d = SplitDriver(m, size: 4)
        let straddle = m.gpaBase + UInt64(m.regionSize) - 100
        d.set(0, straddle, 300, 2, 0)
        d.publish(0)
        let q = try Virtqueue(size: 4, options: VirtqueueOptions(), addresses: d.addresses, memory: m.memory, base: 0, segmentsPerSlot: 4)
        let c = try #require(q.pop().chain)
        #expect(c.writableCount == 2 && c.writableBytes == 300)
        #expect(c.writable[0].iov_len == 100 && c.writable[1].iov_len == 200)
        #expect(m.memory.pointer(guestPhysical: straddle, length: 300) == nil)
    }
}

/// Driver side of a packed ring.
struct PackedDriver {
    let m: RingMemory
    let size: Int
    let desc: UInt64, driverEvent: UInt64, deviceEvent: UInt64
    var next = 0
    var wrap = true

    init(_ m: RingMemory, size: Int) {
        self.m = m
        self.size = size
        desc = m.alloc(16 * size)
        driverEvent = m.alloc(4)
        deviceEvent = m.alloc(4)
    }

    var addresses: VirtqueueAddresses { VirtqueueAddresses(descriptorTable: m.user(desc), driverArea: m.user(driverEvent), deviceArea: m.user(deviceEvent)) }

    /// Makes a chain available (flags of the head written last).
    mutating func add(id: UInt16, _ buffers: [(UInt64, UInt32, Bool)], indirect: Bool = false) {
        let start = next
        let headWrap = wrap
        var headFlags: UInt16 = 0
        for (k, b) in buffers.enumerated() {
            let d = m.host(desc) + 16 * next
            d.storeBytes(of: b.0, as: UInt64.self)
            d.storeBytes(of: b.1, toByteOffset: 8, as: UInt32.self)
            d.storeBytes(of: id, toByteOffset: 12, as: UInt16.self)
            var flags: UInt16 = (k < buffers.count - 1 ? 1 : 0) | (b.2 ? 2 : 0) | (indirect ? 4 : 0)
            flags |= wrap ? 0x80 : 0x8000
            if next == start { headFlags = flags } else { d.storeBytes(of: flags, toByteOffset: 14, as: UInt16.self) }
            next += 1
            if next == size { next = 0; wrap.toggle() }
        }
        _ = headWrap
        csys_store_release_u16(m.host(desc) + 16 * start + 14, headFlags)
    }

    func used(at i: Int) -> (id: UInt16, len: UInt32, flags: UInt16) {
        let d = m.host(desc) + 16 * i
        return (d.load(fromByteOffset: 12, as: UInt16.self), d.load(fromByteOffset: 8, as: UInt32.self), d.load(fromByteOffset: 14, as: UInt16.self))
    }

    func setDriverEvent(flags: UInt16, offWrap: UInt16 = 0) {
        m.host(driverEvent).storeBytes(of: offWrap, as: UInt16.self)
        m.host(driverEvent).storeBytes(of: flags, toByteOffset: 2, as: UInt16.self)
    }
    var deviceEventFlags: UInt16 { m.host(deviceEvent).load(fromByteOffset: 2, as: UInt16.self) }
}

@Suite struct PackedVirtqueueTests {
    @Test func chainsWrapAroundAndUsedFlagsFollowTheWrapCounter() throws {
        let m = try RingMemory()
        var d = PackedDriver(m, size: 4)
        let opts = VirtqueueOptions(packed: true, indirect: true)
        let q = try Virtqueue(size: 4, options: opts, addresses: d.addresses, memory: m.memory, base: 0x8000, segmentsPerSlot: 8)
        #expect(!q.hasAvailable)
        let a = m.alloc(32), b = m.alloc(64)
        d.add(id: 2, [(a, 32, false), (b, 64, true)])
        d.add(id: 0, [(a, 8, false)])
        let c1 = try #require(q.pop().chain)
        #expect(c1.head == 2 && c1.ringEntries == 2 && c1.readableBytes == 32 && c1.writableBytes == 64)
        let c2 = try #require(q.pop().chain)
        #expect(c2.head == 0 && c2.ringEntries == 1)
        #expect(q.pop().isEmpty)
        q.push(head: 2, ringEntries: 2, length: 64)
        q.push(head: 0, ringEntries: 1, length: 0)
        #expect(q.flush())
        // Used entries at positions 0 and 2, with AVAIL|USED = wrap counter (1).
        #expect(d.used(at: 0).id == 2 && d.used(at: 0).len == 64 && d.used(at: 0).flags & 0x8080 == 0x8080)
        #expect(d.used(at: 2).id == 0 && d.used(at: 2).flags & 0x8080 == 0x8080)
        // The next chain wraps: positions 3 and 0 with the driver's wrap counter flipped.
        d.add(id: 1, [(a, 16, false), (b, 16, true)])
        let c3 = try #require(q.pop().chain)
        #expect(c3.head == 1 && c3.ringEntries == 2)
        q.push(head: 1, ringEntries: 2, length: 16)
        _ = q.flush()
        #expect(d.used(at: 3).id == 1 && d.used(at: 3).flags & 0x8080 == 0x8080)
        // Ring base: avail position 1 with wrap 0, used position 1 with wrap 0.
        #expect(q.ringBase == 1 | 1 << 16)
        // Indirect in a packed ring.
        let table = m.alloc(32)
        let t = m.host(table)
        t.storeBytes(of: a, as: UInt64.self); t.storeBytes(of: UInt32(16), toByteOffset: 8, as: UInt32.self)
        t.storeBytes(of: UInt16(0), toByteOffset: 14, as: UInt16.self)
        (t + 16).storeBytes(of: b, as: UInt64.self); (t + 16).storeBytes(of: UInt32(32), toByteOffset: 8, as: UInt32.self)
        (t + 16).storeBytes(of: UInt16(2), toByteOffset: 14, as: UInt16.self)
        d.add(id: 3, [(table, 32, false)], indirect: true)
        let c4 = try #require(q.pop().chain)
        #expect(c4.head == 3 && c4.readableBytes == 16 && c4.writableBytes == 32)
    }

    @Test func packedMalformedInput() throws {
        let m = try RingMemory()
        var d = PackedDriver(m, size: 4)
        let q = try Virtqueue(size: 4, options: VirtqueueOptions(packed: true), addresses: d.addresses, memory: m.memory, base: 0x8000, segmentsPerSlot: 8)
        let a = m.alloc(16)
        d.add(id: 1, [(a, 0, false)])  // zero length
        #expect(q.pop().invalidError == .zeroLength)
        q.push(head: 1, ringEntries: 1, length: 0)
        d.add(id: 9, [(a, 16, false)])  // id out of range
        #expect(q.pop().isBroken)
        // A chain that never ends (NEXT on every descriptor) breaks the queue.
        var d2 = PackedDriver(m, size: 4)
        let q2 = try Virtqueue(size: 4, options: VirtqueueOptions(packed: true), addresses: d2.addresses, memory: m.memory, base: 0x8000, segmentsPerSlot: 8)
        for i in 0..<4 {
            let p = m.host(d2.desc) + 16 * i
            p.storeBytes(of: a, as: UInt64.self)
            p.storeBytes(of: UInt32(16), toByteOffset: 8, as: UInt32.self)
            p.storeBytes(of: UInt16(0x80 | 1), toByteOffset: 14, as: UInt16.self)
        }
        d2.next = 0
        #expect(q2.pop().isBroken)
        #expect(q2.brokenReason.contains("longer than the queue"))
    }

    @Test func packedEventSuppression() throws {
        let m = try RingMemory()
        var d = PackedDriver(m, size: 8)
        let q = try Virtqueue(size: 8, options: VirtqueueOptions(packed: true, eventIndex: true), addresses: d.addresses,
                              memory: m.memory, base: 0x8000, segmentsPerSlot: 8)
        let a = m.alloc(16)
        d.setDriverEvent(flags: 1)  // disabled
        d.add(id: 0, [(a, 16, true)])
        _ = q.pop(); q.push(head: 0, ringEntries: 1, length: 16)
        #expect(!q.flush())
        d.setDriverEvent(flags: 2, offWrap: 0x8000 | 2)  // notify when position 2 (wrap 1) is used
        d.add(id: 1, [(a, 16, true)])
        _ = q.pop(); q.push(head: 1, ringEntries: 1, length: 16)
        #expect(!q.flush())  // used position now 2: descriptor 2 not yet used
        d.add(id: 2, [(a, 16, true)])
        _ = q.pop(); q.push(head: 2, ringEntries: 1, length: 16)
        #expect(q.flush())
        d.setDriverEvent(flags: 0)
        q.disableNotifications()
        #expect(d.deviceEventFlags == 1)
        #expect(!q.enableNotificationsAndCheck())
        #expect(d.deviceEventFlags == 0)
        d.add(id: 3, [(a, 16, true)])
        #expect(q.enableNotificationsAndCheck())
    }
}

@Suite struct GuestMemoryTests {
    @Test func translationChecksBoundsAndOverflow() throws {
        let m = try RingMemory(regionSize: 1 << 16, regions: 2)
        let mem = m.memory
        #expect(mem.regionCount == 2)
        #expect(mem.pointer(guestPhysical: m.gpaBase, length: 1 << 16) != nil)
        #expect(mem.pointer(guestPhysical: m.gpaBase, length: (1 << 16) + 1) == nil)
        #expect(mem.pointer(guestPhysical: m.gpaBase - 1, length: 1) == nil)
        #expect(mem.pointer(guestPhysical: UInt64.max, length: 2) == nil)
        #expect(mem.pointer(userAddress: m.userBase + 10, length: 10) == mem.pointer(guestPhysical: m.gpaBase + 10, length: 10))
        let v = UnsafeMutablePointer<iovec>.allocate(capacity: 2)
        defer { v.deallocate() }
        #expect(mem.translate(guestPhysical: m.gpaBase + (1 << 16) - 4, length: 8, write: false, into: v, start: 0, capacity: 2) == .ok(2))
        #expect(mem.translate(guestPhysical: m.gpaBase + (2 << 16) - 4, length: 8, write: false, into: v, start: 0, capacity: 2) == .outOfRange)
        #expect(mem.translate(guestPhysical: m.gpaBase + (1 << 16) - 4, length: 8, write: false, into: v, start: 1, capacity: 2) == .tooManySegments)
        #expect(mem.translate(guestPhysical: UInt64.max - 2, length: 8, write: false, into: v, start: 0, capacity: 2) == .outOfRange)
    }

    @Test func mappingRefusesBadRegions() throws {
        let fd = csys_memfd_create("small", 0)
        defer { close(fd) }
        _ = ftruncate(fd, 4096)
        #expect(throws: GuestMemoryError.fileTooSmall(index: 0, fileSize: 4096, needed: 8192)) {
            try GuestMemory.map([(GuestMemoryRegionDescriptor(guestPhysicalAddress: 0, size: 8192, userAddress: 0, mmapOffset: 0), fd)], limit: 8)
        }
        #expect(throws: GuestMemoryError.zeroSize(index: 0)) {
            try GuestMemory.map([(GuestMemoryRegionDescriptor(guestPhysicalAddress: 0, size: 0, userAddress: 0, mmapOffset: 0), fd)], limit: 8)
        }
        #expect(throws: GuestMemoryError.addressOverflow(index: 0)) {
            try GuestMemory.map([(GuestMemoryRegionDescriptor(guestPhysicalAddress: UInt64.max, size: 16, userAddress: 0, mmapOffset: 0), fd)], limit: 8)
        }
        let r = GuestMemoryRegionDescriptor(guestPhysicalAddress: 0, size: 4096, userAddress: 0, mmapOffset: 0)
        #expect(throws: GuestMemoryError.overlap(index: 1)) { try GuestMemory.map([(r, fd), (r, fd)], limit: 8) }
        #expect(throws: GuestMemoryError.tooManyRegions(limit: 1)) { try GuestMemory.map([(r, fd), (r, fd)], limit: 1) }
    }

    @Test func iovecTrimming() {
        let buf = UnsafeMutableRawPointer.allocate(byteCount: 100, alignment: 8)
        defer { buf.deallocate() }
        let v = UnsafeMutablePointer<iovec>.allocate(capacity: 3)
        defer { v.deallocate() }
        v[0] = iovec(iov_base: buf, iov_len: 10)
        v[1] = iovec(iov_base: buf + 10, iov_len: 30)
        v[2] = iovec(iov_base: buf + 40, iov_len: 60)
        let list = IOVectorList(base: v, count: 3)
        let side = UnsafeMutablePointer<iovec>.allocate(capacity: 2)
        defer { side.deallocate() }
        #expect(list.copyPrefix(25, into: side, capacity: 2) == 2)
        #expect(side[1].iov_len == 15)
        #expect(list.copyPrefix(45, into: side, capacity: 2) == nil)
        #expect(list.lastByte == buf + 99)
        let tail = list.droppingPrefix(25)!
        #expect(tail.count == 2 && tail[0].iov_base == buf + 25 && tail.totalLength == 75)
        let head = tail.droppingSuffix(61)!
        #expect(head.count == 1 && head.totalLength == 14)
        #expect(list.droppingPrefix(1000) == nil)
    }
}
