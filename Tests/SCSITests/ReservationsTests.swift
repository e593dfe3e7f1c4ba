import Testing
import Synchronization
@testable import SCSI
#if canImport(Glibc)
import Glibc
#endif

/// A pthread running `body` (tests only).
final class Thread: @unchecked Sendable {
    private var id = pthread_t()
    private let body: () -> Void

    init(_ body: @escaping @Sendable () -> Void) {
        self.body = body
        let arg = Unmanaged.passRetained(self).toOpaque()
        pthread_create(&id, nil, { raw in
            let thread = Unmanaged<Thread>.fromOpaque(raw!).takeRetainedValue()
            thread.body()
            return nil
        }, arg)
    }

    func join() { pthread_join(id, nil) }
}

// MARK: Builders

private let holderNexus = ITNexus(initiator: 0x1000)
private let registrantNexus = ITNexus(initiator: 0x2000)
private let outsiderNexus = ITNexus(initiator: 0x3000)

private let holderKey: UInt64 = 0x1122_3344_5566_7788
private let registrantKey: UInt64 = 0xAABB_CCDD_EEFF_0011

/// PERSISTENT RESERVE OUT CDB (10 bytes).
private func proutCDB(_ action: UInt8, type: UInt8 = 0, scope: UInt8 = 0, length: UInt32 = 24) -> CDB {
    CDB([0x5F, action, scope << 4 | type, 0, 0,
         UInt8(length >> 24), UInt8(length >> 16 & 0xFF), UInt8(length >> 8 & 0xFF), UInt8(length & 0xFF), 0])
}

/// PERSISTENT RESERVE IN CDB (10 bytes).
private func prinCDB(_ action: UInt8, allocation: UInt16 = 0xFFFF) -> CDB {
    CDB([0x5E, action, 0, 0, 0, 0, 0, UInt8(allocation >> 8), UInt8(allocation & 0xFF), 0])
}

private func be64(_ v: UInt64) -> [UInt8] { (0..<8).map { UInt8(truncatingIfNeeded: v >> (56 - 8 * $0)) } }

/// The 24-byte PR OUT parameter list.
private func params(key: UInt64 = 0, serviceKey: UInt64 = 0, flags: UInt8 = 0) -> [UInt8] {
    be64(key) + be64(serviceKey) + [0, 0, 0, 0, flags, 0, 0, 0]
}

enum PROutAction: UInt8 {
    case register = 0, reserve = 1, release = 2, clear = 3, preempt = 4, preemptAndAbort = 5, registerIgnore = 6
}

@discardableResult
private func prout(_ state: ReservationState, _ action: PROutAction, from nexus: ITNexus, key: UInt64 = 0,
                   serviceKey: UInt64 = 0, type: PersistentReservationType? = nil, flags: UInt8 = 0) throws(SCSIError) -> ReservationEffects {
    try state.persistentReserveOut(proutCDB(action.rawValue, type: type?.rawValue ?? 0),
                                   parameters: params(key: key, serviceKey: serviceKey, flags: flags), from: nexus)
}

/// Fixed-format sense bytes written out by hand (key, ASC, ASCQ and optional sense-key specific bytes).
private func fixedSense(_ key: UInt8, _ asc: UInt8, _ ascq: UInt8, sks: [UInt8] = [0, 0, 0]) -> [UInt8] {
    [0x70, 0, key, 0, 0, 0, 0, 0x0A, 0, 0, 0, 0, asc, ascq, 0] + sks
}

/// What `body` threw, as status and encoded fixed sense.
private func failure(_ body: () throws(SCSIError) -> Void) -> (SCSIStatus, [UInt8])? {
    do {
        try body()
        return nil
    } catch {
        var bytes = SenseBytes()
        if let sense = error.sense { sense.encode(.fixed, into: &bytes) }
        return (error.status, bytes.array)
    }
}

private func isConflict(_ body: () throws(SCSIError) -> Void) -> Bool {
    guard let (status, sense) = failure(body) else { return false }
    return status == .reservationConflict && sense.isEmpty
}

/// A LU state where `holderNexus` (key `holderKey`) holds a reservation of `type` and `registrantNexus`
/// is registered with `registrantKey`.
private func reserved(_ type: PersistentReservationType) throws(SCSIError) -> ReservationState {
    let state = ReservationState()
    try prout(state, .register, from: holderNexus, serviceKey: holderKey)
    try prout(state, .register, from: registrantNexus, serviceKey: registrantKey)
    try prout(state, .reserve, from: holderNexus, key: holderKey, type: type)
    return state
}

// MARK: Tests

