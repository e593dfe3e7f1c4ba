import PVSCSITestSupport
import VfioUserTestSupport
import CSystem
import PVSCSI
import SCSI
import Testing
import VfioUser
#if canImport(Glibc)
import Glibc
#endif

/// PVSCSI task management reaching the back-end (`abort(token:)`, `resetLogicalUnit()`), with a channel that
/// behaves like the iSCSI one: held I/O completes with ECANCELED once aborted or reset, and the guest sees
/// BTSTAT_ABORTQUEUE / BTSTAT_BUSRESET without the I/O ever finishing on its own.
@Suite(.serialized) struct TaskManagementTests {
    /// A fixture whose LUN channels are open, cancellable and holding their completions.
    func heldFixture(luns: [Int] = [0]) throws -> (Fixture, [MemoryChannel]) {
        let f = try Fixture(luns: luns)
        let g = f.guest!
        var out: [MemoryChannel] = []
        for l in luns {
            _ = try g.run([GuestRequest(context: 900 + UInt64(l), target: UInt8(l), cdb: [0, 0, 0, 0, 0, 0])])
            let ch = try #require(f.channels.made(l))
            f.onLoop {
                ch.cancellable = true
                ch.hold.store(true, ordering: .releasing)
            }
            out.append(ch)
        }
        g.drainInterrupts()
        return (f, out)
    }

    func read(_ g: TestGuest, context: UInt64, target: UInt8 = 0) -> GuestRequest {
        GuestRequest(context: context, target: target, cdb: read10(lba: UInt32(context % 64), blocks: 1),
                     flags: PVSCSI.flagDirectionToHost, dataAddress: g.address(page: TestGuest.dataPage), dataLength: 512)
    }

    @Test func abortCommandAbortsTheBackEndRequest() throws {
        let (f, chs) = try heldFixture()
        let g = f.guest!
        g.place(read(g, context: 42))
        g.place(read(g, context: 43))
        try g.kick()
        #expect(!g.waitInterrupt(milliseconds: 100))
        #expect(f.requestsInFlight == 2)
        #expect(try g.command(.abortCommand, TestGuest.words([42], pairs: true) + [0, 0]) == 0)
        // Completed by the back-end's abort alone (the channel still holds the other one).
        #expect(g.waitInterrupt())
        let done = g.takeCompletions()
        #expect(done.map(\.context) == [42])
        #expect(done.first?.hostStatus == HostAdapterStatus.abortQueue.rawValue)
        #expect(chs[0].aborted.load(ordering: .acquiring) == 1)
        #expect(f.deviceStats.backendAborts == 1)
        #expect(f.requestsInFlight == 1)
        // An abort of an unknown context touches nothing.
        #expect(try g.command(.abortCommand, TestGuest.words([7777], pairs: true) + [0, 0]) == 0)
        #expect(chs[0].aborted.load(ordering: .acquiring) == 1)
        f.onLoop { chs[0].release() }
        #expect(g.waitInterrupt())
        #expect(g.takeCompletions().map(\.context) == [43])
    }

    @Test func resetDeviceResetsOnlyThatTargetsBackEnd() throws {
        let (f, chs) = try heldFixture(luns: [0, 1])
        let g = f.guest!
        g.place(read(g, context: 1, target: 0))
        g.place(read(g, context: 2, target: 0))
        g.place(read(g, context: 3, target: 1))
        try g.kick()
        #expect(!g.waitInterrupt(milliseconds: 100))
        #expect(try g.command(.resetDevice, [0, 0, 0]) == 0)  // target 0, lun[8] = 0
        var done: [GuestCompletion] = []
        while done.count < 2, g.waitInterrupt(milliseconds: 2000) { done += g.takeCompletions() }
        #expect(Set(done.map(\.context)) == [1, 2])
        #expect(done.allSatisfy { $0.hostStatus == HostAdapterStatus.busReset.rawValue })
        #expect(chs[0].resets.load(ordering: .acquiring) == 1)
        #expect(chs[1].resets.load(ordering: .acquiring) == 0)
        #expect(f.requestsInFlight == 1)
        // RESET_BUS reaches every LUN's back-end.
        #expect(try g.command(.resetBus) == 0)
        #expect(g.waitInterrupt())
        let rest = g.takeCompletions()
        #expect(rest.map(\.context) == [3])
        #expect(rest.first?.hostStatus == HostAdapterStatus.busReset.rawValue)
        #expect(chs[0].resets.load(ordering: .acquiring) == 2)
        #expect(chs[1].resets.load(ordering: .acquiring) == 1)
        #expect(f.deviceStats.backendResets == 3)
    }

    @Test func adapterResetAbortsWhatIsInFlight() throws {
        let (f, chs) = try heldFixture()
        let g = f.guest!
        g.place(read(g, context: 11))
        g.place(read(g, context: 12))
        try g.kick()
        #expect(!g.waitInterrupt(milliseconds: 100))
        #expect(try g.command(.adapterReset) == 0)
        #expect(chs[0].aborted.load(ordering: .acquiring) == 2)
        // The aborted requests come back from the back-end and are dropped (their rings are gone).
        var waited = 0
        while f.requestsInFlight > 0 && waited < 200 { usleep(10_000); waited += 1 }
        #expect(f.requestsInFlight == 0)
        try g.linuxStartup()
        #expect(try g.run([GuestRequest(context: 13, cdb: [0, 0, 0, 0, 0, 0])]).first?.context == 13)
    }

