import BlockIO
import Synchronization

// OWNER: scsi-state helper (LUN table, events, TMF). The command layer adds execute/resume in
// CommandDispatch.swift. STUB: replace bodies; keep the public signatures (or extend them).

/// A change to a target's LUN map that front-ends tell their guests about.
public enum LUNEvent: Sendable, Equatable {
    case added(LogicalUnitNumber)
    case removed(LogicalUnitNumber)
    case capacityChanged(LogicalUnitNumber, blockCount: UInt64)
    case parametersChanged(LogicalUnitNumber)
}

/// Why a LUN map change was refused.
public enum LUNTableError: Error, Equatable, Sendable {
    case lunExists(LogicalUnitNumber)
    case noSuchLUN(LogicalUnitNumber)
    case shrinkNotAllowed(current: UInt64, requested: UInt64)
}

/// A SCSI target: the LUN map of one controller and the entry point for commands and TMFs.
public final class SCSITarget: Sendable {
    /// A name for logs.
    public let name: String

    public init(name: String) {
        self.name = name
    }

    /// The logical unit at `lun`, if present (lock-free read of the current map snapshot).
    public func logicalUnit(_ lun: LogicalUnitNumber) -> LogicalUnit? { nil }

    /// LUNs currently present, sorted.
    public var lunNumbers: [LogicalUnitNumber] { [] }

    /// Adds a LUN; establishes REPORTED LUNS DATA HAS CHANGED on the other LUNs and emits `.added`.
    public func add(_ unit: LogicalUnit) throws(LUNTableError) {}

    /// Removes a LUN; emits `.removed`.
    @discardableResult
    public func remove(_ lun: LogicalUnitNumber) throws(LUNTableError) -> LogicalUnit { throw .noSuchLUN(lun) }

    /// Changes a LUN's capacity; establishes CAPACITY DATA HAS CHANGED and emits `.capacityChanged`.
    public func resize(_ lun: LogicalUnitNumber, blockCount: UInt64, allowShrink: Bool) throws(LUNTableError) {}

    /// Registers an event handler; returns a token for `unsubscribe`. Handlers run on the caller's
    /// thread of the change and must only enqueue work.
    @discardableResult
    public func subscribe(_ handler: @escaping @Sendable (LUNEvent) -> Void) -> Int { 0 }

    /// Removes an event handler.
    public func unsubscribe(_ token: Int) {}
}
