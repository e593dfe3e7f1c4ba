import TestSupport
import VirtioTestSupport
import VhostUserTestSupport
import BlockIO
import CSystem
import GuestMemoryMap
import SCSI
import Testing
import VhostUser
import VirtioDevices
import Virtio
#if canImport(Glibc)
import Glibc
#endif

/// A running virtio-scsi controller with a test front-end: ring 0 control, 1 event, 2 requests.
final class SCSIFixture: @unchecked Sendable {
    let ram: TestGuestRAM
    let rings: [TestSplitRing]
    let channel: MemoryChannel
    let target = SCSITarget(name: "vscsi")
    let device: VirtioSCSIDevice<MemoryChannel>
    let server: VhostUserServer<VirtioSCSIDevice<MemoryChannel>>
    let log = TestLog()
    var client: TestFrontEnd!
    var fds: [(kick: Int32, call: Int32)] = []
    let path = testSocketPath("scsi")

    init(features: UInt64 = VirtioFeature.version1 | VirtioFeature.ringEventIndex | VirtioFeature.ringIndirectDescriptors
             | vhostUserFeatureProtocolFeatures | VirtioSCSI.featureHotplug | VirtioSCSI.featureChange, ringSize: Int = 32,
         hotplug: Bool = true, drainTimeoutMilliseconds: Int32 = 30_000, maxQueueSize: Int = 256,
         expectedQueueSize: Int? = nil, synchronous: Bool = false) throws {
        let memory = TestGuestRAM()
        ram = memory
        rings = (0..<3).map { _ in TestSplitRing(ram: memory, size: ringSize) }
        try target.add(Self.unit(0, blocks: 8192))
        let ch = MemoryChannel(bytes: 4 << 20, synchronous: synchronous)
        channel = ch
        device = try VirtioSCSIDevice(target: target, options: VirtioSCSIOptions(requestQueues: 1, maxQueueSize: maxQueueSize,
                                                                                 expectedQueueSize: expectedQueueSize, hotplug: hotplug,
                                                                                 drainTimeoutMilliseconds: drainTimeoutMilliseconds),
                                      channelFactory: { _ in ch }, log: log.logger)
        server = VhostUserServer(socketPath: path, device: device, log: log.logger)
        try server.start()
        client = TestFrontEnd(path: path)
        fds = client.setUp(ram: ram, rings: rings, features: features,
                           protocolFeatures: VhostUserProtocolFeature.replyAck | VhostUserProtocolFeature.multiQueue)
        // EVENT_IDX: ask for an interrupt on every used entry.
        for r in rings { r.setUsedEvent(0xFFFF) }
    }

    static func unit(_ n: Int, blocks: UInt64) -> LogicalUnit {
        LogicalUnit(number: LogicalUnitNumber(n)!, identity: LogicalUnitIdentity(serial: "SG\(n)", naa: 0x5000_0000_0000_0000 | UInt64(n)),
                    geometry: BlockGeometry(logicalBlockSize: 512, physicalBlockSize: 512, blockCount: blocks), backendID: 0)
    }

    deinit {
        client = nil
        server.stop()
        device.shutdown()
        for f in fds { close(f.kick); close(f.call) }
    }

    struct Response {
        var senseLength: UInt32
        var residual: UInt32
        var status: UInt8
        var response: UInt8
        var sense: [UInt8]
        var usedLength: UInt32
        var dataIn: [UInt8]
    }

    /// Publishes a command on the request queue; returns its head and the addresses to read back.
    func post(lun: [UInt8] = [1, 0, 0x40, 0, 0, 0, 0, 0], tag: UInt64, cdb: [UInt8], out: [UInt8] = [], inLength: Int = 0,
              responseLength: Int = 108) -> (head: UInt16, resp: UInt64, data: UInt64) {
        let request = ram.scsiRequest(lun: lun, tag: tag, cdb: cdb, out: out, inLength: inLength, responseLength: responseLength)
        let head = rings[2].addChain(request.buffers)
        rings[2].publish(head)
        _ = csys_eventfd_signal(fds[2].kick, 1)
        return (head, request.response, request.dataIn)
    }

