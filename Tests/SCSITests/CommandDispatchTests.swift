import BlockIO
@testable import SCSI
import Testing

@Suite struct CommandDispatchTests {
    static let tur: [UInt8] = [0, 0, 0, 0, 0, 0]
    static let powerOnSense = fixedFormatSense(0x06, 0x29, 0x00)

    @Test func unitAttentionDoesNotBlockInquiryReportLUNsOrRequestSense() {
        var h = Harness(keepPowerOnUA: true)
        #expect(h.run([0x12, 0, 0, 0, 96, 0], dataIn: 96).status == .good)
        #expect(h.run([0xA0, 0, 0, 0, 0, 0] + bytesBE32(64) + [0, 0], dataIn: 64).status == .good)
        let blocked = h.run(read10(lba: 0, blocks: 1), dataIn: 512)
        #expect(blocked.status == .checkCondition)
        #expect(blocked.sense == Self.powerOnSense)
        #expect(blocked.requests.isEmpty)
        #expect(h.run(Self.tur).status == .good)
        // The other nexus still has its own.
        #expect(h.run(Self.tur, nexus: Harness.other).sense == Self.powerOnSense)
    }

    @Test func requestSenseReturnsAndClearsTheUnitAttention() {
        var h = Harness(keepPowerOnUA: true)
        let o = h.run([0x03, 0, 0, 0, 18, 0], dataIn: 18)
        #expect(o.status == .good)
        #expect(o.data == Self.powerOnSense)
        #expect(h.run(Self.tur).status == .good)
        let descriptor = h.run([0x03, 1, 0, 0, 18, 0], dataIn: 18, nexus: Harness.other)
        #expect(descriptor.data == [0x72, 0x06, 0x29, 0x00, 0, 0, 0, 0])
    }

    @Test func unitAttentionComesBeforeOpcodeAndFieldChecks() {
        var h = Harness(keepPowerOnUA: true)
        #expect(h.run([0xC5, 0, 0, 0, 0, 0]).sense == Self.powerOnSense)
        #expect(h.run([0xC5, 0, 0, 0, 0, 0]).sense == invalidOpcodeSense)
    }

    @Test func queuedUnitAttentionsAreReportedOneByOne() {
        var h = Harness()
        h.unit.unitAttentions.establish(.modeParametersChanged, for: .all)
        h.unit.unitAttentions.establish(.capacityDataHasChanged, for: .all)
        let first = h.run(Self.tur)
        let second = h.run(Self.tur)
        #expect(Set([first.sense, second.sense]) == Set([fixedFormatSense(0x06, 0x2A, 0x01), fixedFormatSense(0x06, 0x2A, 0x09)]))
        #expect(h.run(Self.tur).status == .good)
    }

    @Test func capacityChangeRaisesUnitAttention() throws {
        var h = Harness()
        try h.target.resize(LogicalUnitNumber(0)!, blockCount: 128, allowShrink: false)
        #expect(h.run(Self.tur).sense == fixedFormatSense(0x06, 0x2A, 0x09))
        #expect(h.run([0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], dataIn: 8).data == [0, 0, 0, 127, 0, 0, 2, 0])
    }

    @Test func absentLUN() {
        var h = Harness()
        let notSupported = fixedFormatSense(0x05, 0x25, 0x00)
        #expect(h.run(Self.tur, lun: 5).sense == notSupported)
        #expect(h.run(read10(lba: 0, blocks: 1), dataIn: 512, lun: 5).sense == notSupported)
        #expect(h.run([0xC5, 0, 0, 0, 0, 0], lun: 5).sense == notSupported)
        var view = LUNMapView()
        var task = SCSITask(nexus: Harness.nexus, lun: nil, tag: 1, cdb: CDB(Self.tur))
        guard case .complete = h.target.execute(&task, view: &view) else {
            Issue.record("undecodable LUN did not complete")
            return
        }
        #expect(task.status == .checkCondition && task.sense.array == notSupported)
    }

    @Test func flatSpaceLUNIsReachable() {
        var h = Harness(lun: 300)
        h.unit.unitAttentions.clear(for: Harness.nexus)
        let o = h.run(read10(lba: 1, blocks: 1), dataIn: 512, lun: 300)
        #expect(o.status == .good && o.dataInLength == 512)
        #expect(h.run(Self.tur, lun: 0).sense == fixedFormatSense(0x05, 0x25, 0x00))
    }

