import Synchronization

/// SPC-2 RESERVE/RELEASE and SPC-4 persistent reservations of one logical unit.
///
/// Supports every service action (REGISTER AND MOVE with the SAS-format TransportID this target reports)
/// and reservation type, LU scope only, ALL_TG_PT, no APTPL (PTPL_C = 0), no SPEC_I_PT (SIP_C = 0),
/// and the SPC-3 "compatible reservation handling" exceptions (CRH = 1): RESERVE and RELEASE conflict
/// while any registration exists, and PERSISTENT RESERVE OUT conflicts while another nexus holds an
/// SPC-2 reservation.
///
/// `isReserved` and the first test of `conflicts(_:from:)` are lock-free; the rest takes a mutex.
public final class ReservationState: Sendable {
    /// Most registrations kept; one more is refused with INSUFFICIENT REGISTRATION RESOURCES.
    public static let maximumRegistrations = 256

    private struct State {
        var spc2Holder: ITNexus? = nil
        var registrations: [PersistentRegistration] = []
        var reservation: PersistentReservation? = nil
        var generation: UInt32 = 0

        func registration(of nexus: ITNexus) -> Int? {
            registrations.firstIndex { $0.covers(nexus) }
        }

        func holds(_ nexus: ITNexus) -> Bool {
            guard let r = reservation else { return false }
            if r.type.allRegistrantsHold { return registration(of: nexus) != nil }
            guard let i = registration(of: r.holder) else { return false }
            return registrations[i].covers(nexus)
        }
    }

    private static let flagSPC2: UInt8 = 1
    private static let flagPersistent: UInt8 = 2
    private static let flagRegistered: UInt8 = 4

    private let state = Mutex(State())
    /// Bit set of `flag*`, mirrored after each change for the lock-free paths.
    private let flags = Atomic<UInt8>(0)

    // Lock-free snapshot of what `conflicts` needs, rewritten under the mutex after every change and read
    // with a sequence lock (odd `sequence` = being rewritten).
    private static let snapshotSlots = 64
    private static let snapshotMaxRegistrations = 48
    private static let allPortsKey: UInt32 = 0x1_0001
    private let sequence = Atomic<UInt64>(0)
    /// Bits 0-7 reservation type (0 none), bit 8 registrations exist, bit 9 table overflow (use the lock).
    private let policy = Atomic<UInt64>(0)
    /// SPC-2 holder: initiator and targetPort + 1 (0 = none).
    private let spc2Initiator = Atomic<UInt64>(0)
    private let spc2Port = Atomic<UInt32>(0)
    /// Registrations by initiator hash: key initiator, and (port key << 8 | role) with port key = targetPort + 1
    /// or `allPortsKey`, role 1 registrant / 2 holder; 0 = empty slot.
    private let slotInitiator: InlineArray<64, Atomic<UInt64>>
    private let slotPortRole: InlineArray<64, Atomic<UInt32>>

    public init() {
        slotInitiator = InlineArray { _ in Atomic(0) }
        slotPortRole = InlineArray { _ in Atomic(0) }
    }

    /// Lock-free: is any reservation (SPC-2 or persistent) held?
    @inline(__always) public var isReserved: Bool {
        flags.load(ordering: .acquiring) & (Self.flagSPC2 | Self.flagPersistent) != 0
    }

    /// Whether `cdb` from `nexus` conflicts with the current reservations (SPC-4 5.13.1 table, SBC-3
    /// table, SPC-2 5.5.1, SPC-3 5.6.3). Lock-free (a sequence-locked snapshot; the mutex only when more
    /// than 48 registrations exist or a writer keeps the snapshot busy).
    /// RESERVE, RELEASE and PERSISTENT RESERVE OUT are fully decided here only for the conflicts that
    /// depend on another nexus's reservation; `reserve`, `release` and `persistentReserveOut` check the rest.
    @inline(__always) public func conflicts(_ cdb: CDB, from nexus: ITNexus) -> Bool {
        let f = flags.load(ordering: .acquiring)
        if f == 0 { return false }
        let access = ReservationAccess.of(cdb)
        if f == Self.flagRegistered {  // registrations only: just RESERVE/RELEASE conflict
            return access == .reserve || access == .release
        }
        return snapshotConflicts(access, from: nexus)
    }