    func readResponse(_ resp: UInt64, data: UInt64, inLength: Int, usedLength: UInt32) -> Response {
        let h = ram.read(resp, 12)
        let senseLength = h.readLE(UInt32.self, at: 0)!
        return Response(senseLength: senseLength, residual: h.readLE(UInt32.self, at: 4)!, status: h[10], response: h[11],
                        sense: ram.read(resp + 12, Int(min(senseLength, 96))), usedLength: usedLength,
                        dataIn: inLength > 0 ? ram.read(data, inLength) : [])
    }

    /// Sends one command and waits for its completion.
    func command(lun: [UInt8] = [1, 0, 0x40, 0, 0, 0, 0, 0], tag: UInt64 = 1, cdb: [UInt8], out: [UInt8] = [],
                 inLength: Int = 0, responseLength: Int = 108) -> Response? {
        let before = rings[2].usedIndex
        let p = post(lun: lun, tag: tag, cdb: cdb, out: out, inLength: inLength, responseLength: responseLength)
        guard waitFor({ rings[2].usedIndex != before }) else { return nil }
        let e = rings[2].usedElement(before)
        #expect(e.id == UInt32(p.head))
        return readResponse(p.resp, data: p.data, inLength: inLength, usedLength: e.len)
    }

    /// Clears the power-on unit attention of LUN 0.
    func clearUnitAttention() {
        let r = command(cdb: [0x00, 0, 0, 0, 0, 0])  // TEST UNIT READY
        #expect(r?.status == SCSIStatus.checkCondition.rawValue)
        #expect(r?.sense.count ?? 0 >= 14 && r?.sense[2] == SenseKey.unitAttention.rawValue)
        #expect(command(cdb: [0x00, 0, 0, 0, 0, 0])?.status == SCSIStatus.good.rawValue)
    }

    /// Posts a control-queue request; returns the response address and head.
    func control(_ request: [UInt8], responseLength: Int) -> (head: UInt16, resp: UInt64) {
        let r = ram.alloc(request.count)
        ram.write(request, at: r)
        let resp = ram.alloc(responseLength)
        ram.pointer(resp).storeBytes(of: 0xEE, as: UInt8.self)
        let head = rings[0].addChain([.init(gpa: r, length: UInt32(request.count), writable: false),
                                      .init(gpa: resp, length: UInt32(responseLength), writable: true)])
        rings[0].publish(head)
        _ = csys_eventfd_signal(fds[0].kick, 1)
        return (head, resp)
    }

    static func tmf(_ subtype: UInt32, lun: [UInt8] = [1, 0, 0x40, 0, 0, 0, 0, 0], tag: UInt64 = 0) -> [UInt8] {
        var p = [UInt8]()
        p.appendLE(VirtioSCSI.ControlType.taskManagement.rawValue)
        p.appendLE(subtype)
        p += lun
        p.appendLE(tag)
        return p
    }

    /// Adds `count` 16-byte buffers to the event queue and kicks.
    func postEventBuffers(_ count: Int) -> [UInt64] {
        var out: [UInt64] = []
        for _ in 0..<count {
            let b = ram.alloc(16)
            let head = rings[1].addChain([.init(gpa: b, length: 16, writable: true)])
            rings[1].publish(head)
            out.append(b)
        }
        _ = csys_eventfd_signal(fds[1].kick, 1)
        return out
    }
}

@Suite(.serialized) struct VirtioSCSITests {
    /// QEMU's vhost-user-scsi has no config ops: a back-end offering CONFIG makes QEMU warn at every start
    /// ("vhost-user backend supports VHOST_USER_PROTOCOL_F_CONFIG but QEMU does not"). virtio-blk needs it.
    @Test func protocolFeaturesOfferConfigOnlyForVirtioBlk() throws {
        let f = try SCSIFixture()
        let offered = try #require(f.client.getU64(.getProtocolFeatures))
        #expect(offered & VhostUserProtocolFeature.config == 0)
        #expect(offered & VhostUserProtocolFeature.replyAck != 0)
    }

