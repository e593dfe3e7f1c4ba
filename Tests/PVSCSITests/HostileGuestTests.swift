import PVSCSITestSupport
import CSystem
import PVSCSI
import SCSI
import Testing
import VfioUser
#if canImport(Glibc)
import Glibc
#endif

/// Each hostile guest input from the issue (and QEMU CVE-2016-4952, -7155, -7156, -7421) as its own test:
/// the device must refuse it without crashing, hanging or touching memory outside the DMA window.
@Suite(.serialized) struct HostileGuestTests {
    /// A fixture connected and reset, rings not yet set up.
    func bareFixture() throws -> Fixture {
        let f = try Fixture(startup: false)
        try f.guest.connect()
        #expect(try f.guest.command(.adapterReset) == 0)
        return f
    }

    @Test func ringPageCountZeroIsRejected() throws {
        let f = try bareFixture()
        #expect(try f.guest.setupRings(requestPages: 0, completionPages: 1) == PVSCSI.commandFailed)
        #expect(try f.guest.setupRings(requestPages: 1, completionPages: 0) == PVSCSI.commandFailed)
        #expect(!f.ringsReady)
    }

    @Test func ringPageCountAboveMaximumIsRejected() throws {
        let f = try bareFixture()
        #expect(try f.guest.setupRings(requestPages: 64, completionPages: 1) == PVSCSI.commandFailed)
        #expect(try f.guest.setupRings(requestPages: 1, completionPages: 0x8000_0000) == PVSCSI.commandFailed)
        #expect(!f.ringsReady)
        // The maximum itself is fine.
        #expect(try f.guest.setupRings(requestPages: 32, completionPages: 32) == 0)
        #expect(f.ringsReady)
    }

    @Test func ringPageCountNotPowerOfTwoIsRejected() throws {
        let f = try bareFixture()
        #expect(try f.guest.setupRings(requestPages: 3, completionPages: 1) == PVSCSI.commandFailed)
        #expect(try f.guest.setupRings(requestPages: 2, completionPages: 6) == PVSCSI.commandFailed)
        #expect(!f.ringsReady)
    }

    @Test func messageRingPageCountsAreChecked() throws {
        let f = try bareFixture()
        #expect(try f.guest.setupRings() == 0)
        #expect(try f.guest.setupMessageRing(pages: 0) == PVSCSI.commandFailed)
        #expect(try f.guest.setupMessageRing(pages: 3) == PVSCSI.commandFailed)
        #expect(try f.guest.setupMessageRing(pages: 32) == PVSCSI.commandFailed)
        #expect(!f.messageRingReady)
        #expect(try f.guest.setupMessageRing(pages: 16) == 0)
        #expect(f.messageRingReady)
    }

