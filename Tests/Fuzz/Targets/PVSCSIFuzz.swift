import Backends
import BlockIO
import CSystem
import Gateway
import PVSCSI
import SCSI
import TestSupport
import VfioUser
#if canImport(Glibc)
import Glibc
#endif

/// A PVSCSI controller as the gateway runs it (targets 0 and 3, null back-ends), started once per process
/// on a socket in a scratch directory.
final class PVSCSIFixture: @unchecked Sendable {
    let socket: String
    let controller: PVSCSIController<SCSITarget, AnyBlockChannel>

    init(tag: String) {
        socket = scratchDirectory("pvscsi-\(tag)") + "/pv.sock"
        let backend = try! AnyBlockBackend.open(BackendSpec(kind: .null, path: "", size: 1 << 20))
        let target = SCSITarget(name: "fuzz-pvscsi")
        for t in [0, 3] {
            try! target.add(LogicalUnit(number: LogicalUnitNumber(t)!, identity: LogicalUnitIdentity(serial: "PV\(t)", naa: 0x6001_4051_1000_0000 + UInt64(t)),
                                        geometry: backend.geometry, backendID: 0))
        }
        controller = try! PVSCSIController(socketPath: socket, target: target, channelFactory: { _ in try? backend.makeChannel() }, log: TestLog.quiet)
        try! controller.start()
    }
}

/// vfio-user messages from a hostile client (QEMU's side), with fds, to the PVSCSI controller's server:
/// framing, version negotiation, DMA map/unmap, region and config-space access, IRQ set-up, reset.
///
/// Input: chunks as for `vhost-user` (see `sendChunks`). The connection is half-closed afterwards and the
/// harness waits until the server closed it.
public enum VfioUserMessageFuzz {
    nonisolated(unsafe) static var fixture: PVSCSIFixture?

    static func run(_ data: UnsafeRawBufferPointer) {
        if fixture == nil { fixture = PVSCSIFixture(tag: "vfio") }
        var r = FuzzReader(data)
        guard let client = UnixClient(path: fixture!.socket) else { return }
        sendChunks(&r, on: client)
        client.finish()
    }

    static func message(_ id: UInt16, _ command: UInt16, _ payload: [UInt8], flags: UInt32 = 0) -> [UInt8] {
        var s = SeedBytes()
        s.u16(id); s.u16(command); s.u32(UInt32(16 + payload.count)); s.u32(flags); s.u32(0)
        s.append(payload)
        return s.bytes
    }