    /// The adapter's requests are tasks in the core's task set: a second request with the context (tag) of one
    /// still in flight on the same target is an overlapped command (CHECK CONDITION, ABORTED COMMAND), and
    /// ABORT_CMD then aborts the first one only.
    @Test func aDuplicateContextInFlightIsAnOverlappedCommand() throws {
        let (f, chs) = try heldFixture(luns: [0, 1])
        let g = f.guest!
        g.place(read(g, context: 50, target: 0))
        g.place(read(g, context: 50, target: 1))  // same tag on another LUN: a different task
        try g.kick()
        #expect(!g.waitInterrupt(milliseconds: 100))
        g.place(read(g, context: 50, target: 0))
        try g.kick()
        #expect(g.waitInterrupt())
        let overlapped = g.takeCompletions()
        #expect(overlapped.map(\.context) == [50])
        #expect(overlapped.first?.hostStatus == HostAdapterStatus.success.rawValue)
        #expect(overlapped.first?.scsiStatus == UInt16(SCSIStatus.checkCondition.rawValue))
        #expect(f.requestsInFlight == 2)
        #expect(try g.command(.abortCommand, TestGuest.words([50], pairs: true) + [0, 0]) == 0)
        #expect(g.waitInterrupt())
        let done = g.takeCompletions()
        #expect(done.count == 1 && done.first?.hostStatus == HostAdapterStatus.abortQueue.rawValue)
        #expect(chs[0].aborted.load(ordering: .acquiring) == 1)
        #expect(chs[1].aborted.load(ordering: .acquiring) == 0)
        f.onLoop { chs[1].release() }
        #expect(g.waitInterrupt())
        #expect(g.takeCompletions().first?.hostStatus == HostAdapterStatus.success.rawValue)
    }

    @Test func localBackEndsCannotAbortAndTheRequestCompletesNormally() throws {
        let f = try Fixture()
        let g = f.guest!
        _ = try g.run([GuestRequest(context: 1, cdb: [0, 0, 0, 0, 0, 0])])
        let ch = try #require(f.channels.made(0))
        f.onLoop { ch.hold.store(true, ordering: .releasing) }
        g.drainInterrupts()
        g.place(read(g, context: 5))
        try g.kick()
        #expect(g.noCompletion(milliseconds: 100))
        #expect(try g.command(.abortCommand, TestGuest.words([5], pairs: true) + [0, 0]) == 0)
        #expect(g.noCompletion(milliseconds: 100))  // nothing to cancel: it waits for its I/O
        #expect(f.deviceStats.backendAborts == 0)
        f.onLoop { ch.release() }
        #expect(g.waitInterrupt())
        #expect(g.takeCompletions().first?.hostStatus == HostAdapterStatus.abortQueue.rawValue)
    }

    /// ISSUE_SCSI and DEVICE_UNPLUG are not implemented by this adapter (nor by QEMU's). The interface
    /// (PVSCSI header, SETUP_MSG_RING notes) defines -1 in COMMAND_STATUS as "command not supported"; the
    /// device answers exactly that, takes no descriptor words, and keeps working.
    @Test func unsupportedCommandsAnswerMinusOneAndChangeNothing() throws {
        let f = try Fixture()
        let g = f.guest!
        for command in [PVSCSI.Command.issueSCSI, .deviceUnplug, .setupRequestCallThreshold] {
            try g.writeRegister(PVSCSI.Register.command, command.rawValue)
            #expect(try g.readRegister(PVSCSI.Register.commandStatus) == PVSCSI.commandFailed)
            // A stray COMMAND_DATA word is not taken as a descriptor of it.
            try g.writeRegister(PVSCSI.Register.commandData, 0x1234)
            #expect(try g.readRegister(PVSCSI.Register.commandStatus) == PVSCSI.commandFailed)
        }
        try g.writeRegister(PVSCSI.Register.command, 99)
        #expect(try g.readRegister(PVSCSI.Register.commandStatus) == PVSCSI.commandFailed)
        #expect(f.ringsReady)
        #expect(try g.run([GuestRequest(context: 3, cdb: [0, 0, 0, 0, 0, 0])]).first?.context == 3)
    }

    /// vmw_pvscsi falls back to MSI when MSI-X is off: completions then signal the MSI eventfd (never INTx).
    @Test func msiEventfdCarriesCompletionInterrupts() throws {
        let f = try Fixture(useMSIX: false)
        let g = f.guest!
        var info = Payload()
        info.u32(16); info.u32(0); info.u32(UInt32(VfioPCIIRQ.msi)); info.u32(0)
        let r = try g.client.request(.deviceGetIRQInfo, info.bytes)
        #expect(r.u32(12) == 1)  // one MSI vector
        #expect(r.u32(4) & 0x1 != 0)  // eventfd capable
        let msi = csys_eventfd(0, 1)
        defer { close(msi) }
        let dupFD = dup(msi)
        #expect(try !g.client.setIRQs(index: UInt32(VfioPCIIRQ.msi), flags: 4 | 32, start: 0, count: 1, fds: [dupFD]).isError)
        close(dupFD)
        g.drainInterrupts()
        g.place(GuestRequest(context: 8, cdb: [0, 0, 0, 0, 0, 0]))
        try g.kick()
        var pfd = pollfd(fd: msi, events: Int16(POLLIN), revents: 0)
        #expect(poll(&pfd, 1, 5000) == 1)
        #expect(g.takeCompletions().map(\.context) == [8])
        #expect(!g.waitInterrupt(milliseconds: 50))  // INTx stayed quiet
        #expect(f.logLines.contains("interrupt eventfd for MSI vector 0"))
    }
}
