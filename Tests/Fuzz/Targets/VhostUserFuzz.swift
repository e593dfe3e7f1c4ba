import Backends
import BlockIO
import CSystem
import Gateway
import SCSI
import TestSupport
import VhostUser
import VirtioDevices
import Virtio
#if canImport(Glibc)
import Glibc
#endif

/// The vhost-user servers the gateway runs (virtio-scsi with LUNs 0 and 2, virtio-blk; null back-ends),
/// started once per process on sockets in a scratch directory. A server serves one front-end at a time, so
/// the message target (connections that come and go) and the ring targets (one lasting session) get their own.
final class VhostUserFixture: @unchecked Sendable {
    let scsiSocket: String
    let blkSocket: String
    let scsi: VhostUserSCSIController<AnyBlockChannel>
    let blk: VhostUserBlkController<AnyBlockChannel>

    nonisolated(unsafe) static var instances: [String: VhostUserFixture] = [:]
    static func get(_ tag: String) -> VhostUserFixture {
        if instances[tag] == nil { instances[tag] = VhostUserFixture(tag: tag) }
        return instances[tag]!
    }

    init(tag: String) {
        let dir = scratchDirectory("vhost-\(tag)")
        scsiSocket = dir + "/scsi.sock"
        blkSocket = dir + "/blk.sock"
        let (backend, target) = nullSCSITarget(name: "fuzz-scsi", serial: "FUZZ", naa: 0x6001_4051_0000_0000)
        let quiet = TestLog.quiet
        // A short drain timeout: the event queue holds its buffers until an event, so every GET_VRING_BASE of it
        // waits the whole timeout (and then abandons them, a path worth fuzzing too).
        scsi = VhostUserSCSIController(socketPath: scsiSocket, device: try! VirtioSCSIDevice(target: target,
                                            options: VirtioSCSIOptions(requestQueues: 2, maxQueueSize: 256, drainTimeoutMilliseconds: 100, watchdogMilliseconds: 0),
                                            channelFactory: { _ in try backend.makeChannel() }, log: quiet), log: quiet)
        blk = VhostUserBlkController(socketPath: blkSocket, device: try! VirtioBlkDevice(geometry: backend.geometry,
                                          options: VirtioBlkOptions(maxQueueSize: 256, serial: "FUZZBLK", drainTimeoutMilliseconds: 100, watchdogMilliseconds: 0),
                                          channelFactory: { try backend.makeChannel() }, log: quiet), log: quiet)
        try! scsi.start()
        try! blk.start()
    }
}

/// A null back-end (1 MiB) and a SCSI target with LUNs 0 and 2 on it (serials SERIAL0/SERIAL2, NAA `naa` + LUN), as
/// the virtio-scsi fuzz fixtures serve.
func nullSCSITarget(name: String, serial: String, naa: UInt64) -> (AnyBlockBackend, SCSITarget) {
    let backend = try! AnyBlockBackend.open(BackendSpec(kind: .null, path: "", size: 1 << 20))
    let target = SCSITarget(name: name)
    for lun in [0, 2] {
        try! target.add(LogicalUnit(number: LogicalUnitNumber(lun)!, identity: LogicalUnitIdentity(serial: "\(serial)\(lun)", naa: naa + UInt64(lun)),
                                    geometry: backend.geometry, backendID: 0))
    }
    return (backend, target)
}

/// vhost-user messages from a hostile front-end, with fds (memfds, eventfds, other files) attached anywhere:
/// the server's receive, framing and every request handler, on the virtio-scsi or virtio-blk server.
///
/// Input: one byte selecting the server (bit 0: virtio-blk), then chunks (see `sendChunks`): each a
/// count/kind byte for the fds, a 16-bit length and the raw bytes written to the socket. The connection is
/// then half-closed and the harness waits until the server closes its side (it handled everything).
public enum VhostUserMessageFuzz {
    static func run(_ data: UnsafeRawBufferPointer) {
        let f = VhostUserFixture.get("messages")
        var r = FuzzReader(data)
        let which = r.u8()
        guard let client = UnixClient(path: which & 1 == 0 ? f.scsiSocket : f.blkSocket) else { return }
        sendChunks(&r, on: client)
        client.finish()
    }

