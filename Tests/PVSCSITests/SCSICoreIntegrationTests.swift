import PVSCSITestSupport
import CSystem
import PVSCSI
import SCSI
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// PVSCSI in front of the real SCSI core (SCSITarget.execute/resume) and an in-memory channel.
@Suite(.serialized) struct SCSICoreIntegrationTests {
    @Test func inquiryVPDAndReportLUNsComeFromTheCore() throws {
        let f = try Fixture(luns: [0, 1], useCore: true)
        let g = f.guest!
        let data = g.address(page: TestGuest.dataPage)
        let sense = g.address(page: TestGuest.sensePage)
        // The first command to a fresh LUN may report POWER ON / RESET; INQUIRY is exempt.
        let inq = try g.run([GuestRequest(context: 1, cdb: [0x12, 0, 0, 0, 96, 0], flags: PVSCSI.flagDirectionToHost,
                                          dataAddress: data, dataLength: 96, senseAddress: sense, senseLength: 96)])
        #expect(inq.first?.scsiStatus == 0)
        #expect(inq.first?.dataLength ?? 0 >= 36)
        let bytes = UnsafeRawBufferPointer(start: g.pointer(data), count: 36)
        #expect(String(decoding: bytes[8..<16], as: UTF8.self) == "SCSIGATE")
        #expect(String(decoding: bytes[16..<26], as: UTF8.self) == "TEST-LUN-0")
        // VPD page 80h: unit serial number.
        let vpd = try g.run([GuestRequest(context: 2, cdb: [0x12, 1, 0x80, 0, 64, 0], flags: PVSCSI.flagDirectionToHost,
                                          dataAddress: data, dataLength: 64, senseAddress: sense, senseLength: 96)])
        #expect(vpd.first?.scsiStatus == 0)
        #expect(UnsafeRawBufferPointer(start: g.pointer(data), count: 8)[1] == 0x80)
        // REPORT LUNS on a PVSCSI target lists only its LUN 0 (the core's LUN 1 is PVSCSI target 1).
        memset(g.pointer(data), 0xEE, 64)
        let rl = try g.run([GuestRequest(context: 3, cdb: [0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], flags: PVSCSI.flagDirectionToHost,
                                         dataAddress: data, dataLength: 256, senseAddress: sense, senseLength: 96)])
        #expect(rl.first?.scsiStatus == 0)
        #expect(rl.first?.dataLength == 16)
        let list = UnsafeRawBufferPointer(start: g.pointer(data), count: 24)
        #expect(Array(list[0..<16]) == [0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
        #expect(list[16] == 0xEE)
        // Allocation length below 16: ILLEGAL REQUEST, INVALID FIELD IN CDB.
        let short = try g.run([GuestRequest(context: 4, target: 1, cdb: [0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0], flags: PVSCSI.flagDirectionToHost,
                                            dataAddress: data, dataLength: 8, senseAddress: sense, senseLength: 96)])
        #expect(short.first?.scsiStatus == 0x02)
        let sb = UnsafeRawBufferPointer(start: g.pointer(sense), count: 18)
        #expect(sb[2] & 0xF == 0x05 && sb[12] == 0x24)
    }

    @Test func writeAndReadRoundTripThroughTheCore() throws {
        let f = try Fixture(useCore: true)
        let g = f.guest!
        let sense = g.address(page: TestGuest.sensePage)
        // Clear the power-on unit attention first (TEST UNIT READY until GOOD).
        var tries = 0
        while tries < 4 {
            let t = try g.run([GuestRequest(context: 100 + UInt64(tries), cdb: [0, 0, 0, 0, 0, 0], senseAddress: sense, senseLength: 96)])
            if t.first?.scsiStatus == 0 { break }
            tries += 1
        }
        let src = g.address(page: TestGuest.dataPage)
        for i in 0..<8192 { g.pointer(src).storeBytes(of: UInt8(truncatingIfNeeded: i * 13 + 5), toByteOffset: i, as: UInt8.self) }
        g.writeSG(page: TestGuest.sgPage, [(src, 4096, 0), (src + 4096, 4096, 0)])
        let w = try g.run([GuestRequest(context: 1, cdb: write10(lba: 16, blocks: 16), flags: PVSCSI.flagDirectionToDevice | PVSCSI.flagSGList,
                                        dataAddress: g.address(page: TestGuest.sgPage), dataLength: 8192,
                                        senseAddress: sense, senseLength: 96)])
        #expect(w.first?.scsiStatus == 0)
        #expect(w.first?.hostStatus == 0)
        #expect(Array(f.disks[0]!.bytes[8192..<16384]) == Array(UnsafeRawBufferPointer(start: g.pointer(src), count: 8192)))
        let dst = g.address(page: TestGuest.dataPage + 10)
        memset(g.pointer(dst), 0, 8192)
        let r = try g.run([GuestRequest(context: 2, cdb: read10(lba: 16, blocks: 16), flags: PVSCSI.flagDirectionToHost,
                                        dataAddress: dst, dataLength: 8192, senseAddress: sense, senseLength: 96)])
        #expect(r.first?.scsiStatus == 0)
        #expect(r.first?.dataLength == 8192)
        #expect(memcmp(g.pointer(src), g.pointer(dst), 8192) == 0)
        // Out of range: CHECK CONDITION, ILLEGAL REQUEST, LBA OUT OF RANGE in the guest's sense buffer.
        let bad = try g.run([GuestRequest(context: 3, cdb: read10(lba: 4000, blocks: 1), flags: PVSCSI.flagDirectionToHost,
                                          dataAddress: dst, dataLength: 512, senseAddress: sense, senseLength: 96)])
        #expect(bad.first?.scsiStatus == 0x02)
        let s = UnsafeRawBufferPointer(start: g.pointer(sense), count: 18)
        #expect(bad.first?.senseLength ?? 0 >= 14)
        #expect(s[2] & 0xF == 0x05)
        #expect(s[12] == 0x21)
    }

