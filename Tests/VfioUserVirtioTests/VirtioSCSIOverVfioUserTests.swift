import BlockIO
import CSystem
import SCSI
import TestSupport
import Testing
import VfioUser
import VfioUserTestSupport
import VfioUserVirtio
import Virtio
import VirtioDevices
import VirtioTestSupport
#if canImport(Glibc)
import Glibc
#endif

/// A virtio-scsi device with LUN 0 (2048 blocks of 512 bytes) on a memory back-end, served as a virtio-pci function.
final class SCSIPCIFixture {
    let channel = MemoryChannel(bytes: 1 << 20)
    let log = TestLog()
    let controller: VfioUserVirtioController<VirtioSCSIDevice<MemoryChannel>>
    let path = testSocketPath("vfu-scsi")
    let ram = TestGuestRAM()
    let target = SCSITarget(name: "vfu-scsi")

    init() throws {
        try target.add(LogicalUnit(number: LogicalUnitNumber(0)!, identity: LogicalUnitIdentity(serial: "SGVFU0", naa: 0x5000_0000_0000_0001),
                                   geometry: BlockGeometry(logicalBlockSize: 512, physicalBlockSize: 512, blockCount: 2048), backendID: 0))
        let channel = self.channel
        let device = try VirtioSCSIDevice(target: target, options: VirtioSCSIOptions(requestQueues: 1, maxQueueSize: 256, expectedQueueSize: 32),
                                          channelFactory: { _ in channel }, log: log.logger)
        controller = try VfioUserVirtioController(socketPath: path, device: device, kind: .scsi, log: log.logger)
        try controller.start()
    }

    deinit { controller.stop() }
}

@Suite(.serialized) struct VirtioSCSIOverVfioUserTests {
    @Test func inquiryAndReadThroughTheCore() throws {
        let f = try SCSIPCIFixture()
        let (channel, path, ram) = (f.channel, f.path, f.ram)
        let d = try VirtioPCIDriver(path: path, ram: ram)
        #expect(try d.config(0x02, 2) == 0x1048)
        #expect(try d.config(0x09, 3) == 0x010000)
        #expect(d.msixTableSize == 4)  // control, event, one request queue, config
        #expect(try d.common(0x12, 2) == 3)
        try d.enableMSIX()
        #expect(try d.negotiate(wanted: ~VirtioFeature.ringPacked) == 0x0B)
        // num_queues in the device config: one request queue.
        #expect(try d.read(4, 0, 4) == 1)
        let rings = (0..<3).map { _ in TestSplitRing(ram: ram, size: 32) }
        for (i, r) in rings.enumerated() {
            try d.setupQueue(i, size: 32, desc: r.desc, driver: r.avail, device: r.used, vector: UInt16(i + 1))
        }
        try d.setStatus(0x0F)
        let lun: [UInt8] = [1, 0, 0x40, 0, 0, 0, 0, 0]
        // Commands as the Linux scan sends them: INQUIRY, then TEST UNIT READY until the power-on UNIT ATTENTION
        // is reported (CHECK CONDITION, sense key 6) and gone.
        func run(_ cdb: [UInt8], tag: UInt64, inLength: Int = 0) throws -> TestSCSIRequest {
            let before = rings[2].usedIndex
            let request = ram.scsiRequest(lun: lun, tag: tag, cdb: cdb, inLength: inLength)
            rings[2].publish(rings[2].addChain(request.buffers))
            try d.kick(2)
            #expect(waitFor { rings[2].usedIndex == before &+ 1 })
            return request
        }
        let inquiry = try run([0x12, 0, 0, 0, 96, 0], tag: 1, inLength: 96)
        #expect(d.waitInterrupt(d.vectorFDs[3]))
        #expect(ram.read(inquiry.response + 10, 2) == [0, 0])  // GOOD, VIRTIO_SCSI_S_OK
        #expect(ram.read(inquiry.dataIn, 1) == [0])  // direct-access block device
        var attentions = 0
        for tag in 2...5 {
            let tur = try run([0, 0, 0, 0, 0, 0], tag: UInt64(tag))
            if ram.read(tur.response + 10, 1) == [0] { break }
            #expect(ram.read(tur.response + 10, 1) == [2])
            #expect(ram.read(tur.response + 12 + 2, 1)[0] & 0x0F == 6)  // sense key UNIT ATTENTION
            attentions += 1
        }
        #expect(attentions <= 2)
        // READ(10) of LBA 5, two blocks, from the back-end's bytes.
        let pattern = (0..<1024).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ 1) }
        pattern.withUnsafeBytes { UnsafeMutableRawBufferPointer(rebasing: channel.storage[(5 * 512)..<(7 * 512)]).copyMemory(from: $0) }
        let before = rings[2].usedIndex
        let read = ram.scsiRequest(lun: lun, tag: 3, cdb: [0x28, 0, 0, 0, 0, 5, 0, 0, 2, 0], inLength: 1024)
        rings[2].publish(rings[2].addChain(read.buffers))
        try d.kick(2)
        #expect(waitFor { rings[2].usedIndex == before &+ 1 })
        #expect(ram.read(read.response + 10, 2) == [0, 0])
        #expect(ram.read(read.dataIn, 1024) == pattern)
    }
}