    static func message(_ request: VhostUserRequest, _ payload: [UInt8], flags: UInt32 = 1) -> [UInt8] {
        VhostUserMessage(request: request.rawValue, flags: flags, payload: payload).encoded()
    }

    static func u64(_ v: UInt64) -> [UInt8] { var s = SeedBytes(); s.u64(v); return s.bytes }
    static func u32s(_ vs: UInt32...) -> [UInt8] { var s = SeedBytes(); for v in vs { s.u32(v) }; return s.bytes }

    /// A QEMU-like start-up: features, protocol features, memory table (one memfd), one ring with
    /// kick and call eventfds, then config reads and a stop.
    static func seeds() -> [(String, [UInt8])] {
        var region = SeedBytes()
        region.u32(1); region.u32(0)
        region.u64(0); region.u64(64 << 10); region.u64(0x7F00_0000_0000); region.u64(0)
        var addr = SeedBytes()
        addr.u32(2); addr.u32(0); addr.u64(0x7F00_0000_0000); addr.u64(0x7F00_0000_3000); addr.u64(0x7F00_0000_2000); addr.u64(0)
        let setup = chunk(message(.getFeatures, [])) + chunk(message(.setFeatures, u64(1 << 32 | 1 << 30 | 1 << 29 | 1 << 28)))
            + chunk(message(.getProtocolFeatures, [])) + chunk(message(.setProtocolFeatures, u64(1 | 1 << 3 | 1 << 9 | 1 << 12)))
            + chunk(message(.setOwner, [])) + chunk(message(.getQueueNum, []))
            + chunk(message(.setMemTable, region.bytes, flags: 1 | 8), fds: [0])
        let ring = chunk(message(.setVringNum, u32s(2, 128))) + chunk(message(.setVringAddr, addr.bytes))
            + chunk(message(.setVringBase, u32s(2, 0))) + chunk(message(.setVringCall, u64(2)), fds: [1])
            + chunk(message(.setVringEnable, u32s(2, 1))) + chunk(message(.setVringKick, u64(2), flags: 1 | 8), fds: [1])
        let tail = chunk(message(.getConfig, u32s(0, 36, 0) + [UInt8](repeating: 0, count: 36)))
            + chunk(message(.setConfig, u32s(20, 8, 0) + u32s(96, 32)))
            + chunk(message(.getVringBase, u32s(2, 0)))
            + chunk(message(.getInflightFD, u64(0) + u64(0) + u32s(0, 0) + [0, 0, 0, 0]))
            + chunk(message(.resetDevice, []))
        var addReg = SeedBytes()
        addReg.u64(0); addReg.u64(0x100000); addReg.u64(64 << 10); addReg.u64(0x7F00_1000_0000); addReg.u64(0)
        let slots = chunk(message(.getMaxMemSlots, [])) + chunk(message(.addMemReg, addReg.bytes), fds: [0])
            + chunk(message(.remMemReg, addReg.bytes))
        return [
            ("scsi-startup", [0] + setup + ring + tail),
            ("blk-startup", [1] + setup + chunk(message(.setVringNum, u32s(0, 128))) + chunk(message(.getConfig, u32s(0, 60, 0) + [UInt8](repeating: 0, count: 60)))),
            ("mem-slots", [0] + setup + slots),
            ("split-header", [0] + chunk(Array(message(.getFeatures, []).prefix(5))) + chunk(Array(message(.getFeatures, []).dropFirst(5)))),
            ("too-many-fds", [0] + chunk(message(.setOwner, []), fds: [1, 1, 1, 1, 1, 1, 1])),
        ]
    }

    public static let target = FuzzTarget(name: "vhost-user", summary: "vhost-user messages with fds (virtio-scsi and virtio-blk servers)",
                                          run: run, seeds: seeds)
}