@Suite("Persistent reservations: PERSISTENT RESERVE IN data")
struct PersistentReserveInTests {
    @Test func readKeysEmptyAndFilled() throws {
        let state = ReservationState()
        #expect(try state.persistentReserveIn(prinCDB(0), from: holderNexus) == [0, 0, 0, 0, 0, 0, 0, 0])
        try prout(state, .register, from: holderNexus, serviceKey: holderKey)
        try prout(state, .register, from: registrantNexus, serviceKey: registrantKey)
        #expect(try state.persistentReserveIn(prinCDB(0), from: outsiderNexus)
                == [0, 0, 0, 2, 0, 0, 0, 16] + be64(holderKey) + be64(registrantKey))
    }

    @Test func readReservation() throws {
        let state = ReservationState()
        #expect(try state.persistentReserveIn(prinCDB(1), from: holderNexus) == [0, 0, 0, 0, 0, 0, 0, 0])
        try prout(state, .register, from: holderNexus, serviceKey: holderKey)
        try prout(state, .reserve, from: holderNexus, key: holderKey, type: .writeExclusiveRegistrantsOnly)
        #expect(try state.persistentReserveIn(prinCDB(1), from: outsiderNexus)
                == [0, 0, 0, 1, 0, 0, 0, 16] + be64(holderKey) + [0, 0, 0, 0, 0, 0x05, 0, 0])
    }

    @Test func readReservationAllRegistrantsReportsKeyZero() throws {
        let state = try reserved(.exclusiveAccessAllRegistrants)
        #expect(try state.persistentReserveIn(prinCDB(1), from: holderNexus)
                == [0, 0, 0, 2, 0, 0, 0, 16] + be64(0) + [0, 0, 0, 0, 0, 0x08, 0, 0])
    }

    @Test func reportCapabilities() throws {
        let state = ReservationState()
        // Length 8; CRH, ATP_C; TMV, ALLOW COMMANDS 001b; every type; PTPL_C = SIP_C = 0.
        #expect(try state.persistentReserveIn(prinCDB(2), from: holderNexus) == [0, 8, 0x14, 0x90, 0xEA, 0x01, 0, 0])
    }

    @Test func readFullStatus() throws {
        let state = ReservationState()
        let portTwo = ITNexus(initiator: 0x2000, targetPort: 2)
        try prout(state, .register, from: holderNexus, serviceKey: holderKey, flags: 0x04)  // ALL_TG_PT
        try prout(state, .register, from: portTwo, serviceKey: registrantKey)
        try prout(state, .reserve, from: holderNexus, key: holderKey, type: .exclusiveAccess)
        let expected: [UInt8] = [0, 0, 0, 2, 0, 0, 0, 96]
            + be64(holderKey) + [0, 0, 0, 0, 0x03, 0x03, 0, 0, 0, 0, 0, 1, 0, 0, 0, 24]
            + [0x06, 0, 0, 0] + be64(0x1000) + [UInt8](repeating: 0, count: 12)
            + be64(registrantKey) + [0, 0, 0, 0, 0x00, 0x00, 0, 0, 0, 0, 0, 2, 0, 0, 0, 24]
            + [0x06, 0, 0, 0] + be64(0x2000) + [UInt8](repeating: 0, count: 12)
        #expect(try state.persistentReserveIn(prinCDB(3), from: outsiderNexus) == expected)
    }

    @Test(arguments: [UInt8(0x04), 0x05, 0x1F])
    func invalidServiceAction(action: UInt8) {
        let state = ReservationState()
        let f = failure { () throws(SCSIError) in _ = try state.persistentReserveIn(prinCDB(action), from: holderNexus) }
        #expect(f?.0 == .checkCondition)
        #expect(f?.1 == fixedSense(0x05, 0x24, 0x00, sks: [0xCC, 0x00, 0x01]))
    }
}

@Suite("Persistent reservations: PERSISTENT RESERVE OUT")
struct PersistentReserveOutTests {
    @Test(arguments: [UInt32(0), 23, 25, 48])
    func parameterListLengthMustBe24(length: UInt32) {
        let state = ReservationState()
        let data = params(serviceKey: holderKey) + [UInt8](repeating: 0, count: 24)
        let f = failure { () throws(SCSIError) in
            _ = try state.persistentReserveOut(proutCDB(0, length: length), parameters: data, from: holderNexus)
        }
        #expect(f?.0 == .checkCondition)
        #expect(f?.1 == fixedSense(0x05, 0x1A, 0x00))
        #expect(state.registrations.isEmpty)
    }

    @Test func shortDataOutIsAParameterListLengthError() {
        let state = ReservationState()
        let f = failure { () throws(SCSIError) in
            _ = try state.persistentReserveOut(proutCDB(0), parameters: [0, 0, 0], from: holderNexus)
        }
        #expect(f?.1 == fixedSense(0x05, 0x1A, 0x00))
    }

    @Test(arguments: [
        // (service action, type byte, scope, expected sense-key specific bytes)
        (UInt8(0x08), UInt8(0x01), UInt8(0), [UInt8(0xCC), 0x00, 0x01]),
        (0x1F, 0x01, 0, [0xCC, 0x00, 0x01]),
        (0x01, 0x00, 0, [0xCB, 0x00, 0x02]),  // RESERVE, type 0
        (0x01, 0x02, 0, [0xCB, 0x00, 0x02]),
        (0x01, 0x04, 0, [0xCB, 0x00, 0x02]),
        (0x01, 0x09, 0, [0xCB, 0x00, 0x02]),
        (0x02, 0x0F, 0, [0xCB, 0x00, 0x02]),  // RELEASE
        (0x04, 0x00, 0, [0xCB, 0x00, 0x02]),  // PREEMPT
        (0x05, 0x0A, 0, [0xCB, 0x00, 0x02]),  // PREEMPT AND ABORT
        (0x01, 0x01, 1, [0xCF, 0x00, 0x02]),  // scope not LU_SCOPE
    ])
    func invalidFieldInCDB(action: UInt8, type: UInt8, scope: UInt8, sks: [UInt8]) throws {
        let state = ReservationState()
        try prout(state, .register, from: holderNexus, serviceKey: holderKey)
        let f = failure { () throws(SCSIError) in
            _ = try state.persistentReserveOut(proutCDB(action, type: type, scope: scope),
                                               parameters: params(key: holderKey, serviceKey: registrantKey),
                                               from: holderNexus)
        }
        #expect(f?.0 == .checkCondition)
        #expect(f?.1 == fixedSense(0x05, 0x24, 0x00, sks: sks))
        #expect(state.persistentReservation == nil)
        #expect(state.generation == 1)
    }

