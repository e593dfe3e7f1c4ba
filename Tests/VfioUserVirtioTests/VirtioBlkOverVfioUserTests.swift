import BlockIO
import CSystem
import TestSupport
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

/// A virtio-blk device on a memory back-end, served as a virtio-pci function over a real vfio-user socket.
final class BlkPCIFixture: @unchecked Sendable {
    let channel = MemoryChannel(bytes: 1 << 20)
    let log = TestLog()
    let device: VirtioBlkDevice<MemoryChannel>
    let controller: VfioUserVirtioController<VirtioBlkDevice<MemoryChannel>>
    let ram = TestGuestRAM()
    let path = testSocketPath("vfu-blk")

    init(drainMilliseconds: Int32 = 30_000) throws {
        let channel = self.channel
        let geometry = BlockGeometry(logicalBlockSize: 512, physicalBlockSize: 512, blockCount: 2048)
        device = try VirtioBlkDevice(geometry: geometry,
                                     options: VirtioBlkOptions(queues: 1, maxQueueSize: 256, expectedQueueSize: 64, serial: "SG-VFU-BLK",
                                                               drainTimeoutMilliseconds: drainMilliseconds),
                                     channelFactory: { channel }, log: log.logger)
        controller = try VfioUserVirtioController(socketPath: path, device: device, kind: .blk, log: log.logger)
        try controller.start()
    }

    deinit { controller.stop() }

    /// A virtio-blk request: header (+ data out) readable, then data in and status writable.
    func request(type: UInt32, sector: UInt64, out: [UInt8] = [], inLength: Int = 0) -> (buffers: [TestSplitRing.Buffer], dataIn: UInt64, status: UInt64) {
        var buffers = ram.blkRequestOut(type: type, sector: sector, out: out)
        var dataIn: UInt64 = 0
        if inLength > 0 {
            dataIn = ram.alloc(inLength)
            buffers.append(.init(gpa: dataIn, length: UInt32(inLength), writable: true))
        }
        let status = ram.alloc(1)
        ram.write([0xFF], at: status)
        buffers.append(.init(gpa: status, length: 1, writable: true))
        return (buffers, dataIn, status)
    }

    /// A driver with MSI-X on, features negotiated (`wanted`), split queue 0 on vector 1, config on vector 0, DRIVER_OK.
    func splitDriver(wanted: UInt64 = ~VirtioFeature.ringPacked, size: Int = 64) throws -> (VirtioPCIDriver, TestSplitRing) {
        let d = try VirtioPCIDriver(path: path, ram: ram)
        try d.enableMSIX()
        #expect(try d.negotiate(wanted: wanted) == 0x0B)
        try d.setCommon(0x10, 2, 0)
        #expect(try d.common(0x10, 2) == 0)
        let ring = TestSplitRing(ram: ram, size: size)
        try d.setupQueue(0, size: size, desc: ring.desc, driver: ring.avail, device: ring.used, vector: 1)
        try d.setStatus(0x0F)
        return (d, ring)
    }
    /// The driver starts from scratch on fresh rings (reset, features, split queue 0 on vector 1, DRIVER_OK) and a
    /// FLUSH completes: the function serves. Waits with `pump`, which also answers DMA messages (guest RAM without fd).
    func expectServes(_ d: VirtioPCIDriver, sourceLocation: SourceLocation = #_sourceLocation) throws {
        #expect(try d.negotiate(wanted: ~VirtioFeature.ringPacked) == 0x0B, sourceLocation: sourceLocation)
        let ring = TestSplitRing(ram: ram, size: 16)
        try d.setupQueue(0, size: 16, desc: ring.desc, driver: ring.avail, device: ring.used, vector: 1)
        try d.setStatus(0x0F)
        #expect(try d.status == 0x0F, sourceLocation: sourceLocation)
        let flush = request(type: VirtioBlk.typeFlush, sector: 0)
        ring.publish(ring.addChain(flush.buffers))
        try d.kick(0)
        #expect(d.pump { ring.usedIndex == 1 }, sourceLocation: sourceLocation)
        #expect(ram.read(flush.status, 1) == [0], sourceLocation: sourceLocation)
    }
}

