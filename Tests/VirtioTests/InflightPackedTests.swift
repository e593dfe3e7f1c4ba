import BlockIO
import CSystem
import Testing
import Virtio
#if canImport(Glibc)
import Glibc
#endif

/// Packed-ring in-flight tracking (vhost-user INFLIGHT_SHMFD): a restarted back-end resubmits what
/// the driver still waits for, from the descriptors the region saved.
@Suite struct InflightPackedTests {
    static let size = 8
    static let options = VirtqueueOptions(packed: true, indirect: true)

    final class Region {
        let bytes = InflightPackedRegion.byteCount(queueSize: InflightPackedTests.size)
        let base: UnsafeMutableRawPointer
        init() {
            base = .allocate(byteCount: bytes, alignment: 64)
            base.initializeMemory(as: UInt8.self, repeating: 0, count: bytes)
        }
        deinit { base.deallocate() }
        func make() -> InflightPackedRegion { InflightPackedRegion(base: base, size: InflightPackedTests.size, usedPosition: 0, usedWrap: true) }
    }

    /// Driver posts ids 2 (2 descriptors), 5 (1) and 1 (3); the back-end pops all and returns 5.
    static func firstLife(_ m: RingMemory, _ d: inout PackedDriver, _ region: Region, complete5: Bool = true) throws
        -> (a: UInt64, b: UInt64, c: UInt64, region: InflightPackedRegion) {
        let a = m.alloc(16), b = m.alloc(32), c = m.alloc(48)
        let q = try Virtqueue(size: size, options: options, addresses: d.addresses, memory: m.memory, base: 0x8000, segmentsPerSlot: 8)
        let r = region.make()
        #expect(q.attachInflight(packed: r) == 0)
        d.add(id: 2, [(a, 16, false), (b, 32, true)])
        d.add(id: 5, [(c, 48, false)])
        d.add(id: 1, [(a, 8, false), (b, 8, false), (c, 8, true)])
        #expect(q.pop().chain?.head == 2)
        #expect(q.pop().chain?.head == 5)
        #expect(q.pop().chain?.head == 1)
        if complete5 {
            q.push(head: 5, ringEntries: 1, length: 0)
            _ = q.flush()
            // The used entry of 5 overwrote the head descriptor of 2 at position 0.
            #expect(d.used(at: 0).id == 5)
        }
        return (a, b, c, r)
    }

    @Test func restartedBackendResubmitsFromSavedDescriptorsInPopOrder() throws {
        let m = try RingMemory()
        var d = PackedDriver(m, size: Self.size)
        let region = Region()
        let (a, b, c, _) = try Self.firstLife(m, &d, region)
        // The back-end dies with 2 and 1 in flight; the VMM's base is stale (avail 0, used 0).
        let q = try Virtqueue(size: Self.size, options: Self.options, addresses: d.addresses, memory: m.memory, base: 0x8000,
                              segmentsPerSlot: 8)
        #expect(q.attachInflight(packed: region.make()) == 2)
        #expect(q.hasAvailable)
        let c2 = try #require(q.pop().chain)
        #expect(c2.head == 2 && c2.ringEntries == 2 && c2.readableBytes == 16 && c2.writableBytes == 32)
        #expect(c2.readable[0].iov_base == UnsafeMutableRawPointer(m.host(a)) && c2.writable[0].iov_base == UnsafeMutableRawPointer(m.host(b)))
        let c1 = try #require(q.pop().chain)
        #expect(c1.head == 1 && c1.ringEntries == 3 && c1.readableBytes == 16 && c1.writableBytes == 8)
        #expect(c1.writable[0].iov_base == UnsafeMutableRawPointer(m.host(c)))
        #expect(q.pop().isEmpty)
        // Used continues after 5's entry (position 1); avail after the 6 entries the driver posted.
        #expect(q.ringBase == 6 | 0x8000 | 1 << 16 | 0x8000_0000)
        q.push(head: 1, ringEntries: 3, length: 8)
        q.push(head: 2, ringEntries: 2, length: 32)
        _ = q.flush()
        #expect(d.used(at: 1).id == 1 && d.used(at: 1).flags & 0x8080 == 0x8080)
        #expect(d.used(at: 4).id == 2 && d.used(at: 4).flags & 0x8080 == 0x8080)
        // New requests continue at the driver's position.
        d.add(id: 3, [(a, 4, false)])
        #expect(q.pop().chain?.head == 3)
        // A third life resubmits only 3.
        let q3 = try Virtqueue(size: Self.size, options: Self.options, addresses: d.addresses, memory: m.memory, base: 0, segmentsPerSlot: 8)
        #expect(q3.attachInflight(packed: region.make()) == 1)
        #expect(q3.pop().chain?.head == 3)
        #expect(q3.pop().isEmpty)
    }

