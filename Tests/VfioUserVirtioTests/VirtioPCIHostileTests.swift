import CSystem
import Testing
import VfioUser
import VfioUserTestSupport
@testable import VfioUserVirtio
import Virtio
import VirtioDevices
import VirtioTestSupport
#if canImport(Glibc)
import Glibc
#endif

/// Every malformed-input class the PVSCSI tests cover (HostileGuestTests, VfioUserProtocolTests), against the
/// virtio-pci function: each bad access fails that request (an errno reply, or a refused and logged register write)
/// or sets DEVICE_NEEDS_RESET; nothing crashes or hangs, and the function serves again (after a device reset where
/// the virtio spec asks for one).
@Suite(.serialized) struct VirtioPCIHostileTests {
    static let bar0: UInt32 = 0
    static let msixBAR: UInt32 = 1

    func msixDriver(_ f: BlkPCIFixture) throws -> VirtioPCIDriver {
        let d = try VirtioPCIDriver(path: f.path, ram: f.ram)
        try d.enableMSIX()
        return d
    }

    // MARK: Regions

    @Test func regionAccessesOutsideABarOrWithBadCountsAreRefused() throws {
        let f = try BlkPCIFixture()
        let d = try msixDriver(f)
        let c = d.client
        let refused: [(UInt32, UInt64, UInt32)] = [
            (Self.bar0, 0x4000, 4),  // just past BAR 0
            (Self.bar0, 0x3FFE, 4),  // runs past its end
            (Self.bar0, UInt64.max - 1, 4),  // offset + count wraps
            (Self.bar0, 0, 0), (Self.bar0, 0, 3), (Self.bar0, 0, 5), (Self.bar0, 0, 16),  // BAR widths are 1, 2, 4, 8
            (Self.bar0, 0x2000, 0x10_0001),  // above the transfer maximum
            (Self.msixBAR, 0x10_0000, 4),  // past the MSI-X BAR
            (2, 0, 4), (3, 0, 4), (4, 0, 4), (5, 0, 4),  // BARs the function does not have
            (6, 0, 4), (8, 0, 4), (9, 0, 4), (0xFFFF_FFFF, 0, 4),  // ROM, VGA, no such region
            (UInt32(VfioPCIRegion.config), 254, 4), (UInt32(VfioPCIRegion.config), 0, 0x10_0001),
        ]
        for (region, offset, count) in refused {
            #expect(try c.regionRead(region, offset: offset, count: count).errorNumber == EINVAL, "read region \(region) 0x\(String(offset, radix: 16)) +\(count)")
            let data = [UInt8](repeating: 0xFF, count: min(Int(count), 64))
            if Int(count) == data.count {
                #expect(try c.regionWrite(region, offset: offset, data: data).errorNumber == EINVAL, "write region \(region) 0x\(String(offset, radix: 16)) +\(count)")
            }
        }
        // A payload whose length does not match its count.
        var p = Payload()
        p.u64(0x14); p.u32(Self.bar0); p.u32(1)
        p.bytes += [0x0F, 0x0F]
        #expect(try c.request(.regionWrite, p.bytes).errorNumber == EINVAL)
        #expect(try d.status == 0)  // nothing of it reached device_status
        try f.expectServes(d)
    }