    /// The conflict rule, from the facts about the logical unit and the requesting nexus.
    /// `role`: 0 not registered, 1 registered, 2 reservation holder.
    @inline(__always)
    static func decide(_ access: ReservationAccess, type: PersistentReservationType?, registrationsExist: Bool,
                       role: UInt8, spc2HeldByOther: Bool) -> Bool {
        if let type {
            if access == .reserve || access == .release { return true }
            if role == 2 || (role == 1 && type.registrantsHaveAccess) { return false }
            switch access {
            case .unrestricted, .persistentReserveIn, .persistentReserveOut, .testUnitReady: return false
            case .read: return type.excludesReads
            case .write, .reserve, .release: return true
            }
        }
        if registrationsExist, access == .reserve || access == .release { return true }
        if spc2HeldByOther {
            switch access {
            case .unrestricted, .persistentReserveIn, .release: return false
            case .read, .write, .reserve, .persistentReserveOut, .testUnitReady: return true
            }
        }
        return false
    }

    private func snapshotConflicts(_ access: ReservationAccess, from nexus: ITNexus) -> Bool {
        let port = UInt32(nexus.targetPort) + 1
        for _ in 0..<16 {
            let before = sequence.load(ordering: .acquiring)
            if before & 1 != 0 { continue }
            let p = policy.load(ordering: .relaxed)
            if p & 0x200 != 0 { break }
            let spc2P = spc2Port.load(ordering: .relaxed)
            let spc2I = spc2Initiator.load(ordering: .relaxed)
            var role: UInt8 = 0
            var i = Self.slotHome(nexus.initiator)
            for _ in 0..<Self.snapshotSlots {
                let pr = slotPortRole[i].load(ordering: .relaxed)
                if pr == 0 { break }
                if slotInitiator[i].load(ordering: .relaxed) == nexus.initiator {
                    let key = pr >> 8
                    if key == port || key == Self.allPortsKey { role = max(role, UInt8(truncatingIfNeeded: pr)) }
                }
                i = (i + 1) & (Self.snapshotSlots - 1)
            }
            atomicMemoryFence(ordering: .acquiring)
            guard sequence.load(ordering: .relaxed) == before else { continue }
            let type = PersistentReservationType(rawValue: UInt8(truncatingIfNeeded: p))
            let spc2Other = spc2P != 0 && !(spc2P == port && spc2I == nexus.initiator)
            return Self.decide(access, type: type, registrationsExist: p & 0x100 != 0, role: role,
                               spc2HeldByOther: spc2Other)
        }
        return lockedConflicts(access, from: nexus)
    }

    /// The same decision from the authoritative state, under the mutex.
    func lockedConflicts(_ access: ReservationAccess, from nexus: ITNexus) -> Bool {
        state.withLock { s in
            let role: UInt8 = s.holds(nexus) ? 2 : (s.registration(of: nexus) != nil ? 1 : 0)
            let spc2Other = s.spc2Holder.map { $0 != nexus } ?? false
            return Self.decide(access, type: s.reservation?.type, registrationsExist: !s.registrations.isEmpty,
                               role: role, spc2HeldByOther: spc2Other)
        }
    }

    @inline(__always) private static func slotHome(_ initiator: UInt64) -> Int {
        Int(truncatingIfNeeded: (initiator &* 0x9E37_79B9_7F4A_7C15) >> 58)
    }

    // MARK: SPC-2

    /// Checks the RESERVE(6)/(10) and RELEASE(6)/(10) CDB fields this target does not support
    /// (extents, third-party reservations).
    public static func validateReserveRelease(_ cdb: CDB) throws(SCSIError) {
        switch cdb.opcode {
        case 0x16, 0x17:
            if cdb[1] & 0x01 != 0 { throw .invalidFieldInCDB(byte: 1, bit: 0) }  // obsolete extent bit
        case 0x56, 0x57:
            if cdb[1] & 0x10 != 0 { throw .invalidFieldInCDB(byte: 1, bit: 4) }  // 3RDPTY
            if cdb[1] & 0x02 != 0 { throw .invalidFieldInCDB(byte: 1, bit: 1) }  // LONGID
        default:
            break
        }
    }

