#if canImport(Glibc)
import Glibc
#endif

/// vfio-user command codes (QEMU docs/interop/vfio-user.rst, protocol version 0.1).
public enum VfioUserCommand: UInt16, Sendable {
    case version = 1
    case dmaMap = 2
    case dmaUnmap = 3
    case deviceGetInfo = 4
    case deviceGetRegionInfo = 5
    case deviceGetRegionIOFDs = 6
    case deviceGetIRQInfo = 7
    case deviceSetIRQs = 8
    case regionRead = 9
    case regionWrite = 10
    case dmaRead = 11
    case dmaWrite = 12
    case deviceReset = 13
    case dirtyPages = 14
    case regionWriteMulti = 15
    case deviceFeature = 16
    case migDataRead = 17
    case migDataWrite = 18
}

/// The 16-byte header in front of every vfio-user message.
public struct VfioUserHeader: Sendable, Equatable {
    /// Size of the header on the wire.
    public static let size = 16
    /// Flag bits.
    public static let typeMask: UInt32 = 0xF
    public static let typeCommand: UInt32 = 0
    public static let typeReply: UInt32 = 1
    public static let noReply: UInt32 = 0x10
    public static let error: UInt32 = 0x20

    public var messageID: UInt16
    public var command: UInt16
    /// Whole message size including the header.
    public var size: UInt32
    public var flags: UInt32
    public var errorNumber: UInt32

    public init(messageID: UInt16, command: UInt16, size: UInt32, flags: UInt32, errorNumber: UInt32 = 0) {
        self.messageID = messageID
        self.command = command
        self.size = size
        self.flags = flags
        self.errorNumber = errorNumber
    }

    /// Decodes a header from at least 16 bytes.
    public init?(_ bytes: UnsafeRawBufferPointer) {
        guard bytes.count >= Self.size else { return nil }
        messageID = bytes.loadUnaligned(fromByteOffset: 0, as: UInt16.self)
        command = bytes.loadUnaligned(fromByteOffset: 2, as: UInt16.self)
        size = bytes.loadUnaligned(fromByteOffset: 4, as: UInt32.self)
        flags = bytes.loadUnaligned(fromByteOffset: 8, as: UInt32.self)
        errorNumber = bytes.loadUnaligned(fromByteOffset: 12, as: UInt32.self)
    }

    /// Encodes the header into the first 16 bytes of `buffer`.
    public func encode(into buffer: UnsafeMutableRawBufferPointer) {
        precondition(buffer.count >= Self.size)
        buffer.storeBytes(of: messageID, toByteOffset: 0, as: UInt16.self)
        buffer.storeBytes(of: command, toByteOffset: 2, as: UInt16.self)
        buffer.storeBytes(of: size, toByteOffset: 4, as: UInt32.self)
        buffer.storeBytes(of: flags, toByteOffset: 8, as: UInt32.self)
        buffer.storeBytes(of: errorNumber, toByteOffset: 12, as: UInt32.self)
    }

    /// Whether the message is a reply.
    public var isReply: Bool { flags & Self.typeMask == Self.typeReply }
    /// Whether the sender asked for no reply.
    public var wantsNoReply: Bool { flags & Self.noReply != 0 }
    /// Whether a reply carries an error.
    public var isError: Bool { flags & Self.error != 0 }
}

/// Bounds-checked little-endian reads from a message payload. Every accessor returns nil
/// instead of reading past the end.
public struct PayloadReader {
    public let bytes: UnsafeRawBufferPointer

    public init(_ bytes: UnsafeRawBufferPointer) { self.bytes = bytes }

    public var count: Int { bytes.count }

    @inline(__always) func fits(_ offset: Int, _ size: Int) -> Bool {
        offset >= 0 && size >= 0 && offset <= bytes.count && bytes.count - offset >= size
    }
    public func u8(_ offset: Int) -> UInt8? { fits(offset, 1) ? bytes[offset] : nil }
    public func u16(_ offset: Int) -> UInt16? { fits(offset, 2) ? bytes.loadUnaligned(fromByteOffset: offset, as: UInt16.self) : nil }
    public func u32(_ offset: Int) -> UInt32? { fits(offset, 4) ? bytes.loadUnaligned(fromByteOffset: offset, as: UInt32.self) : nil }
    public func u64(_ offset: Int) -> UInt64? { fits(offset, 8) ? bytes.loadUnaligned(fromByteOffset: offset, as: UInt64.self) : nil }
    /// A sub-range, or nil when out of bounds.
    public func slice(_ offset: Int, _ size: Int) -> UnsafeRawBufferPointer? {
        guard fits(offset, size) else { return nil }
        return UnsafeRawBufferPointer(rebasing: bytes[offset..<(offset + size)])
    }
}

