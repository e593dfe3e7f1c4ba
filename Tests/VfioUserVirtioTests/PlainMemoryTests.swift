import BlockIO
import CSystem
import SCSI
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

extension VirtioPCIDriver {
    /// A driver whose guest RAM has no fd (QEMU with plain `-m`): the test client serves the server's
    /// DMA_READ/DMA_WRITE requests from it.
    static func plainMemory(path: String, ram: TestGuestRAM) throws -> VirtioPCIDriver {
        let d = try VirtioPCIDriver(path: path, ram: ram, withFD: false)
        d.client.dmaMemory = ram.host
        d.client.dmaBase = ram.gpaBase
        d.client.dmaSize = ram.size
        return d
    }

    /// Serves DMA requests until `condition` holds (`seconds` at most).
    func pump(seconds: Double = 5, until condition: () -> Bool) -> Bool {
        waitFor(seconds: seconds) {
            _ = try? client.pump(milliseconds: 5)
            return condition()
        }
    }
}

/// Guest RAM without fd: the rings run on the function's shadow, kept in step by DMA messages.
@Suite(.serialized) struct PlainMemoryTests {
    static let sharedMemoryFeatures = VirtioFeature.ringEventIndex | VirtioFeature.ringPacked

    /// A plain-memory driver with MSI-X, every offered feature, split queue 0 (16 entries) on vector 1, DRIVER_OK.
    static func blkDriver(_ f: BlkPCIFixture) throws -> (VirtioPCIDriver, TestSplitRing) {
        let d = try VirtioPCIDriver.plainMemory(path: f.path, ram: f.ram)
        try d.enableMSIX()
        #expect(try d.negotiate(wanted: ~0) == 0x0B)
        let ring = TestSplitRing(ram: f.ram, size: 16)
        try d.setupQueue(0, size: 16, desc: ring.desc, driver: ring.avail, device: ring.used, vector: 1)
        try d.setStatus(0x0F)
        return (d, ring)
    }

    @Test func virtioBlkWriteThenReadBackThroughDMAMessages() throws {
        let f = try BlkPCIFixture()
        let d = try VirtioPCIDriver.plainMemory(path: f.path, ram: f.ram)
        try d.enableMSIX()
        let offered = try d.deviceFeatures
        #expect(offered & Self.sharedMemoryFeatures == 0, "EVENT_IDX and packed rings are not offered")
        #expect(offered & VirtioFeature.ringIndirectDescriptors != 0)
        // A driver that takes EVENT_IDX anyway does not get FEATURES_OK.
        #expect(try d.negotiate(wanted: ~0, force: VirtioFeature.ringEventIndex) & 0x08 == 0)
        #expect(try d.negotiate(wanted: ~0) == 0x0B)
        try d.setCommon(0x10, 2, 0)
        let ring = TestSplitRing(ram: f.ram, size: 16)
        try d.setupQueue(0, size: 16, desc: ring.desc, driver: ring.avail, device: ring.used, vector: 1)
        try d.setStatus(0x0F)
        #expect(try d.status == 0x0F)
        // A sentinel in used->flags: it must survive (the device's NO_NOTIFY stays in the shadow).
        f.ram.pointer(ring.used).storeBytes(of: UInt16(0x5A00), as: UInt16.self)

        let pattern = (0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) }
        let w = f.request(type: VirtioBlk.typeOut, sector: 3, out: pattern)
        ring.publish(ring.addChain(w.buffers))
        try d.kick(0)
        #expect(d.pump { ring.usedIndex == 1 })
        #expect(d.waitInterrupt(d.vectorFDs[1]))
        #expect(f.ram.read(w.status, 1) == [0])
        #expect(f.channel.bytes(3 * 512, 4096) == pattern)
        #expect(ring.usedElement(0).id == 0 && ring.usedElement(0).len == 1)

        let r = f.request(type: VirtioBlk.typeIn, sector: 3, inLength: 4096)
        let readHead = ring.addIndirect(r.buffers)
        ring.publish(readHead)
        try d.kick(0)
        #expect(d.pump { ring.usedIndex == 2 })
        #expect(f.ram.read(r.status, 1) == [0])
        #expect(f.ram.read(r.dataIn, 4096) == pattern)
        #expect(ring.usedElement(1).id == UInt32(readHead) && ring.usedElement(1).len == 4097)