    /// RESERVE(6)/RESERVE(10): RESERVATION CONFLICT when another nexus holds the LU or any persistent
    /// registration exists; reserving again from the holder succeeds.
    public func reserve(from nexus: ITNexus) throws(SCSIError) {
        let ok = state.withLock { s -> Bool in
            if !s.registrations.isEmpty || s.reservation != nil { return false }
            if let holder = s.spc2Holder, holder != nexus { return false }
            s.spc2Holder = nexus
            publish(s)
            return true
        }
        if !ok { throw .reservationConflict }
    }

    /// RELEASE(6)/RELEASE(10): releases the holder's reservation; from another nexus it does nothing
    /// (GOOD). The conflict while registrations exist is reported by `conflicts(_:from:)`.
    public func release(from nexus: ITNexus) {
        state.withLock { s in
            guard s.registrations.isEmpty, s.spc2Holder == nexus else { return }
            s.spc2Holder = nil
            publish(s)
        }
    }

    /// LOGICAL UNIT RESET / hard reset: releases the SPC-2 reservation (persistent ones survive).
    public func resetSPC2Reservation() {
        state.withLock { s in
            s.spc2Holder = nil
            publish(s)
        }
    }

    /// I_T nexus loss or I_T NEXUS RESET: releases an SPC-2 reservation held through `nexus`
    /// (persistent reservations and registrations survive). Returns whether one was released.
    @discardableResult
    public func nexusLost(_ nexus: ITNexus) -> Bool {
        state.withLock { s in
            guard s.spc2Holder == nexus else { return false }
            s.spc2Holder = nil
            publish(s)
            return true
        }
    }

    // MARK: Introspection

    /// The nexus holding an SPC-2 reservation.
    public var spc2Holder: ITNexus? { state.withLock { $0.spc2Holder } }
    /// Current registrations, in registration order.
    public var registrations: [PersistentRegistration] { state.withLock { $0.registrations } }
    /// The persistent reservation in force.
    public var persistentReservation: PersistentReservation? { state.withLock { $0.reservation } }
    /// PRgeneration.
    public var generation: UInt32 { state.withLock { $0.generation } }

    /// Rewrites the lock-free snapshot and flags from `s` (mutex held: one writer at a time).
    private func publish(_ s: State) {
        let v = sequence.load(ordering: .relaxed)
        sequence.store(v &+ 1, ordering: .relaxed)
        atomicMemoryFence(ordering: .releasing)
        var p = UInt64(s.reservation?.type.rawValue ?? 0)
        if !s.registrations.isEmpty { p |= 0x100 }
        if s.registrations.count > Self.snapshotMaxRegistrations { p |= 0x200 }
        policy.store(p, ordering: .relaxed)
        spc2Initiator.store(s.spc2Holder?.initiator ?? 0, ordering: .relaxed)
        spc2Port.store(s.spc2Holder.map { UInt32($0.targetPort) + 1 } ?? 0, ordering: .relaxed)
        for i in 0..<Self.snapshotSlots { slotPortRole[i].store(0, ordering: .relaxed) }
        if s.registrations.count <= Self.snapshotMaxRegistrations {
            let holderIndex = s.reservation.flatMap { s.registration(of: $0.holder) }
            let everyoneHolds = s.reservation?.type.allRegistrantsHold ?? false
            for (index, r) in s.registrations.enumerated() {
                let role: UInt32 = (everyoneHolds || index == holderIndex) ? 2 : 1
                let key = r.allTargetPorts ? Self.allPortsKey : UInt32(r.nexus.targetPort) + 1
                var i = Self.slotHome(r.nexus.initiator)
                while slotPortRole[i].load(ordering: .relaxed) != 0 { i = (i + 1) & (Self.snapshotSlots - 1) }
                slotInitiator[i].store(r.nexus.initiator, ordering: .relaxed)
                slotPortRole[i].store(key << 8 | role, ordering: .relaxed)
            }
        }
        sequence.store(v &+ 2, ordering: .releasing)

        var f: UInt8 = 0
        if s.spc2Holder != nil { f |= Self.flagSPC2 }
        if s.reservation != nil { f |= Self.flagPersistent }
        if !s.registrations.isEmpty { f |= Self.flagRegistered }
        flags.store(f, ordering: .releasing)
    }

