import BlockIO
import Synchronization

/// A change to a target's LUN map that front-ends tell their guests about.
public enum LUNEvent: Sendable, Equatable {
    case added(LogicalUnitNumber)
    case removed(LogicalUnitNumber)
    case capacityChanged(LogicalUnitNumber, blockCount: UInt64)
    case parametersChanged(LogicalUnitNumber)
}

/// Why a LUN map change was refused.
public enum LUNTableError: Error, Equatable, Sendable, CustomStringConvertible {
    case lunExists(LogicalUnitNumber)
    case noSuchLUN(LogicalUnitNumber)
    case shrinkNotAllowed(current: UInt64, requested: UInt64)
    case zeroCapacity

    public var description: String {
        switch self {
        case let .lunExists(lun): return "\(lun) already exists"
        case let .noSuchLUN(lun): return "\(lun) does not exist"
        case let .shrinkNotAllowed(current, requested):
            return "new size of \(requested) blocks is below the current \(current) blocks (shrinking needs force)"
        case .zeroCapacity: return "a LUN needs at least one block"
        }
    }
}

/// A per-thread copy of a target's LUN map. Front-ends keep one per queue group and call
/// `SCSITarget.refresh(_:)` before each batch: when the map has not changed, that is one atomic load.
public struct LUNMapView: Sendable {
    /// Map generation this view reflects (`UInt64.max`: never filled).
    public private(set) var generation: UInt64 = .max
    /// Units with LUN < 256, indexed directly.
    private var low: [LogicalUnit?] = []
    /// Units with LUN >= 256.
    private var high: [UInt16: LogicalUnit] = [:]
    /// Present LUNs, ascending.
    public private(set) var numbers: [LogicalUnitNumber] = []

    public init() {}

    init(generation: UInt64, units: [UInt16: LogicalUnit]) {
        self.generation = generation
        low = Array(repeating: nil, count: 256)
        for (number, unit) in units {
            if number < 256 { low[Int(number)] = unit } else { high[number] = unit }
        }
        numbers = units.keys.sorted().map { LogicalUnitNumber(Int($0))! }
    }

    /// The unit at `lun`, or nil when absent.
    @inline(__always)
    public func unit(_ lun: LogicalUnitNumber) -> LogicalUnit? {
        let v = lun.value
        if v < 256 { return low.isEmpty ? nil : low[Int(v)] }
        return high[v]
    }
}

/// A SCSI target: the LUN map of one controller and the entry point for commands and TMFs.
///
/// Map changes take a lock and bump a generation; the command path reads a `LUNMapView`.
public final class SCSITarget: Sendable {
    /// A name for logs.
    public let name: String

    private struct State {
        var units: [UInt16: LogicalUnit] = [:]
        var subscribers: [Int: @Sendable (LUNEvent) -> Void] = [:]
        var nextToken = 1
    }

    private let state = Mutex(State())
    private let generationAtomic = Atomic<UInt64>(0)

    public init(name: String) {
        self.name = name
    }

    /// The current map generation (changes on every add and remove).
    public var generation: UInt64 { generationAtomic.load(ordering: .acquiring) }

    /// Brings `view` up to date; one atomic load when nothing changed.
    @inline(__always)
    public func refresh(_ view: inout LUNMapView) {
        if view.generation == generationAtomic.load(ordering: .acquiring) { return }
        view = snapshot()
    }

    /// A fresh view of the map.
    public func snapshot() -> LUNMapView {
        state.withLock { s in LUNMapView(generation: generationAtomic.load(ordering: .acquiring), units: s.units) }
    }

    /// The logical unit at `lun`, if present (takes the lock: control path only).
    public func logicalUnit(_ lun: LogicalUnitNumber) -> LogicalUnit? {
        state.withLock { $0.units[lun.value] }
    }

    /// LUNs currently present, ascending.
    public var lunNumbers: [LogicalUnitNumber] {
        state.withLock { $0.units.keys.sorted() }.map { LogicalUnitNumber(Int($0))! }
    }

    /// Every logical unit, by ascending LUN.
    public var logicalUnits: [LogicalUnit] {
        state.withLock { s in s.units.keys.sorted().map { s.units[$0]! } }
    }

