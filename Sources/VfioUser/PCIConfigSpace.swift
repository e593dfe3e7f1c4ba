/// A base address register of an emulated PCI function.
public struct PCIBAR: Sendable, Equatable {
    /// Size in bytes (a power of two, at least 16; 0 = BAR not implemented).
    public var size: UInt32
    /// I/O space instead of 32-bit memory space.
    public var isIO: Bool

    public init(size: UInt32, isIO: Bool = false) {
        precondition(size == 0 || (size >= 16 && size & (size - 1) == 0), "BAR size must be a power of two >= 16")
        self.size = size
        self.isIO = isIO
    }

    public static let none = PCIBAR(size: 0)
}

/// Where an MSI-X table and PBA live.
public struct MSIXLayout: Sendable, Equatable {
    public var vectors: Int
    public var tableBAR: Int
    public var tableOffset: UInt32
    public var pbaBAR: Int
    public var pbaOffset: UInt32

    public init(vectors: Int, tableBAR: Int, tableOffset: UInt32, pbaBAR: Int, pbaOffset: UInt32) {
        precondition(vectors >= 1 && vectors <= 2048)
        self.vectors = vectors
        self.tableBAR = tableBAR
        self.tableOffset = tableOffset
        self.pbaBAR = pbaBAR
        self.pbaOffset = pbaOffset
    }
}

/// The identity of an emulated PCI function.
public struct PCIIdentity: Sendable, Equatable {
    public var vendorID: UInt16
    public var deviceID: UInt16
    public var subsystemVendorID: UInt16
    public var subsystemID: UInt16
    /// Class code (base class, subclass, programming interface) as 0xBBSSPP.
    public var classCode: UInt32
    public var revision: UInt8

    public init(vendorID: UInt16, deviceID: UInt16, subsystemVendorID: UInt16, subsystemID: UInt16,
                classCode: UInt32, revision: UInt8) {
        self.vendorID = vendorID
        self.deviceID = deviceID
        self.subsystemVendorID = subsystemVendorID
        self.subsystemID = subsystemID
        self.classCode = classCode
        self.revision = revision
    }
}

/// A type-0 PCI configuration space (256 bytes) with write masks: read-only identity, the command
/// register, write-1-to-clear status bits, BAR sizing (writing all ones reads back the size mask),
/// interrupt line, and an MSI-X capability when configured.
public struct PCIConfigSpace: Sendable {
    /// Size of the config space region.
    public static let size = 256
    /// Command register bits.
    public static let commandIOSpace: UInt16 = 1 << 0
    public static let commandMemorySpace: UInt16 = 1 << 1
    public static let commandBusMaster: UInt16 = 1 << 2
    public static let commandINTxDisable: UInt16 = 1 << 10
    /// Offset of the MSI-X capability when present.
    public static let msixCapabilityOffset = 0x40
    /// Offset of the MSI capability when present (64-bit address, one vector, no per-vector masking).
    public static let msiCapabilityOffset = 0x50

    private var bytes: [UInt8]
    private var writeMask: [UInt8]
    private var clearMask: [UInt8]
    private var resetImage: [UInt8]
    public let bars: [PCIBAR]
    public let msix: MSIXLayout?
    /// Whether the function has an MSI capability.
    public let hasMSI: Bool
    /// Config-space offsets of the `capabilities` given to `init`, in order.
    public let capabilityOffsets: [Int]

    /// Where further capabilities (`capabilities:`) start.
    public static let extraCapabilitiesOffset = 0x60

