import BlockIO
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// IOVectorList, the non-owning scatter-gather view every request carries: copies that start inside any
/// segment, stop at the end of the list and never touch memory outside it.
@Suite("IOVectorList: gather, scatter and zero across segments")
struct IOVectorListTests {
    /// Three segments of 3, 5 and 4 bytes (12 in all), each inside a guard-filled buffer so that a write
    /// past a segment's end shows up as a changed guard byte.
    final class Segments {
        static let lengths = [3, 5, 4]
        static let guardByte: UInt8 = 0xA5
        let buffers: [UnsafeMutableRawBufferPointer]
        let storage = IOVectorStorage(capacity: 3)

        init(fill: UInt8 = 0) {
            buffers = Self.lengths.map { length in
                let b = UnsafeMutableRawBufferPointer.allocate(byteCount: length + 2, alignment: 1)
                b.initializeMemory(as: UInt8.self, repeating: Self.guardByte)
                (b.baseAddress! + 1).initializeMemory(as: UInt8.self, repeating: fill, count: length)
                return b
            }
            for (i, b) in buffers.enumerated() {
                storage.elements[i] = iovec(iov_base: b.baseAddress! + 1, iov_len: Self.lengths[i])
            }
        }
        deinit { buffers.forEach { $0.deallocate() } }

        var list: IOVectorList { storage.view(count: 3) }
        /// The 12 bytes the list covers, in order.
        var contents: [UInt8] { zip(buffers, Self.lengths).flatMap { b, n in Array(b[1...n]) } }
        /// Whether every guard byte around every segment is intact.
        var guardsIntact: Bool { zip(buffers, Self.lengths).allSatisfy { b, n in b[0] == Self.guardByte && b[n + 1] == Self.guardByte } }
    }

    @Test("totalLength sums the segments; the empty list and a count of 0 have no buffers")
    func lengths() {
        let s = Segments()
        #expect(s.list.totalLength == 12)
        #expect(s.list[1].iov_len == 5)
        #expect(IOVectorList.empty.totalLength == 0 && IOVectorList.empty.base == nil)
        let none = IOVectorList(base: s.storage.elements, count: 0)
        #expect(none.base == nil && none.count == 0)
        let negative = IOVectorList(base: s.storage.elements, count: -1)
        #expect(negative.base == nil && negative.count == 0 && negative.totalLength == 0)
        // Fresh storage holds empty elements.
        let fresh = IOVectorStorage(capacity: 4)
        #expect(fresh.view(count: 4).totalLength == 0 && fresh.capacity == 4)
    }

    @Test("scatter from an offset inside the first segment runs across the others")
    func scatterAcrossSegments() {
        let s = Segments()
        let source: [UInt8] = Array(1...10)
        let written = source.withUnsafeBytes { s.list.scatter(at: 2, from: $0) }
        #expect(written == 10)
        #expect(s.contents == [0, 0] + source)
        #expect(s.guardsIntact)
    }

    @Test("gather reads back what scatter wrote, from any offset")
    func gatherRoundTrip() {
        let s = Segments()
        let source: [UInt8] = (0..<12).map { UInt8($0 * 7 + 3) }
        #expect(source.withUnsafeBytes { s.list.scatter(at: 0, from: $0) } == 12)
        for offset in 0...12 {
            var out = [UInt8](repeating: 0xEE, count: 12)
            let n = out.withUnsafeMutableBytes { s.list.gather(from: offset, into: $0) }
            #expect(n == 12 - offset, "offset \(offset)")
            #expect(Array(out[0..<n]) == Array(source[offset...]), "offset \(offset)")
            #expect(out[n...].allSatisfy { $0 == 0xEE }, "gather wrote past what it returned at offset \(offset)")
        }
    }

    @Test("copies stop at the end of the list; offsets past it or negative copy nothing")
    func boundaries() {
        let s = Segments()
        let source = [UInt8](repeating: 0x55, count: 5)
        #expect(source.withUnsafeBytes { s.list.scatter(at: 10, from: $0) } == 2)
        #expect(s.contents == [UInt8](repeating: 0, count: 10) + [0x55, 0x55])
        #expect(source.withUnsafeBytes { s.list.scatter(at: 12, from: $0) } == 0)
        #expect(source.withUnsafeBytes { s.list.scatter(at: 100, from: $0) } == 0)
        #expect(source.withUnsafeBytes { s.list.scatter(at: -1, from: $0) } == 0)
        var out = [UInt8](repeating: 0, count: 4)
        #expect(out.withUnsafeMutableBytes { s.list.gather(from: 12, into: $0) } == 0)
        #expect(out.withUnsafeMutableBytes { s.list.gather(from: -3, into: $0) } == 0)
        #expect(out.withUnsafeMutableBytes { IOVectorList.empty.gather(from: 0, into: $0) } == 0)
        #expect(s.guardsIntact)
    }

    @Test("zero clears the asked range only, clipped to the list")
    func zeroRange() {
        let s = Segments(fill: 0xFF)
        #expect(s.list.zero(from: 2, length: 4) == 4)
        #expect(s.contents == [0xFF, 0xFF, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF])
        #expect(s.list.zero(from: 9, length: 100) == 3)
        #expect(s.contents.suffix(3) == [0, 0, 0])
        #expect(s.list.zero(from: 0, length: 0) == 0 && s.list.zero(from: -1, length: 4) == 0)
        #expect(s.guardsIntact)
    }
}