@Suite(.serialized) struct VirtioBlkOverVfioUserTests {
    @Test func identityCapabilitiesAndQueueRegisters() throws {
        let f = try BlkPCIFixture()
        let d = try VirtioPCIDriver(path: f.path, ram: f.ram)
        #expect(try d.config(0x00, 2) == 0x1AF4)
        #expect(try d.config(0x02, 2) == 0x1042)
        #expect(try d.config(0x08, 1) == 1)  // revision
        #expect(try d.config(0x09, 3) == 0x010000)  // mass storage, SCSI (as QEMU's virtio-blk-pci)
        #expect(try d.config(0x2C, 2) == 0x1AF4)
        #expect(try d.config(0x06, 2) & 0x10 != 0)  // capability list
        // Every virtio capability, in BAR 0 at the documented offsets; notify multiplier 4.
        #expect(d.caps[1]?.bar == 0 && d.caps[1]?.offset == 0x0000)
        #expect(d.caps[2]?.offset == 0x3000 && d.caps[2]?.multiplier == 4)
        #expect(d.caps[3]?.offset == 0x1000)
        #expect(d.caps[4]?.offset == 0x2000)
        #expect(d.msixCapOffset != 0 && d.msixTableSize == 2)  // one queue + config
        #expect(try d.common(0x12, 2) == 1)  // num_queues
        #expect(try d.common(0x18, 2) == 64)  // queue_size: the expected size as maximum
        let features = try d.deviceFeatures
        #expect(features & VirtioFeature.version1 != 0)
        #expect(features & VirtioFeature.ringPacked != 0)
        // Device config: capacity 2048 sectors, blk_size 512.
        #expect(try d.read(4, 0, 8) == 2048)
        #expect(try d.read(4, 20, 4) == 512)
        // Vectors beyond the table read back as NO_VECTOR.
        try d.setCommon(0x10, 2, 7)
        #expect(try d.common(0x10, 2) == 0xFFFF)
        try d.setCommon(0x10, 2, 1)
        #expect(try d.common(0x10, 2) == 1)
    }

    @Test func splitRingReadWriteFlushGetIDWithMSIX() throws {
        let f = try BlkPCIFixture()
        let (d, ring) = try f.splitDriver()
        let pattern = (0..<1024).map { UInt8(truncatingIfNeeded: $0 * 7 + 3) }
        let w = f.request(type: VirtioBlk.typeOut, sector: 3, out: pattern)
        ring.publish(ring.addChain(w.buffers))
        try d.kick(0)
        #expect(d.waitInterrupt(d.vectorFDs[1]))
        #expect(waitFor { ring.usedIndex == 1 })
        #expect(f.ram.read(w.status, 1) == [0])
        #expect(f.channel.bytes(3 * 512, 1024) == pattern)

        let r = f.request(type: VirtioBlk.typeIn, sector: 3, inLength: 1024)
        ring.publish(ring.addIndirect(r.buffers))  // indirect descriptors
        try d.kick(0)
        #expect(waitFor { ring.usedIndex == 2 })
        #expect(f.ram.read(r.status, 1) == [0])
        #expect(f.ram.read(r.dataIn, 1024) == pattern)
        #expect(ring.usedElement(1).len == 1025)

        let flush = f.request(type: VirtioBlk.typeFlush, sector: 0)
        ring.publish(ring.addChain(flush.buffers))
        let id = f.request(type: VirtioBlk.typeGetID, sector: 0, inLength: 20)
        ring.publish(ring.addChain(id.buffers))
        try d.kick(0)
        #expect(waitFor { ring.usedIndex == 4 })
        #expect(f.ram.read(flush.status, 1) == [0])
        #expect(f.ram.read(id.status, 1) == [0])
        #expect(Array(f.ram.read(id.dataIn, 10)) == Array("SG-VFU-BLK".utf8))
    }

    @Test func packedRing() throws {
        let f = try BlkPCIFixture()
        let d = try VirtioPCIDriver(path: f.path, ram: f.ram)
        try d.enableMSIX()
        #expect(try d.negotiate(wanted: ~0) == 0x0B)
        let ring = TestPackedRing(ram: f.ram, size: 32)
        try d.setupQueue(0, size: 32, desc: ring.desc, driver: ring.driverEvent, device: ring.deviceEvent, vector: 1)
        try d.setStatus(0x0F)
        let pattern = [UInt8](repeating: 0xA5, count: 512)
        let w = f.request(type: VirtioBlk.typeOut, sector: 9, out: pattern)
        ring.add(id: 5, w.buffers)
        try d.kick(0)
        #expect(d.waitInterrupt(d.vectorFDs[1]))
        #expect(waitFor { ring.isUsed(at: 0, wrap: true) })
        #expect(ring.used(at: 0).id == 5)
        #expect(f.channel.bytes(9 * 512, 512) == pattern)
        let r = f.request(type: VirtioBlk.typeIn, sector: 9, inLength: 512)
        let at = ring.add(id: 6, r.buffers)
        try d.kick(0)
        #expect(waitFor { ring.isUsed(at: at, wrap: true) })
        #expect(f.ram.read(r.dataIn, 512) == pattern)
    }