    @Test func inquiryThroughGuestMemory() throws {
        let f = try SCSIFixture()
        let r = try #require(f.command(cdb: [0x12, 0, 0, 0, 96, 0], inLength: 96))
        #expect(r.response == VirtioSCSI.Response.ok.rawValue)
        #expect(r.status == SCSIStatus.good.rawValue)
        #expect(r.dataIn[0] == 0)  // direct-access block device
        #expect(Array(r.dataIn[8..<16]) == Array("SCSIGATE".utf8))
        #expect(r.usedLength == UInt32(108) + UInt32(96) - r.residual)
    }

    @Test(arguments: [false, true])
    func writeThenReadRoundTrip(synchronous: Bool) throws {
        let f = try SCSIFixture(synchronous: synchronous)
        f.clearUnitAttention()
        let data = (0..<8192).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 5) }
        // WRITE(10) LBA 100, 16 blocks.
        let w = try #require(f.command(tag: 2, cdb: [0x2A, 0, 0, 0, 0, 100, 0, 0, 16, 0], out: data))
        #expect(w.response == VirtioSCSI.Response.ok.rawValue)
        #expect(w.status == SCSIStatus.good.rawValue)
        #expect(f.channel.bytes(100 * 512, 8192) == data)
        // READ(10) back.
        let r = try #require(f.command(tag: 3, cdb: [0x28, 0, 0, 0, 0, 100, 0, 0, 16, 0], inLength: 8192))
        #expect(r.status == SCSIStatus.good.rawValue)
        #expect(r.residual == 0)
        #expect(r.dataIn == data)
        #expect(r.usedLength == 108 + 8192)
        // Past the end: CHECK CONDITION, LBA OUT OF RANGE, sense delivered.
        let bad = try #require(f.command(tag: 4, cdb: [0x28, 0, 0, 0, 0x20, 0, 0, 0, 1, 0], inLength: 512))
        #expect(bad.status == SCSIStatus.checkCondition.rawValue)
        #expect(bad.senseLength >= 14)
        #expect(bad.sense[2] & 0x0F == SenseKey.illegalRequest.rawValue && bad.sense[12] == 0x21)
    }

    @Test func writeWithMoreSegmentsThanTheDefaultSegMax() throws {
        // QEMU advertises seg_max = virtqueue_size - 2 to virtio-scsi guests: slots must hold ring-size chains.
        let f = try SCSIFixture(ringSize: 256)
        f.clearUnitAttention()
        var req: [UInt8] = [1, 0, 0x40, 0, 0, 0, 0, 0]
        req.appendLE(UInt64(11))
        req += [0, 0, 0, 0x2A, 0, 0, 0, 0, 8, 0, 0, 200, 0] + [UInt8](repeating: 0, count: 22)
        let r = f.ram.alloc(req.count)
        f.ram.write(req, at: r)
        var buffers = [TestSplitRing.Buffer(gpa: r, length: UInt32(req.count), writable: false)]
        var ok = true
        var addresses: [UInt64] = []
        for i in 0..<200 {
            let d = f.ram.alloc(512, align: 4096)
            f.ram.write([UInt8](repeating: UInt8(truncatingIfNeeded: i), count: 512), at: d)
            addresses.append(d)
            buffers.append(.init(gpa: d, length: 512, writable: false))
        }
        let resp = f.ram.alloc(108)
        f.ram.write([UInt8](repeating: 0xFF, count: 12), at: resp)
        buffers.append(.init(gpa: resp, length: 108, writable: true))
        let before = f.rings[2].usedIndex
        let head = f.rings[2].addIndirect(buffers)
        f.rings[2].publish(head)
        _ = csys_eventfd_signal(f.fds[2].kick, 1)
        #expect(waitFor { f.rings[2].usedIndex != before })
        #expect(f.ram.read(resp + 10, 2) == [SCSIStatus.good.rawValue, VirtioSCSI.Response.ok.rawValue])
        for i in 0..<200 where f.channel.bytes((8 + i) * 512, 512) != [UInt8](repeating: UInt8(truncatingIfNeeded: i), count: 512) { ok = false }
        #expect(ok)
    }

    @Test func lunAddressing() throws {
        let f = try SCSIFixture()
        #expect(f.command(lun: [1, 1, 0x40, 0, 0, 0, 0, 0], cdb: [0x12, 0, 0, 0, 36, 0], inLength: 36)?.response == VirtioSCSI.Response.badTarget.rawValue)
        #expect(f.command(lun: [2, 0, 0x40, 0, 0, 0, 0, 0], cdb: [0x12, 0, 0, 0, 36, 0], inLength: 36)?.response == VirtioSCSI.Response.badTarget.rawValue)
        #expect(f.command(lun: [1, 0, 0x80, 0, 0, 0, 0, 0], cdb: [0x12, 0, 0, 0, 36, 0], inLength: 36)?.response == VirtioSCSI.Response.incorrectLUN.rawValue)
        #expect(f.command(lun: [1, 0, 0x40, 0, 1, 0, 0, 0], cdb: [0x12, 0, 0, 0, 36, 0], inLength: 36)?.response == VirtioSCSI.Response.incorrectLUN.rawValue)
        // Peripheral addressing of LUN 0 works too; an absent LUN answers through SCSI (PQ 3 for INQUIRY).
        #expect(f.command(lun: [1, 0, 0, 0, 0, 0, 0, 0], cdb: [0x12, 0, 0, 0, 36, 0], inLength: 36)?.status == 0)
        let absent = try #require(f.command(lun: [1, 0, 0x40, 7, 0, 0, 0, 0], cdb: [0x12, 0, 0, 0, 36, 0], inLength: 36))
        #expect(absent.response == VirtioSCSI.Response.ok.rawValue)
        #expect(absent.dataIn[0] >> 5 == 3)
        #expect(VirtioSCSI.decodeAddress((1, 0, 0x7F, 0xFF, 0, 0, 0, 0)) == .lun(LogicalUnitNumber(16383)!))
    }

    /// Events name a LUN with the encoding REPORT LUNS uses (peripheral below 256, flat above), so Linux's
    /// `scsilun_to_int` gives the hot-added LUN the number its scan gives it (LUN 2 is 0:0:0:2, not 16386).
    @Test func eventAddressesUseTheReportLUNsEncoding() {
        for value in [0, 2, 255, 256, 300, 16383] {
            let lun = LogicalUnitNumber(value)!
            let bytes = VirtioSCSI.encodeAddress(lun)
            let sam = lun.samEncoding
            #expect(bytes[0] == 1 && bytes[1] == 0 && bytes[4...] == [0, 0, 0, 0])
            #expect(UInt64(bytes[2]) << 56 | UInt64(bytes[3]) << 48 == sam)
            // Linux: scsilun_to_int reads (lun[2] << 8) | lun[3] for a single-level address.
            let linux = Int(bytes[2]) << 8 | Int(bytes[3])
            #expect(linux == (value < 256 ? value : 0x4000 | value))
            #expect(VirtioSCSI.decodeAddress((bytes[0], bytes[1], bytes[2], bytes[3], 0, 0, 0, 0)) == .lun(lun))
        }
        #expect(VirtioSCSI.encodeAddress(LogicalUnitNumber(2)!) == [1, 0, 0, 2, 0, 0, 0, 0])
        #expect(VirtioSCSI.encodeAddress(LogicalUnitNumber(300)!) == [1, 0, 0x41, 0x2C, 0, 0, 0, 0])
    }

    /// Every place a LUN number crosses the wire, as Linux's virtio_scsi does it: the guest numbers each LUN
    /// from REPORT LUNS (`scsilun_to_int`: bytes 0-1 of the entry), addresses commands and TMFs to that number
    /// as `[1, target, 0x40 | L >> 8, L & 0xFF]`, and adds a hot-plugged LUN at the number bytes 2-3 of the
    /// event give (`(lun[2] << 8) | lun[3]`). Each path must name the same LUN, for peripheral (< 256) and flat LUNs.
    @Test func lunNumbersRoundTripThroughReportLUNsRequestsTMFsAndEvents() throws {
        let f = try SCSIFixture()
        let values = [2, 255, 256, 300, 16383]
        for v in values { try f.target.add(SCSIFixture.unit(v, blocks: 64)) }
        // LUN 0's unit attentions (power on, REPORTED LUNS DATA HAS CHANGED) come first.
        var attentions = 0
        while f.command(cdb: [0x00, 0, 0, 0, 0, 0])?.status != SCSIStatus.good.rawValue && attentions < 8 { attentions += 1 }
        #expect(attentions >= 1 && attentions < 8)
        let report = try #require(f.command(tag: 2, cdb: [0xA0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0], inLength: 4096))
        #expect(report.status == SCSIStatus.good.rawValue)
        let d = report.dataIn
        let listed = (Int(d[0]) << 24 | Int(d[1]) << 16 | Int(d[2]) << 8 | Int(d[3])) / 8
        #expect(listed == values.count + 1)
        var linuxNumbers: [Int: Int] = [:]  // LUN -> the number Linux gives it from REPORT LUNS
        for i in 0..<listed {
            let entry = Array(report.dataIn[(8 + 8 * i)..<(16 + 8 * i)])
            #expect(entry[2...] == [0, 0, 0, 0, 0, 0])
            let linux = Int(entry[0]) << 8 | Int(entry[1])
            // The request Linux sends to that number reaches the LUN whose serial is SG<value>.
            let address: [UInt8] = [1, 0, UInt8(linux >> 8) | 0x40, UInt8(linux & 0xFF), 0, 0, 0, 0]
            let inquiry = try #require(f.command(lun: address, tag: UInt64(10 + i), cdb: [0x12, 1, 0x80, 0, 64, 0], inLength: 64))
            #expect(inquiry.status == SCSIStatus.good.rawValue)
            let serial = String(decoding: inquiry.dataIn[4..<(4 + Int(inquiry.dataIn[3]))], as: UTF8.self)
            let value = try #require(Int(serial.dropFirst(2)))
            linuxNumbers[value] = linux
            #expect(linux == (value < 256 ? value : 0x4000 | value), "LUN \(value) listed as \(linux)")
            // A LOGICAL UNIT RESET to the same address names that LUN (FUNCTION COMPLETE, not INCORRECT LUN).
            let tmf = f.control(SCSIFixture.tmf(VirtioSCSI.TMF.logicalUnitReset.rawValue, lun: address), responseLength: 16)
            #expect(waitFor { f.ram.read(tmf.resp, 1) != [0xEE] })
            #expect(f.ram.read(tmf.resp, 1) == [VirtioSCSI.Response.ok.rawValue])
        }
        #expect(Set(linuxNumbers.keys) == Set([0] + values))
        // Hot-plug and removal events give Linux the same number as its scan (the adds above, made while the
        // event queue had no buffer, are reported first as missed events).
        _ = f.postEventBuffers(1)
        #expect(waitFor { f.rings[1].usedIndex == 1 })
        let buffers = f.postEventBuffers(2)
        try f.target.add(SCSIFixture.unit(301, blocks: 64))
        #expect(waitFor { f.rings[1].usedIndex == 2 })
        try f.target.remove(LogicalUnitNumber(2)!)
        #expect(waitFor { f.rings[1].usedIndex == 3 })
        let added = f.ram.read(buffers[0], 16)
        let removed = f.ram.read(buffers[1], 16)
        #expect(Int(added[6]) << 8 | Int(added[7]) == 0x4000 | 301)
        #expect(Int(removed[6]) << 8 | Int(removed[7]) == linuxNumbers[2])
        #expect(removed.readLE(UInt32.self, at: 12) == VirtioSCSI.ResetReason.removed.rawValue)
    }

    @Test func malformedRequestsFailWithoutStoppingTheQueue() throws {
        let f = try SCSIFixture()
        // Response buffer smaller than the response header + sense: returned unused.
        let before = f.rings[2].usedIndex
        _ = f.post(tag: 9, cdb: [0x12, 0, 0, 0, 36, 0], responseLength: 20)
        #expect(waitFor { f.rings[2].usedIndex != before })
        #expect(f.rings[2].usedElement(before).len == 0)
        // A request header shorter than 19 + cdb_size: FAILURE.
        let r = f.ram.alloc(10)
        let resp = f.ram.alloc(108)
        let head = f.rings[2].addChain([.init(gpa: r, length: 10, writable: false), .init(gpa: resp, length: 108, writable: true)])
        f.rings[2].publish(head)
        _ = csys_eventfd_signal(f.fds[2].kick, 1)
        #expect(waitFor { f.rings[2].usedIndex == before &+ 2 })
        #expect(f.ram.read(resp + 11, 1) == [VirtioSCSI.Response.failure.rawValue])
        #expect(f.command(cdb: [0x12, 0, 0, 0, 36, 0], inLength: 36)?.status == 0)
    }

    @Test func abortTaskWaitsForTheBackendAndAbortsTheCommand() throws {
        let f = try SCSIFixture()
        f.clearUnitAttention()
        f.channel.hold.store(true, ordering: .releasing)
        let before = f.rings[2].usedIndex
        let cmd = f.post(tag: 77, cdb: [0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0], inLength: 4096)
        usleep(50_000)
        #expect(f.rings[2].usedIndex == before)
        // QUERY TASK finds it.
        let q = f.control(SCSIFixture.tmf(VirtioSCSI.TMF.queryTask.rawValue, tag: 77), responseLength: 1)
        #expect(waitFor { f.rings[0].usedIndex == 1 })
        #expect(f.ram.read(q.resp, 1) == [VirtioSCSI.Response.functionSucceeded.rawValue])
        // ABORT TASK completes only after the back-end returns the I/O.
        let a = f.control(SCSIFixture.tmf(VirtioSCSI.TMF.abortTask.rawValue, tag: 77), responseLength: 1)
        usleep(100_000)
        #expect(f.rings[0].usedIndex == 1)
        f.channel.releaseHeld()
        #expect(waitFor { f.rings[0].usedIndex == 2 })
        #expect(f.ram.read(a.resp, 1) == [VirtioSCSI.Response.ok.rawValue])
        #expect(f.rings[2].usedIndex == before &+ 1)
        let resp = f.readResponse(cmd.resp, data: cmd.data, inLength: 0, usedLength: 0)
        #expect(resp.response == VirtioSCSI.Response.aborted.rawValue)
        // QUERY TASK now finds nothing; LUN RESET completes; unknown TMF subtype is rejected; bad target.
        _ = f.control(SCSIFixture.tmf(VirtioSCSI.TMF.queryTask.rawValue, tag: 77), responseLength: 1)
        let reset = f.control(SCSIFixture.tmf(VirtioSCSI.TMF.logicalUnitReset.rawValue), responseLength: 1)
        let odd = f.control(SCSIFixture.tmf(99), responseLength: 1)
        let badTarget = f.control(SCSIFixture.tmf(VirtioSCSI.TMF.abortTaskSet.rawValue, lun: [1, 3, 0x40, 0, 0, 0, 0, 0]), responseLength: 1)
        let noLUN = f.control(SCSIFixture.tmf(VirtioSCSI.TMF.abortTaskSet.rawValue, lun: [1, 0, 0x40, 9, 0, 0, 0, 0]), responseLength: 1)
        #expect(waitFor { f.rings[0].usedIndex == 7 })
        #expect(f.ram.read(reset.resp, 1) == [VirtioSCSI.Response.ok.rawValue])
        #expect(f.ram.read(odd.resp, 1) == [VirtioSCSI.Response.functionRejected.rawValue])
        #expect(f.ram.read(badTarget.resp, 1) == [VirtioSCSI.Response.badTarget.rawValue])
        #expect(f.ram.read(noLUN.resp, 1) == [VirtioSCSI.Response.incorrectLUN.rawValue])
        // After LOGICAL UNIT RESET the LUN reports BUS DEVICE RESET FUNCTION OCCURRED.
        let ua = try #require(f.command(cdb: [0x00, 0, 0, 0, 0, 0]))
        #expect(ua.status == SCSIStatus.checkCondition.rawValue && ua.sense[12] == 0x29 && ua.sense[13] == 0x03)
    }

    @Test func asynchronousNotificationQueryReportsNoEvents() throws {
        let f = try SCSIFixture()
        var p = [UInt8]()
        p.appendLE(VirtioSCSI.ControlType.asyncNotificationQuery.rawValue)
        p += [1, 0, 0x40, 0, 0, 0, 0, 0]
        p.appendLE(UInt32(0xFF))
        let c = f.control(p, responseLength: 5)
        #expect(waitFor { f.rings[0].usedIndex == 1 })
        #expect(f.ram.read(c.resp, 5) == [0, 0, 0, 0, VirtioSCSI.Response.ok.rawValue])
        #expect(f.rings[0].usedElement(0).len == 5)
    }

    @Test func hotplugRemoveResizeEventsAndMissedEvents() throws {
        let f = try SCSIFixture()
        let buffers = f.postEventBuffers(3)
        usleep(20_000)
        #expect(f.rings[1].usedIndex == 0)  // buffers are kept until an event happens
        try f.target.add(SCSIFixture.unit(5, blocks: 100))
        #expect(waitFor { f.rings[1].usedIndex == 1 })
        var e = f.ram.read(buffers[0], 16)
        #expect(e.readLE(UInt32.self, at: 0) == VirtioSCSI.Event.transportReset.rawValue)
        #expect(Array(e[4..<12]) == [1, 0, 0, 5, 0, 0, 0, 0])  // peripheral addressing, as REPORT LUNS
        #expect(e.readLE(UInt32.self, at: 12) == VirtioSCSI.ResetReason.rescan.rawValue)
        try f.target.resize(LogicalUnitNumber(5)!, blockCount: 200, allowShrink: false)
        #expect(waitFor { f.rings[1].usedIndex == 2 })
        e = f.ram.read(buffers[1], 16)
        #expect(e.readLE(UInt32.self, at: 0) == VirtioSCSI.Event.parameterChange.rawValue)
        #expect(e.readLE(UInt32.self, at: 12) == 0x092A)
        try f.target.remove(LogicalUnitNumber(5)!)
        #expect(waitFor { f.rings[1].usedIndex == 3 })
        e = f.ram.read(buffers[2], 16)
        #expect(e.readLE(UInt32.self, at: 12) == VirtioSCSI.ResetReason.removed.rawValue)
        // No buffer left: the event is missed, and the next buffer carries NO_EVENT | EVENTS_MISSED.
        try f.target.add(SCSIFixture.unit(6, blocks: 100))
        usleep(50_000)
        #expect(f.rings[1].usedIndex == 3)
        let more = f.postEventBuffers(1)
        #expect(waitFor { f.rings[1].usedIndex == 4 })
        e = f.ram.read(more[0], 16)
        #expect(e.readLE(UInt32.self, at: 0) == VirtioSCSI.Event.noEvent.rawValue | VirtioSCSI.Event.missedFlag)
    }

    /// A LUN event while the event queue is not running (a gateway restarted under a guest: the CLI adds a LUN
    /// before QEMU has reconnected) is missed; when the ring starts again with buffers the driver posted before,
    /// no kick comes, and the first buffer must carry EVENTS_MISSED at once (Linux then rescans the host).
    @Test func anEventMissedWhileTheEventQueueWasStoppedIsReportedWhenItStartsAgain() throws {
        let f = try SCSIFixture()
        let c = f.client!
        let base = try #require(c.getVringBase(1))
        try f.target.add(SCSIFixture.unit(7, blocks: 64))
        let b = f.ram.alloc(16)
        f.ram.write([UInt8](repeating: 0xEE, count: 16), at: b)
        let head = f.rings[1].addChain([.init(gpa: b, length: 16, writable: true)])
        f.rings[1].publish(head)  // posted while stopped; no kick follows
        let fds = c.startRing(1, f.rings[1], ram: f.ram, base: base)
        defer { close(fds.kick); close(fds.call) }
        #expect(waitFor { f.rings[1].usedIndex == 1 })
        let e = f.ram.read(b, 16)
        #expect(e.readLE(UInt32.self, at: 0) == VirtioSCSI.Event.noEvent.rawValue | VirtioSCSI.Event.missedFlag)
    }

    @Test func configSpaceAndWritableSizes() throws {
        let f = try SCSIFixture()
        let c = f.device.readConfig()
        #expect(c.count == 36)
        #expect(c.readLE(UInt32.self, at: 0) == 1)  // num_queues
        #expect(c.readLE(UInt32.self, at: 16) == 16)  // event_info_size
        #expect(c.readLE(UInt32.self, at: 20) == 96)
        #expect(c.readLE(UInt32.self, at: 24) == 32)
        #expect(c.readLE(UInt32.self, at: 32) == 16383)
        var set = [UInt8]()
        set.appendLE(UInt32(20))
        set.appendLE(UInt32(8))
        set.appendLE(UInt32(0))
        set.appendLE(UInt32(32))  // sense_size
        set.appendLE(UInt32(16))  // cdb_size
        #expect(f.client.ack(.setConfig, set) == 0)
        #expect(f.device.readConfig().readLE(UInt32.self, at: 20) == 32)
        // A command with the smaller layout (19 + 16 request, 12 + 32 response).
        var req: [UInt8] = [1, 0, 0x40, 0, 0, 0, 0, 0]
        req.appendLE(UInt64(5))
        req += [0, 0, 0, 0x12, 0, 0, 0, 36, 0] + [UInt8](repeating: 0, count: 10)
        let r = f.ram.alloc(req.count)
        f.ram.write(req, at: r)
        let resp = f.ram.alloc(44)
        let data = f.ram.alloc(36)
        let head = f.rings[2].addChain([.init(gpa: r, length: UInt32(req.count), writable: false),
                                        .init(gpa: resp, length: 44, writable: true), .init(gpa: data, length: 36, writable: true)])
        f.rings[2].publish(head)
        _ = csys_eventfd_signal(f.fds[2].kick, 1)
        #expect(waitFor { f.rings[2].usedIndex == 1 })
        #expect(f.rings[2].usedElement(0).len == 44 + 36)
        #expect(Array(f.ram.read(data + 8, 8)) == Array("SCSIGATE".utf8))
        // Out-of-range or read-only fields are refused.
        var bad = [UInt8]()
        bad.appendLE(UInt32(0))
        bad.appendLE(UInt32(4))
        bad.appendLE(UInt32(0))
        bad.appendLE(UInt32(9))
        #expect(f.client.ack(.setConfig, bad) == 1)
    }
}