    // MARK: PERSISTENT RESERVE IN

    /// PERSISTENT RESERVE IN: returns the parameter data (caller truncates to the allocation length).
    public func persistentReserveIn(_ cdb: CDB, from nexus: ITNexus) throws(SCSIError) -> [UInt8] {
        let action = cdb[1] & 0x1F
        guard action <= 0x03 else { throw .invalidFieldInCDB(byte: 1, bit: 4) }
        let s = state.withLock { $0 }
        var out: [UInt8] = []
        switch action {
        case 0x00:  // READ KEYS
            out.appendBE32(s.generation)
            out.appendBE32(UInt32(s.registrations.count * 8))
            for r in s.registrations { out.appendBE64(r.key) }
        case 0x01:  // READ RESERVATION
            out.appendBE32(s.generation)
            if let r = s.reservation {
                out.appendBE32(16)
                let key: UInt64 = r.type.allRegistrantsHold ? 0 : (s.registration(of: r.holder).map { s.registrations[$0].key } ?? 0)
                out.appendBE64(key)
                out.append(contentsOf: [0, 0, 0, 0, 0, r.type.rawValue, 0, 0])
            } else {
                out.appendBE32(0)
            }
        case 0x02:  // REPORT CAPABILITIES
            out.appendBE16(8)
            out.append(0x10 | 0x04)  // CRH = 1, SIP_C = 0, ATP_C = 1, PTPL_C = 0
            out.append(0x80 | 0x10)  // TMV = 1, ALLOW COMMANDS = 001b (TEST UNIT READY allowed), PTPL_A = 0
            out.append(0xEA)         // WR_EX_AR, EX_AC_RO, WR_EX_RO, EX_AC, WR_EX
            out.append(0x01)         // EX_AC_AR
            out.append(contentsOf: [0, 0])
        default:    // READ FULL STATUS
            out.appendBE32(s.generation)
            out.appendBE32(UInt32(s.registrations.count * 48))
            for r in s.registrations {
                let holds: Bool
                if let res = s.reservation {
                    holds = res.type.allRegistrantsHold || r.covers(res.holder)
                } else {
                    holds = false
                }
                out.appendBE64(r.key)
                out.append(contentsOf: [0, 0, 0, 0])
                out.append((r.allTargetPorts ? 0x02 : 0) | (holds ? 0x01 : 0))
                out.append(holds ? s.reservation!.type.rawValue : 0)
                out.append(contentsOf: [0, 0, 0, 0])
                out.appendBE16(r.nexus.targetPort)
                out.appendBE32(24)
                out.append(contentsOf: Self.transportID(r.nexus))
            }
        }
        return out
    }

    /// The 24-byte TransportID this target reports for an initiator: SAS format (protocol identifier 6)
    /// carrying the front-end's 64-bit initiator identifier as the SAS address.
    public static func transportID(_ nexus: ITNexus) -> [UInt8] {
        var id: [UInt8] = [0x06, 0, 0, 0]
        id.appendBE64(nexus.initiator)
        id.append(contentsOf: [UInt8](repeating: 0, count: 12))
        return id
    }

    // MARK: PERSISTENT RESERVE OUT

