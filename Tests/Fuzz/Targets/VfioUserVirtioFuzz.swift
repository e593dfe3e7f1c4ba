import Backends
import BlockIO
import CSystem
import Gateway
import TestSupport
import VfioUser
import VfioUserVirtio
import Virtio
import VirtioDevices
#if canImport(Glibc)
import Glibc
#endif

/// The virtio-scsi (LUNs 0 and 2, two request queues) and virtio-blk devices as the gateway serves them over vfio-user
/// (`VfioUserVirtioController`, null back-ends), started once per process on sockets in a scratch directory.
final class VfioUserVirtioFixture: @unchecked Sendable {
    let scsiSocket: String
    let blkSocket: String
    let scsi: VfioUserVirtioController<VirtioSCSIDevice<AnyBlockChannel>>
    let blk: VfioUserVirtioController<VirtioBlkDevice<AnyBlockChannel>>

    init() {
        let dir = scratchDirectory("vfio-virtio")
        scsiSocket = dir + "/scsi.sock"
        blkSocket = dir + "/blk.sock"
        let (backend, target) = nullSCSITarget(name: "fuzz-vfu-scsi", serial: "VFU", naa: 0x6001_4052_0000_0000)
        let quiet = TestLog.quiet
        // A short drain timeout: the event queue holds its buffers until an event, so every reset waits for it.
        let scsiDevice = try! VirtioSCSIDevice(target: target,
                                               options: VirtioSCSIOptions(requestQueues: 2, maxQueueSize: 256, expectedQueueSize: 256,
                                                                          drainTimeoutMilliseconds: 100, watchdogMilliseconds: 0),
                                               channelFactory: { _ in try backend.makeChannel() }, log: quiet)
        let blkDevice = try! VirtioBlkDevice(geometry: backend.geometry,
                                             options: VirtioBlkOptions(maxQueueSize: 256, expectedQueueSize: 256, serial: "FUZZVFU",
                                                                       drainTimeoutMilliseconds: 100, watchdogMilliseconds: 0),
                                             channelFactory: { try backend.makeChannel() }, log: quiet)
        scsi = try! VfioUserVirtioController(socketPath: scsiSocket, device: scsiDevice, kind: .scsi, log: quiet)
        blk = try! VfioUserVirtioController(socketPath: blkSocket, device: blkDevice, kind: .blk, log: quiet)
        try! scsi.start()
        try! blk.start()
    }
}

/// A hostile vfio-user client of the virtio-pci functions: raw message streams with fds (framing, DMA map/unmap,
/// region accesses to every virtio structure, SET_IRQS, resets) on top of a driver that brings a ring up the way
/// Linux's virtio_pci_modern does, over a ring image in a 64 KiB memfd window at IOVA 0, on the real server.
///
/// Input: target flags (bit 0: virtio-blk, else virtio-scsi; bit 1: raw stream only, no driver and no ring; bit 2: no
/// kick at the end), 32 extra driver feature bits (ORed into the low word: device-specific bits, or ones never
/// offered), a 16-bit length and that many bytes of message chunks (see `sendChunks`) sent after the driver's set-up,
/// then a ring image as in `virtio-scsi`/`virtio-blk` (flags: bit 0 EVENT_IDX, bit 1 INDIRECT_DESC, bit 2 packed,
/// bits 3-4 the virtio-scsi queue; size selector; base and used index (unused here: a virtio-pci ring starts at 0);
/// the descriptor table at 0, the driver area at 0x2000, the device area at 0x3000, guest memory from 0x4000).
/// The connection is half-closed afterwards and the harness waits until the server closed it.
public enum VfioUserVirtioFuzz {
    static let ramSize = 64 << 10
    static let bar0: UInt32 = 0

    final class State: @unchecked Sendable {
        let fixture = VfioUserVirtioFixture()
        let ram = SharedRAM(size: VfioUserVirtioFuzz.ramSize, name: "fuzz-vfu-guest")
    }

    nonisolated(unsafe) static var state: State?

    /// A REGION_WRITE of `bytes` at BAR 0 `offset`, posted (no reply), as QEMU sends BAR writes.
    static func barWrite(_ offset: UInt64, _ value: UInt64, _ count: Int) -> [UInt8] {
        var s = SeedBytes()
        s.u64(offset); s.u32(bar0); s.u32(UInt32(count))
        for i in 0 ..< count { s.u8(UInt8(truncatingIfNeeded: value >> (8 * UInt64(i)))) }
        return VfioUserMessageFuzz.message(0x7000, VfioUserCommand.regionWrite.rawValue, s.bytes, flags: VfioUserHeader.noReply)
    }