/// Requests a guest places on a virtio-scsi or virtio-blk ring (virtio-scsi commands, TMFs, AN queries and
/// subscribes; virtio-blk IN/OUT/FLUSH/GET_ID/DISCARD/WRITE_ZEROES), through the real vhost-user server,
/// device model, queue group and back-end path. A persistent front-end session maps 64 KiB of guest RAM;
/// each input is a ring image that the harness starts (SET_VRING_KICK services what is already available),
/// then stops with GET_VRING_BASE, which returns once every request completed.
///
/// Input: flags (bit 0 EVENT_IDX, bit 1 INDIRECT_DESC, bit 2 packed, bits 3-4 virtio-scsi queue: control,
/// event, request 0, request 1), ring size selector, ring base (16 bits), used index, then the descriptor
/// table, the driver area and guest memory from 0x4000 (as in `virtqueue-split`/`virtqueue-packed`).
public enum VirtioDeviceFuzz {
    static let userBase: UInt64 = 0x7F00_0000_0000
    static let ramSize = 64 << 10

    final class Session {
        let client: UnixClient
        let ram = SharedRAM(size: VirtioDeviceFuzz.ramSize, name: "fuzz-guest")
        let offered: UInt64
        let callFD = csys_eventfd(0, 1)
        /// The kick eventfd sent with every ring start (the server closes its copy when the ring stops; nothing
        /// ever signals it: the harness places the requests before the start, which services what is available).
        let kickFD = csys_eventfd(0, 1)
        /// Ring indexes whose call fd the server has (set once per session).
        var callSet: Set<UInt32> = []
        var features: UInt64 = 0

        init?(path: String) {
            guard let c = UnixClient(path: path) else { return nil }
            client = c
            guard let f = Self.query(c, .getFeatures) else { return nil }
            offered = f
            let protocolWanted = VhostUserProtocolFeature.replyAck | VhostUserProtocolFeature.multiQueue
            guard Self.send(c, .setFeatures, VhostUserMessageFuzz.u64(f & ~(VirtioFeature.ringPacked | VirtioFeature.ringEventIndex | VirtioFeature.ringIndirectDescriptors))),
                  Self.query(c, .getProtocolFeatures) != nil,
                  Self.send(c, .setProtocolFeatures, VhostUserMessageFuzz.u64(protocolWanted)) else { return nil }
            var region = SeedBytes()
            region.u32(1); region.u32(0)
            region.u64(0); region.u64(UInt64(VirtioDeviceFuzz.ramSize)); region.u64(VirtioDeviceFuzz.userBase); region.u64(0)
            guard Self.send(c, .setMemTable, region.bytes, fds: [ram.fd], ack: true) else { return nil }
        }

        deinit { close(callFD); close(kickFD) }

        static func encode(_ request: VhostUserRequest, _ payload: [UInt8], ack: Bool = false) -> [UInt8] {
            let flags = VhostUserWire.version | (ack ? VhostUserWire.flagNeedReply : 0)
            return VhostUserMessage(request: request.rawValue, flags: flags, payload: payload).encoded()
        }

        static func send(_ c: UnixClient, _ request: VhostUserRequest, _ payload: [UInt8], fds: [Int32] = [], ack: Bool = false) -> Bool {
            guard c.send(encode(request, payload, ack: ack), fds: fds) else { return false }
            if ack { return reply(c) != nil }
            return true
        }

        static func reply(_ c: UnixClient) -> [UInt8]? {
            guard let header = c.receive(VhostUserWire.headerSize), let size = header.readLE(UInt32.self, at: 8),
                  size <= 4096, let payload = c.receive(Int(size)) else { return nil }
            return payload
        }

        static func query(_ c: UnixClient, _ request: VhostUserRequest) -> UInt64? {
            guard send(c, request, []), let p = reply(c) else { return nil }
            return p.readLE(UInt64.self, at: 0)
        }

