import PVSCSITestSupport
import TestSupport
import VfioUserTestSupport
import Backends
import BlockIO
import CSystem
import Foundation
import Gateway
import ISCSIBackend
import PVSCSI
import SCSI
import Testing

/// PVSCSI task management against a real iSCSI back-end (tgtd, libiscsi): with tgtd stopped (SIGSTOP) the
/// READ stays in flight; ABORT_CMD makes the channel send ABORT TASK, RESET_DEVICE a LUN RESET; once tgtd
/// runs again the guest gets BTSTAT_ABORTQUEUE / BTSTAT_BUSRESET.
@Suite(.serialized, .enabled(if: getuid() == 0, "tgtd needs root (its IPC lock file)")) struct PVSCSIOverISCSITaskManagementTests {
    @Test func abortAndResetReachTheRemoteTarget() throws {
        let tgt = try TgtTarget(sizeMiB: 16)
        let config = try ISCSIBackendConfig(url: tgt.url, initiatorName: "iqn.2026-11.test.scsigate:pvscsi-initiator",
                                            timeoutSeconds: 30)
        let backend = AnyBlockBackend.iscsi(try ISCSIBackend.open(config: config))
        defer { backend.close() }
        let table = SCSITarget(name: "iscsi")
        try table.add(LogicalUnit(number: LogicalUnitNumber(0)!,
                                  identity: LogicalUnitIdentity(serial: "ISCSI0", naa: 0x5000_0000_0000_00F1),
                                  geometry: backend.geometry, backendID: 0))
        let sock = "/tmp/scsigate-pvscsi-iscsi-\(getpid()).sock"
        let controller = try PVSCSIController(socketPath: sock, target: table,
                                              channelFactory: { _ in try? backend.makeChannel() }, log: TestLog.quiet)
        try controller.start()
        defer { controller.stop() }
        let client = try VfioUserTestClient(path: sock)
        let g = TestGuest(client: client)
        try g.connect()
        try g.linuxStartup()
        let device = controller.device
        let sense = g.address(page: TestGuest.sensePage)
        var n = 0
        while n < 4 {
            let t = try g.run([GuestRequest(context: 90 + UInt64(n), cdb: [0, 0, 0, 0, 0, 0], senseAddress: sense, senseLength: 96)])
            if t.first?.scsiStatus == 0 { break }
            n += 1
        }
        let ok = try g.run([GuestRequest(context: 1, cdb: read10(lba: 0, blocks: 8), flags: PVSCSI.flagDirectionToHost,
                                         dataAddress: g.address(page: TestGuest.dataPage), dataLength: 4096)])
        #expect(ok.first?.hostStatus == 0 && ok.first?.scsiStatus == 0)
        g.drainInterrupts()

        // ABORT_CMD while the target is stopped.
        #expect(tgt.signal(SIGSTOP))
        g.place(GuestRequest(context: 42, cdb: read10(lba: 64, blocks: 8), flags: PVSCSI.flagDirectionToHost,
                             dataAddress: g.address(page: TestGuest.dataPage), dataLength: 4096))
        try g.kick()
        #expect(!g.waitInterrupt(milliseconds: 300))
        #expect(controller.sync { device.requestsInFlight } == 1)
        #expect(try g.command(.abortCommand, TestGuest.words([42], pairs: true) + [0, 0]) == 0)
        #expect(controller.sync { device.stats.backendAborts } == 1)
        #expect(tgt.signal(SIGCONT))
        var done: [GuestCompletion] = []
        while done.isEmpty, g.waitInterrupt(milliseconds: 10_000) { done += g.takeCompletions() }
        #expect(done.map(\.context) == [42])
        #expect(done.first?.hostStatus == HostAdapterStatus.abortQueue.rawValue)

        // RESET_DEVICE while the target is stopped.
        #expect(tgt.signal(SIGSTOP))
        g.place(GuestRequest(context: 43, cdb: read10(lba: 128, blocks: 8), flags: PVSCSI.flagDirectionToHost,
                             dataAddress: g.address(page: TestGuest.dataPage), dataLength: 4096))
        try g.kick()
        #expect(!g.waitInterrupt(milliseconds: 300))
        #expect(try g.command(.resetDevice, [0, 0, 0]) == 0)
        #expect(controller.sync { device.stats.backendResets } == 1)
        #expect(tgt.signal(SIGCONT))
        done = []
        while done.isEmpty, g.waitInterrupt(milliseconds: 10_000) { done += g.takeCompletions() }
        #expect(done.map(\.context) == [43])
        #expect(done.first?.hostStatus == HostAdapterStatus.busReset.rawValue)

        // The LUN keeps working afterwards.
        var again: [GuestCompletion] = []
        for k in 0..<4 {
            again = try g.run([GuestRequest(context: 50 + UInt64(k), cdb: read10(lba: 0, blocks: 8), flags: PVSCSI.flagDirectionToHost,
                                            dataAddress: g.address(page: TestGuest.dataPage), dataLength: 4096,
                                            senseAddress: sense, senseLength: 96)], milliseconds: 10_000)
            if again.first?.scsiStatus == 0 { break }  // a unit attention after the LUN reset first
        }
        #expect(again.first?.hostStatus == 0 && again.first?.scsiStatus == 0)
    }
}