/// Little-endian writes into a preallocated reply buffer, bounds-checked (writes past the end are dropped
/// and `overflowed` is set).
public struct PayloadWriter {
    public let bytes: UnsafeMutableRawBufferPointer
    public private(set) var length = 0
    public private(set) var overflowed = false

    public init(_ bytes: UnsafeMutableRawBufferPointer) { self.bytes = bytes }

    mutating func reserve(_ n: Int) -> Int? {
        guard n >= 0, bytes.count - length >= n else { overflowed = true; return nil }
        let at = length
        length += n
        return at
    }
    public mutating func u16(_ v: UInt16) { if let at = reserve(2) { bytes.storeBytes(of: v, toByteOffset: at, as: UInt16.self) } }
    public mutating func u32(_ v: UInt32) { if let at = reserve(4) { bytes.storeBytes(of: v, toByteOffset: at, as: UInt32.self) } }
    public mutating func u64(_ v: UInt64) { if let at = reserve(8) { bytes.storeBytes(of: v, toByteOffset: at, as: UInt64.self) } }
    public mutating func raw(_ src: UnsafeRawBufferPointer) {
        guard src.count > 0 else { return }
        if let at = reserve(src.count), let base = bytes.baseAddress, let s = src.baseAddress {
            (base + at).copyMemory(from: s, byteCount: src.count)
        }
    }
    /// Reserves `n` bytes and returns them for the caller to fill.
    public mutating func space(_ n: Int) -> UnsafeMutableRawBufferPointer? {
        guard let at = reserve(n) else { return nil }
        return UnsafeMutableRawBufferPointer(rebasing: bytes[at..<(at + n)])
    }
}

/// VFIO PCI region indices.
public enum VfioPCIRegion {
    public static let bar0 = 0
    public static let rom = 6
    public static let config = 7
    public static let vga = 8
    public static let count = 9
}

/// VFIO PCI IRQ indices.
public enum VfioPCIIRQ {
    public static let intx = 0
    public static let msi = 1
    public static let msix = 2
    public static let err = 3
    public static let req = 4
    public static let count = 5
}

/// Minimal, bounded scanner for the version capabilities JSON: finds the unsigned integer value of a
/// key anywhere in the document. It never allocates per character and stops at `maxLength`.
public enum CapabilityJSON {
    /// Largest JSON document accepted.
    public static let maxLength = 4096

    /// Checks that `bytes` is a NUL-terminated, printable JSON object text of bounded length, with
    /// balanced braces and brackets outside strings. Returns the text length (without NUL) or nil.
    public static func validate(_ bytes: UnsafeRawBufferPointer) -> Int? {
        guard bytes.count >= 1, bytes.count <= maxLength + 1 else { return nil }
        guard let nul = bytes.firstIndex(of: 0), nul == bytes.count - 1 else { return nil }
        var depth = 0
        var inString = false
        var escape = false
        var sawObject = false
        for i in 0..<nul {
            let c = bytes[i]
            if c < 0x20 && c != 0x09 && c != 0x0A && c != 0x0D { return nil }
            if inString {
                if escape { escape = false } else if c == 0x5C { escape = true } else if c == 0x22 { inString = false }
                continue
            }
            switch c {
            case 0x22: inString = true
            case 0x7B, 0x5B:
                if depth == 0 && c == 0x7B { sawObject = true }
                depth += 1
                if depth > 16 { return nil }
            case 0x7D, 0x5D:
                depth -= 1
                if depth < 0 { return nil }
            default: break
            }
        }
        guard !inString, depth == 0, sawObject else { return nil }
        return nul
    }

    /// The unsigned integer following `"key":`, or nil when absent or not a number.
    public static func unsignedValue(of key: String, in bytes: UnsafeRawBufferPointer) -> UInt64? {
        let pattern = Array("\"\(key)\"".utf8)
        guard bytes.count >= pattern.count else { return nil }
        var i = 0
        while i + pattern.count <= bytes.count {
            var match = true
            for j in 0..<pattern.count where bytes[i + j] != pattern[j] { match = false; break }
            if match {
                var k = i + pattern.count
                while k < bytes.count && (bytes[k] == 0x20 || bytes[k] == 0x09 || bytes[k] == 0x0A || bytes[k] == 0x0D) { k += 1 }
                guard k < bytes.count, bytes[k] == 0x3A else { return nil }
                k += 1
                while k < bytes.count && (bytes[k] == 0x20 || bytes[k] == 0x09) { k += 1 }
                var value: UInt64 = 0
                var digits = 0
                while k < bytes.count, bytes[k] >= 0x30, bytes[k] <= 0x39 {
                    let (m, o1) = value.multipliedReportingOverflow(by: 10)
                    let (a, o2) = m.addingReportingOverflow(UInt64(bytes[k] - 0x30))
                    if o1 || o2 { return nil }
                    value = a
                    digits += 1
                    k += 1
                }
                return digits > 0 ? value : nil
            }
            i += 1
        }
        return nil
    }
}