        /// Runs one ring image on queue `index`; false when the session is unusable.
        ///
        /// The same messages a front-end sends to start and stop a ring, pipelined (the server handles a
        /// connection's messages in order, so nothing waits between them): SET_VRING_NUM/ADDR/BASE/ENABLE in one
        /// write, SET_VRING_CALL once per ring index of the session (the server keeps a ring's call fd across
        /// stops), then SET_VRING_KICK (with REPLY_ACK, so a refused start is answered instead of closing the
        /// connection) and GET_VRING_BASE in one write, and only then the two replies. The GET_VRING_BASE reply
        /// comes once the ring drained: every request of this input completed and the ring is stopped, so no
        /// state but the session's set-up carries over to the next input.
        func run(index: UInt32, size: Int, base: UInt32, options: VirtqueueOptions) -> Bool {
            var wanted = offered & ~(VirtioFeature.ringPacked | VirtioFeature.ringEventIndex | VirtioFeature.ringIndirectDescriptors)
            if options.packed { wanted |= VirtioFeature.ringPacked }
            if options.eventIndex { wanted |= VirtioFeature.ringEventIndex }
            if options.indirect { wanted |= VirtioFeature.ringIndirectDescriptors }
            wanted &= offered
            if wanted != features {
                guard Self.send(client, .setFeatures, VhostUserMessageFuzz.u64(wanted)) else { return false }
                features = wanted
            }
            var addr = SeedBytes()
            addr.u32(index); addr.u32(0)
            addr.u64(VirtioDeviceFuzz.userBase); addr.u64(VirtioDeviceFuzz.userBase + 0x3000); addr.u64(VirtioDeviceFuzz.userBase + 0x2000); addr.u64(0)
            var v = UInt64(0)
            _ = csys_eventfd_drain(callFD, &v)
            _ = csys_eventfd_drain(kickFD, &v)
            let setup = Self.encode(.setVringNum, VhostUserMessageFuzz.u32s(index, UInt32(size)))
                + Self.encode(.setVringAddr, addr.bytes)
                + Self.encode(.setVringBase, VhostUserMessageFuzz.u32s(index, base))
                + Self.encode(.setVringEnable, VhostUserMessageFuzz.u32s(index, 1))
            guard client.send(setup) else { return false }
            if !callSet.contains(index) {
                guard Self.send(client, .setVringCall, VhostUserMessageFuzz.u64(UInt64(index)), fds: [callFD]) else { return false }
                callSet.insert(index)
            }
            let startStop = Self.encode(.setVringKick, VhostUserMessageFuzz.u64(UInt64(index)), ack: true)
                + Self.encode(.getVringBase, VhostUserMessageFuzz.u32s(index, 0))
            guard client.send(startStop, fds: [kickFD]),
                  Self.reply(client) != nil,
                  Self.reply(client) != nil else { return false }
            return true
        }
    }

    nonisolated(unsafe) static var sessions: [String: Session] = [:]

    static func run(_ data: UnsafeRawBufferPointer, blk: Bool) {
        let f = VhostUserFixture.get("rings")
        let path = blk ? f.blkSocket : f.scsiSocket
        if sessions[path] == nil {
            guard let fresh = Session(path: path) else { preconditionFailure("the \(blk ? "virtio-blk" : "virtio-scsi") server refused a well-formed session") }
            sessions[path] = fresh
        }
        let s = sessions[path]!
        var r = FuzzReader(data)
        let flags = r.u8()
        let packed = flags & 4 != 0
        let size = packed ? Int(r.u8()) % 256 + 1 : 1 << (Int(r.u8()) % 9)
        let base = UInt32(r.u16())
        let usedIdx = r.u16()
        s.ram.clear()
        s.ram.load(r.take(16 * size), at: 0)
        s.ram.load(r.take(packed ? 4 : 6 + 2 * size), at: 0x2000)
        if !packed { (s.ram.host + 0x3000 + 2).storeBytes(of: usedIdx.littleEndian, as: UInt16.self) }
        s.ram.load(r.rest(), at: 0x4000)
        let index: UInt32 = blk ? 0 : UInt32((flags >> 3) & 3)
        let options = VirtqueueOptions(packed: packed, eventIndex: flags & 1 != 0, indirect: flags & 2 != 0)
        if !s.run(index: index, size: size, base: packed ? base | 0x8000 : base, options: options) {
            sessions[path] = nil  // the server closed the session: start a new one next time
        }
    }