    @Test func hotAddedLUNAnswersThroughTheCoreWithAUnitAttention() throws {
        let f = try Fixture(luns: [0], useCore: true)
        let g = f.guest!
        try f.addLUN(5)
        #expect(g.waitInterrupt())
        let msgs = g.takeMessages()
        #expect(msgs.first?.0 == PVSCSI.messageDeviceAdded && msgs.first?.2 == 5)
        let sense = g.address(page: TestGuest.sensePage)
        let t = try g.run([GuestRequest(context: 1, target: 5, cdb: [0, 0, 0, 0, 0, 0], senseAddress: sense, senseLength: 96)])
        #expect(t.first?.hostStatus == 0)
        #expect(t.first?.scsiStatus == 0x02)
        let s = UnsafeRawBufferPointer(start: g.pointer(sense), count: 18)
        #expect(s[2] & 0xF == 0x06)  // UNIT ATTENTION
        #expect(s[12] == 0x29)  // POWER ON, RESET, OR BUS DEVICE RESET OCCURRED
    }

    @Test("hotplug = false: no DEV_ADDED message; the guest learns of the LUN from REPORTED LUNS DATA HAS CHANGED")
    func hotplugMessagesOff() throws {
        var options = PVSCSIOptions()
        options.hotplugMessages = false
        let f = try Fixture(luns: [0], useCore: true, options: options)
        let g = f.guest!
        try f.addLUN(5)
        #expect(!g.waitInterrupt(milliseconds: 500))
        #expect(g.takeMessages().isEmpty)
        // LUN 0's pending unit attentions, in order (the first is the power-on one of a new nexus).
        let sense = g.address(page: TestGuest.sensePage)
        var seen: [UInt16] = []
        for context in 1...4 {
            let t = try g.run([GuestRequest(context: UInt64(context), target: 0, cdb: [0, 0, 0, 0, 0, 0],
                                            senseAddress: sense, senseLength: 96)])
            guard t.first?.scsiStatus == 0x02 else { break }
            let s = UnsafeRawBufferPointer(start: g.pointer(sense), count: 18)
            #expect(s[2] & 0xF == 0x06)  // UNIT ATTENTION
            seen.append(UInt16(s[12]) << 8 | UInt16(s[13]))
        }
        #expect(seen.contains(0x3F0E))  // REPORTED LUNS DATA HAS CHANGED
    }

    @Test func resetDeviceEstablishesBusDeviceResetUnitAttention() throws {
        let f = try Fixture(luns: [0, 1], useCore: true)
        let g = f.guest!
        let sense = g.address(page: TestGuest.sensePage)
        // Clear the power-on unit attentions of both targets.
        for t in [UInt8(0), 1] {
            var n = 0
            while n < 4 {
                let r = try g.run([GuestRequest(context: 50 + UInt64(n), target: t, cdb: [0, 0, 0, 0, 0, 0], senseAddress: sense, senseLength: 96)])
                if r.first?.scsiStatus == 0 { break }
                n += 1
            }
        }
        #expect(try g.command(.resetDevice, [1, 0, 0]) == 0)
        let t0 = try g.run([GuestRequest(context: 1, target: 0, cdb: [0, 0, 0, 0, 0, 0], senseAddress: sense, senseLength: 96)])
        #expect(t0.first?.scsiStatus == 0)  // other target untouched
        let t1 = try g.run([GuestRequest(context: 2, target: 1, cdb: [0, 0, 0, 0, 0, 0], senseAddress: sense, senseLength: 96)])
        #expect(t1.first?.scsiStatus == 0x02)
        let s = UnsafeRawBufferPointer(start: g.pointer(sense), count: 18)
        #expect(s[2] & 0xF == 0x06)
        #expect(s[12] == 0x29 && s[13] == 0x03)
        // RESET_BUS: both targets report it.
        #expect(try g.command(.resetBus) == 0)
        for t in [UInt8(0), 1] {
            let r = try g.run([GuestRequest(context: 10 + UInt64(t), target: t, cdb: [0, 0, 0, 0, 0, 0], senseAddress: sense, senseLength: 96)])
            #expect(r.first?.scsiStatus == 0x02)
            #expect(s[12] == 0x29)
        }
    }
}
