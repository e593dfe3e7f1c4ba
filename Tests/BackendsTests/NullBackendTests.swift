import BlockIO
import Glibc
import TestSupport
import Testing
@testable import Backends

/// The null back-end: synchronous completions, ready on commit, with no completion fd.
@Suite struct NullBackendTests {
    @Test func completesOnCommitWithoutAnFD() throws {
        let backend = try NullBackend(spec: BackendSpec(kind: .null, path: "", size: 1 << 20))
        let channel = try backend.makeChannel()
        #expect(channel.completionFD == -1)
        let buffer = TestBuffers(segments: [4096])
        buffer.fill(seed: 8)
        let before = buffer.bytes
        #expect(channel.submit(BlockRequest(operation: .read, offset: 0, length: 4096, buffers: buffer.list), token: 5) == 0)
        #expect(channel.reap { _, _ in } == 0)  // not committed yet
        #expect(channel.inFlight == 1)
        channel.commit()
        var results = Completions()
        #expect(channel.reap { token, result in results[token] = result } == 1)  // at once, no wait
        #expect(results == [5: .success(4096)])
        #expect(buffer.bytes == before)  // reads leave the buffers untouched
        #expect(channel.reap { _, _ in } == 0)  // delivered once
        #expect(channel.inFlight == 0)
    }

    @Test func rangeAndValidationRules() throws {
        let backend = try NullBackend(spec: BackendSpec(kind: .null, path: "", size: 1 << 20, readOnly: false))
        let channel = try backend.makeChannel()
        let buffer = TestBuffers(segments: [8192])
        #expect(channel.submit(BlockRequest(operation: .write, offset: 1 << 20, length: 512, buffers: buffer.list), token: 1) == ERANGE)
        #expect(channel.submit(BlockRequest(operation: .write, offset: 3, length: 512, buffers: buffer.list), token: 1) == EINVAL)
        #expect(channel.submit(BlockRequest(operation: .read, offset: (1 << 20) - 4096, length: 8192, buffers: buffer.list), token: 1) == 0)
        #expect(channel.submit(BlockRequest(operation: .flush, offset: 0, length: 0), token: 2) == 0)
        channel.commit()
        #expect(waitForCompletions(channel, count: 2) == [1: .success(4096), 2: .success(0)])
        #expect(backend.geometry.blockCount == 2048)

        let ro = try NullBackend(spec: BackendSpec(kind: .null, path: "", size: 1 << 20, readOnly: true)).makeChannel()
        #expect(ro.submit(BlockRequest(operation: .write, offset: 0, length: 512, buffers: buffer.list), token: 1) == EROFS)
        #expect(throws: BackendOpenError.self) { try NullBackend(spec: BackendSpec(kind: .null, path: "", size: 1000)) }
    }

    @Test func batchOf64AndQueueFull() throws {
        let channel = try NullBackend(spec: BackendSpec(kind: .null, path: "", size: 1 << 30, queueDepth: 64)).makeChannel()
        let buffer = TestBuffers(segments: [4096])
        for i in 0..<64 {
            #expect(channel.submit(BlockRequest(operation: .write, offset: UInt64(i) * 4096, length: 4096, buffers: buffer.list),
                                   token: UInt64(i)) == 0)
        }
        #expect(channel.submit(BlockRequest(operation: .flush, offset: 0, length: 0), token: 99) == EAGAIN)
        channel.commit()
        let results = waitForCompletions(channel, count: 64)
        #expect(results.count == 64)
        #expect(results.values.allSatisfy { $0 == .success(4096) })
    }
}