    // MARK: Seeds

    static func gpa(_ offset: Int) -> UInt64 { UInt64(0x4000 + offset) }

    /// A split ring image (flags, size, descriptors, avail entries, data at 0x4000).
    static func image(flags: UInt8, size: Int, _ descriptors: [[UInt8]], avail: [UInt16], data: [UInt8]) -> [UInt8] {
        [flags, UInt8(size.trailingZeroBitCount), 0, 0, 0, 0] + VirtqueueFuzz.ringImage(size: size, descriptors: descriptors, avail: avail) + data
    }

    static func packedImage(flags: UInt8, size: Int, _ descriptors: [[UInt8]], data: [UInt8]) -> [UInt8] {
        [flags | 4, UInt8(size - 1), 0, 0, 0, 0] + VirtqueueFuzz.ringImage(size: size, descriptors: descriptors, avail: nil) + data
    }

    static let desc = VirtqueueFuzz.desc
    static func packedDesc(_ a: UInt64, _ l: UInt32, id: UInt16, flags: UInt16) -> [UInt8] { VirtqueueFuzz.packedDesc(a, l, id: id, flags: flags) }

    /// virtio_scsi_cmd_req (LUN 0 or 2, 32-byte CDB) + data.
    static func scsiRequest(lun: UInt8, cdb: [UInt8]) -> [UInt8] {
        var s = SeedBytes()
        s.append([1, 0, 0x40, lun, 0, 0, 0, 0]); s.u64(7); s.u8(0); s.u8(0); s.u8(0)
        s.append(cdb + [UInt8](repeating: 0, count: 32 - cdb.count))
        return s.bytes
    }

    static func scsiSeeds() -> [(String, [UInt8])] {
        let q2: UInt8 = 2 << 3
        var out: [(String, [UInt8])] = []
        let commands: [(String, [UInt8], UInt32)] = [
            ("inquiry", [0x12, 0, 0, 0, 96, 0], 96), ("tur", [0, 0, 0, 0, 0, 0], 0),
            ("read10", [0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0], 4096), ("report-luns", [0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], 256),
            ("read-capacity16", [0x9E, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0], 32),
        ]
        for (name, cdb, inLength) in commands {
            let req = scsiRequest(lun: name == "report-luns" ? 2 : 0, cdb: cdb)
            var descs = [desc(gpa(0), 51, 1, 1), desc(gpa(0x100), 108, inLength > 0 ? 3 : 2, 2)]
            if inLength > 0 { descs.append(desc(gpa(0x1000), inLength, 2, 0)) }
            out.append(("scsi-\(name)", image(flags: q2, size: 8, descs, avail: [0], data: req)))
        }
        // WRITE(10) of 8 blocks: header, data-out, response.
        let write = scsiRequest(lun: 0, cdb: [0x2A, 0, 0, 0, 0, 0, 0, 0, 8, 0])
        out.append(("scsi-write10", image(flags: q2 | 1, size: 16, [desc(gpa(0), 51, 1, 1), desc(gpa(0x1000), 4096, 1, 2), desc(gpa(0x100), 108, 2, 0)],
                                          avail: [0], data: write)))
        // Through an indirect table.
        var data = write + [UInt8](repeating: 0, count: 0x800 - write.count)
        data += desc(gpa(0), 51, 1, 1) + desc(gpa(0x1000), 4096, 1, 2) + desc(gpa(0x100), 108, 2, 0)
        out.append(("scsi-indirect", image(flags: q2 | 2, size: 8, [desc(gpa(0x800), 48, 4, 0)], avail: [0], data: data)))
        out.append(("scsi-packed", packedImage(flags: q2, size: 8, [packedDesc(gpa(0), 51, id: 3, flags: 1), packedDesc(gpa(0x100), 108, id: 3, flags: 2)],
                                               data: scsiRequest(lun: 0, cdb: [0, 0, 0, 0, 0, 0]))))
        // Control queue: TMF (ABORT TASK, LUN RESET, I_T NEXUS RESET) and AN query/subscribe.
        for (name, subtype) in [("abort-task", UInt32(0)), ("lun-reset", UInt32(5)), ("it-nexus-reset", UInt32(7))] {
            var tmf = SeedBytes()
            tmf.u32(0); tmf.u32(subtype); tmf.append([1, 0, 0x40, 0, 0, 0, 0, 0]); tmf.u64(7)
            out.append(("ctrl-tmf-\(name)", image(flags: 0, size: 4, [desc(gpa(0), 24, 1, 1), desc(gpa(0x100), 1, 2, 0)], avail: [0], data: tmf.bytes)))
        }
        for (name, type) in [("an-query", UInt32(1)), ("an-subscribe", UInt32(2))] {
            var an = SeedBytes()
            an.u32(type); an.append([1, 0, 0x40, 0, 0, 0, 0, 0]); an.u32(0xFFFF_FFFF)
            out.append(("ctrl-\(name)", image(flags: 0, size: 4, [desc(gpa(0), 16, 1, 1), desc(gpa(0x100), 8, 2, 0)], avail: [0], data: an.bytes)))
        }
        out.append(("event-buffers", image(flags: 1 << 3, size: 4, [desc(gpa(0), 16, 2, 0), desc(gpa(0x100), 16, 2, 0)], avail: [0, 1], data: [])))
        return out
    }

