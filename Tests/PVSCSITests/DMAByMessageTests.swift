import PVSCSITestSupport
import VfioUserTestSupport
import CSystem
import PVSCSI
import Testing
import VfioUser
#if canImport(Glibc)
import Glibc
#endif

/// Guest memory exported without an fd (QEMU with plain `-m` RAM): rings, SG lists, sense and data reached
/// with VFIO_USER_DMA_READ / VFIO_USER_DMA_WRITE messages served by the test client, bounce buffers for
/// the back-end, and a client that answers late, never, wrongly or with an error.
@Suite(.serialized) struct DMAByMessageTests {
    /// Fills `count` bytes at guest address `address` with a pattern and returns it.
    func fill(_ g: TestGuest, _ address: UInt64, _ count: Int, seed: Int) -> [UInt8] {
        let p = g.pointer(address)
        var out: [UInt8] = []
        for k in 0..<count {
            let b = UInt8(truncatingIfNeeded: k &* 13 &+ seed &* 7 &+ 1)
            p.storeBytes(of: b, toByteOffset: k, as: UInt8.self)
            out.append(b)
        }
        return out
    }

    @Test func ringsSGListsAndDataAllTravelByMessage() throws {
        let f = try Fixture(withoutFD: true)
        let g = f.guest!
        #expect(f.ringsReady)
        #expect(f.logLines.contains("has no fd"))
        // CONFIG is not answered: its page is not host-mapped (a DMA_WRITE would land after the early reply).
        #expect(f.logLines.contains("is not in fd-backed guest memory"))
        let server = f.controller.server
        let early: Int = f.controller.sync { server.writesAcknowledgedEarly }
        #expect(early > 0)
        // INQUIRY (data-in through a bounce buffer).
        let data = g.address(page: TestGuest.dataPage)
        let inq = try g.run([GuestRequest(context: 7, cdb: inquiryCDB, flags: PVSCSI.flagDirectionToHost,
                                          dataAddress: data, dataLength: 36)])
        #expect(inq == [GuestCompletion(context: 7, dataLength: 36, senseLength: 0, hostStatus: 0, scsiStatus: 0)])
        #expect(String(decoding: UnsafeRawBufferPointer(start: g.pointer(data), count: 36)[8..<16], as: UTF8.self) == "SCSIGATE")
        // 96 KiB written from three SG pieces (one spanning two 64 KiB bounce chunks), read back contiguously.
        let pieces: [(page: Int, offset: Int, length: Int)] = [(TestGuest.dataPage + 40, 512, 20480),
                                                               (TestGuest.dataPage + 4, 0, 65536),
                                                               (TestGuest.dataPage + 60, 1024, 12288)]
        var pattern: [UInt8] = []
        for (i, piece) in pieces.enumerated() { pattern += fill(g, g.address(page: piece.page, offset: piece.offset), piece.length, seed: i) }
        g.writeSG(page: TestGuest.sgPage, pieces.map { (g.address(page: $0.page, offset: $0.offset), UInt32($0.length), 0) })
        let w = try g.run([GuestRequest(context: 1, cdb: write10(lba: 64, blocks: 192),
                                        flags: PVSCSI.flagDirectionToDevice | PVSCSI.flagSGList,
                                        dataAddress: g.address(page: TestGuest.sgPage), dataLength: 98304)])
        #expect(w == [GuestCompletion(context: 1, dataLength: 98304, senseLength: 0, hostStatus: 0, scsiStatus: 0)])
        #expect(Array(f.disks[0]!.bytes[32768..<(32768 + 98304)]) == pattern)
        let into = g.address(page: TestGuest.dataPage + 100)
        memset(g.pointer(into), 0, 98304)
        let r = try g.run([GuestRequest(context: 2, cdb: read10(lba: 64, blocks: 192), flags: PVSCSI.flagDirectionToHost,
                                        dataAddress: into, dataLength: 98304)])
        #expect(r == [GuestCompletion(context: 2, dataLength: 98304, senseLength: 0, hostStatus: 0, scsiStatus: 0)])
        #expect(Array(UnsafeRawBufferPointer(start: g.pointer(into), count: 98304)) == pattern)
        // Sense written by message too.
        let sense = g.address(page: TestGuest.sensePage)
        memset(g.pointer(sense), 0, 96)
        let bad = try g.run([GuestRequest(context: 3, cdb: [0xFF, 0, 0, 0, 0, 0], senseAddress: sense, senseLength: 96)])
        #expect(bad.first?.scsiStatus == 2 && (bad.first?.senseLength ?? 0) >= 14)
        #expect(g.pointer(sense).load(as: UInt8.self) & 0x7F == 0x70)
        #expect(g.client.dmaReadsServed > 0 && g.client.dmaWritesServed > 0)
        #expect(f.serverStats.dmaFailures == 0)
        #expect(f.serverStats.dmaReads == g.client.dmaReadsServed)
    }

