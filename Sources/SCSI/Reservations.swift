import Synchronization

// OWNER: scsi-state helper. STUB: replace bodies; keep the public signatures (or extend them).

/// Side effects a reservation command asks of the target beyond its own state.
public struct ReservationEffects: Sendable {
    /// Unit attentions to establish.
    public var unitAttentions: [(AdditionalSense, UnitAttentionScope)] = []
    /// PREEMPT AND ABORT: abort tasks of these nexuses on the LUN.
    public var abortTasksOf: [ITNexus] = []
    public init() {}
}

/// SPC-2 RESERVE/RELEASE and SPC-4 persistent reservations of one logical unit.
public final class ReservationState: Sendable {
    public init() {}

    /// Lock-free: is any reservation (SPC-2 or persistent) held?
    @inline(__always) public var isReserved: Bool { false }

    /// Whether `cdb` from `nexus` conflicts with the current reservation (SPC-4 5.13.1 table).
    public func conflicts(_ cdb: CDB, from nexus: ITNexus) -> Bool { false }

    /// PERSISTENT RESERVE IN: returns the parameter data (caller truncates to the allocation length).
    public func persistentReserveIn(_ cdb: CDB, from nexus: ITNexus) throws(SCSIError) -> [UInt8] {
        throw .invalidOpcode
    }

    /// PERSISTENT RESERVE OUT with its parameter list.
    public func persistentReserveOut(_ cdb: CDB, parameters: [UInt8], from nexus: ITNexus) throws(SCSIError) -> ReservationEffects {
        throw .invalidOpcode
    }

    /// RESERVE(6)/RESERVE(10).
    public func reserve(from nexus: ITNexus) throws(SCSIError) {}

    /// RELEASE(6)/RELEASE(10).
    public func release(from nexus: ITNexus) {}

    /// LOGICAL UNIT RESET / I_T NEXUS RESET effects on SPC-2 reservations.
    public func resetSPC2Reservation() {}

    /// I_T nexus loss.
    public func nexusLost(_ nexus: ITNexus) {}
}