        // Several requests in one kick, wrapping the 16-entry ring.
        var statuses: [UInt64] = []
        for k in 0..<20 {  // 2 descriptors each: 5 per kick
            let flush = f.request(type: VirtioBlk.typeFlush, sector: 0)
            statuses.append(flush.status)
            ring.publish(ring.addChain(flush.buffers))
            if k % 5 == 4 {
                try d.kick(0)
                #expect(d.pump { ring.usedIndex == 2 &+ UInt16(k + 1) })
            }
        }
        #expect(statuses.allSatisfy { f.ram.read($0, 1) == [0] })
        #expect(f.ram.pointer(ring.used).load(as: UInt16.self) == 0x5A00, "used->flags never written")
        #expect(d.client.dmaReadsServed > 0 && d.client.dmaWritesServed > 0)
        #expect(f.log.contains("guest RAM has no fd"))
        try d.setStatus(0)
        #expect(f.log.contains("guest RAM without fd: 22 requests copied in (0 refused), 22 completed"))
    }

    @Test func memfdRAMWithSmallWindowsWithoutFDKeepsTheSharedMemoryPath() throws {
        // QEMU exports ROMs and VGA memory without an fd next to a memfd guest RAM: still the direct path.
        let f = try BlkPCIFixture()
        let d = try VirtioPCIDriver(path: f.path, ram: f.ram)
        #expect(try !d.client.dmaMap(address: 0xFD00_0000, size: 1 << 20, fd: nil).isError)
        #expect(try d.deviceFeatures & Self.sharedMemoryFeatures == Self.sharedMemoryFeatures)
        try d.enableMSIX()
        #expect(try d.negotiate(wanted: ~VirtioFeature.ringPacked) == 0x0B)
        #expect(f.controller.function.plainRings == nil)
        let ring = TestSplitRing(ram: f.ram, size: 16)
        try d.setupQueue(0, size: 16, desc: ring.desc, driver: ring.avail, device: ring.used, vector: 1)
        try d.setStatus(0x0F)
        let flush = f.request(type: VirtioBlk.typeFlush, sector: 0)
        ring.publish(ring.addChain(flush.buffers))
        try d.kick(0)
        #expect(waitFor { ring.usedIndex == 1 })
        #expect(d.client.dmaReadsServed == 0 && d.client.dmaWritesServed == 0)
    }

    @Test func intxWithoutMSIX() throws {
        let f = try BlkPCIFixture()
        let d = try VirtioPCIDriver.plainMemory(path: f.path, ram: f.ram)
        try d.enableINTx()
        #expect(try d.negotiate(wanted: ~0) == 0x0B)
        let ring = TestSplitRing(ram: f.ram, size: 16)
        try d.setupQueue(0, size: 16, desc: ring.desc, driver: ring.avail, device: ring.used, vector: 0xFFFF)
        try d.setStatus(0x0F)
        let flush = f.request(type: VirtioBlk.typeFlush, sector: 0)
        ring.publish(ring.addChain(flush.buffers))
        try d.kick(0)
        #expect(d.pump { ring.usedIndex == 1 })
        #expect(d.waitInterrupt(d.intxFD))
        #expect(try d.read(3, 0, 1) == 1)  // ISR queue bit, read to clear
        #expect(f.ram.read(flush.status, 1) == [0])
    }

    @Test func hostileChainsFailTheirRequestOnly() throws {
        let f = try BlkPCIFixture()
        let (d, ring) = try Self.blkDriver(f)
        let header = f.ram.alloc(16)
        // A loop: 0 -> 1 -> 0.
        ring.setDescriptor(0, addr: header, len: 16, flags: 1, next: 1)
        ring.setDescriptor(1, addr: header, len: 16, flags: 1, next: 0)
        ring.publish(0)
        // Outside every window.
        ring.setDescriptor(2, addr: 0x5000_0000, len: 512, flags: 0, next: 0)
        ring.publish(2)
        // A huge length from a valid address.
        ring.setDescriptor(3, addr: header, len: 0xFFFF_FF00, flags: 0, next: 0)
        ring.publish(3)
        // An indirect table of 2^16 descriptors.
        ring.setDescriptor(4, addr: header, len: 16 << 16, flags: 4, next: 0)
        ring.publish(4)
        // A next index past the table.
        ring.setDescriptor(5, addr: header, len: 16, flags: 1, next: 999)
        ring.publish(5)
        ring.nextFree = 6
        try d.kick(0)
        #expect(d.pump { ring.usedIndex == 5 })
        for i in 0..<5 { #expect(ring.usedElement(UInt16(i)).len == 0) }
        #expect(f.controller.function.plainRings?.refusedChains == 5)
        #expect(try d.status & 0x40 == 0)
        // The queue still serves good requests.
        let flush = f.request(type: VirtioBlk.typeFlush, sector: 0)
        ring.publish(ring.addChain(flush.buffers))
        try d.kick(0)
        #expect(d.pump { ring.usedIndex == 6 })
        #expect(f.ram.read(flush.status, 1) == [0])
        // An avail index beyond the ring: the device breaks the queue, nothing hangs.
        ring.setAvailIndex(ring.availIdx &+ 100)
        try d.kick(0)
        #expect(!d.pump(seconds: 0.5) { ring.usedIndex != 6 })
        // A DMA_READ the client refuses: the device needs a reset (config interrupt), a reset repairs it.
        d.client.dmaServing = .refuse
        #expect(try d.negotiate(wanted: ~0) == 0x0B)
        try d.setCommon(0x10, 2, 0)
        let ring2 = TestSplitRing(ram: f.ram, size: 16)
        try d.setupQueue(0, size: 16, desc: ring2.desc, driver: ring2.avail, device: ring2.used, vector: 1)
        // (The queue_enable write is acknowledged before the device's DMA_READ: the status follows.)
        #expect(waitFor { ((try? d.status) ?? 0) & 0x40 != 0 })
        #expect(f.log.contains("device needs reset"))
        d.client.dmaServing = .serve
        #expect(try d.negotiate(wanted: ~0) == 0x0B)
        try d.setupQueue(0, size: 16, desc: ring2.desc, driver: ring2.avail, device: ring2.used, vector: 1)
        try d.setStatus(0x0F)
        let again = f.request(type: VirtioBlk.typeFlush, sector: 0)
        ring2.publish(ring2.addChain(again.buffers))
        try d.kick(0)
        #expect(d.pump { ring2.usedIndex == 1 })
    }

    @Test func randomDescriptorTablesNeverCrashOrHang() throws {
        let f = try BlkPCIFixture()
        let d = try VirtioPCIDriver.plainMemory(path: f.path, ram: f.ram)
        try d.enableMSIX()
        var rng = SystemRandomNumberGenerator()
        let data = f.ram.alloc(64 << 10)
        for round in 0..<40 {
            #expect(try d.negotiate(wanted: ~0) == 0x0B)
            let ring = TestSplitRing(ram: f.ram, size: 16)
            try d.setupQueue(0, size: 16, desc: ring.desc, driver: ring.avail, device: ring.used, vector: 1)
            try d.setStatus(0x0F)
            for i in 0..<16 {
                let addr: UInt64 = [data, data + UInt64.random(in: 0..<(64 << 10), using: &rng), 0x5000_0000, UInt64.random(in: 0...UInt64.max, using: &rng)][Int.random(in: 0..<4, using: &rng)]
                let len: UInt32 = [16, UInt32.random(in: 0..<4096, using: &rng), 0xFFFF_FFFF, 16 << UInt32.random(in: 0..<20, using: &rng)][Int.random(in: 0..<4, using: &rng)]
                ring.setDescriptor(i, addr: addr, len: len, flags: UInt16.random(in: 0..<8, using: &rng), next: UInt16.random(in: 0..<20, using: &rng))
            }
            let count = Int.random(in: 1...(round % 5 == 4 ? 40 : 16), using: &rng)  // sometimes more than the ring holds
            for _ in 0..<count { ring.publish(UInt16.random(in: 0..<18, using: &rng)) }
            try d.kick(0)
            _ = d.pump(seconds: 0.05) { false }
            // A ring the driver broke (avail entries past the ring or the table) needs a reset; nothing else may.
            if try d.status & 0x40 != 0 { #expect(f.log.contains("device needs reset: queue 0: avail"), "round \(round)") }
            #expect(Int(ring.usedIndex) <= count)
        }
        #expect(f.controller.server.stats.dmaFailures == 0)
    }

    @Test func resetArrivingDuringADMAWait() throws {
        let f = try BlkPCIFixture()
        let (d, ring) = try Self.blkDriver(f)
        // The driver resets the device while the function waits for the reply to its first DMA_READ of the kick.
        d.client.onDMARequest = { client in
            var p = Payload()
            p.u64(0x14)
            p.u32(0)
            p.u32(1)
            p.bytes.append(0)
            let reply = try client.request(.regionWrite, p.bytes)
            #expect(!reply.isError)
        }
        let w = f.request(type: VirtioBlk.typeOut, sector: 1, out: [UInt8](repeating: 0x77, count: 512))
        ring.publish(ring.addChain(w.buffers))
        try d.kick(0)
        _ = d.pump(seconds: 0.5) { false }
        #expect(try d.status == 0)
        #expect(ring.usedIndex == 0)
        // The device starts again from scratch.
        try f.expectServes(d)
    }

    /// SeaBIOS enables its request queue, sets DRIVER_OK and notifies at once, then polls the used ring. With
    /// guest RAM without fd the enable waits for a DMA_READ (the guest's used index), and the driver's DRIVER_OK
    /// and notification arrive during that wait: the notification must not be dropped (it hung the boot).
    @Test func notificationArrivingWhileTheQueueIsBeingEnabled() throws {
        let f = try BlkPCIFixture()
        let d = try VirtioPCIDriver.plainMemory(path: f.path, ram: f.ram)
        try d.enableMSIX()
        #expect(try d.negotiate(wanted: ~0) == 0x0B)
        let ring = TestSplitRing(ram: f.ram, size: 16)
        let w = f.request(type: VirtioBlk.typeOut, sector: 2, out: [UInt8](repeating: 0x5C, count: 512))
        var hooked = false
        d.client.onDMARequest = { _ in
            hooked = true
            try d.setStatus(0x0F)
            ring.publish(ring.addChain(w.buffers))
            try d.kick(0)
        }
        try d.setupQueue(0, size: 16, desc: ring.desc, driver: ring.avail, device: ring.used, vector: 1)
        #expect(d.pump { ring.usedIndex == 1 }, "the notification sent during the enable's DMA wait was served")
        #expect(hooked)
        #expect(f.ram.read(w.status, 1) == [0])
        #expect(f.channel.bytes(2 * 512, 512) == [UInt8](repeating: 0x5C, count: 512))
        #expect(try d.status == 0x0F)
        #expect(!f.log.contains("ignored notification"))
    }

    /// A reset during the enable's DMA wait: the queue stays disabled, and the device starts again from scratch.
    @Test func resetArrivingWhileTheQueueIsBeingEnabled() throws {
        let f = try BlkPCIFixture()
        let d = try VirtioPCIDriver.plainMemory(path: f.path, ram: f.ram)
        try d.enableMSIX()
        #expect(try d.negotiate(wanted: ~0) == 0x0B)
        let ring = TestSplitRing(ram: f.ram, size: 16)
        var hooked = false
        d.client.onDMARequest = { _ in
            hooked = true
            try d.setStatus(0)
        }
        try d.setupQueue(0, size: 16, desc: ring.desc, driver: ring.avail, device: ring.used, vector: 1)
        _ = d.pump(seconds: 0.5) { false }
        #expect(hooked)
        #expect(try d.status == 0)
        try d.setCommon(0x16, 2, 0)
        #expect(try d.common(0x1C, 2) == 0, "queue 0 is not enabled after the reset")
        #expect(f.log.contains("reset while the queue was being enabled"))
        try f.expectServes(d)
    }

    @Test func windowUnmappedAndMappedAgainWhileTheRingRuns() throws {
        let f = try BlkPCIFixture()
        let (d, ring) = try Self.blkDriver(f)
        let w = f.request(type: VirtioBlk.typeOut, sector: 7, out: [UInt8](repeating: 0xC3, count: 512))
        ring.publish(ring.addChain(w.buffers))
        try d.kick(0)
        #expect(d.pump { ring.usedIndex == 1 })
        // The window holding ring and buffers goes; a kick meanwhile waits for it; it comes back (as QEMU does when
        // the guest's memory map changes): the request runs then, the shadow (used index 1) kept.
        #expect(try !d.client.dmaUnmap(address: f.ram.gpaBase, size: UInt64(f.ram.size)).isError)
        #expect(f.controller.function.deviceTableHeld)
        let r = f.request(type: VirtioBlk.typeIn, sector: 7, inLength: 512)
        ring.publish(ring.addChain(r.buffers))
        try d.kick(0)
        #expect(!d.pump(seconds: 0.3) { ring.usedIndex == 2 })
        #expect(try !d.client.dmaMap(address: f.ram.gpaBase, size: UInt64(f.ram.size), fd: nil).isError)
        #expect(!f.controller.function.deviceTableHeld)
        #expect(d.pump { ring.usedIndex == 2 })
        #expect(f.ram.read(r.dataIn, 512) == [UInt8](repeating: 0xC3, count: 512))
        #expect(f.log.contains("waiting for the next map"))
        #expect(try d.status & 0x40 == 0)
    }

    @Test func virtioSCSIReadWriteAndSenseThroughDMAMessages() throws {
        let f = try SCSIPCIFixture()
        let (channel, ram) = (f.channel, f.ram)
        let d = try VirtioPCIDriver.plainMemory(path: f.path, ram: ram)
        try d.enableMSIX()
        #expect(try d.deviceFeatures & Self.sharedMemoryFeatures == 0)
        #expect(try d.negotiate(wanted: ~0) == 0x0B)
        let rings = (0..<3).map { _ in TestSplitRing(ram: ram, size: 32) }
        for (i, r) in rings.enumerated() {
            try d.setupQueue(i, size: 32, desc: r.desc, driver: r.avail, device: r.used, vector: UInt16(i + 1))
        }
        try d.setStatus(0x0F)
        func run(_ cdb: [UInt8], tag: UInt64, out: [UInt8] = [], inLength: Int = 0) throws -> TestSCSIRequest {
            let before = rings[2].usedIndex
            let request = ram.scsiRequest(tag: tag, cdb: cdb, out: out, inLength: inLength)
            rings[2].publish(rings[2].addChain(request.buffers))
            try d.kick(2)
            #expect(d.pump { rings[2].usedIndex == before &+ 1 })
            return request
        }
        for tag in 1...4 {  // the power-on UNIT ATTENTION
            if ram.read(try run([0, 0, 0, 0, 0, 0], tag: UInt64(tag)).response + 10, 1) == [0] { break }
        }
        let pattern = (0..<1024).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ 1) }
        let write = try run([0x2A, 0, 0, 0, 0, 5, 0, 0, 2, 0], tag: 10, out: pattern)
        #expect(ram.read(write.response + 10, 2) == [0, 0])  // GOOD, VIRTIO_SCSI_S_OK
        #expect(channel.bytes(5 * 512, 1024) == pattern)
        let read = try run([0x28, 0, 0, 0, 0, 5, 0, 0, 2, 0], tag: 11, inLength: 1024)
        #expect(ram.read(read.response + 10, 2) == [0, 0])
        #expect(ram.read(read.dataIn, 1024) == pattern)
        // READ(10) past the end: CHECK CONDITION, ILLEGAL REQUEST, LBA OUT OF RANGE, in the guest's sense buffer.
        let bad = try run([0x28, 0, 0, 0, 0x10, 0, 0, 0, 1, 0], tag: 12, inLength: 512)
        #expect(ram.read(bad.response + 10, 1) == [2])
        let senseLength = ram.pointer(bad.response).load(as: UInt32.self)
        #expect(senseLength >= 14)
        let sense = ram.read(bad.response + 12, 14)
        #expect(sense[2] & 0x0F == 5 && sense[12] == 0x21)
        #expect(rings[2].usedFlags == 0)
        // Hotplug: an event buffer posted on the event queue gets the transport-reset event through DMA_WRITE.
        let event = ram.alloc(16)
        rings[1].publish(rings[1].addChain([.init(gpa: event, length: 16, writable: true)]))
        try d.kick(1)
        _ = d.pump(seconds: 0.2) { false }
        try f.target.add(LogicalUnit(number: LogicalUnitNumber(3)!, identity: LogicalUnitIdentity(serial: "SGPLAIN3", naa: 0x5000_0000_0000_0003),
                                     geometry: BlockGeometry(logicalBlockSize: 512, physicalBlockSize: 512, blockCount: 64), backendID: 0))
        #expect(d.pump { rings[1].usedIndex == 1 })
        #expect(ram.read(event, 16).readLE(UInt32.self, at: 0) == VirtioSCSI.Event.transportReset.rawValue)
        #expect(Array(ram.read(event, 16)[4..<8]) == [1, 0, 0, 3])  // LUN 3 (single-level, peripheral)
    }
}