    @Test(arguments: [
        // (service action, flags byte, expected SKS): SPEC_I_PT always, APTPL for the register actions.
        (PROutAction.register, UInt8(0x08), [UInt8(0x8B), 0x00, 0x14]),
        (.registerIgnore, 0x08, [0x8B, 0x00, 0x14]),
        (.reserve, 0x08, [0x8B, 0x00, 0x14]),
        (.register, 0x01, [0x88, 0x00, 0x14]),
        (.registerIgnore, 0x01, [0x88, 0x00, 0x14]),
    ])
    func invalidFieldInParameterList(action: PROutAction, flags: UInt8, sks: [UInt8]) {
        let state = ReservationState()
        let f = failure { () throws(SCSIError) in
            try prout(state, action, from: holderNexus, serviceKey: holderKey, type: .writeExclusive, flags: flags)
        }
        #expect(f?.1 == fixedSense(0x05, 0x26, 0x00, sks: sks))
        #expect(state.registrations.isEmpty)
    }

    @Test func aptplIsIgnoredOutsideRegister() throws {
        let state = ReservationState()
        try prout(state, .register, from: holderNexus, serviceKey: holderKey)
        try prout(state, .reserve, from: holderNexus, key: holderKey, type: .writeExclusive, flags: 0x01)
        #expect(state.persistentReservation == PersistentReservation(holder: holderNexus, type: .writeExclusive))
    }

    @Test func registerRules() throws {
        let state = ReservationState()
        // Unregistered with a non-zero reservation key: conflict.
        #expect(isConflict { () throws(SCSIError) in try prout(state, .register, from: holderNexus, key: 5, serviceKey: holderKey) })
        // Unregistered, service key 0: nothing registered, still GOOD.
        try prout(state, .register, from: holderNexus)
        #expect(state.registrations.isEmpty)
        try prout(state, .register, from: holderNexus, serviceKey: holderKey)
        #expect(state.registrations == [PersistentRegistration(nexus: holderNexus, key: holderKey, allTargetPorts: false)])
        // Registered, wrong key: conflict.
        #expect(isConflict { () throws(SCSIError) in try prout(state, .register, from: holderNexus, key: 1, serviceKey: 2) })
        // Change the key.
        try prout(state, .register, from: holderNexus, key: holderKey, serviceKey: 0x42)
        #expect(state.registrations.map(\.key) == [0x42])
        // REGISTER AND IGNORE EXISTING KEY ignores the reservation key.
        try prout(state, .registerIgnore, from: holderNexus, key: 0xDEAD, serviceKey: 0x43)
        #expect(state.registrations.map(\.key) == [0x43])
        try prout(state, .registerIgnore, from: registrantNexus, key: 0xDEAD, serviceKey: registrantKey)
        // Unregister.
        try prout(state, .register, from: holderNexus, key: 0x43, serviceKey: 0)
        #expect(state.registrations.map(\.nexus) == [registrantNexus])
        #expect(state.generation == 6)
    }

    @Test func registrationLimit() throws {
        let state = ReservationState()
        for i in 0..<ReservationState.maximumRegistrations {
            try prout(state, .register, from: ITNexus(initiator: UInt64(i + 1)), serviceKey: UInt64(i + 1))
        }
        let f = failure { () throws(SCSIError) in
            try prout(state, .register, from: ITNexus(initiator: 99_999), serviceKey: 7)
        }
        #expect(f?.1 == fixedSense(0x05, 0x55, 0x04))
    }

    @Test func allTargetPortsRegistrationCoversEveryPort() throws {
        let state = ReservationState()
        let portOne = ITNexus(initiator: 7, targetPort: 1)
        let portTwo = ITNexus(initiator: 7, targetPort: 2)
        try prout(state, .register, from: portOne, serviceKey: holderKey)
        #expect(isConflict { () throws(SCSIError) in try prout(state, .reserve, from: portTwo, key: holderKey, type: .writeExclusive) })
        try prout(state, .register, from: portOne, key: holderKey, serviceKey: 0)
        try prout(state, .register, from: portOne, serviceKey: holderKey, flags: 0x04)
        try prout(state, .reserve, from: portTwo, key: holderKey, type: .writeExclusive)
        #expect(!state.conflicts(CDB([0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0]), from: portOne))
    }

    @Test func reserveRules() throws {
        let state = ReservationState()
        #expect(isConflict { () throws(SCSIError) in try prout(state, .reserve, from: holderNexus, key: 0, type: .writeExclusive) })
        try prout(state, .register, from: holderNexus, serviceKey: holderKey)
        try prout(state, .register, from: registrantNexus, serviceKey: registrantKey)
        #expect(isConflict { () throws(SCSIError) in try prout(state, .reserve, from: holderNexus, key: registrantKey, type: .writeExclusive) })
        try prout(state, .reserve, from: holderNexus, key: holderKey, type: .writeExclusive)
        #expect(state.isReserved)
        try prout(state, .reserve, from: holderNexus, key: holderKey, type: .writeExclusive)  // same again: GOOD
        #expect(isConflict { () throws(SCSIError) in try prout(state, .reserve, from: holderNexus, key: holderKey, type: .exclusiveAccess) })
        #expect(isConflict { () throws(SCSIError) in try prout(state, .reserve, from: registrantNexus, key: registrantKey, type: .writeExclusive) })
        #expect(state.generation == 2)  // RESERVE does not count
    }

