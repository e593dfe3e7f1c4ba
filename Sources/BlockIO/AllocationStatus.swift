/// Whether a back-end's storage holds data for a byte range (GET LBA STATUS provisioning status).
public enum AllocationState: UInt8, Sendable, Equatable {
    /// The range holds data (or the back-end cannot tell).
    case mapped
    /// The range has no storage behind it (a hole): reads return zeroes.
    case deallocated
}

/// The first extent of a byte range that has one allocation state.
public struct AllocationExtent: Sendable, Equatable {
    /// The state of every byte in the extent.
    public var state: AllocationState
    /// Extent length in bytes from the queried offset (at least 1, at most the queried length).
    public var length: UInt64

    /// Creates an extent.
    public init(state: AllocationState, length: UInt64) {
        self.state = state
        self.length = length
    }
}

/// Asks a back-end for the allocation state of the bytes starting at `offset`: the extent of the same
/// state that begins there, clipped to `length`; nil when the back-end cannot tell (the caller reports
/// "mapped or unknown"). Synchronous and not for the per-I/O path (one or two `lseek` calls for files).
public typealias AllocationQuery = @Sendable (_ offset: UInt64, _ length: UInt64) -> AllocationExtent?