    @Test func transfersRespectTheClientsMaximumDataSize() throws {
        let f = try Fixture(startup: false)
        let g = f.guest!
        try g.connect(withoutFD: true, maxDataTransfer: 4096)
        try g.linuxStartup(expectConfig: false)
        var pattern: [UInt8] = fill(g, g.address(page: TestGuest.dataPage), 32768, seed: 5)
        let w = try g.run([GuestRequest(context: 1, cdb: write10(lba: 8, blocks: 64), flags: PVSCSI.flagDirectionToDevice,
                                        dataAddress: g.address(page: TestGuest.dataPage), dataLength: 32768)])
        #expect(w.first?.hostStatus == 0 && w.first?.scsiStatus == 0)
        #expect(Array(f.disks[0]!.bytes[4096..<(4096 + 32768)]) == pattern)
        memset(g.pointer(g.address(page: TestGuest.dataPage)), 0, 32768)
        let r = try g.run([GuestRequest(context: 2, cdb: read10(lba: 8, blocks: 64), flags: PVSCSI.flagDirectionToHost,
                                        dataAddress: g.address(page: TestGuest.dataPage), dataLength: 32768)])
        #expect(r.first?.dataLength == 32768)
        pattern = Array(UnsafeRawBufferPointer(start: g.pointer(g.address(page: TestGuest.dataPage)), count: 32768)) == pattern ? pattern : []
        #expect(!pattern.isEmpty)
        #expect(g.client.largestDMA == 4096)
    }

    @Test func manyBouncedRequestsBeyondThePoolWaitAndAllComplete() throws {
        var options = PVSCSIOptions()
        options.bounceBufferBytes = 256 << 10  // 4 chunks: 20 requests of 64 KiB must take turns
        let f = try Fixture(blocks: 8192, options: options, withoutFD: true)
        let g = f.guest!
        var reqs: [GuestRequest] = []
        for i in 0..<20 {
            reqs.append(GuestRequest(context: UInt64(100 + i), cdb: read10(lba: UInt32(i * 128), blocks: 128),
                                     flags: PVSCSI.flagDirectionToHost,
                                     dataAddress: g.address(page: TestGuest.dataPage + 16 * (i % 4)), dataLength: 65536))
        }
        let done = try g.run(reqs, milliseconds: 5000)
        #expect(done.count == 20)
        #expect(done.allSatisfy { $0.hostStatus == 0 && $0.scsiStatus == 0 && $0.dataLength == 65536 })
        // Larger than the whole pool: refused, not stuck.
        let big = try g.run([GuestRequest(context: 9, cdb: read10(lba: 0, blocks: 1024), flags: PVSCSI.flagDirectionToHost,
                                          dataAddress: g.address(page: TestGuest.dataPage), dataLength: 524288)])
        #expect(big.first?.hostStatus == HostAdapterStatus.invalidParameter.rawValue)
    }

    @Test func dataInMemoryWithoutFDBesideMappedRingsAndRefusedDMAFailsOnlyThatRequest() throws {
        let f = try Fixture()
        let g = f.guest!
        // A second window without fd, served from a separate buffer.
        let base: UInt64 = 0x4000_0000
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        defer { buffer.deallocate() }
        memset(buffer, 0x5A, 65536)
        g.client.dmaMemory = buffer
        g.client.dmaBase = base
        g.client.dmaSize = 1 << 20
        #expect(try !g.client.dmaMap(address: base, size: 1 << 20, fd: nil).isError)
        let w = try g.run([GuestRequest(context: 1, cdb: write10(lba: 0, blocks: 16), flags: PVSCSI.flagDirectionToDevice,
                                        dataAddress: base, dataLength: 8192)])
        #expect(w.first?.hostStatus == 0 && w.first?.scsiStatus == 0)
        #expect(f.disks[0]!.bytes[0..<8192].allSatisfy { $0 == 0x5A })
        g.client.dmaServing = .refuse
        let r = try g.run([GuestRequest(context: 2, cdb: read10(lba: 0, blocks: 16), flags: PVSCSI.flagDirectionToHost,
                                        dataAddress: base + 65536, dataLength: 8192)])
        #expect(r.first?.context == 2)
        #expect(r.first?.hostStatus == HostAdapterStatus.hardwareFailure.rawValue)
        #expect(f.serverStats.dmaFailures > 0)
        // Refusal is not fatal: the next request is served.
        g.client.dmaServing = .serve
        let again = try g.run([GuestRequest(context: 3, cdb: read10(lba: 0, blocks: 16), flags: PVSCSI.flagDirectionToHost,
                                            dataAddress: base + 65536, dataLength: 8192)])
        #expect(again.first?.hostStatus == 0)
        #expect(UnsafeRawBufferPointer(start: buffer + 65536, count: 8192).allSatisfy { $0 == 0x5A })
    }