    @Test func resetMidIODrainsAndReturnsToPowerOn() throws {
        let f = try BlkPCIFixture()
        let (d, ring) = try f.splitDriver()
        f.channel.hold.store(true, ordering: .releasing)
        let w = f.request(type: VirtioBlk.typeOut, sector: 1, out: [UInt8](repeating: 0x11, count: 512))
        ring.publish(ring.addChain(w.buffers))
        try d.kick(0)
        #expect(waitFor { f.channel.inFlight == 1 })
        let channel = f.channel
        let releaser = Thread { usleep(300_000); channel.releaseHeld() }
        try d.setStatus(0)  // returns once the ring drained
        releaser.join()
        #expect(try d.status == 0)
        #expect(ring.usedIndex == 1, "the request in flight completed before the reset finished")
        #expect(f.ram.read(w.status, 1) == [0])
        #expect(try d.common(0x1C, 2) == 0)  // queue disabled
        #expect(try d.common(0x1A, 2) == 0xFFFF)
        #expect(try d.common(0x10, 2) == 0xFFFF)
        #expect(try d.common(0x18, 2) == 64)
        // The driver starts again from scratch on fresh rings.
        try f.expectServes(d)
    }

    @Test func resizeRaisesTheConfigInterrupt() throws {
        let f = try BlkPCIFixture()
        let (d, _) = try f.splitDriver()
        let generation = try d.common(0x15, 1)
        f.device.resize(blockCount: 4096)
        #expect(d.waitInterrupt(d.vectorFDs[0]))
        #expect(try d.read(4, 0, 8) == 4096)
        #expect(try d.common(0x15, 1) != generation)
        #expect(try d.read(3, 0, 1) & 2 != 0)  // ISR: configuration change, cleared by the read
        #expect(try d.read(3, 0, 1) == 0)
    }

    @Test func intxFallbackSetsISRAndSignalsTheLine() throws {
        let f = try BlkPCIFixture()
        let d = try VirtioPCIDriver(path: f.path, ram: f.ram)
        try d.enableINTx()
        #expect(try d.negotiate(wanted: ~VirtioFeature.ringPacked) == 0x0B)
        let ring = TestSplitRing(ram: f.ram, size: 16)
        try d.setupQueue(0, size: 16, desc: ring.desc, driver: ring.avail, device: ring.used, vector: 0xFFFF)
        try d.setStatus(0x0F)
        let flush = f.request(type: VirtioBlk.typeFlush, sector: 0)
        ring.publish(ring.addChain(flush.buffers))
        try d.kick(0)
        #expect(d.waitInterrupt(d.intxFD))
        #expect(ring.usedIndex == 1)
        #expect(try d.read(3, 0, 1) == 1)  // ISR queue bit, read to clear
        #expect(try d.read(3, 0, 1) == 0)
    }

