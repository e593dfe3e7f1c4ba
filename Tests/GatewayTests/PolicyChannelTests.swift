import BlockIO
import Foundation
import Glibc
import Synchronization
import Testing
import TestSupport
@testable import Backends
@testable import Gateway

/// `PolicyChannel`: requests over a QoS limit are held and resumed by the channel's timer; writes that
/// find no space are held and retried (hold policy) or fail at once (report policy).
@Suite(.serialized) struct PolicyChannelTests {
    static func nullChannel(policy: LUNPolicy) throws -> PolicyChannel {
        let backend = try NullBackend(spec: BackendSpec(kind: .null, path: "", size: 1 << 30))
        return try PolicyChannel(.null(try backend.makeChannel()), policy: policy)
    }

    @Test func withoutPolicyRequestsPassStraightThrough() throws {
        let channel = try Self.nullChannel(policy: LUNPolicy())
        let buffers = TestBuffers(segments: [4096])
        for token in 0..<8 as Range<UInt64> {
            #expect(channel.submit(BlockRequest(operation: .read, offset: 0, length: 4096, buffers: buffers.list), token: token) == 0)
        }
        channel.commit()
        let results = waitForCompletions(channel, count: 8, timeoutSeconds: 5)
        #expect(results.count == 8)
        #expect(results.values.allSatisfy { $0.succeeded })
        #expect(channel.inFlight == 0)
    }

    /// Over a back-end that completes on commit (null: no completion fd) the channel completes on commit too, so
    /// the front-ends reap at once; its fd stays quiet (no wake-up per request) and is readable only when a held
    /// request is due, whose completion the next reap delivers.
    @Test func aSynchronousBackEndCompletesOnCommitAndHeldRequestsWakeTheFD() throws {
        let policy = LUNPolicy()
        let channel = try Self.nullChannel(policy: policy)
        #expect(channel.completesOnCommit)
        let buffers = TestBuffers(segments: [4096])
        var pfd = pollfd(fd: channel.completionFD, events: Int16(POLLIN), revents: 0)
        #expect(channel.submit(BlockRequest(operation: .read, offset: 0, length: 4096, buffers: buffers.list), token: 1) == 0)
        channel.commit()
        var tokens: [UInt64] = []
        #expect(channel.reap { token, _ in tokens.append(token) } == 1)
        #expect(tokens == [1])
        #expect(Glibc.poll(&pfd, 1, 0) == 0)
        // 10 IOPS without burst: the second read waits about 100 ms, then the fd wakes the loop for it.
        policy.setLimits(QoSLimits(iops: 10, burstMilliseconds: 0))
        for token in 2...3 as ClosedRange<UInt64> {
            #expect(channel.submit(BlockRequest(operation: .read, offset: 0, length: 4096, buffers: buffers.list), token: token) == 0)
        }
        channel.commit()
        _ = channel.reap { token, _ in tokens.append(token) }
        #expect(Glibc.poll(&pfd, 1, 2000) == 1)
        let deadline = Date().addingTimeInterval(2)
        while tokens.count < 3 && Date() < deadline {
            _ = channel.reap { token, _ in tokens.append(token) }
        }
        #expect(tokens.sorted() == [1, 2, 3])
        #expect(channel.inFlight == 0)
    }