    @Test func aClientThatNeverAnswersFailsFastAfterTheTimeoutAndResetRecovers() throws {
        let f = try Fixture(withoutFD: true)
        let g = f.guest!
        let server = f.controller.server
        f.onLoop { server.dmaTimeoutMilliseconds = 300 }
        g.client.dmaServing = .ignore
        g.place(GuestRequest(context: 1, cdb: [0, 0, 0, 0, 0, 0]))
        let start = clock()
        try g.kick()
        #expect(!g.waitInterrupt(milliseconds: 1500))
        #expect(f.controller.sync { server.dmaBroken })
        #expect(f.logLines.contains("no reply"))
        _ = start
        // The server still answers, fails further DMA at once, and DEVICE_RESET clears the condition.
        #expect(try g.client.read32(7, 0) == 0x07C0_15AD)
        try g.kick()
        #expect(f.deviceStats.requests == 0)
        g.client.dmaServing = .serve
        #expect(try !g.client.request(.deviceReset).isError)
        #expect(!f.controller.sync { server.dmaBroken })
        try g.linuxStartup(expectConfig: false)
        let done = try g.run([GuestRequest(context: 2, cdb: [0, 0, 0, 0, 0, 0])])
        #expect(done.first?.context == 2)
    }

    @Test func aGarbageReplyMarksDMABrokenWithoutCrashing() throws {
        let f = try Fixture(withoutFD: true)
        let g = f.guest!
        let server = f.controller.server
        g.client.dmaServing = .garbage
        g.place(GuestRequest(context: 1, cdb: [0, 0, 0, 0, 0, 0]))
        try g.kick()
        try g.client.pump(milliseconds: 200)
        #expect(f.controller.sync { server.dmaBroken })
        #expect(f.logLines.contains("malformed DMA_READ reply"))
        #expect(try g.client.read32(7, 0) == 0x07C0_15AD)
    }

    @Test func anOversizedReplyIsNeverCopiedAndDropsTheClient() throws {
        let f = try Fixture(withoutFD: true)
        let g = f.guest!
        g.client.dmaServing = .oversized
        g.place(GuestRequest(context: 1, cdb: [0, 0, 0, 0, 0, 0]))
        try g.kick()
        try? g.client.pump(milliseconds: 300)
        #expect(f.logLines.contains("oversized or truncated reply"))
        var waited = 0
        while f.clientConnected && waited < 200 { usleep(10_000); waited += 1 }
        #expect(!f.clientConnected)  // the stream cannot be trusted any more
        let c = try VfioUserTestClient(path: f.path)
        #expect(try !c.negotiateVersion().isError)
        #expect(try c.read32(7, 0) == 0x07C0_15AD)
    }

    @Test func clientRequestsDuringADMAWaitAreHandledAtOnceInOrder() throws {
        let f = try Fixture(withoutFD: true)
        let g = f.guest!
        var readDuringWait: UInt32? = nil
        var maskAfterWrite: UInt32? = nil
        // When the device asks for DMA, the client first reads a register (a vCPU waiting on a read, holding
        // the lock QEMU's DMA handler needs), posts an interrupt-mask write and reads it back, then answers.
        g.client.onDMARequest = { c in
            readDuringWait = try c.read32(0, PVSCSI.Register.interruptMask)
            c.postWrite32(0, PVSCSI.Register.interruptMask, PVSCSI.interruptCompletion0)
            maskAfterWrite = try c.read32(0, PVSCSI.Register.interruptMask)
        }
        let done = try g.run([GuestRequest(context: 5, cdb: [0, 0, 0, 0, 0, 0])])
        #expect(done.first?.context == 5)
        #expect(readDuringWait == PVSCSI.interruptAll)
        #expect(maskAfterWrite == PVSCSI.interruptCompletion0)  // the posted write did not pass the read
        // The loop is free at once: a readiness reported for messages the wait already handled does not make it
        // block in a receive (that cost 5 s, the socket's receive timeout).
        var t0 = timespec(), t1 = timespec()
        clock_gettime(CLOCK_MONOTONIC, &t0)
        #expect(f.serverStats.handledDuringDMA >= 3)
        clock_gettime(CLOCK_MONOTONIC, &t1)
        #expect(t1.tv_sec - t0.tv_sec < 2)
    }

    @Test func aKickOrAResetDuringADMAWaitIsSafe() throws {
        let f = try Fixture(withoutFD: true)
        try kickOrReset(f)
    }