    /// `capabilities`: further read-only capabilities (vendor-specific ones, for example), each given whole
    /// (byte 0 the capability id, byte 1 the next pointer, filled in here, then the body); they are laid out
    /// from `extraCapabilitiesOffset` on, dword aligned, and chained after MSI-X and MSI.
    /// `capabilityOffsets` tells where each one went.
    public init(identity: PCIIdentity, bars: [PCIBAR], msix: MSIXLayout?, msi: Bool = false, interruptPin: UInt8 = 1,
                capabilities: [[UInt8]] = []) {
        precondition(bars.count <= 6)
        var b = [UInt8](repeating: 0, count: Self.size)
        var w = [UInt8](repeating: 0, count: Self.size)
        var c = [UInt8](repeating: 0, count: Self.size)
        func put16(_ o: Int, _ v: UInt16) { b[o] = UInt8(v & 0xFF); b[o + 1] = UInt8(v >> 8) }
        func put32(_ o: Int, _ v: UInt32) { for i in 0..<4 { b[o + i] = UInt8((v >> (8 * UInt32(i))) & 0xFF) } }
        put16(0x00, identity.vendorID)
        put16(0x02, identity.deviceID)
        // Command: I/O, memory, bus master, parity, SERR, INTx disable are writable.
        let commandWritable: UInt16 = 0x0001 | 0x0002 | 0x0004 | 0x0040 | 0x0100 | 0x0400
        w[0x04] = UInt8(commandWritable & 0xFF)
        w[0x05] = UInt8(commandWritable >> 8)
        // Status: capabilities list when MSI-X exists; error bits are write-1-to-clear.
        put16(0x06, msix != nil || msi || !capabilities.isEmpty ? 0x0010 : 0)
        c[0x07] = 0xF9
        b[0x08] = identity.revision
        b[0x09] = UInt8(identity.classCode & 0xFF)
        b[0x0A] = UInt8((identity.classCode >> 8) & 0xFF)
        b[0x0B] = UInt8((identity.classCode >> 16) & 0xFF)
        w[0x0C] = 0xFF  // cache line size
        w[0x0D] = 0xFF  // latency timer
        b[0x0E] = 0x00  // header type 0, single function
        for (i, bar) in bars.enumerated() where bar.size > 0 {
            let o = 0x10 + 4 * i
            let low: UInt32 = bar.isIO ? 0x1 : 0x0  // memory: 32-bit, non-prefetchable
            put32(o, low)
            let mask = ~(bar.size - 1) & (bar.isIO ? ~UInt32(0x3) : ~UInt32(0xF))
            for k in 0..<4 { w[o + k] = UInt8((mask >> (8 * UInt32(k))) & 0xFF) }
        }
        put16(0x2C, identity.subsystemVendorID)
        put16(0x2E, identity.subsystemID)
        w[0x3C] = 0xFF  // interrupt line
        b[0x3D] = interruptPin
        if let m = msix {
            let o = Self.msixCapabilityOffset
            b[0x34] = UInt8(o)
            b[o] = 0x11  // MSI-X capability ID
            b[o + 1] = 0  // end of list
            put16(o + 2, UInt16(m.vectors - 1))
            w[o + 3] = 0xC0  // enable and function mask
            put32(o + 4, m.tableOffset | UInt32(m.tableBAR))
            put32(o + 8, m.pbaOffset | UInt32(m.pbaBAR))
        }
        if msi {
            let o = Self.msiCapabilityOffset
            if msix != nil { b[Self.msixCapabilityOffset + 1] = UInt8(o) } else { b[0x34] = UInt8(o) }
            b[o] = 0x05  // MSI capability ID
            b[o + 1] = 0  // end of list
            put16(o + 2, 0x0080)  // 64-bit address capable, one vector (multiple message capable 0)
            w[o + 2] = 0x01  // MSI enable (multiple message enable stays 0: one vector)
            for k in 4..<12 { w[o + k] = 0xFF }  // message address (low, high)
            w[o + 4] = 0xFC  // dword aligned
            w[o + 12] = 0xFF  // message data
            w[o + 13] = 0xFF
        }
        // Further capabilities, chained after the last of the above.
        var lastNext: Int = msi ? Self.msiCapabilityOffset + 1 : msix != nil ? Self.msixCapabilityOffset + 1 : 0x34
        var at = Self.extraCapabilitiesOffset
        var offsets: [Int] = []
        for cap in capabilities {
            precondition(cap.count >= 2 && at + cap.count <= Self.size, "capabilities do not fit the config space")
            b[lastNext] = UInt8(at)
            for (i, v) in cap.enumerated() { b[at + i] = v }
            b[at + 1] = 0
            offsets.append(at)
            lastNext = at + 1
            at = (at + cap.count + 3) & ~3
        }
        capabilityOffsets = offsets
        bytes = b
        writeMask = w
        clearMask = c
        resetImage = b
        self.bars = bars
        self.msix = msix
        self.hasMSI = msi
    }

    /// Restores the power-on contents.
    public mutating func reset() { bytes = resetImage }

    /// Makes `count` bytes at `offset` writable by the client (fields of a device capability, for example).
    public mutating func makeWritable(offset: Int, count: Int) {
        precondition(offset >= 0 && count >= 0 && offset + count <= Self.size)
        for o in offset ..< offset + count { writeMask[o] = 0xFF }
    }

    /// Stores `value`'s low `count` bytes at `offset` as the device (past the write masks); false when out of range.
    public mutating func store(offset: Int, count: Int, value: UInt64) -> Bool {
        guard offset >= 0, count >= 0, count <= 8, offset <= Self.size - count else { return false }
        for i in 0 ..< count { bytes[offset + i] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(i))) }
        return true
    }

    /// Reads `destination.count` bytes at `offset`; false when out of range.
    public func read(offset: Int, into destination: UnsafeMutableRawBufferPointer) -> Bool {
        guard offset >= 0, destination.count <= Self.size, offset <= Self.size - destination.count else { return false }
        for i in 0..<destination.count { destination[i] = bytes[offset + i] }
        return true
    }

    /// Writes bytes at `offset` through the write masks; false when out of range.
    public mutating func write(offset: Int, from source: UnsafeRawBufferPointer) -> Bool {
        guard offset >= 0, source.count <= Self.size, offset <= Self.size - source.count else { return false }
        for i in 0..<source.count {
            let o = offset + i
            let v = source[i]
            let w = writeMask[o]
            var n = (bytes[o] & ~w) | (v & w)
            n &= ~(v & clearMask[o])
            bytes[o] = n
        }
        return true
    }

    /// A little-endian 16-bit field.
    public func u16(_ offset: Int) -> UInt16 { UInt16(bytes[offset]) | UInt16(bytes[offset + 1]) << 8 }
    /// A little-endian 32-bit field.
    public func u32(_ offset: Int) -> UInt32 { UInt32(u16(offset)) | UInt32(u16(offset + 2)) << 16 }

    /// The command register.
    public var command: UInt16 { u16(0x04) }
    /// Whether MSI-X is enabled in the capability.
    public var msixEnabled: Bool { msix != nil && u16(Self.msixCapabilityOffset + 2) & 0x8000 != 0 }
    /// Whether MSI is enabled in the capability.
    public var msiEnabled: Bool { hasMSI && u16(Self.msiCapabilityOffset + 2) & 0x0001 != 0 }
}