    @Test func aHalfDoneUsedUpdateIsRolledBackOrCommittedByTheRingFlags() throws {
        // Crash after the region recorded 5's return but before its used descriptor was written: 5 is resubmitted.
        do {
            let m = try RingMemory()
            var d = PackedDriver(m, size: Self.size)
            let region = Region()
            let r = try Self.firstLife(m, &d, region, complete5: false).region
            r.willComplete(id: 5, usedPosition: 1, usedWrap: true)
            let q = try Virtqueue(size: Self.size, options: Self.options, addresses: d.addresses, memory: m.memory, base: 0x8000,
                                  segmentsPerSlot: 8)
            #expect(q.attachInflight(packed: region.make()) == 3)
            #expect([q.pop().chain?.head, q.pop().chain?.head, q.pop().chain?.head] == [2, 5, 1])
            #expect(q.ringBase == 6 | 0x8000 | 0 << 16 | 0x8000_0000)
        }
        // Crash after the used descriptor became visible but before the snapshot: the update is committed.
        do {
            let m = try RingMemory()
            var d = PackedDriver(m, size: Self.size)
            let region = Region()
            let r = try Self.firstLife(m, &d, region, complete5: false).region
            r.willComplete(id: 5, usedPosition: 1, usedWrap: true)
            let used = m.host(d.desc)
            used.storeBytes(of: UInt16(5), toByteOffset: 12, as: UInt16.self)
            csys_store_release_u16(used + 14, 0x8080)
            let q = try Virtqueue(size: Self.size, options: Self.options, addresses: d.addresses, memory: m.memory, base: 0x8000,
                                  segmentsPerSlot: 8)
            #expect(q.attachInflight(packed: region.make()) == 2)
            #expect([q.pop().chain?.head, q.pop().chain?.head] == [2, 1])
            #expect(q.ringBase == 6 | 0x8000 | 1 << 16 | 0x8000_0000)
        }
    }

    @Test func aFreshOrIdleRegionKeepsTheRingBase() throws {
        let m = try RingMemory()
        var d = PackedDriver(m, size: Self.size)
        let region = Region()
        let q = try Virtqueue(size: Self.size, options: Self.options, addresses: d.addresses, memory: m.memory,
                              base: 3 | 0x8000 | 3 << 16 | 0x8000_0000, segmentsPerSlot: 8)
        #expect(q.attachInflight(packed: region.make()) == 0)
        #expect(q.ringBase == 3 | 0x8000 | 3 << 16 | 0x8000_0000)
        // Pop and return everything: a restart resubmits nothing and keeps the VMM's base.
        d.next = 3
        let a = m.alloc(16)
        d.add(id: 4, [(a, 16, true)])
        #expect(q.pop().chain?.head == 4)
        q.push(head: 4, ringEntries: 1, length: 16)
        _ = q.flush()
        let q2 = try Virtqueue(size: Self.size, options: Self.options, addresses: d.addresses, memory: m.memory,
                               base: 4 | 0x8000 | 4 << 16 | 0x8000_0000, segmentsPerSlot: 8)
        #expect(q2.attachInflight(packed: region.make()) == 0)
        #expect(q2.ringBase == 4 | 0x8000 | 4 << 16 | 0x8000_0000)
    }