    func kickOrReset(_ f: Fixture) throws {
        let g = f.guest!
        // A kick during the DMA of another kick: noted and processed afterwards (both requests complete).
        g.place(GuestRequest(context: 1, cdb: [0, 0, 0, 0, 0, 0]))
        g.client.onDMARequest = { c in
            g.place(GuestRequest(context: 2, cdb: [0, 0, 0, 0, 0, 0]))
            c.postWrite32(0, PVSCSI.Register.kickNonRWIO, 0)
        }
        try g.kick(rw: false)
        var got = g.takeCompletions()
        while got.count < 2, g.waitInterrupt(milliseconds: 2000) { got += g.takeCompletions() }
        #expect(Set(got.map(\.context)) == [1, 2])
        // An ADAPTER_RESET and DMA_UNMAP of all memory during a DMA wait: the interrupted work stops, nothing
        // crashes, and the guest can start over.
        g.place(GuestRequest(context: 3, cdb: [0, 0, 0, 0, 0, 0]))
        g.client.onDMARequest = { c in
            c.postWrite32(0, PVSCSI.Register.command, PVSCSI.Command.adapterReset.rawValue)
            _ = try c.dmaUnmap(address: 0, size: 0, flags: 2)
        }
        try g.kick()
        try g.client.pump(milliseconds: 200)
        #expect(f.dmaWindowCount == 0)
        #expect(!f.ringsReady)
        #expect(try !g.client.dmaMap(address: TestGuest.iova, size: UInt64(TestGuest.size), fd: nil).isError)
        try g.linuxStartup(expectConfig: false)
        let again = try g.run([GuestRequest(context: 4, cdb: [0, 0, 0, 0, 0, 0])])
        #expect(again.first?.context == 4)
    }

    @Test func mappablePageIsOfferedOnlyWhenAsked() throws {
        var synchronous = PVSCSIOptions()
        synchronous.synchronousRegisterWrites = true
        let f = try Fixture(startup: false, options: synchronous)
        let c = f.client!
        #expect(try !c.negotiateVersion().isError)
        // Offered whatever the guest memory (fd-less windows too: writes are then acknowledged early when the
        // device needs DMA by message).
        #expect(try !c.dmaMap(address: 0x10_0000, size: 0x10_0000, fd: nil).isError)
        /// GET_REGION_INFO for BAR0 with room for the capability; returns (reply payload, fd received).
        func bar0Info() throws -> ([UInt8], Int32) {
            var q = Payload()
            q.u32(64); q.u32(0); q.u32(0); q.u32(0); q.u64(0); q.u64(0)
            q.bytes += [UInt8](repeating: 0, count: 32)
            let (_, bytes) = c.message(.deviceGetRegionInfo, q.bytes)
            c.sendRaw(bytes)
            var buffer = [UInt8](repeating: 0, count: 16 + 64)
            var fds = [Int32](repeating: -1, count: 4)
            var nfds: Int32 = 0
            var truncated: Int32 = 0
            let n = buffer.withUnsafeMutableBytes { b in
                fds.withUnsafeMutableBufferPointer { csys_recv_with_fds(c.fd, b.baseAddress, 16, $0.baseAddress, 4, &nfds, &truncated) }
            }
            #expect(n == 16)
            let h = buffer.withUnsafeBytes { VfioUserHeader($0)! }
            let payload = Int(h.size) - 16
            var body = [UInt8](repeating: 0, count: payload)
            _ = body.withUnsafeMutableBytes { recv(c.fd, $0.baseAddress, payload, Int32(MSG_WAITALL)) }
            return (body, nfds > 0 ? fds[0] : -1)
        }
        let (info, fd) = try bar0Info()
        let r = TestReply(header: VfioUserHeader(messageID: 0, command: 5, size: 0, flags: 1), payload: info)
        #expect(info.count == 64)
        #expect(r.u32(4) == 0xF)  // READ | WRITE | MMAP | CAPS
        #expect(r.u32(12) == 32)  // cap_offset
        #expect(r.u32(32) & 0xFFFF == 1)  // VFIO_REGION_INFO_CAP_SPARSE_MMAP
        #expect(r.u32(40) == 1)  // one area
        #expect(r.u64(48) == 5 * 4096 && r.u64(56) == 4096)
        #expect(fd >= 0)
        if fd >= 0 {
            // The area is mappable and private to the device (the device never looks at it).
            let p = csys_mmap_shared(fd, 4096, 5 * 4096, 1)
            #expect(p != nil)
            if let p { _ = csys_munmap(p, 4096) }
            close(fd)
        }
        // The default (posted register writes, 16 targets) offers no mappable area at all.
        let f2 = try Fixture(startup: false)
        #expect(try !f2.client.negotiateVersion().isError)

        var q = Payload()
        q.u32(64); q.u32(0); q.u32(0); q.u32(0); q.u64(0); q.u64(0)
        q.bytes += [UInt8](repeating: 0, count: 32)
        #expect(try f2.client.request(.deviceGetRegionInfo, q.bytes).u32(4) == 0x3)
    }
}