    /// VERSION, then waits for its reply: the server has then finished with the previous connection (its disconnect
    /// resets the function and drains the rings before the next client is served).
    static func hello(_ client: UnixClient) -> Bool {
        var version = SeedBytes()
        version.u16(0); version.u16(1)
        version.append(Array(#"{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576}}"#.utf8) + [0])
        guard client.send(VfioUserMessageFuzz.message(1, VfioUserCommand.version.rawValue, version.bytes)),
              let header = client.receive(16) else { return false }
        let size = Int(header[4]) | Int(header[5]) << 8 | Int(header[6]) << 16 | Int(header[7]) << 24
        guard size >= 16, size <= 4096 else { return false }
        return size == 16 || client.receive(size - 16) != nil
    }

    /// The driver's set-up of queue `index` over the ring image (the ring starts serving at queue_enable).
    static func driver(queues: Int, index: Int, size: Int, features: UInt64, client: UnixClient, ram: SharedRAM, vectors: [Int32]) -> Bool {
        var map = SeedBytes()
        map.u32(32); map.u32(3); map.u64(0); map.u64(0); map.u64(UInt64(ramSize))
        var irqs = SeedBytes()
        irqs.u32(20); irqs.u32(4 | 32); irqs.u32(UInt32(VfioPCIIRQ.msix)); irqs.u32(0); irqs.u32(UInt32(vectors.count))
        guard client.send(VfioUserMessageFuzz.message(2, VfioUserCommand.dmaMap.rawValue, map.bytes), fds: [ram.fd]),
              client.send(VfioUserMessageFuzz.message(3, VfioUserCommand.deviceSetIRQs.rawValue, irqs.bytes), fds: vectors) else { return false }
        typealias C = VirtioPCILayout.Common
        var writes: [UInt8] = []
        for status: UInt64 in [0, 1, 3] { writes += barWrite(UInt64(C.deviceStatus), status, 1) }
        writes += barWrite(UInt64(C.driverFeatureSelect), 0, 4) + barWrite(UInt64(C.driverFeature), features & 0xFFFF_FFFF, 4)
        writes += barWrite(UInt64(C.driverFeatureSelect), 1, 4) + barWrite(UInt64(C.driverFeature), features >> 32, 4)
        writes += barWrite(UInt64(C.deviceStatus), 0x0B, 1) + barWrite(UInt64(C.configMSIXVector), 0, 2)
        writes += barWrite(UInt64(C.queueSelect), UInt64(index), 2) + barWrite(UInt64(C.queueSize), UInt64(size), 2)
        writes += barWrite(UInt64(C.queueMSIXVector), UInt64(min(index + 1, queues)), 2)
        writes += barWrite(UInt64(C.queueDesc), 0, 8) + barWrite(UInt64(C.queueDriver), 0x2000, 8) + barWrite(UInt64(C.queueDevice), 0x3000, 8)
        writes += barWrite(UInt64(C.queueEnable), 1, 2) + barWrite(UInt64(C.deviceStatus), 0x0F, 1)
        return client.send(writes)
    }

    static func run(_ data: UnsafeRawBufferPointer) {
        if state == nil { state = State() }
        let s = state!
        var r = FuzzReader(data)
        let flags = r.u8()
        let blk = flags & 1 != 0
        let raw = flags & 2 != 0
        let extraFeatures = UInt64(r.u32())
        let stream = r.take(Int(r.u16()))
        let ringFlags = r.u8()
        let packed = ringFlags & 4 != 0
        let size = packed ? Int(r.u8()) % 256 + 1 : 1 << (Int(r.u8()) % 9)
        _ = r.u16()
        _ = r.u16()
        let fixture = s.fixture
        guard let client = UnixClient(path: blk ? fixture.blkSocket : fixture.scsiSocket) else { return }
        let queues = blk ? fixture.blk.device.queueCount : fixture.scsi.device.queueCount
        let index = blk ? 0 : Int((ringFlags >> 3) & 3)
        var vectors: [Int32] = []
        defer { for fd in vectors { close(fd) } }
        if !raw {
            guard hello(client) else { return }
            s.ram.clear()
            s.ram.load(r.take(16 * size), at: 0)
            s.ram.load(r.take(packed ? 4 : 6 + 2 * size), at: 0x2000)
            s.ram.load(r.rest(), at: 0x4000)
            vectors = (0 ..< queues + 1).map { _ in csys_eventfd(0, 1) }
            var features = VirtioFeature.version1 | extraFeatures
            if packed { features |= VirtioFeature.ringPacked }
            if ringFlags & 1 != 0 { features |= VirtioFeature.ringEventIndex }
            if ringFlags & 2 != 0 { features |= VirtioFeature.ringIndirectDescriptors }
            guard driver(queues: queues, index: index, size: size, features: features, client: client, ram: s.ram, vectors: vectors) else { return }
        }
        var chunks = FuzzReader(stream)
        sendChunks(&chunks, on: client)
        if flags & 4 == 0 {
            _ = client.send(barWrite(VirtioPCILayout.notifyOffset + UInt64(index) * UInt64(VirtioPCILayout.notifyOffMultiplier), UInt64(index), 2))
        }
        client.finish()
    }

    // MARK: Seeds

    static func input(blk: Bool, raw: Bool = false, noKick: Bool = false, features: UInt32 = 0, stream: [UInt8] = [], image: [UInt8]) -> [UInt8] {
        var s = SeedBytes()
        s.u8((blk ? 1 : 0) | (raw ? 2 : 0) | (noKick ? 4 : 0))
        s.u32(features)
        s.u16(UInt16(stream.count))
        s.append(stream)
        s.append(image)
        return s.bytes
    }

    static func access(_ region: UInt32, _ offset: UInt64, _ count: UInt32, data: [UInt8] = []) -> [UInt8] {
        var s = SeedBytes()
        s.u64(offset); s.u32(region); s.u32(count); s.append(data)
        return s.bytes
    }

    static func seeds() -> [(String, [UInt8])] {
        var out: [(String, [UInt8])] = []
        // Every ring image of the vhost-user device targets, now behind the virtio-pci function.
        for (name, image) in VirtioDeviceFuzz.scsiSeeds() { out.append((name, input(blk: false, image: image))) }
        for (name, image) in VirtioDeviceFuzz.blkSeeds() { out.append((name, input(blk: true, image: image))) }
        let blkIn = VirtioDeviceFuzz.blkSeeds().first { $0.0 == "blk-in" }!.1
        let scsiRead = VirtioDeviceFuzz.scsiSeeds().first { $0.0 == "scsi-read10" }!.1
        func m(_ id: UInt16, _ command: VfioUserCommand, _ payload: [UInt8], flags: UInt32 = 0) -> [UInt8] {
            VfioUserMessageFuzz.message(id, command.rawValue, payload, flags: flags)
        }
        var unmapAll = SeedBytes()
        unmapAll.u32(24); unmapAll.u32(2); unmapAll.u64(0); unmapAll.u64(0)
        var unmapRing = SeedBytes()
        unmapRing.u32(24); unmapRing.u32(0); unmapRing.u64(0); unmapRing.u64(UInt64(ramSize))
        var mapAgain = SeedBytes()
        mapAgain.u32(32); mapAgain.u32(3); mapAgain.u64(0); mapAgain.u64(0); mapAgain.u64(UInt64(ramSize))
        var mapNoFD = SeedBytes()
        mapNoFD.u32(32); mapNoFD.u32(3); mapNoFD.u64(0); mapNoFD.u64(0x100000); mapNoFD.u64(0x10000)
        var irqs = SeedBytes()
        irqs.u32(20); irqs.u32(4 | 32); irqs.u32(UInt32(VfioPCIIRQ.msix)); irqs.u32(0); irqs.u32(2)
        var intx = SeedBytes()
        intx.u32(20); intx.u32(4 | 32); intx.u32(UInt32(VfioPCIIRQ.intx)); intx.u32(0); intx.u32(1)
        typealias C = VirtioPCILayout.Common
        // Reads of every structure and the config space's capability list.
        let reads = [(bar0, UInt64(0), UInt32(4)), (bar0, 0x04, 4), (bar0, 0x12, 2), (bar0, 0x18, 2), (bar0, 0x20, 8), (bar0, 0x1000, 1),
                     (bar0, 0x2000, 8), (bar0, 0x2010, 4), (1, 0, 8), (UInt32(VfioPCIRegion.config), 0x34, 1), (UInt32(VfioPCIRegion.config), 0x40, 64)]
            .enumerated().map { i, a in chunk(m(UInt16(20 + i), .regionRead, access(a.0, a.1, a.2))) }.reduce([], +)
        // Register writes a driver may get wrong: while the queue runs, across fields, status bits cleared.
        let writes = chunk(m(40, .regionWrite, access(bar0, UInt64(C.queueSize), 2, data: [3, 0])))
            + chunk(m(41, .regionWrite, access(bar0, UInt64(C.queueDesc) + 1, 1, data: [0xFF])))
            + chunk(m(42, .regionWrite, access(bar0, UInt64(C.deviceStatus), 1, data: [0x03])))
            + chunk(m(43, .regionWrite, access(bar0, UInt64(C.queueSelect), 2, data: [7, 0])))
            + chunk(m(44, .regionWrite, access(bar0, 0x2020, 1, data: [1])))
            + chunk(m(45, .regionWrite, access(bar0, 0x3003, 1, data: [0])))
        out.append(("blk-unmap-all-under-ring", input(blk: true, stream: chunk(m(30, .dmaUnmap, unmapAll.bytes)), image: blkIn)))
        out.append(("blk-unmap-and-map-again", input(blk: true, stream: chunk(m(31, .dmaUnmap, unmapRing.bytes))
            + chunk(m(32, .dmaMap, mapAgain.bytes), fds: [0]), image: blkIn)))
        out.append(("scsi-window-without-fd", input(blk: false, stream: chunk(m(33, .dmaMap, mapNoFD.bytes)), image: scsiRead)))
        out.append(("scsi-vectors-change", input(blk: false, stream: chunk(m(34, .deviceSetIRQs, irqs.bytes), fds: [1, 1]), image: scsiRead)))
        out.append(("blk-intx", input(blk: true, stream: chunk(m(35, .deviceSetIRQs, intx.bytes), fds: [1]), image: blkIn)))
        out.append(("blk-device-reset", input(blk: true, stream: chunk(m(36, .deviceReset, [])), image: blkIn)))
        out.append(("scsi-register-reads", input(blk: false, stream: reads, image: scsiRead)))
        out.append(("blk-register-writes", input(blk: true, stream: writes, image: blkIn)))
        out.append(("blk-feature-not-offered", input(blk: true, features: 1 << 31, image: blkIn)))
        // The VIRTIO_PCI_CAP_PCI_CFG window (the fifth vendor capability, at 0xA4): select device_status, write it, read
        // the capacity.
        let config = UInt32(VfioPCIRegion.config)
        let window = chunk(m(50, .regionWrite, access(config, 0xA4 + 4, 1, data: [0])))
            + chunk(m(51, .regionWrite, access(config, 0xA4 + 8, 8, data: [0x14, 0, 0, 0, 1, 0, 0, 0])))
            + chunk(m(52, .regionWrite, access(config, 0xA4 + 16, 4, data: [0x0F, 0, 0, 0])))
            + chunk(m(53, .regionWrite, access(config, 0xA4 + 8, 8, data: [0, 0x20, 0, 0, 4, 0, 0, 0])))
            + chunk(m(54, .regionRead, access(config, 0xA4 + 16, 4)))
        out.append(("blk-pci-cfg-window", input(blk: true, stream: window, image: blkIn)))
        // Raw streams: no driver, no ring (the hostile client alone).
        var version = SeedBytes()
        version.u16(0); version.u16(1)
        version.append(Array(#"{"capabilities":{"max_msg_fds":8}}"#.utf8) + [0])
        let empty = [UInt8](repeating: 0, count: 6)
        out.append(("raw-scsi-registers", input(blk: false, raw: true, stream: chunk(m(1, .version, version.bytes)) + reads + writes, image: empty)))
        out.append(("raw-blk-no-version", input(blk: true, raw: true, stream: reads, image: empty)))
        return out
    }

    public static let target = FuzzTarget(name: "vfio-user-virtio",
                                          summary: "vfio-user message streams with fds and ring images (virtio-scsi and virtio-blk virtio-pci functions)",
                                          run: run, seeds: seeds)
}