    /// PERSISTENT RESERVE OUT with its parameter list (`parameters` holds the data-out bytes received).
    public func persistentReserveOut(_ cdb: CDB, parameters: [UInt8], from nexus: ITNexus) throws(SCSIError) -> ReservationEffects {
        let action = cdb[1] & 0x1F
        guard action <= 0x07 else { throw .invalidFieldInCDB(byte: 1, bit: 4) }
        let scope = cdb[2] >> 4
        let typeCode = cdb[2] & 0x0F
        let listLength = cdb.be32(5)
        guard listLength >= 24, parameters.count >= 24 else {
            throw .check(.illegalRequest, .parameterListLengthError)
        }
        if action == 0x07 { return try registerAndMove(listLength: listLength, parameters: parameters, from: nexus) }
        let flagsByte = parameters[20]
        if flagsByte & 0x08 != 0 { throw .invalidFieldInParameterList(byte: 20, bit: 3) }  // SPEC_I_PT, SIP_C = 0
        guard listLength == 24 else { throw .check(.illegalRequest, .parameterListLengthError) }
        let key = parameters.be64(0)
        let serviceKey = parameters.be64(8)
        let isRegister = action == 0x00 || action == 0x06
        if isRegister, flagsByte & 0x01 != 0 { throw .invalidFieldInParameterList(byte: 20, bit: 0) }  // APTPL, PTPL_C = 0
        let allTargetPorts = isRegister && flagsByte & 0x04 != 0

        var type: PersistentReservationType? = nil
        if action == 0x01 || action == 0x02 || action == 0x04 || action == 0x05 {
            guard scope == 0 else { throw .invalidFieldInCDB(byte: 2, bit: 7) }
            guard let t = PersistentReservationType(rawValue: typeCode) else { throw .invalidFieldInCDB(byte: 2, bit: 3) }
            type = t
        }

        let result = state.withLock { s -> Result<ReservationEffects, SCSIError> in
            if let holder = s.spc2Holder, holder != nexus { return .failure(.reservationConflict) }
            let r: Result<ReservationEffects, SCSIError>
            switch action {
            case 0x00, 0x06:
                r = register(&s, nexus: nexus, key: key, serviceKey: serviceKey, ignoreKey: action == 0x06,
                             allTargetPorts: allTargetPorts)
            case 0x01: r = reserve(&s, nexus: nexus, key: key, type: type!)
            case 0x02: r = release(&s, nexus: nexus, key: key, type: type!)
            case 0x03: r = clear(&s, nexus: nexus, key: key)
            default: r = preempt(&s, nexus: nexus, key: key, serviceKey: serviceKey, type: type!, abort: action == 0x05)
            }
            if case .success = r, action != 0x01, action != 0x02 { s.generation &+= 1 }
            publish(s)
            return r
        }
        switch result {
        case .success(let effects): return effects
        case .failure(let error): throw error
        }
    }

    /// REGISTER AND MOVE (SPC-4 5.13.8): the holder hands its reservation (same type) to the I_T nexus
    /// named by the TransportID and RELATIVE TARGET PORT IDENTIFIER, registering it with the service
    /// action reservation key; UNREG also unregisters the holder. Only the SAS-format TransportID this
    /// target reports (see `transportID(_:)`) is understood.
    private func registerAndMove(listLength: UInt32, parameters: [UInt8], from nexus: ITNexus) throws(SCSIError) -> ReservationEffects {
        let key = parameters.be64(0)
        let serviceKey = parameters.be64(8)
        let flagsByte = parameters[17]
        let relativePort = UInt16(parameters[18]) << 8 | UInt16(parameters[19])
        let idLength = UInt32(parameters[20]) << 24 | UInt32(parameters[21]) << 16 | UInt32(parameters[22]) << 8 | UInt32(parameters[23])
        guard UInt64(idLength) + 24 <= UInt64(listLength), Int(idLength) + 24 <= parameters.count else {
            throw .check(.illegalRequest, .parameterListLengthError)
        }
        if flagsByte & 0x01 != 0 { throw .invalidFieldInParameterList(byte: 17, bit: 0) }  // APTPL, PTPL_C = 0
        let unregister = flagsByte & 0x02 != 0
        guard idLength >= 24 else { throw .invalidFieldInParameterList(byte: 20, bit: 7) }
        guard parameters[24] == 0x06 else { throw .invalidFieldInParameterList(byte: 24, bit: 7) }  // FORMAT 00b, SAS
        guard relativePort != 0 else { throw .invalidFieldInParameterList(byte: 18, bit: 7) }
        let destination = ITNexus(initiator: parameters.be64(28), targetPort: relativePort)

        let result = state.withLock { s -> Result<ReservationEffects, SCSIError> in
            if let holder = s.spc2Holder, holder != nexus { return .failure(.reservationConflict) }
            guard let source = s.registration(of: nexus), s.registrations[source].key == key else {
                return .failure(.reservationConflict)
            }
            guard serviceKey != 0 else { return .failure(.invalidFieldInParameterList(byte: 8)) }
            guard let res = s.reservation, !res.type.allRegistrantsHold, s.holds(nexus) else {
                return .failure(.reservationConflict)
            }
            guard destination.initiator != nexus.initiator else { return .failure(.invalidFieldInParameterList(byte: 24, bit: 7)) }
            if let existing = s.registration(of: destination) {
                s.registrations[existing].key = serviceKey
            } else {
                guard s.registrations.count < Self.maximumRegistrations else {
                    return .failure(.check(.illegalRequest, .insufficientRegistrationResources))
                }
                s.registrations.append(PersistentRegistration(nexus: destination, key: serviceKey, allTargetPorts: false))
            }
            s.reservation = PersistentReservation(holder: destination, type: res.type)
            if unregister, let i = s.registration(of: nexus) { s.registrations.remove(at: i) }
            s.generation &+= 1
            publish(s)
            return .success(ReservationEffects())
        }
        switch result {
        case .success(let effects): return effects
        case .failure(let error): throw error
        }
    }