    @Test func throttledRequestsAreHeldThenResumedByTheTimer() throws {
        // 100 IOPS without burst: 21 reads take 200 ms; none fails, each comes back once.
        let policy = LUNPolicy(limits: QoSLimits(iops: 100, burstMilliseconds: 0))
        let channel = try Self.nullChannel(policy: policy)
        let buffers = TestBuffers(segments: [4096])
        let start = IOCounters.now()
        for token in 100..<121 as Range<UInt64> {
            #expect(channel.submit(BlockRequest(operation: .read, offset: 0, length: 4096, buffers: buffers.list), token: token) == 0)
        }
        channel.commit()
        #expect(channel.inFlight == 21)
        var arrivals: [UInt64: UInt64] = [:]
        let deadline = Date().addingTimeInterval(5)
        while arrivals.count < 21 && Date() < deadline {
            var descriptor = pollfd(fd: channel.completionFD, events: Int16(POLLIN), revents: 0)
            _ = poll(&descriptor, 1, 200)
            _ = channel.reap { token, result in
                #expect(result.succeeded)
                #expect(arrivals[token] == nil)
                arrivals[token] = IOCounters.now() - start
            }
        }
        #expect(arrivals.count == 21)
        let elapsed = arrivals.values.max() ?? 0
        #expect(elapsed >= 195_000_000)
        #expect(elapsed < 1_500_000_000)
        #expect(policy.snapshot.throttledRequests == 20)
        #expect(channel.inFlight == 0)
    }

    @Test func abortAndResetCompleteHeldRequestsAsCancelled() throws {
        let policy = LUNPolicy(limits: QoSLimits(iops: 1, burstMilliseconds: 0))
        let channel = try Self.nullChannel(policy: policy)
        let buffers = TestBuffers(segments: [512])
        for token in 1...4 as ClosedRange<UInt64> {
            #expect(channel.submit(BlockRequest(operation: .read, offset: 0, length: 512, buffers: buffers.list), token: token) == 0)
        }
        channel.commit()
        // Token 1 went at once; 2..4 wait a second each.
        #expect(channel.abort(token: 3))
        #expect(channel.resetLogicalUnit())
        let results = waitForCompletions(channel, count: 4, timeoutSeconds: 2)
        #expect(results[1]?.succeeded == true)
        for token in 2...4 as ClosedRange<UInt64> { #expect(results[token]?.errno == ECANCELED) }
        #expect(channel.inFlight == 0)
    }
}

/// A LUN on a file in a 1 MiB tmpfs filled by its own writes (as root: CI runs the tests as root).
@Suite(.serialized, .enabled(if: getuid() == 0, "mounting a tmpfs needs root"))
final class OutOfSpaceTests {
    let directory = TemporaryDirectory()
    let mounted: Bool

    init() {
        mounted = runProgram("/bin/mount", ["-t", "tmpfs", "-o", "size=1m", "scsigate-enospc", directory.path]).status == 0
    }

    deinit { runProgram("/bin/umount", [directory.path]) }

    /// A 4 MiB sparse LUN next to a 256 KiB ballast file, written in 64 KiB chunks (token 1) until one
    /// fails or is not answered within `wait` seconds (held). Returns the channel and the chunks acknowledged.
    func fill(_ policy: LUNPolicy, wait: Double = 20) throws -> (PolicyChannel, Int, TestBuffers) {
        try #require(mounted)
        makeFilledFile(directory.file("ballast"), size: 256 << 10, byte: 0x5A)
        let backend = try FileBackend(spec: BackendSpec(kind: .file, path: directory.file("lun.img"), size: 4 << 20,
                                                        cache: .writeback, create: true))
        let channel = try PolicyChannel(.file(try backend.makeChannel()), policy: policy)
        let buffers = TestBuffers(segments: [64 << 10])
        var written = 0
        while written < 64 {
            buffers.fill(seed: UInt8(written))
            let write = BlockRequest(operation: .write, offset: UInt64(written) << 16, length: 64 << 10, buffers: buffers.list)
            #expect(channel.submit(write, token: 1) == 0)
            channel.commit()
            let result = waitForCompletions(channel, count: 1, timeoutSeconds: wait)[1]
            guard let result, result.succeeded else {
                #expect(result == nil || result?.errno == ENOSPC)
                break
            }
            written += 1
        }
        #expect(written > 4 && written < 64)
        return (channel, written, buffers)
    }