    @Test func unknownOperationCodeAndServiceAction() {
        var h = Harness()
        #expect(h.run([0xC5, 0, 0, 0, 0, 0]).sense == invalidOpcodeSense)
        #expect(h.run([0x04, 0, 0, 0, 0, 0]).sense == invalidOpcodeSense)  // FORMAT UNIT: not supported
        #expect(h.run([0x9E, 0x11] + [UInt8](repeating: 0, count: 14)).sense == invalidCDB(byte: 1, bit: 4))
        #expect(h.run([0xA3, 0x0A] + [UInt8](repeating: 0, count: 10)).sense == invalidCDB(byte: 1, bit: 4))
    }

    @Test func descriptorSenseFollowsDSense() {
        var h = Harness()
        var mode = h.unit.mode
        mode.descriptorSense = true
        h.unit.setMode(mode)
        #expect(h.run(read10(lba: 64, blocks: 1), dataIn: 512).sense == [0x72, 0x05, 0x21, 0x00, 0, 0, 0, 0])
        #expect(h.run(read10(lba: 0, blocks: 1, flags: 0x40), dataIn: 512).sense ==
                [0x72, 0x05, 0x24, 0x00, 0, 0, 0, 8, 0x02, 0x06, 0, 0, 0xCE, 0, 1, 0])
        h.disk.override = { _ in .failure(5) }  // EIO
        #expect(h.run(read10(lba: 9, blocks: 1), dataIn: 512).sense ==
                [0x72, 0x03, 0x11, 0x00, 0, 0, 0, 12, 0x00, 0x0A, 0x80, 0] + bytesBE64(9))
    }

    @Test func hotRemovedUnitFinishesCommandsInFlight() throws {
        let h = Harness()
        var view = LUNMapView()
        let buffer = IOBuffer(size: 512)
        var task = SCSITask(nexus: Harness.nexus, lun: LogicalUnitNumber(0), tag: 1, cdb: CDB(read10(lba: 0, blocks: 1)),
                            dataIn: buffer.list)
        guard case .submit = h.target.execute(&task, view: &view) else {
            Issue.record("no submit")
            return
        }
        try h.target.remove(LogicalUnitNumber(0)!)
        guard case .complete = h.target.resume(&task, with: .success(512)) else {
            Issue.record("no completion")
            return
        }
        #expect(task.status == .good && task.dataInLength == 512)
        var next = SCSITask(nexus: Harness.nexus, lun: LogicalUnitNumber(0), tag: 2, cdb: CDB(Self.tur))
        _ = h.target.execute(&next, view: &view)
        #expect(next.sense.array == fixedFormatSense(0x05, 0x25, 0x00))
        withExtendedLifetime(buffer) {}
    }

    @Test func resumeWithoutAStartedCommandFailsSafely() {
        let h = Harness()
        var task = SCSITask(nexus: Harness.nexus, lun: LogicalUnitNumber(0), tag: 1, cdb: CDB(Self.tur))
        guard case .complete = h.target.resume(&task, with: .success(0)) else {
            Issue.record("no completion")
            return
        }
        #expect(task.status == .checkCondition && task.sense.array == fixedFormatSense(0x04, 0x44, 0x00))
    }
}

@Suite struct ReservationCommandTests {
    static let reserve6: [UInt8] = [0x16, 0, 0, 0, 0, 0]
    static let release6: [UInt8] = [0x17, 0, 0, 0, 0, 0]

    static func prOut(_ action: UInt8, type: UInt8 = 0, key: UInt64, serviceKey: UInt64) -> (cdb: [UInt8], data: [UInt8]) {
        ([0x5F, action, type, 0, 0] + bytesBE32(24) + [0], bytesBE64(key) + bytesBE64(serviceKey) + [UInt8](repeating: 0, count: 8))
    }

    @Test func spc2ReserveConflictsForOtherNexus() {
        var h = Harness()
        #expect(h.run(Self.reserve6).status == .good)
        let conflict = h.run(read10(lba: 0, blocks: 1), dataIn: 512, nexus: Harness.other)
        #expect(conflict.status == .reservationConflict)
        #expect(conflict.sense.isEmpty && conflict.requests.isEmpty)
        #expect(h.run([0x12, 0, 0, 0, 36, 0], dataIn: 36, nexus: Harness.other).status == .good)
        #expect(h.run(read10(lba: 0, blocks: 1), dataIn: 512).status == .good)
        #expect(h.run(Self.reserve6, nexus: Harness.other).status == .reservationConflict)
        #expect(h.run(Self.release6).status == .good)
        #expect(h.run(read10(lba: 0, blocks: 1), dataIn: 512, nexus: Harness.other).status == .good)
        #expect(h.run([0x56, 0x10, 0, 0, 0, 0, 0, 0, 0, 0]).sense == invalidCDB(byte: 1, bit: 4))
    }