    /// Adds a LUN. The new LUN reports POWER ON, RESET to every nexus; the other LUNs report
    /// REPORTED LUNS DATA HAS CHANGED; subscribers get `.added`.
    public func add(_ unit: LogicalUnit) throws(LUNTableError) {
        guard unit.blockCount > 0 else { throw .zeroCapacity }
        let (others, handlers) = try state.withLock { s throws(LUNTableError) in
            guard s.units[unit.number.value] == nil else { throw LUNTableError.lunExists(unit.number) }
            let others = Array(s.units.values)
            s.units[unit.number.value] = unit
            generationAtomic.add(1, ordering: .releasing)
            return (others, Array(s.subscribers.values))
        }
        unit.unitAttentions.establish(.powerOnResetOrBusDeviceReset, for: .all)
        for other in others { other.unitAttentions.establish(.reportedLUNsDataHasChanged, for: .all) }
        for handler in handlers { handler(.added(unit.number)) }
    }

    /// Removes a LUN and returns it. The remaining LUNs report REPORTED LUNS DATA HAS CHANGED;
    /// subscribers get `.removed`. Commands already holding the unit finish against it.
    @discardableResult
    public func remove(_ lun: LogicalUnitNumber) throws(LUNTableError) -> LogicalUnit {
        let (unit, others, handlers) = try state.withLock { s throws(LUNTableError) in
            guard let unit = s.units.removeValue(forKey: lun.value) else { throw LUNTableError.noSuchLUN(lun) }
            generationAtomic.add(1, ordering: .releasing)
            return (unit, Array(s.units.values), Array(s.subscribers.values))
        }
        for other in others { other.unitAttentions.establish(.reportedLUNsDataHasChanged, for: .all) }
        for handler in handlers { handler(.removed(lun)) }
        return unit
    }

    /// Changes a LUN's capacity. The LUN reports CAPACITY DATA HAS CHANGED to every nexus;
    /// subscribers get `.capacityChanged`. Shrinking needs `allowShrink`.
    public func resize(_ lun: LogicalUnitNumber, blockCount: UInt64, allowShrink: Bool) throws(LUNTableError) {
        guard blockCount > 0 else { throw .zeroCapacity }
        let (unit, handlers) = try state.withLock { s throws(LUNTableError) in
            guard let unit = s.units[lun.value] else { throw LUNTableError.noSuchLUN(lun) }
            return (unit, Array(s.subscribers.values))
        }
        let current = unit.blockCount
        if blockCount < current && !allowShrink { throw .shrinkNotAllowed(current: current, requested: blockCount) }
        if blockCount == current { return }
        unit.setBlockCount(blockCount)
        unit.unitAttentions.establish(.capacityDataHasChanged, for: .all)
        for handler in handlers { handler(.capacityChanged(lun, blockCount: blockCount)) }
    }

    /// Sets or clears operator read-only on a LUN; emits `.parametersChanged` and MODE PARAMETERS CHANGED.
    public func setReadOnly(_ lun: LogicalUnitNumber, _ readOnly: Bool) throws(LUNTableError) {
        let (unit, handlers) = try state.withLock { s throws(LUNTableError) in
            guard let unit = s.units[lun.value] else { throw LUNTableError.noSuchLUN(lun) }
            return (unit, Array(s.subscribers.values))
        }
        guard unit.isReadOnly != readOnly else { return }
        unit.setReadOnly(readOnly)
        unit.unitAttentions.establish(.modeParametersChanged, for: .all)
        for handler in handlers { handler(.parametersChanged(lun)) }
    }

    /// Registers an event handler; returns a token for `unsubscribe`. Handlers run on the thread that
    /// changed the map and must only enqueue work.
    @discardableResult
    public func subscribe(_ handler: @escaping @Sendable (LUNEvent) -> Void) -> Int {
        state.withLock { s in
            let token = s.nextToken
            s.nextToken += 1
            s.subscribers[token] = handler
            return token
        }
    }

    /// Removes an event handler.
    public func unsubscribe(_ token: Int) {
        _ = state.withLock { $0.subscribers.removeValue(forKey: token) }
    }
}