    @Test func ringPPNsOutsideMappedMemoryAreRejected() throws {
        let f = try bareFixture()
        let g = f.guest!
        let beyond = (TestGuest.iova + UInt64(TestGuest.size)) >> 12  // first page after the window
        let below = (TestGuest.iova >> 12) - 1
        for bad in [beyond, below, UInt64(1) << 52, UInt64.max, 0] {
            #expect(try g.command(.setupRings, g.setupRingsWords(requestPages: 1, completionPages: 1, statePPN: bad)) == PVSCSI.commandFailed)
            #expect(try g.command(.setupRings, g.setupRingsWords(requestPages: 1, completionPages: 1, requestPPNs: [bad])) == PVSCSI.commandFailed)
            #expect(try g.command(.setupRings, g.setupRingsWords(requestPages: 2, completionPages: 1,
                                                                 requestPPNs: [g.ppn(page: 1), bad])) == PVSCSI.commandFailed)
            #expect(try g.command(.setupRings, g.setupRingsWords(requestPages: 1, completionPages: 1, completionPPNs: [bad])) == PVSCSI.commandFailed)
        }
        #expect(!f.ringsReady)
        // Message ring PPN outside memory.
        #expect(try g.setupRings() == 0)
        var w: [UInt32] = [1, 0]
        w += TestGuest.words([beyond] + [UInt64](repeating: 0, count: 15), pairs: true)
        #expect(try g.command(.setupMessageRing, w) == PVSCSI.commandFailed)
        #expect(!f.messageRingReady)
    }

    @Test func producerIndexRunningAheadOfTheRingIsIgnored() throws {
        let f = try Fixture()
        let g = f.guest!
        // 32-entry ring; the producer claims 1000 new entries.
        g.store32(page: TestGuest.ringsStatePage, offset: PVSCSI.RingsState.requestProducer, 1000)
        try g.kick()
        #expect(!g.waitInterrupt(milliseconds: 50))
        #expect(g.takeCompletions().isEmpty)
        #expect(f.deviceStats.ringErrors >= 1)
        #expect(f.deviceStats.requests == 0)
        // A sane producer afterwards works again.
        g.requestProducer = 0
        let done = try g.run([GuestRequest(context: 1, cdb: [0, 0, 0, 0, 0, 0])])
        #expect(done.map(\.context) == [1])
    }

    @Test func producerIndexWrapAroundIsHandled() throws {
        let f = try Fixture()
        let g = f.guest!
        // Ring of 32, 70 requests in rounds of 10: indices wrap twice.
        for round in 0..<7 {
            var reqs: [GuestRequest] = []
            for i in 0..<10 { reqs.append(GuestRequest(context: UInt64(round * 10 + i + 1), cdb: [0, 0, 0, 0, 0, 0])) }
            let done = try g.run(reqs)
            #expect(done.count == 10)
        }
        #expect(f.deviceStats.requests == 70)
    }

    @Test func sgListThatLoopsFailsTheRequest() throws {
        let f = try Fixture()
        let g = f.guest!
        let sg = g.address(page: TestGuest.sgPage)
        // Element 0 chains back to itself.
        g.writeSG(page: TestGuest.sgPage, [(sg, 0, PVSCSI.sgChainElement)])
        let done = try g.run([GuestRequest(context: 5, cdb: read10(lba: 0, blocks: 8), flags: PVSCSI.flagDirectionToHost | PVSCSI.flagSGList,
                                           dataAddress: sg, dataLength: 4096)])
        #expect(done.first?.hostStatus == HostAdapterStatus.invalidParameter.rawValue)
        // Two segments chaining to each other, with a data element in between.
        let sg2 = g.address(page: TestGuest.sgPage + 1)
        g.writeSG(page: TestGuest.sgPage, [(g.address(page: TestGuest.dataPage), 16, 0), (sg2, 0, PVSCSI.sgChainElement)])
        g.writeSG(page: TestGuest.sgPage + 1, [(sg, 0, PVSCSI.sgChainElement)])
        let done2 = try g.run([GuestRequest(context: 6, cdb: read10(lba: 0, blocks: 8), flags: PVSCSI.flagDirectionToHost | PVSCSI.flagSGList,
                                            dataAddress: sg, dataLength: 4096)])
        #expect(done2.first?.hostStatus == HostAdapterStatus.invalidParameter.rawValue)
        #expect(f.deviceStats.invalidRequests == 2)
    }

    @Test func sgListThatNeverEndsFailsTheRequest() throws {
        let f = try Fixture()
        let g = f.guest!
        // A page of zero-length elements with no chain: the list runs off its page.
        memset(g.pointer(g.address(page: TestGuest.sgPage)), 0, 4096)
        let done = try g.run([GuestRequest(context: 7, cdb: read10(lba: 0, blocks: 1), flags: PVSCSI.flagDirectionToHost | PVSCSI.flagSGList,
                                           dataAddress: g.address(page: TestGuest.sgPage), dataLength: 512)])
        #expect(done.first?.hostStatus == HostAdapterStatus.invalidParameter.rawValue)
        // 16 pages, each 255 zero-length elements then a chain to the next (circular): bounded by maxSGElements.
        for i in 0..<16 {
            let page = TestGuest.sgPage + i
            memset(g.pointer(g.address(page: page)), 0, 4096)
            g.writeSG(page: page, [(UInt64, UInt32, UInt32)](repeating: (0, 0, 0), count: 255)
                + [(g.address(page: TestGuest.sgPage + (i + 1) % 16), 0, PVSCSI.sgChainElement)])
        }
        let done2 = try g.run([GuestRequest(context: 8, cdb: read10(lba: 0, blocks: 1), flags: PVSCSI.flagDirectionToHost | PVSCSI.flagSGList,
                                            dataAddress: g.address(page: TestGuest.sgPage), dataLength: 512)])
        #expect(done2.first?.hostStatus == HostAdapterStatus.invalidParameter.rawValue)
    }

    @Test func dataLengthLargerThanTheSGListFails() throws {
        let f = try Fixture()
        let g = f.guest!
        memset(g.pointer(g.address(page: TestGuest.sgPage)), 0, 4096)
        g.writeSG(page: TestGuest.sgPage, [(g.address(page: TestGuest.dataPage), 512, 0), (g.address(page: TestGuest.dataPage + 1), 512, 0)])
        let done = try g.run([GuestRequest(context: 9, cdb: read10(lba: 0, blocks: 8), flags: PVSCSI.flagDirectionToHost | PVSCSI.flagSGList,
                                           dataAddress: g.address(page: TestGuest.sgPage), dataLength: 4096)])
        #expect(done.first?.hostStatus == HostAdapterStatus.invalidParameter.rawValue)
        // Data length larger than the single buffer's mapped memory.
        let nearEnd = TestGuest.iova + UInt64(TestGuest.size) - 256
        let done2 = try g.run([GuestRequest(context: 10, cdb: read10(lba: 0, blocks: 8), flags: PVSCSI.flagDirectionToHost,
                                            dataAddress: nearEnd, dataLength: 4096)])
        #expect(done2.first?.hostStatus == HostAdapterStatus.invalidParameter.rawValue)
        // Address + length overflowing 64 bits, and an absurd length.
        let done3 = try g.run([GuestRequest(context: 11, cdb: read10(lba: 0, blocks: 8), flags: PVSCSI.flagDirectionToHost,
                                            dataAddress: UInt64.max - 100, dataLength: 4096),
                               GuestRequest(context: 12, cdb: read10(lba: 0, blocks: 8), flags: PVSCSI.flagDirectionToHost,
                                            dataAddress: TestGuest.iova, dataLength: 1 << 40)])
        #expect(done3.count == 2)
        #expect(done3.allSatisfy { $0.hostStatus == HostAdapterStatus.invalidParameter.rawValue })
        // An SG element pointing outside guest memory.
        g.writeSG(page: TestGuest.sgPage, [(0xDEAD_0000_0000, 4096, 0)])
        let done4 = try g.run([GuestRequest(context: 13, cdb: read10(lba: 0, blocks: 8), flags: PVSCSI.flagDirectionToHost | PVSCSI.flagSGList,
                                            dataAddress: g.address(page: TestGuest.sgPage), dataLength: 4096)])
        #expect(done4.first?.hostStatus == HostAdapterStatus.invalidParameter.rawValue)
        #expect(f.channels.made(0)?.submitted.load(ordering: .relaxed) ?? 0 == 0)
    }

    @Test func senseLengthLargerThanTheSenseBufferIsBounded() throws {
        let f = try Fixture()
        let g = f.guest!
        // senseLen claims 4 GiB; the device writes only the sense it has (18 bytes).
        let end = TestGuest.iova + UInt64(TestGuest.size)
        let done = try g.run([GuestRequest(context: 1, cdb: [0xFF, 0, 0, 0, 0, 0], senseAddress: end - 18, senseLength: 0xFFFF_FFFF)])
        #expect(done.first?.scsiStatus == 0x02)
        #expect(done.first?.senseLength == 18)
        // A sense buffer that runs off the mapped window: nothing written, senseLen 0, no fault.
        let done2 = try g.run([GuestRequest(context: 2, cdb: [0xFF, 0, 0, 0, 0, 0], senseAddress: end - 10, senseLength: 96)])
        #expect(done2.first?.scsiStatus == 0x02)
        #expect(done2.first?.senseLength == 0)
        let done3 = try g.run([GuestRequest(context: 3, cdb: [0xFF, 0, 0, 0, 0, 0], senseAddress: UInt64.max - 4, senseLength: 96)])
        #expect(done3.first?.senseLength == 0)
    }

    @Test func commandsBeforeSetupRingsAreHarmless() throws {
        let f = try bareFixture()
        let g = f.guest!
        try g.kick()
        try g.kick(rw: false)
        #expect(try g.setupMessageRing() == PVSCSI.commandFailed)
        #expect(try g.command(.abortCommand, [1, 0, 0, 0]) == 0)
        #expect(try g.command(.resetBus) == 0)
        #expect(try g.command(.resetDevice, [0, 0, 0]) == 0)
        try g.writeRegister(PVSCSI.Register.commandData, 0x1234)  // data with no command
        try g.writeRegister(PVSCSI.Register.command, 99)
        #expect(try g.readRegister(PVSCSI.Register.commandStatus) == PVSCSI.commandFailed)
        try g.writeRegister(PVSCSI.Register.command, 0)
        #expect(try g.readRegister(PVSCSI.Register.commandStatus) == PVSCSI.commandFailed)
        #expect(f.deviceStats.ringErrors >= 2)
        #expect(f.deviceStats.requests == 0)
        #expect(!f.ringsReady)
        // The device still comes up normally.
        try g.linuxStartup()
        let done = try g.run([GuestRequest(context: 1, cdb: [0, 0, 0, 0, 0, 0])])
        #expect(done.first?.context == 1)
    }

    @Test func malformedDescriptorsFailWithInvalidParameter() throws {
        let f = try Fixture()
        let g = f.guest!
        let done = try g.run([GuestRequest(context: 1, cdb: []),
                              GuestRequest(context: 2, cdb: [UInt8](repeating: 0, count: 17)),
                              GuestRequest(context: 3, cdb: [0, 0, 0, 0, 0, 0], flags: PVSCSI.flagOutOfBandCDB),
                              GuestRequest(context: 4, cdb: read10(lba: 0, blocks: 1),
                                           flags: PVSCSI.flagDirectionToHost | PVSCSI.flagDirectionToDevice,
                                           dataAddress: g.address(page: TestGuest.dataPage), dataLength: 512),
                              GuestRequest(context: 5, cdb: read10(lba: 0, blocks: 1), flags: 0,
                                           dataAddress: g.address(page: TestGuest.dataPage), dataLength: 512)])
        #expect(done.count == 5)
        #expect(done.allSatisfy { $0.hostStatus == HostAdapterStatus.invalidParameter.rawValue })
    }

    @Test func fullCompletionRingHoldsCompletionsUntilTheGuestConsumes() throws {
        let f = try Fixture()
        let g = f.guest!
        // 128-entry completion ring, never consumed: 160 requests in rounds of 32.
        for round in 0..<5 {
            for i in 0..<32 { g.place(GuestRequest(context: UInt64(round * 32 + i + 1), cdb: [0, 0, 0, 0, 0, 0])) }
            try g.kick()
        }
        usleep(50_000)
        let producer = g.load32(page: TestGuest.ringsStatePage, offset: PVSCSI.RingsState.completionProducer)
        #expect(producer == 128)  // never beyond the ring
        #expect(f.requestsInFlight == 32)
        let first = g.takeCompletions()
        #expect(first.count == 128)
        try g.kick()  // the driver kicks again; the device flushes what waited
        var rest = g.takeCompletions()
        if rest.count < 32 {
            _ = g.waitInterrupt(milliseconds: 1000)
            rest += g.takeCompletions()
        }
        #expect(rest.count == 32)
        #expect(Set((first + rest).map(\.context)).count == 160)
        #expect(f.requestsInFlight == 0)
    }

    @Test func unmappingRingMemoryDetachesTheRingsUntilItIsMappedAgain() throws {
        let f = try Fixture()
        let g = f.guest!
        let r = try g.client.dmaUnmap(address: TestGuest.iova, size: UInt64(TestGuest.size))
        #expect(!r.isError)
        #expect(!f.ringsReady)
        // A request placed while the memory is gone is not touched (the kick waits).
        g.place(GuestRequest(context: 1, cdb: [0, 0, 0, 0, 0, 0]))
        try g.kick()
        #expect(f.deviceStats.requests == 0)
        // QEMU re-maps guest RAM (at another offset of the same memfd layout here: the same pages).
        let dupFD = dup(g.memfd)
        #expect(try !g.client.dmaMap(address: TestGuest.iova, size: UInt64(TestGuest.size), fd: dupFD).isError)
        close(dupFD)
        #expect(f.ringsReady)
        try g.kick()
        var done = g.takeCompletions()
        if done.isEmpty { _ = g.waitInterrupt(); done = g.takeCompletions() }
        #expect(done.map(\.context) == [1])
        // A full reset and setup still works afterwards.
        try g.linuxStartup()
        let again = try g.run([GuestRequest(context: 2, cdb: [0, 0, 0, 0, 0, 0])])
        #expect(again.first?.context == 2)
    }

    @Test func windowWithoutFDOutsideTheClientsMemoryIsRefusedHarmlessly() throws {
        let f = try bareFixture()
        let g = f.guest!
        // A window without fd that the client cannot serve (its DMA replies are EFAULT): rings placed there
        // set up (the device cannot tell) but every access fails; nothing crashes or loops.
        let r = try g.client.dmaMap(address: 0x1_0000_0000, size: 0x10_0000, fd: nil)
        #expect(!r.isError)
        #expect(f.logLines.contains("has no fd"))
        _ = try g.command(.setupRings, g.setupRingsWords(requestPages: 1, completionPages: 1, statePPN: 0x1_0000_0000 >> 12))
        try g.kick()
        try g.client.pump(milliseconds: 100)
        #expect(f.deviceStats.requests == 0)
        #expect(f.serverStats.dmaFailures > 0)
        #expect(try g.client.read32(7, 0) == 0x07C0_15AD)
    }
}
