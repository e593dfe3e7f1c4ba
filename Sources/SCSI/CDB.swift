/// A command descriptor block, stored inline (up to 32 bytes) so that a task slot holds it without
/// allocation. Reads past `length` return 0.
public struct CDB: Sendable {
    /// Largest CDB the core accepts (virtio-scsi negotiates up to 32 via cdb_size).
    public static let capacity = 32
    private var storage: InlineArray<32, UInt8> = .init(repeating: 0)
    /// Number of valid bytes.
    public private(set) var length: Int = 0

    public init() {}

    /// Copies up to 32 bytes of `bytes`.
    public init(_ bytes: some Collection<UInt8>) {
        var i = 0
        for b in bytes.prefix(Self.capacity) {
            storage[i] = b
            i += 1
        }
        length = i
    }

    /// Copies up to 32 bytes from raw memory (guest ring entries).
    public init(copying raw: UnsafeRawBufferPointer) {
        let n = min(raw.count, Self.capacity)
        for i in 0..<n { storage[i] = raw[i] }
        length = n
    }

    @inline(__always)
    public subscript(i: Int) -> UInt8 {
        i >= 0 && i < length ? storage[i] : 0
    }

    /// The operation code.
    @inline(__always) public var opcode: UInt8 { self[0] }

    /// Big-endian 16-bit field at byte `i`.
    @inline(__always) public func be16(_ i: Int) -> UInt16 { UInt16(self[i]) << 8 | UInt16(self[i + 1]) }
    /// Big-endian 24-bit field at byte `i`.
    @inline(__always) public func be24(_ i: Int) -> UInt32 { UInt32(self[i]) << 16 | UInt32(self[i + 1]) << 8 | UInt32(self[i + 2]) }
    /// Big-endian 32-bit field at byte `i`.
    @inline(__always) public func be32(_ i: Int) -> UInt32 { UInt32(be16(i)) << 16 | UInt32(be16(i + 2)) }
    /// Big-endian 64-bit field at byte `i`.
    @inline(__always) public func be64(_ i: Int) -> UInt64 { UInt64(be32(i)) << 32 | UInt64(be32(i + 4)) }

    /// The valid bytes (allocates; for tests and logging).
    public var bytes: [UInt8] { (0..<length).map { storage[$0] } }
}

extension Array where Element == UInt8 {
    mutating func appendBE16(_ v: UInt16) {
        append(UInt8(v >> 8)); append(UInt8(truncatingIfNeeded: v))
    }
    mutating func appendBE32(_ v: UInt32) {
        appendBE16(UInt16(v >> 16)); appendBE16(UInt16(truncatingIfNeeded: v))
    }
    mutating func appendBE64(_ v: UInt64) {
        appendBE32(UInt32(v >> 32)); appendBE32(UInt32(truncatingIfNeeded: v))
    }
    func be64(_ i: Int) -> UInt64 {
        var v: UInt64 = 0
        for k in 0..<8 { v = v << 8 | UInt64(self[i + k]) }
        return v
    }
}