    static func blkSeeds() -> [(String, [UInt8])] {
        func header(_ type: UInt32, sector: UInt64) -> [UInt8] {
            var s = SeedBytes()
            s.u32(type); s.u32(0); s.u64(sector)
            return s.bytes
        }
        var discard = SeedBytes()
        discard.u64(8); discard.u32(8); discard.u32(0)
        var out: [(String, [UInt8])] = []
        for (name, type, dataFlags) in [("in", UInt32(0), UInt16(3)), ("out", 1, 1), ("get-id", 8, 3)] {
            out.append(("blk-\(name)", image(flags: 0, size: 8, [desc(gpa(0), 16, 1, 1), desc(gpa(0x1000), 4096, dataFlags, 2), desc(gpa(0x100), 1, 2, 0)],
                                             avail: [0], data: header(type, sector: 2))))
        }
        out.append(("blk-flush", image(flags: 1, size: 8, [desc(gpa(0), 16, 1, 1), desc(gpa(0x100), 1, 2, 0)], avail: [0], data: header(4, sector: 0))))
        for (name, type) in [("discard", UInt32(11)), ("write-zeroes", 13)] {
            let d = header(type, sector: 0) + [UInt8](repeating: 0, count: 0x200 - 16) + discard.bytes
            out.append(("blk-\(name)", image(flags: 0, size: 8, [desc(gpa(0), 16, 1, 1), desc(gpa(0x200), 16, 1, 2), desc(gpa(0x100), 1, 2, 0)], avail: [0], data: d)))
        }
        out.append(("blk-packed-in", packedImage(flags: 3, size: 4, [packedDesc(gpa(0), 16, id: 1, flags: 1), packedDesc(gpa(0x1000), 512, id: 1, flags: 3),
                                                                     packedDesc(gpa(0x100), 1, id: 1, flags: 2)], data: header(0, sector: 1))))
        return out
    }

    public static let scsi = FuzzTarget(name: "virtio-scsi", summary: "virtio-scsi command/TMF/AN requests and event buffers over vhost-user",
                                        run: { run($0, blk: false) }, seeds: scsiSeeds)
    public static let blk = FuzzTarget(name: "virtio-blk", summary: "virtio-blk requests over vhost-user",
                                       run: { run($0, blk: true) }, seeds: blkSeeds)
}