    @Test func oddAccessesToEveryVirtioStructureAreHarmless() throws {
        let f = try BlkPCIFixture()
        let d = try msixDriver(f)
        let c = d.client
        let function = f.controller.function
        #expect(try d.negotiate(wanted: ~VirtioFeature.ringPacked) == 0x0B)
        func read(_ offset: UInt64, _ count: UInt32) throws -> [UInt8] {
            let r = try c.regionRead(Self.bar0, offset: offset, count: count)
            #expect(!r.isError, "BAR 0 read at 0x\(String(offset, radix: 16)) of \(count)")
            return Array(r.payload.dropFirst(16))
        }
        func write(_ offset: UInt64, _ bytes: [UInt8]) throws {
            #expect(try !c.regionWrite(Self.bar0, offset: offset, data: bytes).isError, "BAR 0 write at 0x\(String(offset, radix: 16))")
        }
        // Common config: a read across two fields and reads past the last field read as 0; partial, misaligned and
        // read-only writes are refused and leave every field as it was.
        let before = f.log.all.count
        #expect(try read(0x00, 8) == [UInt8](repeating: 0, count: 8))  // device_feature_select + device_feature
        #expect(try read(0x13, 2) == [0, 0])  // num_queues' high byte and device_status
        #expect(try read(0x3C, 4) == [0, 0, 0, 0])
        #expect(try read(0xFFC, 4) == [0, 0, 0, 0])
        let ignored = function.ignoredWrites
        try write(0x21, [0xFF])  // inside queue_desc
        try write(0x16, [0x01])  // half of queue_select
        try write(0x0D, [1, 2, 3, 4])  // misaligned driver_feature
        try write(0x20, [1, 2])  // two bytes of a 64-bit address
        try write(0x12, [9, 0])  // num_queues is read-only
        try write(0x15, [7])  // config_generation is read-only
        try write(0x1E, [3, 0])  // queue_notify_off is read-only
        try write(0x3C, [1, 0, 0, 0])  // past the last field
        try write(0x100, [1, 0, 0, 0, 0, 0, 0, 0])  // in the common page, outside the structure
        #expect(function.ignoredWrites >= ignored + 8)
        #expect(try d.common(0x12, 2) == 1)
        #expect(try d.common(0x16, 2) == 0)
        #expect(try d.common(0x20, 8) == 0)
        #expect(try d.status == 0x0B)
        // ISR: only its first byte exists; a wide read returns it (and clears it), the rest of its page reads 0; writes
        // are refused.
        #expect(try read(0x1001, 1) == [0])
        #expect(try read(0x1FF8, 8) == [UInt8](repeating: 0, count: 8))
        #expect(try read(0x1000, 8) == [UInt8](repeating: 0, count: 8))
        try write(0x1000, [0xFF])
        #expect(try read(0x1000, 1) == [0])
        // Device config: reads past the structure read 0, writes to read-only fields (capacity) or past it are refused.
        #expect(try read(0x2FF8, 8) == [UInt8](repeating: 0, count: 8))
        try write(0x2000, [0, 0, 0, 0, 0, 0, 0, 0])
        try write(0x2FFC, [1, 2, 3, 4])
        try write(0x2FFF, [1])
        #expect(try d.read(4, 0, 8) == 2048)
        // Notify: misaligned, odd widths, queues that do not exist or do not run; reads of the area read 0.
        let notifies = function.ignoredNotifies
        for (offset, bytes) in [(UInt64(0x3000), [UInt8](repeating: 0, count: 2)), (0x3001, [0]), (0x3002, [0, 0]),
                                (0x3000, [0]), (0x3000, [0, 0, 0, 0, 0, 0, 0, 0]), (0x3004, [1, 0]), (0x3FFC, [0xFF, 0x03])] {
            try write(offset, bytes)
        }
        #expect(function.ignoredNotifies == notifies + 7)
        #expect(try read(0x3000, 4) == [0, 0, 0, 0])
        // MSI-X table and PBA (BAR 1): emulated by the VMM; reads give 0, writes change nothing here.
        #expect(try !c.regionWrite(Self.msixBAR, offset: 0, data: [UInt8](repeating: 0xFF, count: 8)).isError)
        let table = try c.regionRead(Self.msixBAR, offset: 0, count: 8)
        #expect(!table.isError && Array(table.payload.dropFirst(16)) == [UInt8](repeating: 0, count: 8))
        #expect(try !c.regionRead(Self.msixBAR, offset: 0x1000, count: 8).isError)
        #expect(f.log.all.count > before)
        try f.expectServes(d)
    }

    // MARK: Interrupts

