/// Transport-level virtio feature bits (virtio 1.2 section 6) used by the rings and devices.
public enum VirtioFeature {
    /// Indirect descriptors.
    public static let ringIndirectDescriptors: UInt64 = 1 << 28
    /// used_event / avail_event notification suppression.
    public static let ringEventIndex: UInt64 = 1 << 29
    /// Virtio 1.0 or later (little-endian rings, no legacy layout).
    public static let version1: UInt64 = 1 << 32
    /// The device can access only memory the platform allows (IOMMU); not offered.
    public static let accessPlatform: UInt64 = 1 << 33
    /// Packed virtqueue layout.
    public static let ringPacked: UInt64 = 1 << 34
    /// Buffers are used in the order they were made available; not offered.
    public static let inOrder: UInt64 = 1 << 35
}

/// Ring options that the negotiated features imply for one virtqueue.
public struct VirtqueueOptions: Sendable, Equatable {
    /// Packed layout (otherwise split).
    public var packed: Bool
    /// VIRTIO_F_RING_EVENT_IDX was negotiated.
    public var eventIndex: Bool
    /// VIRTIO_F_RING_INDIRECT_DESC was negotiated.
    public var indirect: Bool

    /// Creates options.
    public init(packed: Bool = false, eventIndex: Bool = false, indirect: Bool = false) {
        self.packed = packed
        self.eventIndex = eventIndex
        self.indirect = indirect
    }

    /// Options from a negotiated feature set.
    public init(features: UInt64) {
        packed = features & VirtioFeature.ringPacked != 0
        eventIndex = features & VirtioFeature.ringEventIndex != 0
        indirect = features & VirtioFeature.ringIndirectDescriptors != 0
    }
}

/// Where a virtqueue's three areas live, as VMM user addresses (vhost-user SET_VRING_ADDR).
/// For a packed ring, `driverArea` is the driver event suppression structure and `deviceArea` the device one.
public struct VirtqueueAddresses: Sendable, Equatable {
    /// Descriptor table (split) or descriptor ring (packed).
    public var descriptorTable: UInt64
    /// Available ring (split) or driver event suppression (packed).
    public var driverArea: UInt64
    /// Used ring (split) or device event suppression (packed).
    public var deviceArea: UInt64

    /// Creates addresses.
    public init(descriptorTable: UInt64, driverArea: UInt64, deviceArea: UInt64) {
        self.descriptorTable = descriptorTable
        self.driverArea = driverArea
        self.deviceArea = deviceArea
    }
}
