import BlockIO
import Glibc
import Testing
@testable import Backends

/// The existential-free dispatch enums.
@Suite struct AnyBlockBackendTests {
    @Test(arguments: [BackendSpec.Kind.file, .null])
    func roundTripThroughTheEnums(kind: BackendSpec.Kind) throws {
        let dir = TemporaryDirectory()
        let backend = try AnyBlockBackend.open(BackendSpec(kind: kind, path: kind == .null ? "" : dir.file("any.img"),
                                                           size: 1 << 20, create: true))
        let channel = try backend.makeChannel()
        defer { channel.close(); backend.close() }
        #expect(backend.geometry.blockCount == 2048)
        let source = TestBuffers(segments: [4096])
        source.fill(seed: 1)
        #expect(channel.submit(BlockRequest(operation: .write, offset: 0, length: 4096, buffers: source.list), token: 1) == 0)
        #expect(channel.inFlight == 1)
        channel.commit()
        #expect(waitForCompletions(channel, count: 1) == [1: .success(4096)])
        let target = TestBuffers(segments: [4096])
        #expect(channel.submit(BlockRequest(operation: .read, offset: 0, length: 4096, buffers: target.list), token: 2) == 0)
        channel.commit()
        #expect(waitForCompletions(channel, count: 1) == [2: .success(4096)])
        switch backend {
        case .file:
            #expect(target.bytes == source.bytes)
            #expect(try backend.resize(to: 2 << 20).blockCount == 4096)
        case .null:
            #expect(target.bytes == [UInt8](repeating: 0xEE, count: 4096))  // untouched
            #expect(throws: BackendOpenError.self) { try backend.resize(to: 2 << 20) }
        case .iscsi:
            Issue.record("only file and null back-ends are opened from a BackendSpec")
        }
    }
}