    @Test func setIRQsWithBadIndexStartCountOrFDsIsRefused() throws {
        let f = try BlkPCIFixture()
        let d = try VirtioPCIDriver(path: f.path, ram: f.ram)
        let c = d.client
        var fds: [Int32] = []
        for _ in 0..<20 { fds.append(csys_eventfd(0, 1)) }
        defer { for fd in fds { close(fd) } }
        let msix = UInt32(VfioPCIIRQ.msix)
        let vectors = UInt32(d.msixTableSize)
        let eventfdTrigger: UInt32 = 4 | 32
        #expect(vectors == 2)
        #expect(try c.setIRQs(index: 5, flags: eventfdTrigger, start: 0, count: 1, fds: [fds[0]]).errorNumber == EINVAL)
        #expect(try c.setIRQs(index: 0xFFFF_FFFF, flags: eventfdTrigger, start: 0, count: 1, fds: [fds[0]]).errorNumber == EINVAL)
        #expect(try c.setIRQs(index: msix, flags: eventfdTrigger, start: vectors, count: 1, fds: [fds[0]]).errorNumber == EINVAL)
        #expect(try c.setIRQs(index: msix, flags: eventfdTrigger, start: 0, count: vectors + 1,
                              fds: Array(fds.prefix(Int(vectors) + 1))).errorNumber == EINVAL)
        #expect(try c.setIRQs(index: msix, flags: eventfdTrigger, start: 0xFFFF_FFFF, count: 2, fds: [fds[0], fds[1]]).errorNumber == EINVAL)
        #expect(try c.setIRQs(index: msix, flags: eventfdTrigger, start: 0, count: 2, fds: [fds[0]]).errorNumber == EINVAL)
        #expect(try c.setIRQs(index: msix, flags: eventfdTrigger, start: 0, count: 1, fds: [fds[0], fds[1]]).errorNumber == EINVAL)
        #expect(try c.setIRQs(index: msix, flags: 1 | 32, start: 0, count: 1, fds: [fds[0]]).errorNumber == EINVAL)  // fds without DATA_EVENTFD
        #expect(try c.setIRQs(index: msix, flags: 1 | 2 | 32, start: 0, count: 1).errorNumber == EINVAL)  // two data types
        #expect(try c.setIRQs(index: msix, flags: 2 | 32, start: 0, count: 2, data: [1]).errorNumber == EINVAL)  // bool array short
        #expect(try c.setIRQs(index: msix, flags: 0x40 | 1 | 32, start: 0, count: 1).errorNumber == EINVAL)  // unknown flag
        #expect(try c.setIRQs(index: msix, flags: eventfdTrigger, start: 0, count: 17, fds: Array(fds.prefix(17))).errorNumber == EINVAL)
        #expect(try c.setIRQs(index: UInt32(VfioPCIIRQ.intx), flags: eventfdTrigger, start: 1, count: 1, fds: [fds[0]]).errorNumber == EINVAL)
        #expect(try c.setIRQs(index: UInt32(VfioPCIIRQ.msi), flags: eventfdTrigger, start: 0, count: 1, fds: [fds[0]]).isError)  // no MSI
        #expect(try c.setIRQs(index: UInt32(VfioPCIIRQ.err), flags: eventfdTrigger, start: 0, count: 1, fds: [fds[0]]).isError)
        // A vector past the table written into queue_msix_vector reads back as NO_VECTOR.
        try d.setCommon(0x16, 2, 0)
        try d.setCommon(0x1A, 2, UInt64(vectors))
        #expect(try d.common(0x1A, 2) == 0xFFFF)
        // Then a well-formed set-up works, and the queue's interrupt arrives on its vector.
        try d.enableMSIX()
        let (d2, ring) = (d, TestSplitRing(ram: f.ram, size: 16))
        #expect(try d2.negotiate(wanted: ~VirtioFeature.ringPacked) == 0x0B)
        try d2.setupQueue(0, size: 16, desc: ring.desc, driver: ring.avail, device: ring.used, vector: 1)
        try d2.setStatus(0x0F)
        let flush = f.request(type: VirtioBlk.typeFlush, sector: 0)
        ring.publish(ring.addChain(flush.buffers))
        try d2.kick(0)
        #expect(d2.waitInterrupt(d2.vectorFDs[1]))
        #expect(ring.usedIndex == 1)
    }

    // MARK: DMA

    @Test func dmaMapLiesAreRefusedAndLeaveTheTableAlone() throws {
        let f = try BlkPCIFixture()
        let d = try msixDriver(f)
        let c = d.client
        let small = csys_memfd_create("small", 0)
        defer { close(small) }
        #expect(ftruncate(small, 0x2000) == 0)
        let base = f.ram.gpaBase
        let size = UInt64(f.ram.size)
        #expect(try c.dmaMap(address: base + 0x1000, size: 0x1000, fd: small).errorNumber == EEXIST)  // inside the RAM window
        #expect(try c.dmaMap(address: base - 0x1000, size: 0x2000, fd: small).errorNumber == EEXIST)  // overlaps its start
        #expect(try c.dmaMap(address: base + size - 0x1000, size: 0x2000, fd: small).errorNumber == EEXIST)  // and its end
        #expect(try c.dmaMap(address: 0x1000_0000, size: 0, fd: small).errorNumber == EINVAL)
        #expect(try c.dmaMap(address: 0x1000_0000, size: 0x4000, fd: small).errorNumber == EINVAL)  // fd smaller than the window
        #expect(try c.dmaMap(address: 0x1000_0000, size: 0x1000, offset: 0x2000, fd: small).errorNumber == EINVAL)  // offset at its end
        #expect(try c.dmaMap(address: 0x1000_0000, size: 0x1000, offset: UInt64.max & ~0xFFF, fd: small).errorNumber == EINVAL)
        #expect(try c.dmaMap(address: 0x1000_0800, size: 0x1000, fd: small).errorNumber == EINVAL)  // unaligned
        #expect(try c.dmaMap(address: UInt64.max & ~0xFFF, size: 0x2000, fd: small).errorNumber == EINVAL)  // wraps
        #expect(try c.dmaMap(address: 0x1000_0000, size: 0x1000, flags: 0x10, fd: small).errorNumber == EINVAL)
        let eventfd = csys_eventfd(0, 1)
        defer { close(eventfd) }
        #expect(try c.dmaMap(address: 0x1000_0000, size: 0x1000, fd: eventfd).isError)  // not memory
        var two = Payload()
        two.u32(32); two.u32(3); two.u64(0); two.u64(0x1000_0000); two.u64(0x1000)
        #expect(try c.request(.dmaMap, two.bytes, fds: [small, small]).errorNumber == EINVAL)
        #expect(try c.dmaUnmap(address: 0x5000_0000, size: 0x1000).errorNumber == EINVAL)  // never mapped
        #expect(try c.dmaUnmap(address: base, size: 0x1000).errorNumber == EINVAL)  // part of a window
        #expect(try c.dmaUnmap(address: base, size: size, flags: 1).errorNumber == ENOTSUP)  // dirty bitmap
        #expect(try c.dmaUnmap(address: base, size: size, flags: 2).errorNumber == EINVAL)  // unmap-all with a range
        // Only the RAM window is mapped: a ring in it runs.
        #expect(f.controller.function.memoryTable.regionCount == 1)
        try f.expectServes(d)
    }

    @Test func unmappingTheWindowARunningRingUsesKeepsTheRingsMemoryUntilReset() throws {
        let f = try BlkPCIFixture()
        let (d, ring) = try f.splitDriver()
        let function = f.controller.function
        // Unmap every window (VFIO_DMA_UNMAP_FLAG_ALL) under the running ring and never map it again: the device keeps
        // the table it has (its windows stay mapped through it), so the ring neither faults nor reads freed memory.
        #expect(try !d.client.dmaUnmap(address: 0, size: 0, flags: 2).isError)
        #expect(function.deviceTableHeld)
        #expect(function.memoryTable.regionCount == 0)
        let w = f.request(type: VirtioBlk.typeOut, sector: 5, out: [UInt8](repeating: 0x5A, count: 512))
        ring.publish(ring.addChain(w.buffers))
        try d.kick(0)
        #expect(waitFor { ring.usedIndex == 1 })
        #expect(f.channel.bytes(5 * 512, 512) == [UInt8](repeating: 0x5A, count: 512))
        #expect(try d.status & 0x40 == 0)
        // A reset stops the ring; a new ring in memory that is not mapped any more breaks the device.
        try d.setStatus(0)
        #expect(try d.negotiate(wanted: ~VirtioFeature.ringPacked) == 0x0B)
        let ring2 = TestSplitRing(ram: f.ram, size: 16)
        try d.setupQueue(0, size: 16, desc: ring2.desc, driver: ring2.avail, device: ring2.used, vector: 1)
        #expect(try d.status & 0x40 != 0)
        #expect(try d.common(0x1C, 2) == 0)
        // Mapped again and reset: it serves.
        #expect(try !d.client.dmaMap(address: f.ram.gpaBase, size: UInt64(f.ram.size), fd: f.ram.fd).isError)
        try d.setStatus(0)
        try f.expectServes(d)
    }

    // MARK: Rings

    @Test func ringAddressesOutsideMemoryBreakTheDeviceUntilReset() throws {
        let f = try BlkPCIFixture()
        let d = try msixDriver(f)
        let ring = TestSplitRing(ram: f.ram, size: 16)
        let end = f.ram.gpaBase + UInt64(f.ram.size)
        let bad: [(UInt64, UInt64, UInt64)] = [
            (end - 16 * 8, ring.avail, ring.used),  // descriptor table runs past the window
            (ring.desc, end - 4, ring.used),  // driver area runs past it
            (ring.desc, ring.avail, end),  // device area just past it
            (ring.desc, ring.avail, UInt64.max - 8),  // wraps
            (0, ring.avail, ring.used),  // below every window
            (f.ram.gpaBase - 0x100, ring.avail, ring.used),  // straddles the window's start
        ]
        for (desc, driver, device) in bad {
            #expect(try d.negotiate(wanted: ~VirtioFeature.ringPacked) == 0x0B)
            try d.setupQueue(0, size: 16, desc: desc, driver: driver, device: device, vector: 1)
            #expect(try d.status & 0x40 != 0, "ring at 0x\(String(desc, radix: 16)) 0x\(String(driver, radix: 16)) 0x\(String(device, radix: 16))")
            #expect(try d.common(0x1C, 2) == 0)
        }
        // A packed ring outside memory: the same.
        #expect(try d.negotiate(wanted: ~0) == 0x0B)
        try d.setupQueue(0, size: 16, desc: end - 0x40, driver: ring.avail, device: ring.used, vector: 1)
        #expect(try d.status & 0x40 != 0)
        try f.expectServes(d)
    }

    @Test func descriptorsOutsideMemoryFailOnlyTheirRequest() throws {
        let f = try BlkPCIFixture()
        let (d, ring) = try f.splitDriver()
        let end = f.ram.gpaBase + UInt64(f.ram.size)
        // Data-in buffer past the window, a header below it, an indirect table outside it.
        var r = f.request(type: VirtioBlk.typeIn, sector: 0, inLength: 512)
        r.buffers[1] = .init(gpa: end - 256, length: 512, writable: true)
        ring.publish(ring.addChain(r.buffers))
        var h = f.request(type: VirtioBlk.typeFlush, sector: 0)
        h.buffers[0] = .init(gpa: 0x1000, length: 16, writable: false)
        ring.publish(ring.addChain(h.buffers))
        try d.kick(0)
        #expect(waitFor { ring.usedIndex == 2 })
        #expect(ring.usedElement(0).len == 0 && ring.usedElement(1).len == 0)
        #expect(f.ram.read(r.status, 1) == [0xFF] && f.ram.read(h.status, 1) == [0xFF])  // untouched
        let ok = f.request(type: VirtioBlk.typeFlush, sector: 0)
        ring.publish(ring.addChain(ok.buffers))
        try d.kick(0)
        #expect(waitFor { ring.usedIndex == 3 })
        #expect(f.ram.read(ok.status, 1) == [0])
        #expect(try d.status & 0x40 == 0)
    }

    @Test func queueSizeZeroNotAPowerOfTwoOrAboveTheMaximum() throws {
        let f = try BlkPCIFixture()
        let d = try msixDriver(f)
        #expect(try d.negotiate(wanted: ~VirtioFeature.ringPacked) == 0x0B)
        try d.setCommon(0x16, 2, 0)
        for size: UInt64 in [0, 65, 128, 0xFFFF] {
            try d.setCommon(0x18, 2, size)
            #expect(try d.common(0x18, 2) == 64, "queue_size \(size) is refused")
        }
        try d.setCommon(0x18, 2, 48)
        #expect(try d.common(0x18, 2) == 48)
        let ring = TestSplitRing(ram: f.ram, size: 48)
        try d.setupQueue(0, size: 48, desc: ring.desc, driver: ring.avail, device: ring.used, vector: 1)
        #expect(try d.status & 0x40 != 0)  // a split ring of 48 is not a power of 2
        #expect(try d.common(0x1C, 2) == 0)
        // Registers of an enabled queue are fixed until reset.
        try d.setStatus(0)
        #expect(try d.negotiate(wanted: ~VirtioFeature.ringPacked) == 0x0B)
        let good = TestSplitRing(ram: f.ram, size: 16)
        try d.setupQueue(0, size: 16, desc: good.desc, driver: good.avail, device: good.used, vector: 1)
        try d.setCommon(0x18, 2, 32)
        try d.setCommon(0x20, 4, 0x1000)
        try d.setCommon(0x1C, 2, 0)
        #expect(try d.common(0x18, 2) == 16)
        #expect(try d.common(0x20, 8) == good.desc)
        #expect(try d.common(0x1C, 2) == 1)
        try d.setStatus(0)
        try f.expectServes(d)
    }

    @Test func queueSelectOutOfRangeReadsZeroAndTakesNoWrites() throws {
        let f = try BlkPCIFixture()
        let d = try msixDriver(f)
        #expect(try d.negotiate(wanted: ~VirtioFeature.ringPacked) == 0x0B)
        let ring = TestSplitRing(ram: f.ram, size: 16)
        for select: UInt64 in [1, 2, 0x3FF, 0xFFFF] {
            try d.setupQueue(Int(select), size: 16, desc: ring.desc, driver: ring.avail, device: ring.used, vector: 1)
            #expect(try d.common(0x16, 2) == select)
            #expect(try d.common(0x18, 2) == 0)
            #expect(try d.common(0x1A, 2) == 0xFFFF)
            #expect(try d.common(0x1C, 2) == 0)
            #expect(try d.common(0x1E, 2) == 0)
            #expect(try d.common(0x20, 8) == 0)
        }
        try d.setCommon(0x16, 2, 0)
        #expect(try d.common(0x18, 2) == 64)
        #expect(try d.common(0x20, 8) == 0)
        #expect(try d.status == 0x0B)
        try f.expectServes(d)
    }

    /// The avail index jumps past the ring, or an entry names a descriptor past the table: the ring breaks, the device
    /// sets DEVICE_NEEDS_RESET and tells the driver with the config interrupt; a reset repairs it.
    @Test(arguments: [false, true])
    func aRingTheDriverBreaksSetsNeedsResetUntilReset(headPastTheTable: Bool) throws {
        let f = try BlkPCIFixture()
        let (d, ring) = try f.splitDriver()
        if headPastTheTable { ring.publish(200) } else { ring.setAvailIndex(100) }
        try d.kick(0)
        #expect(waitFor { ((try? d.status) ?? 0) & 0x40 != 0 })
        #expect(d.waitInterrupt(d.vectorFDs[0]))
        #expect(ring.usedIndex == 0)
        #expect(f.log.contains("device needs reset: queue 0"))
        try f.expectServes(d)
    }

    @Test func aDeviceThatNeedsResetRefusesIOUntilReset() throws {
        let f = try BlkPCIFixture()
        let d = try msixDriver(f)
        #expect(try d.negotiate(wanted: ~VirtioFeature.ringPacked) == 0x0B)
        try d.setCommon(0x10, 2, 0)
        try d.setStatus(0x0F)
        let end = f.ram.gpaBase + UInt64(f.ram.size)
        try d.setupQueue(0, size: 16, desc: end, driver: end, device: end, vector: 1)
        #expect(try d.status & 0x40 != 0)
        #expect(d.waitInterrupt(d.vectorFDs[0]))  // the config interrupt tells the driver
        // Broken: a well-placed ring does not start, kicks do nothing, the status bit stays whatever the driver writes.
        let ring = TestSplitRing(ram: f.ram, size: 16)
        try d.setupQueue(0, size: 16, desc: ring.desc, driver: ring.avail, device: ring.used, vector: 1)
        #expect(try d.common(0x1C, 2) == 0)
        let flush = f.request(type: VirtioBlk.typeFlush, sector: 0)
        ring.publish(ring.addChain(flush.buffers))
        try d.kick(0)
        try d.setStatus(0x0F)
        #expect(try d.status & 0x40 != 0)
        usleep(100_000)
        #expect(ring.usedIndex == 0)
        #expect(f.ram.read(flush.status, 1) == [0xFF])
        // A reset clears it.
        try d.setStatus(0)
        #expect(try d.status == 0)
        try f.expectServes(d)
    }
}