    @Test func releaseRules() throws {
        let state = try reserved(.writeExclusive)
        #expect(isConflict { () throws(SCSIError) in try prout(state, .release, from: outsiderNexus, key: 0, type: .writeExclusive) })
        #expect(isConflict { () throws(SCSIError) in try prout(state, .release, from: holderNexus, key: registrantKey, type: .writeExclusive) })
        // A registrant that does not hold it: GOOD, nothing happens.
        try prout(state, .release, from: registrantNexus, key: registrantKey, type: .writeExclusive)
        #expect(state.persistentReservation != nil)
        // Wrong type from the holder.
        let f = failure { () throws(SCSIError) in try prout(state, .release, from: holderNexus, key: holderKey, type: .exclusiveAccess) }
        #expect(f?.1 == fixedSense(0x05, 0x26, 0x04))
        let effects = try prout(state, .release, from: holderNexus, key: holderKey, type: .writeExclusive)
        #expect(effects.unitAttentions.isEmpty)  // WE: no unit attention
        #expect(state.persistentReservation == nil)
        #expect(!state.isReserved)
        // No reservation: GOOD.
        try prout(state, .release, from: holderNexus, key: holderKey, type: .writeExclusive)
        #expect(state.generation == 2)
    }

    @Test(arguments: [PersistentReservationType.writeExclusiveRegistrantsOnly, .exclusiveAccessRegistrantsOnly,
                      .writeExclusiveAllRegistrants, .exclusiveAccessAllRegistrants])
    func releaseOfSharedTypesTellsOtherRegistrants(type: PersistentReservationType) throws {
        let state = try reserved(type)
        // For all-registrants types any registrant may release.
        let releaser = type.allRegistrantsHold ? registrantNexus : holderNexus
        let other = type.allRegistrantsHold ? holderNexus : registrantNexus
        let key = type.allRegistrantsHold ? registrantKey : holderKey
        let effects = try prout(state, .release, from: releaser, key: key, type: type)
        #expect(effects.unitAttentions.count == 1)
        #expect(effects.unitAttentions.first?.0 == .reservationsReleased)
        #expect(effects.unitAttentions.first?.1 == .only(other))
        #expect(state.persistentReservation == nil)
    }

    @Test func unregisteringTheHolder() throws {
        let we = try reserved(.writeExclusive)
        let e1 = try prout(we, .register, from: holderNexus, key: holderKey, serviceKey: 0)
        #expect(we.persistentReservation == nil)
        #expect(e1.unitAttentions.isEmpty)

        let ro = try reserved(.writeExclusiveRegistrantsOnly)
        let e2 = try prout(ro, .register, from: holderNexus, key: holderKey, serviceKey: 0)
        #expect(ro.persistentReservation == nil)
        #expect(e2.unitAttentions.map(\.0) == [.reservationsReleased])
        #expect(e2.unitAttentions.map(\.1) == [.only(registrantNexus)])

        // All registrants: the reservation lasts until the last registrant leaves.
        let ar = try reserved(.writeExclusiveAllRegistrants)
        try prout(ar, .register, from: holderNexus, key: holderKey, serviceKey: 0)
        #expect(ar.persistentReservation != nil)
        #expect(!ar.conflicts(CDB([0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0]), from: registrantNexus))
        try prout(ar, .register, from: registrantNexus, key: registrantKey, serviceKey: 0)
        #expect(ar.persistentReservation == nil)
        #expect(!ar.isReserved)
    }

    @Test func clear() throws {
        let state = try reserved(.exclusiveAccess)
        #expect(isConflict { () throws(SCSIError) in try prout(state, .clear, from: outsiderNexus) })
        #expect(isConflict { () throws(SCSIError) in try prout(state, .clear, from: registrantNexus, key: holderKey) })
        let effects = try prout(state, .clear, from: registrantNexus, key: registrantKey)
        #expect(effects.unitAttentions.map(\.0) == [.reservationsPreempted])
        #expect(effects.unitAttentions.map(\.1) == [.only(holderNexus)])
        #expect(state.registrations.isEmpty)
        #expect(state.persistentReservation == nil)
        #expect(state.generation == 3)
    }

    @Test(arguments: [false, true])
    func preemptTheHolder(abort: Bool) throws {
        let state = try reserved(.writeExclusive)
        let effects = try prout(state, abort ? .preemptAndAbort : .preempt, from: registrantNexus, key: registrantKey,
                                serviceKey: holderKey, type: .exclusiveAccess)
        #expect(state.persistentReservation == PersistentReservation(holder: registrantNexus, type: .exclusiveAccess))
        #expect(state.registrations.map(\.nexus) == [registrantNexus])
        #expect(effects.unitAttentions.map(\.0) == [.registrationsPreempted])
        #expect(effects.unitAttentions.map(\.1) == [.only(holderNexus)])
        #expect(effects.abortTasksOf == (abort ? [holderNexus] : []))
        #expect(state.conflicts(CDB([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]), from: holderNexus))
        #expect(state.generation == 3)
        let lun = LogicalUnitNumber(3)!
        #expect(effects.abortScopes(on: lun) == (abort ? [TaskScope(nexus: holderNexus, lun: lun, tag: nil)] : []))
    }