@Suite struct ControllerTests {
    @Test func controllersStartAndStop() throws {
        let target = SCSITarget(name: "ctl")
        try target.add(SCSIFixture.unit(0, blocks: 64))
        let log = TestLog()
        let path = testSocketPath("ctl")
        let channel = MemoryChannel(bytes: 1 << 20)
        let scsi = VhostUserSCSIController(socketPath: path, device: try VirtioSCSIDevice(target: target, options: VirtioSCSIOptions(requestQueues: 2, threads: 2),
                                               channelFactory: { _ in channel }, log: log.logger), log: log.logger)
        try scsi.start()
        let client = try #require(TestFrontEnd(path: path))
        #expect(client.getU64(.getQueueNum) == 4)
        scsi.stop()
        #expect(access(path, F_OK) != 0)

        let blkPath = testSocketPath("ctlblk")
        let blk = VhostUserBlkController(socketPath: blkPath, device: try VirtioBlkDevice(geometry: BlockGeometry(logicalBlockSize: 4096, physicalBlockSize: 4096, blockCount: 16),
                                             options: VirtioBlkOptions(queues: 4, serial: "X", threads: 2), channelFactory: { channel }, log: log.logger), log: log.logger)
        try blk.start()
        #expect(access(blkPath, F_OK) == 0)
        blk.stop()
        #expect(throws: VirtioDeviceError.self) {
            try VirtioBlkDevice(geometry: BlockGeometry(logicalBlockSize: 100, physicalBlockSize: 100, blockCount: 16),
                                options: VirtioBlkOptions(serial: "X"), channelFactory: { channel }, log: log.logger)
        }
    }
}
