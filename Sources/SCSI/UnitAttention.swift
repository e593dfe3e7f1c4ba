import Synchronization

// OWNER: scsi-state helper. STUB: replace bodies; keep the public signatures (or extend them).

/// Which I_T nexuses a unit attention is established for.
public enum UnitAttentionScope: Sendable {
    /// Every nexus, including ones not yet seen.
    case all
    /// Every nexus except the one given (the one whose action caused it).
    case allExcept(ITNexus)
    /// One nexus.
    case only(ITNexus)
}

/// Unit attention conditions of one logical unit, kept per I_T nexus with SPC-4 priority rules.
public final class UnitAttentionBoard: Sendable {
    public init() {}

    /// Establishes `condition` for the nexuses in `scope`.
    public func establish(_ condition: AdditionalSense, for scope: UnitAttentionScope) {}

    /// Lock-free check: might `nexus` have a pending unit attention?
    @inline(__always) public func mayHavePending(for nexus: ITNexus) -> Bool { false }

    /// Removes and returns the highest-priority pending unit attention for `nexus`, if any.
    public func takeNext(for nexus: ITNexus) -> AdditionalSense? { nil }

    /// Returns the highest-priority pending unit attention without removing it.
    public func peekNext(for nexus: ITNexus) -> AdditionalSense? { nil }

    /// Clears every unit attention of `nexus`.
    public func clear(for nexus: ITNexus) {}
}