    @Test func preemptOwnReservationToChangeTypeTellsOthers() throws {
        let state = try reserved(.writeExclusiveRegistrantsOnly)
        let effects = try prout(state, .preempt, from: holderNexus, key: holderKey, serviceKey: holderKey,
                                type: .exclusiveAccessRegistrantsOnly)
        #expect(state.persistentReservation == PersistentReservation(holder: holderNexus, type: .exclusiveAccessRegistrantsOnly))
        #expect(state.registrations.count == 2)
        #expect(effects.unitAttentions.map(\.0) == [.reservationsReleased])
        #expect(effects.unitAttentions.map(\.1) == [.only(registrantNexus)])
    }

    @Test func preemptRegistrationOnly() throws {
        let state = try reserved(.writeExclusive)
        let third = ITNexus(initiator: 0x4000)
        try prout(state, .register, from: third, serviceKey: 0x77)
        // Preempting a non-holder key removes that registration, the reservation stays.
        let effects = try prout(state, .preempt, from: registrantNexus, key: registrantKey, serviceKey: 0x77, type: .writeExclusive)
        #expect(effects.unitAttentions.map(\.1) == [.only(third)])
        #expect(state.persistentReservation?.holder == holderNexus)
        // Unknown key: conflict. Zero key while a single-holder reservation exists: invalid field.
        #expect(isConflict { () throws(SCSIError) in
            try prout(state, .preempt, from: registrantNexus, key: registrantKey, serviceKey: 0x99, type: .writeExclusive)
        })
        let f = failure { () throws(SCSIError) in
            try prout(state, .preempt, from: registrantNexus, key: registrantKey, serviceKey: 0, type: .writeExclusive)
        }
        #expect(f?.1 == fixedSense(0x05, 0x26, 0x00, sks: [0x80, 0x00, 0x08]))
    }

    @Test func preemptWithoutReservation() throws {
        let state = ReservationState()
        try prout(state, .register, from: holderNexus, serviceKey: holderKey)
        try prout(state, .register, from: registrantNexus, serviceKey: registrantKey)
        let f = failure { () throws(SCSIError) in
            try prout(state, .preempt, from: holderNexus, key: holderKey, serviceKey: 0, type: .writeExclusive)
        }
        #expect(f?.1 == fixedSense(0x05, 0x26, 0x00, sks: [0x80, 0x00, 0x08]))
        let effects = try prout(state, .preempt, from: holderNexus, key: holderKey, serviceKey: registrantKey, type: .writeExclusive)
        #expect(effects.unitAttentions.map(\.0) == [.registrationsPreempted])
        #expect(state.registrations.map(\.nexus) == [holderNexus])
        #expect(state.persistentReservation == nil)
    }

    @Test func preemptAllRegistrantsReservation() throws {
        let state = try reserved(.exclusiveAccessAllRegistrants)
        let third = ITNexus(initiator: 0x4000)
        try prout(state, .register, from: third, serviceKey: 0x77)
        let effects = try prout(state, .preemptAndAbort, from: third, key: 0x77, serviceKey: 0, type: .writeExclusive)
        #expect(Set(effects.abortTasksOf) == [holderNexus, registrantNexus])
        #expect(state.registrations.map(\.nexus) == [third])
        #expect(state.persistentReservation == PersistentReservation(holder: third, type: .writeExclusive))
    }

    @Test func unregisteredNexusCannotUseTheOtherActions() throws {
        let state = try reserved(.writeExclusive)
        for action in [PROutAction.reserve, .release, .clear, .preempt, .preemptAndAbort] {
            #expect(isConflict { () throws(SCSIError) in
                try prout(state, action, from: outsiderNexus, key: 0, serviceKey: holderKey, type: .writeExclusive)
            })
        }
        #expect(state.generation == 2)
    }
}