    static func seeds() -> [(String, [UInt8])] {
        var version = SeedBytes()
        version.u16(0); version.u16(1)
        version.append(Array(#"{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576,"migration":{"pgsize":4096}}}"#.utf8) + [0])
        let hello = chunk(message(1, 1, version.bytes))
        var map = SeedBytes()
        map.u32(32); map.u32(3); map.u64(0); map.u64(0x100000); map.u64(64 << 10)
        var unmap = SeedBytes()
        unmap.u32(24); unmap.u32(0); unmap.u64(0x100000); unmap.u64(64 << 10)
        var regionInfo = SeedBytes()
        regionInfo.u32(32); regionInfo.u32(0); regionInfo.u32(0); regionInfo.u32(0); regionInfo.u64(0); regionInfo.u64(0)
        func access(_ region: UInt32, _ offset: UInt64, _ count: UInt32, data: [UInt8] = []) -> [UInt8] {
            var s = SeedBytes()
            s.u64(offset); s.u32(region); s.u32(count); s.append(data)
            return s.bytes
        }
        var irqs = SeedBytes()
        irqs.u32(20); irqs.u32(0x24); irqs.u32(2); irqs.u32(0); irqs.u32(1)
        var irqInfo = SeedBytes()
        irqInfo.u32(16); irqInfo.u32(0); irqInfo.u32(2); irqInfo.u32(0)
        let device = chunk(message(2, 4, [16, 0, 0, 0] + [UInt8](repeating: 0, count: 12)))
            + chunk(message(3, 5, regionInfo.bytes))
            + chunk(message(4, 7, irqInfo.bytes))
            + chunk(message(5, 8, irqs.bytes), fds: [1])
            + chunk(message(6, 9, access(7, 0, 4)))                                   // config space: IDs
            + chunk(message(7, 10, access(7, 4, 2, data: [6, 0])))                    // COMMAND: memory + bus master
            + chunk(message(8, 10, access(7, 0x10, 4, data: [0, 0, 0xF0, 0xFE])))     // BAR0
        let dma = chunk(message(9, 2, map.bytes), fds: [0])
            + chunk(message(10, 10, access(0, 0, 4, data: [1, 0, 0, 0])))            // ADAPTER_RESET
            + chunk(message(11, 9, access(0, 8, 4)))                                  // COMMAND_STATUS
            + chunk(message(12, 10, access(0, 0x3014, 4, data: [0, 0, 0, 0])))       // kick
            + chunk(message(13, 3, unmap.bytes))
            + chunk(message(14, 13, []))
        return [
            ("version", hello),
            ("device-setup", hello + device),
            ("dma-and-registers", hello + device + dma),
            ("no-version", device),
            ("bad-version", chunk(message(1, 1, [0, 0, 9, 0] + Array("{".utf8)))),
        ]
    }

    public static let target = FuzzTarget(name: "vfio-user", summary: "vfio-user messages with fds (PVSCSI controller server)",
                                          run: run, seeds: seeds)
}

/// What a PVSCSI guest driver writes: rings state, request descriptors (CDBs, SG lists, sense and data
/// addresses, LUN/target/bus fields), the message ring, and register/command sequences (SETUP_RINGS,
/// SETUP_MSG_RING, ABORT_CMD, RESET_DEVICE, CONFIG, ...), through the device model on its loop thread with
/// a 64 KiB DMA window mapped as the vfio-user server maps one.
///
/// Input: flags (bit 0: skip the standard SETUP_RINGS, bit 1: also SETUP_MSG_RING, bit 2: two request
/// ring pages), request producer, completion consumer and message consumer (32 bits each), the number of
/// register operations and the operations (register selector byte + 32-bit value), the number of request
/// descriptors and their 128-byte images, then guest memory from page 5 (SG lists, sense, data). Pages:
/// 0 rings state, 1-2 request ring, 3 completion ring, 4 message ring.
public enum PVSCSIFuzz {
    static let iova: UInt64 = 0x100000
    static let pages = 16
    static let registers: [UInt64] = [PVSCSI.Register.command, PVSCSI.Register.commandData, PVSCSI.Register.interruptStatus,
                                      PVSCSI.Register.interruptMask, PVSCSI.Register.kickRWIO, PVSCSI.Register.kickNonRWIO,
                                      PVSCSI.Register.debug, PVSCSI.Register.commandStatus]

    final class State: @unchecked Sendable {
        let fixture = PVSCSIFixture(tag: "dev")
        let ram = SharedRAM(size: PVSCSIFuzz.pages * 4096, name: "fuzz-pvscsi")
        init() {
            let device = fixture.controller.device
            let memory = fixture.controller.server.memory
            let fd = dup(ram.fd)
            let mapped: Bool = fixture.controller.sync {
                do {
                    try memory.map(address: PVSCSIFuzz.iova, size: UInt64(PVSCSIFuzz.pages * 4096), fileOffset: 0, readable: true, writable: true, fd: fd)
                    return true
                } catch { return false }
            }
            precondition(mapped, "DMA window not mapped")
            _ = device
        }
    }

    nonisolated(unsafe) static var state: State?

    static func words(_ v: UInt64) -> [UInt32] { [UInt32(truncatingIfNeeded: v), UInt32(truncatingIfNeeded: v >> 32)] }

    static func run(_ data: UnsafeRawBufferPointer) {
        if state == nil { state = State() }
        let s = state!
        var r = FuzzReader(data)
        let flags = r.u8()
        let producer = r.u32(), completionConsumer = r.u32(), messageConsumer = r.u32()
        var ops: [(UInt64, UInt32)] = []
        for _ in 0 ..< Int(r.u8() % 32) { ops.append((registers[Int(r.u8()) % registers.count], r.u32())) }
        let requestCount = Int(r.u8() % 65)
        s.ram.clear()
        s.ram.load(r.take(128 * requestCount), at: 4096)
        s.ram.load(r.rest(), at: 5 * 4096)
        let base = iova >> 12
        let twoPages = flags & 4 != 0
        var setup: [UInt32] = [twoPages ? 2 : 1, 1] + words(base)
        var req = [UInt64](repeating: 0, count: 32), cmp = [UInt64](repeating: 0, count: 32)
        req[0] = base + 1
        if twoPages { req[1] = base + 2 }
        cmp[0] = base + 3
        setup += req.flatMap(words) + cmp.flatMap(words)
        var message: [UInt32] = [1, 0]
        var msgPPNs = [UInt64](repeating: 0, count: 16)
        msgPPNs[0] = base + 4
        message += msgPPNs.flatMap(words)
        let device = s.fixture.controller.device
        let ram = s.ram
        let (setupWords, messageWords, registerOps) = (setup, message, ops)
        let inFlight: Int = s.fixture.controller.sync {
            func command(_ c: PVSCSI.Command, _ w: [UInt32]) {
                device.barWrite(bar: 0, offset: PVSCSI.Register.command, count: 4, value: UInt64(c.rawValue), posted: false)
                for x in w { device.barWrite(bar: 0, offset: PVSCSI.Register.commandData, count: 4, value: UInt64(x), posted: false) }
            }
            command(.adapterReset, [])
            if flags & 1 == 0 { command(.setupRings, setupWords) }
            if flags & 2 != 0 { command(.setupMessageRing, messageWords) }
            device.barWrite(bar: 0, offset: PVSCSI.Register.interruptMask, count: 4, value: UInt64(PVSCSI.interruptAll), posted: false)
            csys_store32_release(ram.host + PVSCSI.RingsState.completionConsumer, completionConsumer)
            csys_store32_release(ram.host + PVSCSI.RingsState.messageConsumer, messageConsumer)
            csys_store32_release(ram.host + PVSCSI.RingsState.requestProducer, producer)
            for (register, value) in registerOps {
                if register == PVSCSI.Register.commandStatus {
                    _ = device.barRead(bar: 0, offset: register, count: 4)
                } else {
                    device.barWrite(bar: 0, offset: register, count: 4, value: UInt64(value), posted: value & 1 != 0)
                }
            }
            device.barWrite(bar: 0, offset: PVSCSI.Register.kickRWIO, count: 4, value: 0, posted: true)
            // Nothing in flight (the null back-end completes in its commit, inside the kick): reset for the next
            // input now, in the same trip to the loop (the device posts no work of its own to the loop, so
            // nothing could have run between the kick and a reset in a later trip).
            let left = device.requestsInFlight
            if left == 0 { resetAdapter(device) }
            return left
        }
        guard inFlight > 0 else { return }
        // Let the back-end completions land, then reset for the next input.
        var left = inFlight, spins = 0
        while left > 0 && spins < 200 {
            spins += 1
            left = s.fixture.controller.sync { device.requestsInFlight }
        }
        s.fixture.controller.sync { resetAdapter(device) }
    }

    static func resetAdapter(_ device: PVSCSIDevice<SCSITarget, AnyBlockChannel>) {
        device.barWrite(bar: 0, offset: PVSCSI.Register.command, count: 4, value: UInt64(PVSCSI.Command.adapterReset.rawValue), posted: false)
    }

    // MARK: Seeds

    static func request(context: UInt64, data: UInt64, length: UInt64, sense: UInt64, flags: UInt32, cdb: [UInt8], target: UInt8) -> [UInt8] {
        var s = SeedBytes()
        s.u64(context); s.u64(data); s.u64(length); s.u64(sense); s.u32(sense == 0 ? 0 : 96); s.u32(flags)
        s.append(cdb + [UInt8](repeating: 0, count: 16 - cdb.count)); s.u8(UInt8(cdb.count))
        s.zeros(8); s.u8(0); s.u8(0); s.u8(target); s.u8(0)
        s.zeros(128 - s.bytes.count)
        return s.bytes
    }

    static func seed(flags: UInt8 = 2, producer: UInt32, ops: [(UInt8, UInt32)] = [], requests: [[UInt8]], memory: [UInt8] = []) -> [UInt8] {
        var s = SeedBytes()
        s.u8(flags); s.u32(producer); s.u32(0); s.u32(0)
        s.u8(UInt8(ops.count))
        for (reg, value) in ops { s.u8(reg); s.u32(value) }
        s.u8(UInt8(requests.count))
        s.append(requests.flatMap { $0 })
        s.append(memory)
        return s.bytes
    }

    static func seeds() -> [(String, [UInt8])] {
        let data = iova + 6 * 4096, sense = iova + 5 * 4096
        let toHost = PVSCSI.flagDirectionToHost, toDevice = PVSCSI.flagDirectionToDevice
        let inquiry = request(context: 1, data: data, length: 96, sense: sense, flags: toHost, cdb: [0x12, 0, 0, 0, 96, 0], target: 0)
        let read = request(context: 2, data: data, length: 4096, sense: sense, flags: toHost, cdb: [0x28, 0, 0, 0, 0, 1, 0, 0, 8, 0], target: 3)
        let write = request(context: 3, data: data, length: 4096, sense: sense, flags: toDevice, cdb: [0x2A, 0, 0, 0, 0, 1, 0, 0, 8, 0], target: 0)
        let missing = request(context: 4, data: 0, length: 0, sense: sense, flags: PVSCSI.flagDirectionNone, cdb: [0, 0, 0, 0, 0, 0], target: 9)
        // A scatter-gather list at page 7 (2 pages into the memory tail): two elements.
        var sg = SeedBytes()
        sg.u64(data); sg.u32(2048); sg.u32(0); sg.u64(data + 2048); sg.u32(2048); sg.u32(0)
        let sgRead = request(context: 5, data: iova + 7 * 4096, length: 4096, sense: sense, flags: toHost | PVSCSI.flagSGList,
                             cdb: [0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0], target: 0)
        let tail = [UInt8](repeating: 0, count: 2 * 4096) + sg.bytes
        // ABORT_CMD for context 2 (register selectors: 0 command, 1 command data).
        let abort: [(UInt8, UInt32)] = [(0, 6), (1, 2), (1, 0), (1, 3), (1, 0)]
        let resetDevice: [(UInt8, UInt32)] = [(0, 5), (1, 3), (1, 0), (1, 0)]
        let config: [(UInt8, UInt32)] = [(0, 7), (1, 0), (1, 0), (1, UInt32((iova >> 12) + 7)), (1, 0), (1, 0x1958), (1, 0)]
        return [
            ("inquiry", seed(producer: 1, requests: [inquiry])),
            ("read-write", seed(producer: 2, requests: [read, write])),
            ("missing-target", seed(producer: 1, requests: [missing])),
            ("sg-list", seed(producer: 1, requests: [sgRead], memory: tail)),
            ("abort", seed(producer: 2, ops: abort, requests: [read, write])),
            ("reset-device", seed(flags: 6, producer: 1, ops: resetDevice, requests: [inquiry])),
            ("config", seed(producer: 0, ops: config, requests: [])),
            ("no-rings", seed(flags: 1, producer: 1, requests: [inquiry])),
        ]
    }

    public static let target = FuzzTarget(name: "pvscsi", summary: "PVSCSI rings, SG lists, commands and message ring (device model)",
                                          run: run, seeds: seeds)
}
