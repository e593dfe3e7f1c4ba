/// Little-endian field access for byte arrays: transport payloads and virtio config spaces.
extension Array where Element == UInt8 {
    /// Appends a little-endian integer.
    public mutating func appendLE<T: FixedWidthInteger>(_ value: T) {
        var v = value.littleEndian
        Swift.withUnsafeBytes(of: &v) { append(contentsOf: $0) }
    }

    /// Reads a little-endian integer at `offset`; nil when out of range.
    public func readLE<T: FixedWidthInteger>(_ type: T.Type, at offset: Int) -> T? {
        let n = MemoryLayout<T>.size
        guard offset >= 0, offset + n <= count else { return nil }
        var v: T = 0
        for i in 0..<n { v |= T(self[offset + i]) << (8 * i) }
        return v
    }
}
