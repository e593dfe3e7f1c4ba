import VfioUser

/// Which virtio device a function carries (its PCI device id is 0x1040 + the virtio device id).
public enum VirtioPCIDeviceKind: Sendable {
    case scsi, blk

    /// The virtio device id (virtio 1.2 §5).
    public var virtioDeviceID: UInt16 {
        switch self {
        case .scsi: return 8
        case .blk: return 2
        }
    }

    /// Name for log lines.
    public var name: String {
        switch self {
        case .scsi: return "virtio-scsi"
        case .blk: return "virtio-blk"
        }
    }
}

/// The register layout of the virtio 1.x PCI function (virtio 1.2 §4.1):
///
///     BAR 0 (memory, 16 KiB): 0x0000 common configuration  (virtio_pci_common_cfg, 0x3c bytes)
///                             0x1000 ISR status            (1 byte, read to clear)
///                             0x2000 device configuration  (the device's config space)
///                             0x3000 notifications         (queue n at 0x3000 + 4 n: notify_off n, multiplier 4)
///     BAR 1 (memory): MSI-X table at 0 (one vector per queue plus one for configuration changes),
///                     PBA at the next 4 KiB boundary (both emulated by the VMM; read as zero here)
///
/// The config space holds the MSI-X capability and the four virtio vendor capabilities
/// (common, notify, ISR, device); there is no VIRTIO_PCI_CAP_PCI_CFG window.
public enum VirtioPCILayout {
    public static let virtioBAR = 0
    public static let msixBAR = 1
    public static let virtioBARSize: UInt32 = 0x4000
    public static let commonOffset: UInt64 = 0x0000
    public static let commonLength: UInt64 = 0x3C
    public static let isrOffset: UInt64 = 0x1000
    public static let deviceConfigOffset: UInt64 = 0x2000
    public static let deviceConfigLength: UInt64 = 0x1000
    public static let notifyOffset: UInt64 = 0x3000
    public static let notifyLength: UInt64 = 0x1000
    public static let notifyOffMultiplier: UInt32 = 4
    /// Most queues the notify area holds.
    public static var maxQueues: Int { Int(notifyLength) / Int(notifyOffMultiplier) }

    /// virtio_pci_cap cfg_type values.
    public static let capCommon: UInt8 = 1
    public static let capNotify: UInt8 = 2
    public static let capISR: UInt8 = 3
    public static let capDevice: UInt8 = 4
    /// VIRTIO_PCI_CAP_PCI_CFG: an access window in config space into the BARs.
    public static let capPCICfg: UInt8 = 5

    /// No MSI-X vector.
    public static let noVector: UInt16 = 0xFFFF

    /// Common configuration register offsets (virtio 1.2 §4.1.4.3).
    public enum Common {
        public static let deviceFeatureSelect = 0x00
        public static let deviceFeature = 0x04
        public static let driverFeatureSelect = 0x08
        public static let driverFeature = 0x0C
        public static let configMSIXVector = 0x10
        public static let numQueues = 0x12
        public static let deviceStatus = 0x14
        public static let configGeneration = 0x15
        public static let queueSelect = 0x16
        public static let queueSize = 0x18
        public static let queueMSIXVector = 0x1A
        public static let queueEnable = 0x1C
        public static let queueNotifyOff = 0x1E
        public static let queueDesc = 0x20
        public static let queueDriver = 0x28
        public static let queueDevice = 0x30
        public static let queueNotifyData = 0x38
        public static let queueReset = 0x3A
    }

    /// device_status bits.
    public enum Status {
        public static let acknowledge: UInt8 = 1
        public static let driver: UInt8 = 2
        public static let driverOK: UInt8 = 4
        public static let featuresOK: UInt8 = 8
        public static let needsReset: UInt8 = 0x40
        public static let failed: UInt8 = 0x80
    }

    /// The MSI-X table and PBA placement for `vectors` vectors in BAR 1, and that BAR's size.
    static func msix(vectors: Int) -> (layout: MSIXLayout, barSize: UInt32) {
        let tableBytes = UInt32(vectors * 16)
        let pbaOffset = (tableBytes + 0xFFF) & ~0xFFF
        var size: UInt32 = 0x1000
        while size < pbaOffset + 0x1000 { size <<= 1 }
        return (MSIXLayout(vectors: vectors, tableBAR: msixBAR, tableOffset: 0, pbaBAR: msixBAR, pbaOffset: pbaOffset), size)
    }

    /// One virtio_pci_cap (16 bytes; 20 with the notify multiplier or the PCI_CFG window's data, `trailer`).
    static func capability(type: UInt8, offset: UInt64, length: UInt64, trailer: UInt32? = nil) -> [UInt8] {
        var c: [UInt8] = [0x09, 0, trailer == nil ? 16 : 20, type, UInt8(virtioBAR), 0, 0, 0]
        func put32(_ v: UInt32) { for i in 0..<4 { c.append(UInt8(truncatingIfNeeded: v >> (8 * UInt32(i)))) } }
        put32(UInt32(offset))
        put32(UInt32(length))
        if let trailer { put32(trailer) }
        return c
    }

    /// Where the VIRTIO_PCI_CAP_PCI_CFG capability is in the list `configSpace` builds.
    static let pciCfgCapabilityIndex = 4

    /// The VIRTIO_PCI_CAP_PCI_CFG window (virtio 1.2 4.1.4.9) of `space`: its cap.bar, cap.offset, cap.length and
    /// pci_cfg_data fields (config-space offsets).
    struct PCICfgWindow {
        let bar: Int
        let offset: Int
        let length: Int
        let data: Int

        init(_ space: PCIConfigSpace) {
            let cap = space.capabilityOffsets[VirtioPCILayout.pciCfgCapabilityIndex]
            bar = cap + 4
            offset = cap + 8
            length = cap + 12
            data = cap + 16
        }
    }

    /// The config space of a function of `kind` with `queues` queues.
    static func configSpace(kind: VirtioPCIDeviceKind, queues: Int) -> PCIConfigSpace {
        let msix = msix(vectors: queues + 1)
        // Class as QEMU's virtio-scsi-pci and virtio-blk-pci: mass storage, SCSI (0x0100).
        let identity = PCIIdentity(vendorID: 0x1AF4, deviceID: 0x1040 + kind.virtioDeviceID, subsystemVendorID: 0x1AF4,
                                   subsystemID: 0x1100, classCode: 0x010000, revision: 1)
        let caps = [
            capability(type: capCommon, offset: commonOffset, length: commonLength),
            capability(type: capNotify, offset: notifyOffset, length: notifyLength, trailer: notifyOffMultiplier),
            capability(type: capISR, offset: isrOffset, length: 1),
            capability(type: capDevice, offset: deviceConfigOffset, length: deviceConfigLength),
            capability(type: capPCICfg, offset: 0, length: 0, trailer: 0),  // at pciCfgCapabilityIndex
        ]
        var space = PCIConfigSpace(identity: identity, bars: [PCIBAR(size: virtioBARSize), PCIBAR(size: msix.barSize)],
                                   msix: msix.layout, capabilities: caps)
        // The driver selects the window (cap.bar, cap.offset, cap.length) and reads or writes pci_cfg_data.
        let window = PCICfgWindow(space)
        space.makeWritable(offset: window.bar, count: 1)
        space.makeWritable(offset: window.offset, count: 12)
        return space
    }
}