    /// Every acknowledged chunk reads back as written.
    func verify(_ channel: PolicyChannel, chunks: Int) {
        let buffers = TestBuffers(segments: [64 << 10])
        for i in 0..<chunks {
            buffers.clear()
            let result = run(channel, BlockRequest(operation: .read, offset: UInt64(i) << 16, length: 64 << 10, buffers: buffers.list))
            #expect(result?.succeeded == true)
            #expect(buffers.bytes == TestBuffers.pattern(count: 64 << 10, seed: UInt8(i)), "chunk \(i)")
        }
    }

    @Test func reportFailsAtOnceAndWritesWorkAgainOnceSpaceIsFreed() throws {
        let policy = LUNPolicy()
        let (channel, written, buffers) = try fill(policy)
        verify(channel, chunks: written)
        // Still full: the next write fails at once.
        buffers.fill(seed: UInt8(written))
        let write = BlockRequest(operation: .write, offset: UInt64(written) << 16, length: 64 << 10, buffers: buffers.list)
        #expect(run(channel, write)?.errno == ENOSPC)
        try FileManager.default.removeItem(atPath: directory.file("ballast"))
        #expect(run(channel, write)?.succeeded == true)
        verify(channel, chunks: written + 1)
        #expect(policy.snapshot.spaceHeldWrites == 0)
        channel.close()
    }

    @Test func holdRetriesUntilSpaceIsFreed() throws {
        let policy = LUNPolicy(outOfSpace: .hold, holdSeconds: 30, spaceRetryMilliseconds: 50)
        let (channel, written, buffers) = try fill(policy, wait: 0.5)
        // The write that found no space is being held, not failed.
        #expect(policy.snapshot.spaceHeldWrites == 1)
        #expect(policy.snapshot.spaceHeldNow == 1)
        // fill() stopped at a failure; with hold there is none: the last write is still held.
        #expect(channel.inFlight == 1)
        try FileManager.default.removeItem(atPath: directory.file("ballast"))
        let results = withExtendedLifetime(buffers) { waitForCompletions(channel, count: 1, timeoutSeconds: 5) }
        #expect(results[1]?.succeeded == true)
        let s = policy.snapshot
        #expect(s.spaceResumedWrites == 1)
        #expect(s.spaceHeldNow == 0)
        verify(channel, chunks: written + 1)
        channel.close()
    }

    @Test func holdReportsTheErrorAfterItsBound() throws {
        let policy = LUNPolicy(outOfSpace: .hold, holdSeconds: 1, spaceRetryMilliseconds: 100)
        let (channel, written, buffers) = try fill(policy, wait: 0.3)
        let started = IOCounters.now()
        // The held write's iovecs point into `buffers`: keep them alive while it is retried (they were released
        // at once before, and a retry then read freed memory: EINVAL about one run in several).
        let results = withExtendedLifetime(buffers) { waitForCompletions(channel, count: 1, timeoutSeconds: 5) }
        #expect(results[1]?.errno == ENOSPC)
        #expect(IOCounters.now() - started > 400_000_000)
        #expect(policy.snapshot.spaceFailedWrites == 1)
        #expect(policy.snapshot.spaceHeldNow == 0)
        verify(channel, chunks: written)
        channel.close()
    }
}

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

/// `AnyBlockBackend.allocationQuery`: present for files, absent for the null back-end.
@Suite struct AnyBlockBackendAllocationQueryTests {
    @Test func filesAnswerNullDoesNot() throws {
        let dir = TemporaryDirectory()
        let file = try AnyBlockBackend.open(BackendSpec(kind: .file, path: dir.file("q.img"), size: 1 << 20, create: true))
        defer { file.close() }
        let query = try #require(file.allocationQuery)
        #expect(query(4096, 8192) == AllocationExtent(state: .deallocated, length: 8192))
        let null = try AnyBlockBackend.open(BackendSpec(kind: .null, path: "", size: 1 << 20))
        #expect(null.allocationQuery == nil)
    }
}