    /// Checks that `nexus` is registered with `key`; returns its registration index.
    private func registered(_ s: State, _ nexus: ITNexus, key: UInt64) -> Result<Int, SCSIError> {
        guard let i = s.registration(of: nexus), s.registrations[i].key == key else { return .failure(.reservationConflict) }
        return .success(i)
    }

    private func register(_ s: inout State, nexus: ITNexus, key: UInt64, serviceKey: UInt64, ignoreKey: Bool,
                          allTargetPorts: Bool) -> Result<ReservationEffects, SCSIError> {
        var effects = ReservationEffects()
        guard let i = s.registration(of: nexus) else {
            if !ignoreKey && key != 0 { return .failure(.reservationConflict) }
            if serviceKey == 0 { return .success(effects) }
            // ALL_TG_PT would overlap a registration this initiator port already has through another port.
            if allTargetPorts, s.registrations.contains(where: { $0.nexus.initiator == nexus.initiator }) {
                return .failure(.reservationConflict)
            }
            guard s.registrations.count < Self.maximumRegistrations else {
                return .failure(.check(.illegalRequest, .insufficientRegistrationResources))
            }
            s.registrations.append(PersistentRegistration(nexus: nexus, key: serviceKey, allTargetPorts: allTargetPorts))
            return .success(effects)
        }
        if !ignoreKey && s.registrations[i].key != key { return .failure(.reservationConflict) }
        if serviceKey != 0 {
            s.registrations[i].key = serviceKey
            return .success(effects)
        }
        // Unregister.
        let wasHolder = s.holds(nexus)
        let removed = s.registrations.remove(at: i)
        if let res = s.reservation {
            if res.type.allRegistrantsHold {
                if s.registrations.isEmpty { s.reservation = nil }
            } else if wasHolder {
                s.reservation = nil
                if res.type == .writeExclusiveRegistrantsOnly || res.type == .exclusiveAccessRegistrantsOnly {
                    for other in s.registrations where !other.covers(removed.nexus) {
                        effects.unitAttentions.append((.reservationsReleased, .only(other.nexus)))
                    }
                }
            }
        }
        return .success(effects)
    }

    private func reserve(_ s: inout State, nexus: ITNexus, key: UInt64,
                         type: PersistentReservationType) -> Result<ReservationEffects, SCSIError> {
        if case .failure(let e) = registered(s, nexus, key: key) { return .failure(e) }
        if let res = s.reservation {
            // Holder asking again for the same type: no-op; anything else conflicts.
            if s.holds(nexus) && res.type == type { return .success(ReservationEffects()) }
            return .failure(.reservationConflict)
        }
        s.reservation = PersistentReservation(holder: nexus, type: type)
        return .success(ReservationEffects())
    }