    @Test func hostileRegisterWritesAreRefusedWithoutHarm() throws {
        let f = try BlkPCIFixture()
        let d = try VirtioPCIDriver(path: f.path, ram: f.ram)
        try d.enableMSIX()
        // A feature the device did not offer: FEATURES_OK does not stick.
        #expect(try d.negotiate(wanted: ~VirtioFeature.ringPacked, force: 1 << 50) & 0x08 == 0)
        // Without VERSION_1 (a legacy driver): refused too.
        try d.setStatus(0)
        try d.setStatus(3)
        try d.setCommon(0x08, 4, 1)
        try d.setCommon(0x0C, 4, 0)
        try d.setStatus(0x0B)
        #expect(try d.status & 0x08 == 0)
        // A queue enabled before FEATURES_OK stays off.
        let ring = TestSplitRing(ram: f.ram, size: 16)
        try d.setupQueue(0, size: 16, desc: ring.desc, driver: ring.avail, device: ring.used, vector: 1)
        #expect(try d.common(0x1C, 2) == 0)
        // Odd widths, offsets between fields, read-only fields, a queue that does not exist, a huge size.
        try d.setCommon(0x14, 2, 0)  // status is one byte: a 2-byte write at it is refused
        try d.setCommon(0x21, 1, 0xFF)  // inside queue_desc
        try d.setCommon(0x12, 2, 9)  // num_queues is read-only
        #expect(try d.common(0x12, 2) == 1)
        try d.setCommon(0x16, 2, 5)
        try d.setCommon(0x18, 2, 16)
        #expect(try d.common(0x18, 2) == 0)
        try d.setCommon(0x16, 2, 0)
        try d.setCommon(0x18, 2, 4096)
        #expect(try d.common(0x18, 2) == 16)
        try d.write(4, 0, 8, 0)  // capacity is read-only
        #expect(try d.read(4, 0, 8) == 2048)
        // Notifications for queues that do not run.
        try d.kick(0)
        for offset: UInt64 in [0x3002, 0x3FFC] {
            var p = Payload()
            p.u64(offset)
            p.u32(0)
            p.u32(2)
            p.u16(0)
            let (_, bytes) = d.client.message(.regionWrite, p.bytes, flags: VfioUserHeader.noReply)
            d.client.sendRaw(bytes)
        }
        // A split ring whose size is not a power of 2 breaks the device (NEEDS_RESET), a reset repairs it.
        #expect(try d.negotiate(wanted: ~VirtioFeature.ringPacked) == 0x0B)
        try d.setupQueue(0, size: 12, desc: ring.desc, driver: ring.avail, device: ring.used, vector: 1)
        #expect(try d.status & 0x40 != 0)
        // A ring outside guest memory: the same.
        #expect(try d.negotiate(wanted: ~VirtioFeature.ringPacked) == 0x0B)
        try d.setupQueue(0, size: 16, desc: 0x1000, driver: 0x2000, device: 0x3000, vector: 1)
        #expect(try d.status & 0x40 != 0)
        #expect(try d.common(0x1C, 2) == 0)
        // Clearing status bits without a reset is refused.
        #expect(try d.negotiate(wanted: ~VirtioFeature.ringPacked) == 0x0B)
        try d.setStatus(0x03)
        #expect(try d.status == 0x0B)
        // Still serving after all of it.
        try d.setupQueue(0, size: 16, desc: ring.desc, driver: ring.avail, device: ring.used, vector: 1)
        try d.setStatus(0x0F)
        let flush = f.request(type: VirtioBlk.typeFlush, sector: 0)
        ring.publish(ring.addChain(flush.buffers))
        try d.kick(0)
        #expect(waitFor { ring.usedIndex == 1 })
        #expect(f.log.contains("ignored"))
    }

    @Test func dmaUnmapAndMapWhileTheRingRuns() throws {
        let f = try BlkPCIFixture()
        let (d, ring) = try f.splitDriver()
        // A second window (another memfd) comes and goes while the ring runs; I/O continues.
        let extra = TestGuestRAM(size: 1 << 20)
        let extraBase: UInt64 = 0x2_0000_0000
        #expect(try !d.client.dmaMap(address: extraBase, size: UInt64(extra.size), fd: extra.fd).isError)
        let w = f.request(type: VirtioBlk.typeFlush, sector: 0)
        ring.publish(ring.addChain(w.buffers))
        try d.kick(0)
        #expect(waitFor { ring.usedIndex == 1 })
        #expect(try !d.client.dmaUnmap(address: extraBase, size: UInt64(extra.size)).isError)
        let w2 = f.request(type: VirtioBlk.typeFlush, sector: 0)
        ring.publish(ring.addChain(w2.buffers))
        try d.kick(0)
        #expect(waitFor { ring.usedIndex == 2 })
        #expect(try d.status & 0x40 == 0)
        // The window holding the ring goes and comes back (QEMU does so when the guest's memory map changes): the ring
        // keeps running on the device's table meanwhile, and takes the new table once the ring is inside it again.
        #expect(try !d.client.dmaUnmap(address: f.ram.gpaBase, size: UInt64(f.ram.size)).isError)
        #expect(try d.status & 0x40 == 0)
        #expect(f.controller.function.deviceTableHeld)
        #expect(try !d.client.dmaMap(address: f.ram.gpaBase, size: UInt64(f.ram.size), fd: f.ram.fd).isError)
        #expect(!f.controller.function.deviceTableHeld)
        let w3 = f.request(type: VirtioBlk.typeFlush, sector: 0)
        ring.publish(ring.addChain(w3.buffers))
        try d.kick(0)
        #expect(waitFor { ring.usedIndex == 3 })
    }
}

/// A joinable thread for tests.
final class Thread: @unchecked Sendable {
    private var thread: pthread_t? = nil
    init(_ body: @escaping @Sendable () -> Void) {
        final class Box { let body: () -> Void; init(_ b: @escaping () -> Void) { body = b } }
        let box = Unmanaged.passRetained(Box(body)).toOpaque()
        var t = pthread_t()
        pthread_create(&t, nil, { arg in
            Unmanaged<Box>.fromOpaque(arg!).takeRetainedValue().body()
            return nil
        }, box)
        thread = t
    }
    func join() { if let thread { pthread_join(thread, nil) } }
}
