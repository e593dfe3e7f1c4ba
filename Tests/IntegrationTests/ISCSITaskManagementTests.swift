import TestSupport
import VirtioTestSupport
import VhostUserTestSupport
import BlockIO
import CSystem
import ISCSIBackend
import SCSI
import Synchronization
import Testing
import VhostUser
import VirtioDevices
import Virtio
#if canImport(Glibc)
import Glibc
#endif

/// A virtio-scsi controller over a real iSCSI back-end (tgtd) with a test front-end.
final class ISCSIFixture: @unchecked Sendable {
    let ram = TestGuestRAM()
    let rings: [TestSplitRing]
    let target = SCSITarget(name: "vscsi-iscsi")
    let device: VirtioSCSIDevice<ISCSIChannel>
    let server: VhostUserServer<VirtioSCSIDevice<ISCSIChannel>>
    let log = TestLog()
    var client: TestFrontEnd!
    var fds: [(kick: Int32, call: Int32)] = []
    final class Channels: Sendable { let list = Mutex<[ISCSIChannel]>([]) }
    let channels = Channels()
    let path = testSocketPath("scsi-iscsi")

    init(url: String) throws {
        let memory = ram
        rings = (0..<3).map { _ in TestSplitRing(ram: memory, size: 32) }
        let config = try ISCSIBackendConfig(url: url, initiatorName: "iqn.2026-11.test.scsigate:vhost-initiator",
                                            reconnectBackoff: ISCSIReconnectBackoff(initialMilliseconds: 50, maximumMilliseconds: 300))
        let backend = try ISCSIBackend.open(config: config)
        try target.add(LogicalUnit(number: LogicalUnitNumber(0)!, identity: LogicalUnitIdentity(serial: "SGI0", naa: 0x5000_0000_0000_0100),
                                   geometry: backend.geometry, backendID: 0))
        let list = channels
        device = try VirtioSCSIDevice(target: target, options: VirtioSCSIOptions(requestQueues: 1, maxQueueSize: 256),
                                      channelFactory: { _ in
                                          let c = try backend.makeChannel()
                                          list.list.withLock { $0.append(c) }
                                          return c
                                      }, log: log.logger)
        server = VhostUserServer(socketPath: path, device: device, log: log.logger)
        try server.start()
        client = TestFrontEnd(path: path)
        fds = client.setUp(ram: ram, rings: rings,
                           features: VirtioFeature.version1 | VirtioFeature.ringEventIndex | vhostUserFeatureProtocolFeatures,
                           protocolFeatures: VhostUserProtocolFeature.replyAck | VhostUserProtocolFeature.multiQueue)
        for r in rings { r.setUsedEvent(0xFFFF) }
    }

    deinit {
        client = nil
        server.stop()
        device.shutdown()
        for f in fds { close(f.kick); close(f.call) }
    }

    /// Posts a command on the request queue; returns its head and response / data addresses.
    func post(tag: UInt64, cdb: [UInt8], out: [UInt8] = [], inLength: Int = 0) -> (head: UInt16, resp: UInt64, data: UInt64) {
        let request = ram.scsiRequest(tag: tag, cdb: cdb, out: out, inLength: inLength)
        ram.pointer(request.response + 11).storeBytes(of: 0xEE, as: UInt8.self)  // response byte: not answered yet
        let head = rings[2].addChain(request.buffers)
        rings[2].publish(head)
        _ = csys_eventfd_signal(fds[2].kick, 1)
        return (head, request.response, request.dataIn)
    }

    /// Status and virtio response byte of a completed command.
    func result(_ resp: UInt64) -> (status: UInt8, response: UInt8) {
        let h = ram.read(resp, 12)
        return (h[10], h[11])
    }

    /// Runs one command to completion (10 s at most).
    func command(tag: UInt64, cdb: [UInt8], out: [UInt8] = [], inLength: Int = 0) -> (status: UInt8, response: UInt8, data: [UInt8])? {
        let before = rings[2].usedIndex
        let p = post(tag: tag, cdb: cdb, out: out, inLength: inLength)
        guard waitFor(seconds: 10, { rings[2].usedIndex != before }) else { return nil }
        let r = result(p.resp)
        return (r.status, r.response, inLength > 0 ? ram.read(p.data, inLength) : [])
    }

    func control(_ request: [UInt8]) -> UInt64 {
        let r = ram.alloc(request.count)
        ram.write(request, at: r)
        let resp = ram.alloc(1)
        ram.pointer(resp).storeBytes(of: 0xEE, as: UInt8.self)
        let head = rings[0].addChain([.init(gpa: r, length: UInt32(request.count), writable: false),
                                      .init(gpa: resp, length: 1, writable: true)])
        rings[0].publish(head)
        _ = csys_eventfd_signal(fds[0].kick, 1)
        return resp
    }

    /// Task-management responses the remote target sent on every channel (read when idle).
    var remoteTMFResponses: UInt64 { channels.list.withLock { $0.reduce(0) { $0 + $1.statistics.taskManagementResponses } } }
}