    /// QEMU cannot read a killed back-end's packed ring position: it hands the restarted one the base it last
    /// set (here the start, 0 with wrap 1). With nothing in flight, the region's recorded position wins, and
    /// the driver's next request (at position 3) is seen.
    @Test func anIdleRegionOverridesTheStaleBaseAfterACrash() throws {
        let m = try RingMemory()
        var d = PackedDriver(m, size: Self.size)
        let region = Region()
        let q = try Virtqueue(size: Self.size, options: Self.options, addresses: d.addresses, memory: m.memory, base: 0x8000,
                              segmentsPerSlot: 8)
        #expect(q.attachInflight(packed: region.make()) == 0)
        let a = m.alloc(16)
        for id: UInt16 in [0, 1, 2] { d.add(id: id, [(a, 16, true)]) }
        for id: UInt16 in [0, 1, 2] {
            #expect(q.pop().chain?.head == id)
            q.push(head: id, ringEntries: 1, length: 16)
        }
        _ = q.flush()
        let q2 = try Virtqueue(size: Self.size, options: Self.options, addresses: d.addresses, memory: m.memory, base: 0x8000,
                               segmentsPerSlot: 8)
        #expect(q2.attachInflight(packed: region.make()) == 0)
        #expect(q2.ringBase == 3 | 0x8000 | 3 << 16 | 0x8000_0000)
        d.add(id: 4, [(a, 16, true)])
        #expect(q2.pop().chain?.head == 4)
    }

    @Test func aHostileRegionNeverCrashesOrLoops() throws {
        var seed: UInt64 = 0x9E37_79B9_7F4A_7C15
        func random() -> UInt64 {
            seed ^= seed << 13
            seed ^= seed >> 7
            seed ^= seed << 17
            return seed
        }
        for round in 0..<300 {
            let m = try RingMemory()
            let d = PackedDriver(m, size: Self.size)
            let region = Region()
            let bytes = region.base.assumingMemoryBound(to: UInt8.self)
            for i in 0..<region.bytes { bytes[i] = UInt8(truncatingIfNeeded: random()) }
            // Keep it "valid looking" most of the time so that recovery really walks it.
            if round % 4 != 0 {
                region.base.storeBytes(of: UInt16(1), toByteOffset: 8, as: UInt16.self)
                region.base.storeBytes(of: UInt16(Self.size), toByteOffset: 10, as: UInt16.self)
                for e in 0..<Self.size where random() % 2 == 0 {
                    let p = region.base + 32 + 32 * e
                    p.storeBytes(of: UInt16(truncatingIfNeeded: random() % 10), toByteOffset: 2, as: UInt16.self)
                    p.storeBytes(of: UInt16(truncatingIfNeeded: random() % 10), toByteOffset: 4, as: UInt16.self)
                    p.storeBytes(of: UInt16(truncatingIfNeeded: random() % 4), toByteOffset: 6, as: UInt16.self)
                    p.storeBytes(of: UInt16(truncatingIfNeeded: random() % 10), toByteOffset: 16, as: UInt16.self)
                    p.storeBytes(of: m.gpaBase + random() % 4096, toByteOffset: 24, as: UInt64.self)
                    p.storeBytes(of: UInt32(truncatingIfNeeded: random() % 600), toByteOffset: 20, as: UInt32.self)
                }
            }
            let q = try Virtqueue(size: Self.size, options: Self.options, addresses: d.addresses, memory: m.memory, base: 0x8000,
                                  segmentsPerSlot: 8)
            let n = q.attachInflight(packed: region.make())
            #expect(n <= Self.size)
            var popped = 0
            var done = false
            while !done && popped <= Self.size + 1 {
                switch q.pop() {
                case let .chain(c): q.push(head: c.head, ringEntries: c.ringEntries, length: 0)
                case let .invalid(head, entries, _): q.push(head: head, ringEntries: entries, length: 0)
                case .empty, .broken: done = true
                }
                popped += 1
            }
            #expect(done, "recovery of round \(round) kept producing requests")
        }
    }
}