@Suite("Reservations: conflicts")
struct ReservationConflictTests {
    static let read10 = CDB([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0])
    static let write10 = CDB([0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0])
    static let inquiry = CDB([0x12, 0, 0, 0, 36, 0])
    static let reportLUNs = CDB([0xA0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0])
    static let requestSense = CDB([0x03, 0, 0, 0, 18, 0])
    static let testUnitReady = CDB([0x00, 0, 0, 0, 0, 0])
    static let readCapacity10 = CDB([0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    static let readCapacity16 = CDB([0x9E, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0])
    static let modeSense6 = CDB([0x1A, 0, 0x3F, 0, 0xFF, 0])
    static let modeSelect10 = CDB([0x55, 0x10, 0, 0, 0, 0, 0, 0, 24, 0])
    static let synchronizeCache10 = CDB([0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    static let unmap = CDB([0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0])
    static let prIn = CDB([0x5E, 0, 0, 0, 0, 0, 0, 0, 8, 0])
    static let reportOpcodes = CDB([0xA3, 0x0C, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0])
    static let startUnit = CDB([0x1B, 0, 0, 0, 0x01, 0])
    static let stopUnit = CDB([0x1B, 0, 0, 0, 0x00, 0])
    static let allowRemoval = CDB([0x1E, 0, 0, 0, 0, 0])
    static let preventRemoval = CDB([0x1E, 0, 0, 0, 1, 0])
    static let reserve6 = CDB([0x16, 0, 0, 0, 0, 0])
    static let release6 = CDB([0x17, 0, 0, 0, 0, 0])

    enum Row { case allowed, readLike, writeLike, alwaysConflicts }

    /// Every CDB with its class in the SPC-4 / SBC-3 tables.
    static let commands: [(String, CDB, Row)] = [
        ("READ(10)", read10, .readLike), ("WRITE(10)", write10, .writeLike), ("INQUIRY", inquiry, .allowed),
        ("REPORT LUNS", reportLUNs, .allowed), ("REQUEST SENSE", requestSense, .allowed),
        ("TEST UNIT READY", testUnitReady, .allowed), ("READ CAPACITY(10)", readCapacity10, .allowed),
        ("READ CAPACITY(16)", readCapacity16, .allowed), ("MODE SENSE(6)", modeSense6, .readLike),
        ("MODE SELECT(10)", modeSelect10, .writeLike), ("SYNCHRONIZE CACHE(10)", synchronizeCache10, .writeLike),
        ("UNMAP", unmap, .writeLike), ("PERSISTENT RESERVE IN", prIn, .allowed),
        ("REPORT SUPPORTED OPERATION CODES", reportOpcodes, .readLike), ("START UNIT", startUnit, .allowed),
        ("STOP UNIT", stopUnit, .writeLike), ("ALLOW MEDIUM REMOVAL", allowRemoval, .allowed),
        ("PREVENT MEDIUM REMOVAL", preventRemoval, .writeLike),
        ("RESERVE(6)", reserve6, .alwaysConflicts), ("RELEASE(6)", release6, .alwaysConflicts),
    ]

    enum Role: CaseIterable { case holder, registrant, outsider }

    /// The expected outcome, straight from SPC-4 table 5.13 (columns: holder / registered non-holder /
    /// not registered, per type).
    static func expectedConflict(_ row: Row, _ type: PersistentReservationType, _ role: Role) -> Bool {
        if row == .alwaysConflicts { return true }
        if row == .allowed { return false }
        let privileged: Bool
        switch role {
        case .holder: privileged = true
        case .registrant: privileged = type.rawValue >= 5   // RO and AR types let registrants in
        case .outsider: privileged = false
        }
        if privileged { return false }
        if row == .writeLike { return true }
        return [.exclusiveAccess, .exclusiveAccessRegistrantsOnly, .exclusiveAccessAllRegistrants].contains(type)
    }

    @Test(arguments: PersistentReservationType.allCases)
    func persistentReservationTable(type: PersistentReservationType) throws {
        let state = try reserved(type)
        for (name, cdb, row) in Self.commands {
            for role in Role.allCases {
                let nexus = role == .holder ? holderNexus : role == .registrant ? registrantNexus : outsiderNexus
                let expected = Self.expectedConflict(row, type, role)
                #expect(state.conflicts(cdb, from: nexus) == expected, "\(name) from \(role) under \(type)")
                #expect(state.lockedConflicts(ReservationAccess.of(cdb), from: nexus) == expected, "locked: \(name)")
            }
        }
    }

    @Test func explicitTableSpotChecks() throws {
        // A few cells written out literally, independent of the helper above.
        let we = try reserved(.writeExclusive)
        #expect(!we.conflicts(Self.read10, from: outsiderNexus))
        #expect(we.conflicts(Self.write10, from: registrantNexus))
        let ea = try reserved(.exclusiveAccess)
        #expect(ea.conflicts(Self.read10, from: registrantNexus))
        #expect(!ea.conflicts(Self.inquiry, from: outsiderNexus))
        #expect(!ea.conflicts(Self.testUnitReady, from: outsiderNexus))
        let earo = try reserved(.exclusiveAccessRegistrantsOnly)
        #expect(!earo.conflicts(Self.write10, from: registrantNexus))
        #expect(earo.conflicts(Self.read10, from: outsiderNexus))
    }

    @Test func manyRegistrationsFallBackToTheLockedPath() throws {
        let state = try reserved(.writeExclusiveRegistrantsOnly)
        for i in 0..<60 { try prout(state, .register, from: ITNexus(initiator: UInt64(0x9000 + i)), serviceKey: UInt64(i + 1)) }
        #expect(!state.conflicts(Self.write10, from: ITNexus(initiator: 0x9000 + 59)))
        #expect(!state.conflicts(Self.write10, from: holderNexus))
        #expect(state.conflicts(Self.write10, from: outsiderNexus))
        #expect(!state.conflicts(Self.read10, from: outsiderNexus))
    }

    @Test func overlappingAllTargetPortsRegistrationIsRefused() throws {
        let state = ReservationState()
        try prout(state, .register, from: ITNexus(initiator: 7, targetPort: 2), serviceKey: 1)
        #expect(isConflict { () throws(SCSIError) in
            try prout(state, .register, from: ITNexus(initiator: 7, targetPort: 1), serviceKey: 2, flags: 0x04)
        })
        #expect(state.registrations.count == 1)
    }

    /// Readers never see a torn snapshot: while a writer keeps changing the reservation type and
    /// re-registering, the holder may always write and a non-registrant never may.
    @Test func snapshotIsNeverTorn() throws {
        let state = try reserved(.writeExclusive)
        let stop = Atomic<Bool>(false)
        let writer = Thread {
            var flip = false
            while !stop.load(ordering: .relaxed) {
                flip.toggle()
                _ = try? prout(state, .preempt, from: holderNexus, key: holderKey, serviceKey: holderKey,
                               type: flip ? .exclusiveAccess : .writeExclusiveRegistrantsOnly)
                _ = try? prout(state, .register, from: ITNexus(initiator: 0x7777), serviceKey: flip ? 0x77 : 0)
                _ = try? prout(state, .registerIgnore, from: ITNexus(initiator: 0x7777), serviceKey: 0)
            }
        }
        var wrong = 0
        for _ in 0..<2_000_000 {
            if state.conflicts(Self.write10, from: holderNexus) { wrong += 1 }
            if !state.conflicts(Self.write10, from: outsiderNexus) { wrong += 1 }
        }
        stop.store(true, ordering: .relaxed)
        writer.join()
        #expect(wrong == 0)
    }

    @Test func registrationsAloneOnlyBlockReserveAndRelease() throws {
        let state = ReservationState()
        try prout(state, .register, from: holderNexus, serviceKey: holderKey)
        #expect(!state.isReserved)
        #expect(!state.conflicts(Self.write10, from: outsiderNexus))
        #expect(state.conflicts(Self.reserve6, from: holderNexus))
        #expect(state.conflicts(Self.release6, from: outsiderNexus))
        #expect(isConflict { () throws(SCSIError) in try state.reserve(from: holderNexus) })
        #expect(state.spc2Holder == nil)
    }

    @Test func nothingConflictsWithoutReservations() {
        let state = ReservationState()
        for (_, cdb, _) in Self.commands {
            #expect(!state.conflicts(cdb, from: outsiderNexus))
        }
    }

    /// SPC-2 RESERVE: everything from other nexuses conflicts except INQUIRY, REPORT LUNS, REQUEST SENSE,
    /// READ CAPACITY, LOG SENSE, PERSISTENT RESERVE IN and RELEASE; the holder is never in conflict.
    @Test func spc2ReservationTable() throws {
        let state = ReservationState()
        try state.reserve(from: holderNexus)
        #expect(state.isReserved)
        #expect(state.spc2Holder == holderNexus)
        let allowed: Set<String> = ["INQUIRY", "REPORT LUNS", "REQUEST SENSE", "READ CAPACITY(10)",
                                    "READ CAPACITY(16)", "PERSISTENT RESERVE IN", "RELEASE(6)",
                                    "START UNIT", "ALLOW MEDIUM REMOVAL"]
        for (name, cdb, _) in Self.commands {
            #expect(state.conflicts(cdb, from: outsiderNexus) == !allowed.contains(name), "\(name)")
            #expect(!state.conflicts(cdb, from: holderNexus), "\(name) from the holder")
        }
        #expect(state.conflicts(proutCDB(0), from: outsiderNexus))
        #expect(!state.conflicts(proutCDB(0), from: holderNexus))
    }

    @Test func spc2ReserveRelease() throws {
        let state = ReservationState()
        try state.reserve(from: holderNexus)
        try state.reserve(from: holderNexus)  // again from the holder: GOOD
        #expect(isConflict { () throws(SCSIError) in try state.reserve(from: outsiderNexus) })
        state.release(from: outsiderNexus)    // not the holder: GOOD, no effect
        #expect(state.spc2Holder == holderNexus)
        // PR OUT from another nexus conflicts; from the holder it proceeds.
        #expect(isConflict { () throws(SCSIError) in try prout(state, .register, from: outsiderNexus, serviceKey: 1) })
        state.release(from: holderNexus)
        #expect(!state.isReserved)
        try state.reserve(from: outsiderNexus)
        state.resetSPC2Reservation()
        #expect(state.spc2Holder == nil)
        try state.reserve(from: outsiderNexus)
        #expect(!state.nexusLost(holderNexus))
        #expect(state.nexusLost(outsiderNexus))
        #expect(!state.isReserved)
    }

    @Test func persistentReservationBlocksSPC2() throws {
        let state = try reserved(.writeExclusive)
        #expect(state.conflicts(Self.reserve6, from: holderNexus))
        #expect(isConflict { () throws(SCSIError) in try state.reserve(from: holderNexus) })
        state.release(from: holderNexus)
        #expect(state.persistentReservation != nil)
    }

    @Test(arguments: [
        ([UInt8(0x16), 0x01, 0, 0, 0, 0], [UInt8(0xC8), 0x00, 0x01]),            // RESERVE(6) extent
        ([0x56, 0x10, 0, 0, 0, 0, 0, 0, 0, 0], [0xCC, 0x00, 0x01]),             // RESERVE(10) 3RDPTY
        ([0x57, 0x02, 0, 0, 0, 0, 0, 0, 0, 0], [0xC9, 0x00, 0x01]),             // RELEASE(10) LONGID
    ])
    func unsupportedReserveReleaseFields(cdb: [UInt8], sks: [UInt8]) {
        let f = failure { () throws(SCSIError) in try ReservationState.validateReserveRelease(CDB(cdb)) }
        #expect(f?.1 == fixedSense(0x05, 0x24, 0x00, sks: sks))
    }

    @Test func plainReserveReleaseCDBsAreValid() throws {
        try ReservationState.validateReserveRelease(Self.reserve6)
        try ReservationState.validateReserveRelease(CDB([0x56, 0, 0, 0, 0, 0, 0, 0, 0, 0]))
    }
}

@Suite("Persistent reservations: REGISTER AND MOVE")
struct RegisterAndMoveTests {
    static let destination = ITNexus(initiator: 0x5000, targetPort: 1)

    /// REGISTER AND MOVE parameter list: header, then a SAS TransportID for `initiator`.
    static func moveParameters(key: UInt64, serviceKey: UInt64, flags: UInt8 = 0, port: UInt16 = 1,
                               initiator: UInt64 = 0x5000, protocolByte: UInt8 = 0x06) -> [UInt8] {
        be64(key) + be64(serviceKey) + [0, flags, UInt8(port >> 8), UInt8(port & 0xFF), 0, 0, 0, 24]
            + [protocolByte, 0, 0, 0] + be64(initiator) + [UInt8](repeating: 0, count: 12)
    }

    static func move(_ state: ReservationState, from nexus: ITNexus, _ parameters: [UInt8],
                     length: UInt32 = 48) throws(SCSIError) {
        _ = try state.persistentReserveOut(proutCDB(0x07, length: length), parameters: parameters, from: nexus)
    }

    @Test(arguments: [false, true])
    func movesTheReservation(unregister: Bool) throws {
        let state = try reserved(.exclusiveAccessRegistrantsOnly)
        try Self.move(state, from: holderNexus, Self.moveParameters(key: holderKey, serviceKey: 0x99, flags: unregister ? 0x02 : 0))
        #expect(state.persistentReservation == PersistentReservation(holder: Self.destination, type: .exclusiveAccessRegistrantsOnly))
        let expectedKeys: [UInt64] = unregister ? [registrantKey, 0x99] : [holderKey, registrantKey, 0x99]
        #expect(state.registrations.map(\.key) == expectedKeys)
        #expect(state.generation == 3)
        #expect(!state.conflicts(ReservationConflictTests.write10, from: Self.destination))
        #expect(state.conflicts(ReservationConflictTests.write10, from: holderNexus) == unregister)
        // READ RESERVATION now reports the new holder's key.
        #expect(try state.persistentReserveIn(prinCDB(1), from: outsiderNexus)
                == [0, 0, 0, 3, 0, 0, 0, 16] + be64(0x99) + [0, 0, 0, 0, 0, 0x06, 0, 0])
    }

    @Test func onlyTheHolderOfASingleHolderReservationMayMove() throws {
        let state = try reserved(.writeExclusive)
        #expect(isConflict { () throws(SCSIError) in
            try Self.move(state, from: registrantNexus, Self.moveParameters(key: registrantKey, serviceKey: 0x99))
        })
        #expect(isConflict { () throws(SCSIError) in
            try Self.move(state, from: holderNexus, Self.moveParameters(key: registrantKey, serviceKey: 0x99))
        })
        #expect(isConflict { () throws(SCSIError) in
            try Self.move(state, from: outsiderNexus, Self.moveParameters(key: 0, serviceKey: 0x99))
        })
        let allRegistrants = try reserved(.writeExclusiveAllRegistrants)
        #expect(isConflict { () throws(SCSIError) in
            try Self.move(allRegistrants, from: holderNexus, Self.moveParameters(key: holderKey, serviceKey: 0x99))
        })
        let none = ReservationState()
        try prout(none, .register, from: holderNexus, serviceKey: holderKey)
        #expect(isConflict { () throws(SCSIError) in
            try Self.move(none, from: holderNexus, Self.moveParameters(key: holderKey, serviceKey: 0x99))
        })
        #expect(state.generation == 2)
    }

    /// (parameters, list length, expected fixed sense)
    static let errorCases: [([UInt8], UInt32, [UInt8])] = [
        (moveParameters(key: holderKey, serviceKey: 0), UInt32(48), fixedSense(0x05, 0x26, 0x00, sks: [0x80, 0x00, 0x08])),
        (moveParameters(key: holderKey, serviceKey: 0x99, initiator: 0x1000), 48, fixedSense(0x05, 0x26, 0x00, sks: [0x8F, 0x00, 0x18])),
        (moveParameters(key: holderKey, serviceKey: 0x99, protocolByte: 0x05), 48, fixedSense(0x05, 0x26, 0x00, sks: [0x8F, 0x00, 0x18])),
        (moveParameters(key: holderKey, serviceKey: 0x99, flags: 0x01), 48, fixedSense(0x05, 0x26, 0x00, sks: [0x88, 0x00, 0x11])),
        (moveParameters(key: holderKey, serviceKey: 0x99, port: 0), 48, fixedSense(0x05, 0x26, 0x00, sks: [0x8F, 0x00, 0x12])),
        (moveParameters(key: holderKey, serviceKey: 0x99), 47, fixedSense(0x05, 0x1A, 0x00)),
        (Array(moveParameters(key: holderKey, serviceKey: 0x99).prefix(40)), 48, fixedSense(0x05, 0x1A, 0x00)),
    ]

    @Test(arguments: errorCases)
    func errors(parameters: [UInt8], length: UInt32, sense: [UInt8]) throws {
        let state = try reserved(.writeExclusive)
        let f = failure { () throws(SCSIError) in try Self.move(state, from: holderNexus, parameters, length: length) }
        #expect(f?.0 == .checkCondition)
        #expect(f?.1 == sense)
        #expect(state.persistentReservation?.holder == holderNexus)
        #expect(state.registrations.count == 2)
    }
}