/// virtio-scsi TMFs reaching a real remote target: tgtd is frozen (SIGSTOP) so that the commands stay
/// in flight, the guest's TMF is sent, tgtd resumes (SIGCONT); the TMF reaches tgtd (its response is
/// counted on the channel), the aborted commands answer VIRTIO_SCSI_S_ABORTED before the TMF answers,
/// and the session keeps working.
@Suite(.serialized, .enabled(if: getuid() == 0, "tgtd needs root (its IPC lock file)")) struct ISCSITaskManagementThroughVirtioSCSITests {
    static func write(_ lba: UInt32, blocks: UInt16) -> [UInt8] {
        var cdb = [UInt8](repeating: 0, count: 10)
        cdb[0] = 0x2A
        withUnsafeBytes(of: lba.bigEndian) { for i in 0..<4 { cdb[2 + i] = $0[i] } }
        withUnsafeBytes(of: blocks.bigEndian) { for i in 0..<2 { cdb[7 + i] = $0[i] } }
        return cdb
    }

    static func tmf(_ subtype: UInt32, tag: UInt64 = 0) -> [UInt8] {
        var p = [UInt8]()
        p.appendLE(VirtioSCSI.ControlType.taskManagement.rawValue)
        p.appendLE(subtype)
        p += [1, 0, 0x40, 0, 0, 0, 0, 0]
        p.appendLE(tag)
        return p
    }

    /// A fresh tgtd (stopped when the test ends) and a controller on it, past the power-on unit attention.
    func ready() throws -> (TgtTarget, ISCSIFixture) {
        let tgt = try TgtTarget(sizeMiB: 8)
        let f = try ISCSIFixture(url: tgt.url)
        // Power-on unit attention, then a working WRITE through tgtd.
        _ = f.command(tag: 1, cdb: [0, 0, 0, 0, 0, 0])
        #expect(f.command(tag: 2, cdb: [0, 0, 0, 0, 0, 0])?.status == SCSIStatus.good.rawValue)
        let w = f.command(tag: 3, cdb: Self.write(100, blocks: 1), out: [UInt8](repeating: 0x11, count: 512))
        #expect(w?.status == SCSIStatus.good.rawValue && w?.response == VirtioSCSI.Response.ok.rawValue)
        return (tgt, f)
    }

    @Test func abortTaskOfACommandHeldByAFrozenTargetReachesTheTarget() throws {
        let (tgt, f) = try ready()
        let tmfBefore = f.remoteTMFResponses
        let before = f.rings[2].usedIndex
        #expect(tgt.signal(SIGSTOP))
        let cmd = f.post(tag: 50, cdb: Self.write(200, blocks: 8), out: [UInt8](repeating: 0x22, count: 4096))
        usleep(300_000)
        #expect(f.rings[2].usedIndex == before, "the WRITE waits for the frozen target")
        let a = f.control(Self.tmf(VirtioSCSI.TMF.abortTask.rawValue, tag: 50))
        usleep(300_000)
        #expect(f.rings[0].usedIndex == 0, "ABORT TASK waits for the target")
        #expect(tgt.signal(SIGCONT))
        #expect(waitFor(seconds: 15) { f.rings[0].usedIndex == 1 })
        #expect(f.ram.read(a, 1) == [VirtioSCSI.Response.ok.rawValue])
        #expect(f.rings[2].usedIndex == before &+ 1, "the WRITE was answered before the TMF")
        #expect(f.result(cmd.resp).response == VirtioSCSI.Response.aborted.rawValue)
        #expect(f.remoteTMFResponses == tmfBefore + 1, "ABORT TASK reached tgtd")
        // The session keeps working.
        let r = f.command(tag: 51, cdb: [0x28, 0, 0, 0, 0, 100, 0, 0, 1, 0], inLength: 512)
        #expect(r?.status == SCSIStatus.good.rawValue && r?.data.first == 0x11)
    }

    @Test func logicalUnitResetOfCommandsHeldByAFrozenTargetResetsTheRemoteLUN() throws {
        let (tgt, f) = try ready()
        let tmfBefore = f.remoteTMFResponses
        let before = f.rings[2].usedIndex
        #expect(tgt.signal(SIGSTOP))
        var cmds: [(head: UInt16, resp: UInt64, data: UInt64)] = []
        for i in 0..<3 {
            let lba = UInt32(300 + 8 * i)
            cmds.append(f.post(tag: UInt64(60 + i), cdb: Self.write(lba, blocks: 8), out: [UInt8](repeating: 0x33, count: 4096)))
        }
        usleep(300_000)
        #expect(f.rings[2].usedIndex == before)
        // The channel cancels at once what it had not sent yet (the target's command window is shut
        // while it is frozen) and the rest when tgtd answers the LUN RESET: the TMF may answer before
        // SIGCONT, but never before every command it aborted.
        let a = f.control(Self.tmf(VirtioSCSI.TMF.logicalUnitReset.rawValue))
        usleep(300_000)
        #expect(tgt.signal(SIGCONT))
        #expect(waitFor(seconds: 15) { f.rings[0].usedIndex == 1 })
        #expect(f.ram.read(a, 1) == [VirtioSCSI.Response.ok.rawValue])
        #expect(f.rings[2].usedIndex == before &+ 3, "the commands were answered before the TMF")
        for c in cmds { #expect(f.result(c.resp).response == VirtioSCSI.Response.aborted.rawValue) }
        #expect(waitFor(seconds: 15) { f.remoteTMFResponses == tmfBefore + 1 }, "one LUN RESET reached tgtd")
        // BUS DEVICE RESET unit attention from our LUN, then I/O works again.
        _ = f.command(tag: 70, cdb: [0, 0, 0, 0, 0, 0])
        let r = f.command(tag: 71, cdb: [0x28, 0, 0, 0, 0, 100, 0, 0, 1, 0], inLength: 512)
        #expect(r?.status == SCSIStatus.good.rawValue && r?.data.first == 0x11)
    }
}