    @Test func persistentReservationThroughExecute() {
        var h = Harness()
        let register = Self.prOut(0x00, key: 0, serviceKey: 0xABC)
        #expect(h.run(register.cdb, dataOut: register.data).status == .good)
        let reserve = Self.prOut(0x01, type: 0x03, key: 0xABC, serviceKey: 0)  // exclusive access
        #expect(h.run(reserve.cdb, dataOut: reserve.data).status == .good)
        #expect(h.run(read10(lba: 0, blocks: 1), dataIn: 512, nexus: Harness.other).status == .reservationConflict)
        #expect(h.run(read10(lba: 0, blocks: 1), dataIn: 512).status == .good)
        let keys = h.run([0x5E, 0x00, 0, 0, 0, 0, 0] + bytesBE16(64) + [0], dataIn: 64, nexus: Harness.other)
        #expect(keys.status == .good)
        #expect(keys.data == [0, 0, 0, 1, 0, 0, 0, 8] + bytesBE64(0xABC))
        let truncated = h.run([0x5E, 0x00, 0, 0, 0, 0, 0] + bytesBE16(4) + [0], dataIn: 64)
        #expect(truncated.data == [0, 0, 0, 1])
        // The other nexus registers and preempts: the first one loses its registration and gets a UA.
        let register2 = Self.prOut(0x00, key: 0, serviceKey: 0x2)
        #expect(h.run(register2.cdb, dataOut: register2.data, nexus: Harness.other).status == .good)
        let preempt = Self.prOut(0x04, type: 0x03, key: 0x2, serviceKey: 0xABC)
        #expect(h.run(preempt.cdb, dataOut: preempt.data, nexus: Harness.other).status == .good)
        #expect(h.run(ControlCommandsTestsTUR.cdb).sense == fixedFormatSense(0x06, 0x2A, 0x05))
        #expect(h.run(read10(lba: 0, blocks: 1), dataIn: 512).status == .reservationConflict)
        #expect(h.run(read10(lba: 0, blocks: 1), dataIn: 512, nexus: Harness.other).status == .good)
    }

    @Test func preemptAndAbortHandsBackATaskManagementPlan() {
        let h = Harness()
        var view = LUNMapView()
        func prout(_ action: UInt8, type: UInt8, key: UInt64, serviceKey: UInt64, from nexus: ITNexus) -> SCSITask {
            let (cdb, data) = Self.prOut(action, type: type, key: key, serviceKey: serviceKey)
            let buffer = IOBuffer(data)
            var task = SCSITask(nexus: nexus, lun: LogicalUnitNumber(0), tag: 1, cdb: CDB(cdb), dataOut: buffer.list)
            _ = h.target.execute(&task, view: &view)
            withExtendedLifetime(buffer) {}
            return task
        }
        #expect(prout(0x00, type: 0, key: 0, serviceKey: 0x1, from: Harness.nexus).status == .good)
        #expect(prout(0x01, type: 0x01, key: 0x1, serviceKey: 0, from: Harness.nexus).taskManagementRequest == nil)
        #expect(prout(0x00, type: 0, key: 0, serviceKey: 0x2, from: Harness.other).status == .good)
        let abort = prout(0x05, type: 0x01, key: 0x2, serviceKey: 0x1, from: Harness.other)
        #expect(abort.status == .good)
        let plan = abort.taskManagementRequest
        #expect(plan?.lun == LogicalUnitNumber(0) && plan?.nexus == Harness.other)
        #expect(plan?.abortScopes.contains(TaskScope(nexus: Harness.nexus, lun: LogicalUnitNumber(0), tag: nil)) == true)
    }

    @Test func persistentReserveOutWithShortDataOutFails() {
        var h = Harness()
        let register = Self.prOut(0x00, key: 0, serviceKey: 0xABC)
        let o = h.run(register.cdb, dataOut: Array(register.data.prefix(10)))
        #expect(o.sense == parameterListLengthSense)
        #expect(h.unit.reservations.registrations.isEmpty)
    }
}

enum ControlCommandsTestsTUR {
    static let cdb: [UInt8] = [0, 0, 0, 0, 0, 0]
}
