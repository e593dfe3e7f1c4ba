import PVSCSITestSupport
import VfioUserTestSupport
import BlockIO
import CSystem
import PVSCSI
import SCSI
import Testing
import VfioUser
#if canImport(Glibc)
import Glibc
#endif

let inquiryCDB: [UInt8] = [0x12, 0, 0, 0, 36, 0]

@Suite(.serialized) struct PVSCSIDeviceTests {
    @Test func startupSequenceProbesConfigSpaceRegionsAndIRQs() throws {
        let f = try Fixture(startup: false)
        let c = f.client!
        let v = try c.negotiateVersion()
        #expect(!v.isError)
        #expect(v.payload.count > 5)
        let major = v.payload.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: 0, as: UInt16.self) }
        let minor = v.payload.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: 2, as: UInt16.self) }
        #expect(major == 0 && minor == 1)
        let json = String(decoding: v.payload[4..<(v.payload.count - 1)], as: UTF8.self)
        #expect(json.contains("\"max_msg_fds\":16"))
        #expect(json.contains("max_data_xfer_size"))
        #expect(!json.contains("migration"))
        #expect(v.payload.last == 0)

        var p = Payload()
        p.u32(16); p.u32(0); p.u32(0); p.u32(0)
        let info = try c.request(.deviceGetInfo, p.bytes)
        #expect(info.u32(4) == 0x3)
        #expect(info.u32(8) == 9)
        #expect(info.u32(12) == 5)

        func regionInfo(_ index: UInt32) throws -> TestReply {
            var q = Payload()
            q.u32(32); q.u32(0); q.u32(index); q.u32(0); q.u64(0); q.u64(0)
            return try c.request(.deviceGetRegionInfo, q.bytes)
        }
        let bar0 = try regionInfo(0)
        #expect(bar0.u64(16) == 32768)
        #expect(bar0.u32(4) == 0x3)  // read/write only: posted register writes by default (no mappable page)
        #expect(bar0.u32(0) == 32)
        #expect(bar0.u32(12) == 0)  // no capability
        let cfg = try regionInfo(7)
        #expect(cfg.u64(16) == 256)
        #expect(try regionInfo(1).u64(16) == 0)

        var irq = Payload()
        irq.u32(16); irq.u32(0); irq.u32(2); irq.u32(0)
        let msix = try c.request(.deviceGetIRQInfo, irq.bytes)
        #expect(msix.u32(12) == 1)
        #expect(msix.u32(0 + 4) & 1 == 1)

        // Config space: identity, class, BAR sizing, MSI-X capability in BAR0 pages 6/7.
        #expect(try c.read32(7, 0) == 0x07C0_15AD)
        let classRev = try c.read32(7, 8)
        #expect(classRev >> 8 == 0x01_0000)
        #expect(try c.read32(7, 0x2C) == 0x07C0_15AD)
        try c.write32(7, 0x10, 0xFFFF_FFFF)
        #expect(try c.read32(7, 0x10) == 0xFFFF_8000)
        try c.write32(7, 0x10, 0xFEB0_0000)
        #expect(try c.read32(7, 0x10) == 0xFEB0_0000)
        #expect(try c.read32(7, 0x04) >> 16 & 0x10 != 0)  // capabilities list
        let capPointer = try c.read32(7, 0x34) & 0xFF
        #expect(capPointer == 0x40)
        let cap = try c.read32(7, 0x40)
        #expect(cap & 0xFF == 0x11)
        #expect(try c.read32(7, 0x44) == 0x6000)
        #expect(try c.read32(7, 0x48) == 0x7000)
        try c.write32(7, 0x04, 0x0406)  // memory + bus master + INTx disable
        #expect(try c.read32(7, 0x04) & 0xFFFF == 0x0406)
        try c.write32(7, 0x00, 0x1234_5678)  // read-only identity
        #expect(try c.read32(7, 0) == 0x07C0_15AD)

        try f.guest.connect()
        let numPhys = try f.guest.linuxStartup()
        #expect(numPhys == 16)
        #expect(f.ringsReady && f.messageRingReady)
        let log2 = f.guest.load32(page: TestGuest.ringsStatePage, offset: PVSCSI.RingsState.requestEntriesLog2)
        #expect(log2 == 5)
        #expect(f.guest.load32(page: TestGuest.ringsStatePage, offset: PVSCSI.RingsState.completionEntriesLog2) == 7)
        #expect(f.guest.load32(page: TestGuest.ringsStatePage, offset: PVSCSI.RingsState.messageEntriesLog2) == 5)
    }

    @Test func inquiryReturnsTheLUNIdentity() throws {
        let f = try Fixture()
        let g = f.guest!
        let data = g.address(page: TestGuest.dataPage)
        let done = try g.run([GuestRequest(context: 7, cdb: inquiryCDB, flags: PVSCSI.flagDirectionToHost,
                                           dataAddress: data, dataLength: 36)])
        #expect(done == [GuestCompletion(context: 7, dataLength: 36, senseLength: 0, hostStatus: 0, scsiStatus: 0)])
        let bytes = UnsafeRawBufferPointer(start: g.pointer(data), count: 36)
        #expect(String(decoding: bytes[8..<16], as: UTF8.self) == "SCSIGATE")
        #expect(String(decoding: bytes[16..<26], as: UTF8.self) == "TEST-LUN-0")
    }

    @Test func writeThenReadRoundTripsThroughSGListsAndReachesTheDisk() throws {
        let f = try Fixture()
        let g = f.guest!
        // 8 blocks (4 KiB) written from three scattered buffers described by an SG list.
        let pieces: [(page: Int, offset: Int, length: UInt32)] = [(TestGuest.dataPage + 3, 512, 1024),
                                                                  (TestGuest.dataPage + 7, 0, 2048),
                                                                  (TestGuest.dataPage + 9, 1024, 1024)]
        var pattern: [UInt8] = []
        for (i, piece) in pieces.enumerated() {
            let p = g.pointer(g.address(page: piece.page, offset: piece.offset))
            for k in 0..<Int(piece.length) {
                let b = UInt8(truncatingIfNeeded: k * 7 + i * 31 + 1)
                p.storeBytes(of: b, toByteOffset: k, as: UInt8.self)
                pattern.append(b)
            }
        }
        g.writeSG(page: TestGuest.sgPage, pieces.map { (g.address(page: $0.page, offset: $0.offset), $0.length, 0) })
        let w = try g.run([GuestRequest(context: 1, cdb: write10(lba: 100, blocks: 8),
                                        flags: PVSCSI.flagDirectionToDevice | PVSCSI.flagSGList,
                                        dataAddress: g.address(page: TestGuest.sgPage), dataLength: 4096)])
        #expect(w == [GuestCompletion(context: 1, dataLength: 4096, senseLength: 0, hostStatus: 0, scsiStatus: 0)])
        let disk = f.disks[0]!
        #expect(Array(disk.bytes[51200..<(51200 + 4096)]) == pattern)

        // Read it back into one contiguous buffer (no SG list).
        let into = g.address(page: TestGuest.dataPage + 20)
        memset(g.pointer(into), 0, 4096)
        let r = try g.run([GuestRequest(context: 2, cdb: read10(lba: 100, blocks: 8), flags: PVSCSI.flagDirectionToHost,
                                        dataAddress: into, dataLength: 4096)])
        #expect(r == [GuestCompletion(context: 2, dataLength: 4096, senseLength: 0, hostStatus: 0, scsiStatus: 0)])
        #expect(Array(UnsafeRawBufferPointer(start: g.pointer(into), count: 4096)) == pattern)
    }

    @Test func manyRequestsInOneKickAllComplete() throws {
        let f = try Fixture()
        let g = f.guest!
        var reqs: [GuestRequest] = []
        for i in 0..<20 {
            reqs.append(GuestRequest(context: UInt64(100 + i), cdb: read10(lba: UInt32(i), blocks: 1), flags: PVSCSI.flagDirectionToHost,
                                     dataAddress: g.address(page: TestGuest.dataPage + i), dataLength: 512))
        }
        let done = try g.run(reqs)
        #expect(done.count == 20)
        #expect(Set(done.map(\.context)) == Set((100..<120).map { UInt64($0) }))
        #expect(done.allSatisfy { $0.hostStatus == 0 && $0.scsiStatus == 0 && $0.dataLength == 512 })
    }

    @Test func errorsReturnCheckConditionWithSenseBoundedBySenseLength() throws {
        let f = try Fixture()
        let g = f.guest!
        let sense = g.address(page: TestGuest.sensePage)
        memset(g.pointer(sense), 0xEE, 256)
        // LBA beyond the 2048-block disk.
        let done = try g.run([GuestRequest(context: 9, cdb: read10(lba: 5000, blocks: 1), flags: PVSCSI.flagDirectionToHost,
                                           dataAddress: g.address(page: TestGuest.dataPage), dataLength: 512,
                                           senseAddress: sense, senseLength: 8)])
        #expect(done.count == 1)
        #expect(done.first?.scsiStatus == 0x02)
        #expect(done.first?.hostStatus == 0)
        #expect(done.first?.senseLength == 8)
        let s = UnsafeRawBufferPointer(start: g.pointer(sense), count: 16)
        #expect(s[0] == 0x70)
        #expect(s[2] & 0xF == 0x05)
        #expect(s[8] == 0xEE)  // nothing written past senseLen
        // With a full-size sense buffer the whole fixed-format sense arrives (ASC 21h).
        let done2 = try g.run([GuestRequest(context: 10, cdb: read10(lba: 5000, blocks: 1), flags: PVSCSI.flagDirectionToHost,
                                            dataAddress: g.address(page: TestGuest.dataPage), dataLength: 512,
                                            senseAddress: sense, senseLength: 96)])
        #expect(done2.first?.senseLength == 18)
        #expect(s[12] == 0x21)
    }

    @Test func backendErrorBecomesMediumError() throws {
        let f = try Fixture()
        let g = f.guest!
        _ = try g.run([GuestRequest(context: 1, cdb: [0, 0, 0, 0, 0, 0])])  // creates no channel (TUR)
        _ = try g.run([GuestRequest(context: 2, cdb: read10(lba: 0, blocks: 1), flags: PVSCSI.flagDirectionToHost,
                                    dataAddress: g.address(page: TestGuest.dataPage), dataLength: 512)])
        let ch = try #require(f.channels.made(0))
        f.onLoop { ch.failWith = EIO }
        let sense = g.address(page: TestGuest.sensePage)
        let done = try g.run([GuestRequest(context: 3, cdb: read10(lba: 0, blocks: 1), flags: PVSCSI.flagDirectionToHost,
                                           dataAddress: g.address(page: TestGuest.dataPage), dataLength: 512,
                                           senseAddress: sense, senseLength: 96)])
        #expect(done.first?.scsiStatus == 0x02)
        #expect(UnsafeRawBufferPointer(start: g.pointer(sense), count: 18)[2] & 0xF == 0x03)
    }

    @Test func absentTargetAndNonZeroLUNGetSelectionTimeout() throws {
        let f = try Fixture(luns: [0, 2])
        let g = f.guest!
        let done = try g.run([GuestRequest(context: 1, target: 1, cdb: inquiryCDB, flags: PVSCSI.flagDirectionToHost,
                                           dataAddress: g.address(page: TestGuest.dataPage), dataLength: 36),
                              GuestRequest(context: 2, target: 2, cdb: inquiryCDB, flags: PVSCSI.flagDirectionToHost,
                                           dataAddress: g.address(page: TestGuest.dataPage + 1), dataLength: 36),
                              GuestRequest(context: 3, target: 0, lun: [0, 1, 0, 0, 0, 0, 0, 0], cdb: inquiryCDB,
                                           flags: PVSCSI.flagDirectionToHost, dataAddress: g.address(page: TestGuest.dataPage + 2), dataLength: 36),
                              GuestRequest(context: 4, target: 0, bus: 1, cdb: inquiryCDB, flags: PVSCSI.flagDirectionToHost,
                                           dataAddress: g.address(page: TestGuest.dataPage + 3), dataLength: 36)])
        let byContext = Dictionary(uniqueKeysWithValues: done.map { ($0.context, $0) })
        #expect(byContext[1]?.hostStatus == HostAdapterStatus.selectionTimeout.rawValue)
        #expect(byContext[2]?.hostStatus == 0)
        #expect(byContext[2]?.dataLength == 36)
        #expect(byContext[3]?.hostStatus == HostAdapterStatus.selectionTimeout.rawValue)
        #expect(byContext[4]?.hostStatus == HostAdapterStatus.selectionTimeout.rawValue)
    }

    @Test func abortOfInFlightCommandCompletesWithAbortQueue() throws {
        let f = try Fixture()
        let g = f.guest!
        _ = try g.run([GuestRequest(context: 1, cdb: read10(lba: 0, blocks: 1), flags: PVSCSI.flagDirectionToHost,
                                    dataAddress: g.address(page: TestGuest.dataPage), dataLength: 512)])
        let ch = try #require(f.channels.made(0))
        ch.hold.store(true, ordering: .releasing)
        g.drainInterrupts()
        g.place(GuestRequest(context: 42, cdb: read10(lba: 1, blocks: 1), flags: PVSCSI.flagDirectionToHost,
                             dataAddress: g.address(page: TestGuest.dataPage), dataLength: 512))
        try g.kick()
        #expect(!g.waitInterrupt(milliseconds: 100))
        #expect(f.requestsInFlight == 1)
        let status = try g.command(.abortCommand, TestGuest.words([42], pairs: true) + [0, 0])
        #expect(status == 0)
        f.onLoop { ch.release() }
        #expect(g.waitInterrupt())
        let done = g.takeCompletions()
        #expect(done.count == 1)
        #expect(done.first?.context == 42)
        #expect(done.first?.hostStatus == HostAdapterStatus.abortQueue.rawValue)
    }

    @Test func hotplugPostsDeviceAddedAndRemovedMessagesWithAnInterrupt() throws {
        let f = try Fixture(luns: [0])
        let g = f.guest!
        try f.addLUN(3)
        #expect(g.waitInterrupt())
        var msgs = g.takeMessages()
        #expect(msgs.count == 1)
        #expect(msgs.first?.0 == PVSCSI.messageDeviceAdded)
        #expect(msgs.first?.1 == 0)
        #expect(msgs.first?.2 == 3)
        #expect(msgs.first?.3 == 0)
        // The new target answers.
        let done = try g.run([GuestRequest(context: 5, target: 3, cdb: inquiryCDB, flags: PVSCSI.flagDirectionToHost,
                                           dataAddress: g.address(page: TestGuest.dataPage), dataLength: 36)])
        #expect(done.first?.hostStatus == 0)
        g.drainInterrupts()
        try f.table.remove(LogicalUnitNumber(3)!)
        #expect(g.waitInterrupt())
        msgs = g.takeMessages()
        #expect(msgs.count == 1)
        #expect(msgs.first?.0 == PVSCSI.messageDeviceRemoved)
        #expect(msgs.first?.2 == 3)
        let gone = try g.run([GuestRequest(context: 6, target: 3, cdb: inquiryCDB, flags: PVSCSI.flagDirectionToHost,
                                           dataAddress: g.address(page: TestGuest.dataPage), dataLength: 36)])
        #expect(gone.first?.hostStatus == HostAdapterStatus.selectionTimeout.rawValue)
    }

    @Test func legacyINTxStatusAndAcknowledge() throws {
        let f = try Fixture(useMSIX: false)
        let g = f.guest!
        let done = try g.run([GuestRequest(context: 3, cdb: [0, 0, 0, 0, 0, 0])])
        #expect(done.count == 1)
        let status = try g.readRegister(PVSCSI.Register.interruptStatus)
        #expect(status & PVSCSI.interruptCompletion0 != 0)
        try g.writeRegister(PVSCSI.Register.interruptStatus, status)
        #expect(try g.readRegister(PVSCSI.Register.interruptStatus) == 0)
        // INTx is auto-masked until UNMASK; with the line low nothing fires.
        g.drainInterrupts()
        _ = try g.client.setIRQs(index: 0, flags: 1 | 16, start: 0, count: 1)
        #expect(!g.waitInterrupt(milliseconds: 50))
        // Next completion fires again after unmask.
        let again = try g.run([GuestRequest(context: 4, cdb: [0, 0, 0, 0, 0, 0])])
        #expect(again.first?.context == 4)
    }

    @Test func shutdownSequenceMasksFlushesAndResets() throws {
        let f = try Fixture()
        let g = f.guest!
        try g.writeRegister(PVSCSI.Register.interruptMask, 0)
        g.drainInterrupts()
        g.place(GuestRequest(context: 11, cdb: [0, 0, 0, 0, 0, 0]))
        try g.kick(rw: false)
        // Masked: no interrupt, but the completion is on the ring.
        #expect(!g.waitInterrupt(milliseconds: 50))
        #expect(g.takeCompletions().map(\.context) == [11])
        #expect(try g.command(.adapterReset) == 0)
        #expect(!f.ringsReady)
        #expect(try g.readRegister(PVSCSI.Register.interruptMask) == 0)
    }

    @Test func disconnectResetsTheDeviceAndAReconnectStartsFresh() throws {
        let f = try Fixture()
        #expect(f.ringsReady)
        f.guest = nil
        f.client = nil
        var waited = 0
        while f.clientConnected && waited < 200 {
            usleep(10_000)
            waited += 1
        }
        #expect(!f.ringsReady)
        #expect(f.dmaWindowCount == 0)
        let client = try VfioUserTestClient(path: f.path)
        let guest = TestGuest(client: client)
        try guest.connect()
        try guest.linuxStartup()
        let done = try guest.run([GuestRequest(context: 1, cdb: inquiryCDB, flags: PVSCSI.flagDirectionToHost,
                                               dataAddress: guest.address(page: TestGuest.dataPage), dataLength: 36)])
        #expect(done.first?.dataLength == 36)
    }

    @Test func stopClosesTheBackEndChannelsAndRemovesTheSocket() throws {
        var f: Fixture? = try Fixture()
        _ = try f!.guest.run([GuestRequest(context: 1, cdb: read10(lba: 0, blocks: 1), flags: PVSCSI.flagDirectionToHost,
                                           dataAddress: f!.guest.address(page: TestGuest.dataPage), dataLength: 512)])
        let ch = try #require(f!.channels.made(0))
        let path = f!.path
        f = nil  // stops the controller
        let closed = ch.closed.load(ordering: .acquiring)
        #expect(closed)
        #expect(access(path, F_OK) != 0)
    }

    @Test func secondClientIsRefusedWhileOneIsConnected() throws {
        let f = try Fixture()
        let second = try VfioUserTestClient(path: f.path)
        #expect(second.serverClosed())
        // The first still works.
        #expect(try f.guest.readRegister(PVSCSI.Register.interruptMask) == 0xF)
    }

    @Test func configPageIsAnsweredOnlyWhenTheGuestWaitsForTheWrite() throws {
        let f = try Fixture(startup: false)
        let g = f.guest!
        try g.connect()
        let page = g.address(page: TestGuest.configPage)
        let header = g.pointer(page)
        var words: [UInt32] = TestGuest.words([page, UInt64(PVSCSI.configControllerAddress) << 32], pairs: true)
        words += [PVSCSI.configPageController, 0]
        // Posted (QEMU's default for BAR writes): the guest has moved on and may have freed the page.
        memset(header, 0xAB, 4096)
        try g.writeRegister(PVSCSI.Register.command, PVSCSI.Command.config.rawValue)
        for w in words { g.client.postWrite32(0, PVSCSI.Register.commandData, w) }
        #expect(try g.readRegister(PVSCSI.Register.commandStatus) == PVSCSI.commandFailed)
        #expect(header.load(fromByteOffset: 0, as: UInt32.self) == 0xABAB_ABAB)
        #expect(f.logLines.contains("posted write"))
        // Synchronous (x-no-posted-writes=on): the controller page with numPhys.
        let status = try g.command(.config, words)
        #expect(status == 0)
        #expect(header.load(fromByteOffset: 0, as: UInt32.self) == PVSCSI.configPageController)
        #expect(header.load(fromByteOffset: 6, as: UInt16.self) == 0)
        #expect(header.load(fromByteOffset: 480 - 8, as: UInt32.self) == 16)
        // Another page: failure status in the header, command fails.
        var other = words
        other[4] = 0x1959
        #expect(try g.command(.config, other) == PVSCSI.commandFailed)
        #expect(header.load(fromByteOffset: 6, as: UInt16.self) == HostAdapterStatus.invalidParameter.rawValue)
    }

    @Test func postedKicksAreProcessedInOrder() throws {
        let f = try Fixture()
        let g = f.guest!
        g.place(GuestRequest(context: 77, cdb: [0, 0, 0, 0, 0, 0]))
        g.client.postWrite32(0, PVSCSI.Register.kickNonRWIO, 0)
        #expect(g.waitInterrupt())
        #expect(g.takeCompletions().map(\.context) == [77])
    }
}