    private func release(_ s: inout State, nexus: ITNexus, key: UInt64,
                         type: PersistentReservationType) -> Result<ReservationEffects, SCSIError> {
        if case .failure(let e) = registered(s, nexus, key: key) { return .failure(e) }
        var effects = ReservationEffects()
        guard let res = s.reservation, s.holds(nexus) else { return .success(effects) }
        guard res.type == type else {
            return .failure(.check(.illegalRequest, .invalidReleaseOfPersistentReservation))
        }
        s.reservation = nil
        if res.type.registrantsHaveAccess {
            for other in s.registrations where !other.covers(nexus) {
                effects.unitAttentions.append((.reservationsReleased, .only(other.nexus)))
            }
        }
        return .success(effects)
    }

    private func clear(_ s: inout State, nexus: ITNexus, key: UInt64) -> Result<ReservationEffects, SCSIError> {
        if case .failure(let e) = registered(s, nexus, key: key) { return .failure(e) }
        var effects = ReservationEffects()
        for other in s.registrations where !other.covers(nexus) {
            effects.unitAttentions.append((.reservationsPreempted, .only(other.nexus)))
        }
        s.registrations.removeAll()
        s.reservation = nil
        return .success(effects)
    }

    private func preempt(_ s: inout State, nexus: ITNexus, key: UInt64, serviceKey: UInt64,
                         type: PersistentReservationType, abort: Bool) -> Result<ReservationEffects, SCSIError> {
        if case .failure(let e) = registered(s, nexus, key: key) { return .failure(e) }
        var effects = ReservationEffects()

        /// Removes registrations matching `predicate` (never the issuer's); returns the removed ones.
        func removeRegistrations(where predicate: (PersistentRegistration) -> Bool) -> [PersistentRegistration] {
            var removed: [PersistentRegistration] = []
            s.registrations.removeAll { r in
                guard !r.covers(nexus), predicate(r) else { return false }
                removed.append(r)
                return true
            }
            for r in removed {
                effects.unitAttentions.append((.registrationsPreempted, .only(r.nexus)))
                if abort { effects.abortTasksOf.append(r.nexus) }
            }
            return removed
        }

        guard let res = s.reservation else {
            // No reservation: preempt registrations only.
            guard serviceKey != 0 else { return .failure(.invalidFieldInParameterList(byte: 8)) }
            let matched = s.registrations.contains { $0.key == serviceKey }
            guard matched else { return .failure(.reservationConflict) }
            _ = removeRegistrations { $0.key == serviceKey }
            return .success(effects)
        }

        if res.type.allRegistrantsHold {
            if serviceKey == 0 {
                // Preempt the all-registrants reservation: every other registration goes, issuer reserves.
                _ = removeRegistrations { _ in true }
                s.reservation = PersistentReservation(holder: nexus, type: type)
                return .success(effects)
            }
            guard s.registrations.contains(where: { $0.key == serviceKey }) else { return .failure(.reservationConflict) }
            _ = removeRegistrations { $0.key == serviceKey }
            return .success(effects)
        }

        let holderKey = s.registration(of: res.holder).map { s.registrations[$0].key }
        if serviceKey == holderKey {
            // Preempt the reservation: registrations with that key go (not the issuer's), issuer reserves.
            _ = removeRegistrations { $0.key == serviceKey }
            s.reservation = PersistentReservation(holder: nexus, type: type)
            if res.type != type {
                // The type changed: the registrants that remain learn that the old reservation is gone.
                for other in s.registrations where !other.covers(nexus) {
                    effects.unitAttentions.append((.reservationsReleased, .only(other.nexus)))
                }
            }
            return .success(effects)
        }
        guard serviceKey != 0 else { return .failure(.invalidFieldInParameterList(byte: 8)) }
        guard s.registrations.contains(where: { $0.key == serviceKey }) else { return .failure(.reservationConflict) }
        _ = removeRegistrations { $0.key == serviceKey }
        return .success(effects)
    }
}
