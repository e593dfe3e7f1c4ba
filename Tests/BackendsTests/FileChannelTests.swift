import BlockIO
import CSystem
import Foundation
import Glibc
import TestSupport
import Testing
@testable import Backends
import SystemErrors

/// I/O through FileChannel on real files in both cache modes.
@Suite struct FileChannelTests {
    static let modes: [BackendSpec.CacheMode] = [.none, .writeback]

    func openChannel(_ dir: TemporaryDirectory, cache: BackendSpec.CacheMode, size: UInt64 = 4 << 20,
                     blockSize: UInt32 = 512, queueDepth: Int = 256) throws -> (FileBackend, FileChannel, String) {
        let path = dir.file("disk.img")
        let backend = try FileBackend(spec: BackendSpec(kind: .file, path: path, size: size, logicalBlockSize: blockSize,
                                                        cache: cache, create: true, queueDepth: queueDepth))
        let channel = try backend.makeChannel()
        return (backend, channel, path)
    }

    @Test(arguments: modes)
    func alignedMultiVectorRoundTrip(cache: BackendSpec.CacheMode) throws {
        let dir = TemporaryDirectory()
        let (backend, channel, path) = try openChannel(dir, cache: cache)
        defer { channel.close(); backend.close() }
        let source = TestBuffers(segments: [4096, 8192, 4096])
        source.fill(seed: 7)
        let write = BlockRequest(operation: .write, offset: 65536, length: 16384, buffers: source.list)
        #expect(run(channel, write) == .success(16384))
        #expect(channel.bounceSlotCount == 0)  // aligned: zero copy, no bounce buffer
        #expect(fileBytes(path, offset: 65536, count: 16384) == source.bytes)

        let target = TestBuffers(segments: [8192, 8192])
        let read = BlockRequest(operation: .read, offset: 65536, length: 16384, buffers: target.list)
        #expect(run(channel, read, token: 2) == .success(16384))
        #expect(target.bytes == source.bytes)
        #expect(channel.bounceSlotCount == 0)
        #expect(channel.inFlight == 0)
    }

    /// `poll` delivers completions without a system call: O_DIRECT ones from the AIO context's
    /// completion ring read in user space, buffered ones from the worker rings. It leaves the eventfd
    /// readable (so a loop about to sleep still wakes), and `reap` then finds nothing twice.
    @Test(arguments: modes)
    func pollDeliversFromUserSpaceOnce(cache: BackendSpec.CacheMode) throws {
        let dir = TemporaryDirectory()
        let (backend, channel, path) = try openChannel(dir, cache: cache)
        defer { channel.close(); backend.close() }
        let source = TestBuffers(segments: [4096 * 8])
        source.fill(seed: 21)
        #expect(run(channel, BlockRequest(operation: .write, offset: 0, length: 4096 * 8, buffers: source.list)) == .success(4096 * 8))
        let targets = (0..<8).map { _ in TestBuffers(segments: [4096]) }
        for round in 0..<3 {  // several rounds: the ring's head wraps and must stay consistent
            for (i, t) in targets.enumerated() {
                t.clear()
                let request = BlockRequest(operation: .read, offset: UInt64(i) * 4096, length: 4096, buffers: t.list)
                #expect(channel.submit(request, token: UInt64(round * 100 + i)) == 0)
            }
            channel.commit()
            var results = Completions()
            let deadline = Date().addingTimeInterval(20)
            while results.count < 8 && Date() < deadline {
                _ = channel.poll { token, result in
                    #expect(results[token] == nil)
                    results[token] = result
                }
            }
            #expect(results.count == 8)
            #expect(results.values.allSatisfy { $0 == .success(4096) })
            for (i, t) in targets.enumerated() {
                #expect(t.bytes == Array(source.bytes[(i * 4096)..<((i + 1) * 4096)]))
            }
            var descriptor = pollfd(fd: channel.completionFD, events: Int16(POLLIN), revents: 0)
            #expect(poll(&descriptor, 1, 2000) == 1)  // the eventfd still counts them
            #expect(channel.reap { _, _ in } == 0)  // nothing is delivered twice
            #expect(channel.inFlight == 0)
        }
        #expect(fileBytes(path, offset: 0, count: 4096 * 8) == source.bytes)
    }

    @Test(arguments: modes)
    func unalignedVectorsUseBounceBuffer(cache: BackendSpec.CacheMode) throws {
        let dir = TemporaryDirectory()
        let (backend, channel, path) = try openChannel(dir, cache: cache)
        defer { channel.close(); backend.close() }
        // Misaligned addresses and lengths that are not multiples of 512 (sum 6144 = 12 blocks).
        let source = TestBuffers(segments: [1000, 3096, 2048], misalign: 3)
        source.fill(seed: 99)
        let write = BlockRequest(operation: .write, offset: 512 * 7, length: 6144, buffers: source.list)
        #expect(run(channel, write) == .success(6144))
        #expect(fileBytes(path, offset: 512 * 7, count: 6144) == source.bytes)

        let target = TestBuffers(segments: [100, 5000, 1044], misalign: 1)
        let read = BlockRequest(operation: .read, offset: 512 * 7, length: 6144, buffers: target.list)
        #expect(run(channel, read, token: 2) == .success(6144))
        #expect(target.bytes == source.bytes)
        // O_DIRECT needed a bounce buffer; buffered I/O never does.
        #expect(channel.bounceSlotCount == (cache == .none ? 1 : 0))
    }

    @Test(arguments: modes)
    func buffersLongerThanLengthTransferOnlyLength(cache: BackendSpec.CacheMode) throws {
        let dir = TemporaryDirectory()
        let (backend, channel, path) = try openChannel(dir, cache: cache)
        defer { channel.close(); backend.close() }
        let source = TestBuffers(segments: [4096, 4096])
        source.fill(seed: 1)
        #expect(run(channel, BlockRequest(operation: .write, offset: 0, length: 4096, buffers: source.list)) == .success(4096))
        #expect(fileBytes(path, offset: 0, count: 4096) == Array(source.bytes.prefix(4096)))
        #expect(fileBytes(path, offset: 4096, count: 4096) == [UInt8](repeating: 0, count: 4096))
        let target = TestBuffers(segments: [6144, 2048])
        #expect(run(channel, BlockRequest(operation: .read, offset: 0, length: 4096, buffers: target.list)) == .success(4096))
        #expect(Array(target.bytes.prefix(4096)) == Array(source.bytes.prefix(4096)))
        #expect(Array(target.bytes.suffix(4096)) == [UInt8](repeating: 0xEE, count: 4096))  // untouched
    }

    @Test(arguments: modes)
    func forceUnitAccessWriteAndFlush(cache: BackendSpec.CacheMode) throws {
        let dir = TemporaryDirectory()
        let (backend, channel, path) = try openChannel(dir, cache: cache)
        defer { channel.close(); backend.close() }
        let source = TestBuffers(segments: [8192])
        source.fill(seed: 42)
        let fua = BlockRequest(operation: .write, offset: 1 << 20, length: 8192, buffers: source.list, forceUnitAccess: true)
        #expect(run(channel, fua) == .success(8192))
        #expect(fileBytes(path, offset: 1 << 20, count: 8192) == source.bytes)
        // Unaligned FUA write (bounce path carries RWF_DSYNC too).
        let odd = TestBuffers(segments: [512, 1536], misalign: 5)
        odd.fill(seed: 3)
        #expect(run(channel, BlockRequest(operation: .write, offset: 0, length: 2048, buffers: odd.list,
                                          forceUnitAccess: true), token: 2) == .success(2048))
        #expect(fileBytes(path, offset: 0, count: 2048) == odd.bytes)
        #expect(run(channel, BlockRequest(operation: .flush, offset: 0, length: 0), token: 3) == .success(0))
        if cache == .none { #expect(channel.usesAIOFlush) }  // IOCB_CMD_FDSYNC accepted by ext4
    }

    @Test(arguments: modes)
    func discardPunchesHoles(cache: BackendSpec.CacheMode) throws {
        let dir = TemporaryDirectory()
        let (backend, channel, path) = try openChannel(dir, cache: cache)
        defer { channel.close(); backend.close() }
        let data = TestBuffers(segments: [1 << 20])
        data.fill(seed: 5)
        #expect(run(channel, BlockRequest(operation: .write, offset: 0, length: 1 << 20, buffers: data.list)) == .success(1 << 20))
        #expect(run(channel, BlockRequest(operation: .flush, offset: 0, length: 0), token: 2) == .success(0))
        let blocksBefore = statOf(path).st_blocks
        #expect(blocksBefore >= 2048)
        #expect(run(channel, BlockRequest(operation: .discard, offset: 256 << 10, length: 512 << 10), token: 3)
                == .success(512 << 10))
        let blocksAfter = statOf(path).st_blocks
        #expect(blocksBefore - blocksAfter >= 1024)  // 512 KiB = 1024 sectors deallocated
        let fd = open(path, O_RDONLY)
        defer { close(fd) }
        #expect(csys_seek_hole(fd, 0) == 256 << 10)
        #expect(csys_seek_data(fd, 256 << 10) == 768 << 10)
        #expect(fileBytes(path, offset: 256 << 10, count: 512 << 10) == [UInt8](repeating: 0, count: 512 << 10))
        #expect(fileBytes(path, offset: 0, count: 4096) == Array(data.bytes.prefix(4096)))
        #expect(backend.geometry.discardReadsZeroes)
    }

    @Test(arguments: modes)
    func writeZeroesWithAndWithoutUnmap(cache: BackendSpec.CacheMode) throws {
        let dir = TemporaryDirectory()
        let (backend, channel, path) = try openChannel(dir, cache: cache)
        defer { channel.close(); backend.close() }
        let data = TestBuffers(segments: [1 << 20])
        data.fill(seed: 9)
        #expect(run(channel, BlockRequest(operation: .write, offset: 0, length: 1 << 20, buffers: data.list)) == .success(1 << 20))
        // Without unmap: zeroes, the range stays allocated (ZERO_RANGE keeps it as data).
        #expect(run(channel, BlockRequest(operation: .writeZeroes, offset: 0, length: 128 << 10), token: 2) == .success(128 << 10))
        #expect(fileBytes(path, offset: 0, count: 128 << 10) == [UInt8](repeating: 0, count: 128 << 10))
        let fd = open(path, O_RDONLY)
        defer { close(fd) }
        #expect(csys_seek_hole(fd, 0) >= 128 << 10)
        // With unmap: zeroes through a hole.
        #expect(run(channel, BlockRequest(operation: .writeZeroes, offset: 512 << 10, length: 256 << 10, mayUnmap: true),
                    token: 3) == .success(256 << 10))
        #expect(fileBytes(path, offset: 512 << 10, count: 256 << 10) == [UInt8](repeating: 0, count: 256 << 10))
        #expect(csys_seek_hole(fd, 256 << 10) == 512 << 10)
        // Data around the zeroed ranges is intact.
        #expect(fileBytes(path, offset: 128 << 10, count: 4096) == Array(data.bytes[(128 << 10)..<((128 << 10) + 4096)]))
        #expect(fileBytes(path, offset: 768 << 10, count: 4096) == Array(data.bytes[(768 << 10)..<((768 << 10) + 4096)]))
    }

    @Test(arguments: modes)
    func readPastEndIsShort(cache: BackendSpec.CacheMode) throws {
        let dir = TemporaryDirectory()
        let (backend, channel, _) = try openChannel(dir, cache: cache, size: 1 << 20)
        defer { channel.close(); backend.close() }
        let target = TestBuffers(segments: [8192])
        let straddle = BlockRequest(operation: .read, offset: (1 << 20) - 4096, length: 8192, buffers: target.list)
        #expect(run(channel, straddle) == .success(4096))
        let beyond = BlockRequest(operation: .read, offset: 1 << 20, length: 4096, buffers: target.list)
        #expect(run(channel, beyond, token: 2) == .success(0))
        // Unaligned buffer (bounce): the short count is honest too.
        let odd = TestBuffers(segments: [8192], misalign: 7)
        #expect(run(channel, BlockRequest(operation: .read, offset: (1 << 20) - 512, length: 1024, buffers: odd.list),
                    token: 3) == .success(512))
    }

    @Test(arguments: modes)
    func batchOf64ThenOneCommit(cache: BackendSpec.CacheMode) throws {
        let dir = TemporaryDirectory()
        let (backend, channel, path) = try openChannel(dir, cache: cache)
        defer { channel.close(); backend.close() }
        let buffers = (0..<64).map { i -> TestBuffers in
            let b = TestBuffers(segments: [2048, 2048], misalign: i % 4 == 3 ? 1 : 0)  // every 4th bounces
            b.fill(seed: UInt8(i))
            return b
        }
        for i in 0..<64 {
            let request = BlockRequest(operation: .write, offset: UInt64(i) * 4096, length: 4096, buffers: buffers[i].list)
            #expect(channel.submit(request, token: UInt64(100 + i)) == 0)
        }
        #expect(channel.inFlight == 64)
        channel.commit()
        let written = waitForCompletions(channel, count: 64)
        #expect(written.count == 64)
        #expect(written.values.allSatisfy { $0 == .success(4096) })
        #expect(Set(written.keys) == Set((0..<64).map { UInt64(100 + $0) }))
        for i in [0, 3, 31, 63] {
            #expect(fileBytes(path, offset: i * 4096, count: 4096) == buffers[i].bytes)
        }
        let readers = (0..<64).map { _ in TestBuffers(segments: [4096]) }
        for i in 0..<64 {
            let request = BlockRequest(operation: .read, offset: UInt64(i) * 4096, length: 4096, buffers: readers[i].list)
            #expect(channel.submit(request, token: UInt64(i)) == 0)
        }
        channel.commit()
        let read = waitForCompletions(channel, count: 64)
        #expect(read.count == 64)
        #expect((0..<64).allSatisfy { readers[$0].bytes == buffers[$0].bytes })
        #expect(channel.inFlight == 0)
    }

    @Test(arguments: modes)
    func refusedRequests(cache: BackendSpec.CacheMode) throws {
        let dir = TemporaryDirectory()
        let (backend, channel, _) = try openChannel(dir, cache: cache, size: 1 << 20, queueDepth: 4)
        defer { channel.close(); backend.close() }
        let buffer = TestBuffers(segments: [4096])
        #expect(channel.submit(BlockRequest(operation: .write, offset: 100, length: 512, buffers: buffer.list), token: 1) == EINVAL)
        #expect(channel.submit(BlockRequest(operation: .read, offset: 0, length: 8192, buffers: buffer.list), token: 1) == EINVAL)
        #expect(channel.submit(BlockRequest(operation: .write, offset: 1 << 20, length: 512, buffers: buffer.list), token: 1) == ERANGE)
        #expect(channel.submit(BlockRequest(operation: .discard, offset: (1 << 20) - 512, length: 1024), token: 1) == ERANGE)
        let huge = UInt64(FileBackend.maxTransferBytes) + 512
        #expect(channel.submit(BlockRequest(operation: .read, offset: 0, length: huge, buffers: buffer.list), token: 1) == EINVAL)
        var nullBase = iovec(iov_base: nil, iov_len: 512)
        let nullBaseResult = withUnsafeMutablePointer(to: &nullBase) {
            channel.submit(BlockRequest(operation: .write, offset: 0, length: 512, buffers: IOVectorList(base: $0, count: 1)),
                           token: 1)
        }
        #expect(nullBaseResult == EINVAL)
        var hugeElement = iovec(iov_base: buffer.start, iov_len: Int(bitPattern: UInt(Int.max) + 1))
        let hugeResult = withUnsafeMutablePointer(to: &hugeElement) {
            channel.submit(BlockRequest(operation: .read, offset: 0, length: 512, buffers: IOVectorList(base: $0, count: 1)),
                           token: 1)
        }
        #expect(hugeResult == EINVAL)
        #expect(channel.inFlight == 0)
        for token in 0..<4 {
            #expect(channel.submit(BlockRequest(operation: .read, offset: 0, length: 512, buffers: buffer.list),
                                   token: UInt64(token)) == 0)
        }
        #expect(channel.submit(BlockRequest(operation: .read, offset: 0, length: 512, buffers: buffer.list), token: 9) == EAGAIN)
        channel.commit()
        #expect(waitForCompletions(channel, count: 4).count == 4)
    }

    /// More requests than the kernel's AIO ring holds, all committed at once without reaping: io_submit
    /// accepts part of the batch, the rest stays queued and goes out as completions are reaped.
    @Test func partialSubmitKeepsTheRestQueued() throws {
        let dir = TemporaryDirectory()
        let path = dir.file("eagain.img")
        let backend = try FileBackend(spec: BackendSpec(kind: .file, path: path, size: 4 << 20, create: true, queueDepth: 1024))
        let channel = try backend.makeChannel(aioContextDepth: 1)
        defer { channel.close(); backend.close() }
        let count = 1024
        let buffers = (0..<count).map { i -> TestBuffers in
            let b = TestBuffers(segments: [4096])
            b.fill(seed: UInt8(truncatingIfNeeded: i))
            return b
        }
        for i in 0..<count {
            let request = BlockRequest(operation: .write, offset: UInt64(i) * 4096, length: 4096, buffers: buffers[i].list)
            #expect(channel.submit(request, token: UInt64(i)) == 0)
        }
        channel.commit()
        let leftOver = channel.queuedForSubmission
        #expect(leftOver > 0 && leftOver < count)  // the kernel took part of the batch
        print("partialSubmitKeepsTheRestQueued: io_submit accepted \(count - leftOver) of \(count)")
        let results = waitForCompletions(channel, count: count)
        #expect(results.count == count)
        #expect(results.values.allSatisfy { $0 == .success(4096) })
        #expect(channel.queuedForSubmission == 0)
        for i in [0, count / 2, count - 1] {
            #expect(fileBytes(path, offset: i * 4096, count: 4096) == buffers[i].bytes)
        }
    }

    @Test(arguments: modes)
    func hostileOffsetsAreRefusedNotTrapped(cache: BackendSpec.CacheMode) throws {
        let dir = TemporaryDirectory()
        let (backend, channel, _) = try openChannel(dir, cache: cache, size: 1 << 20)
        defer { channel.close(); backend.close() }
        let buffer = TestBuffers(segments: [4096])
        for offset: UInt64 in [UInt64.max - 511, UInt64(Int64.max) - 511, UInt64(Int64.max) + 1] {
            for operation: BlockIO.BlockOperation in [.read, .write, .discard, .writeZeroes] {
                let request = BlockRequest(operation: operation, offset: offset, length: 4096, buffers: buffer.list)
                #expect(channel.submit(request, token: 1) == ERANGE)
            }
        }
        let hugeLength = BlockRequest(operation: .discard, offset: 0, length: UInt64.max - 511)
        #expect(channel.submit(hugeLength, token: 1) == ERANGE)
        #expect(channel.inFlight == 0)
    }

    /// A filesystem that refuses O_DIRECT (ramfs): a clear error suggesting writeback, no file left
    /// behind, and the same path works with cache = writeback.
    @Test(.enabled(if: getuid() == 0, "mounting a ramfs needs root"))
    func filesystemWithoutDirectIOIsAClearError() throws {
        let dir = TemporaryDirectory()
        let mountPoint = dir.file("ram")
        try FileManager.default.createDirectory(atPath: mountPoint, withIntermediateDirectories: true)
        let mounted = runProgram("/bin/mount", ["-t", "ramfs", "ramfs", mountPoint])
        try #require(mounted.status == 0, "cannot mount ramfs (needs root): \(mounted.output)")
        defer { runProgram("/bin/umount", [mountPoint]) }
        let path = mountPoint + "/disk.img"
        let refused = openFile(BackendSpec(kind: .file, path: path, size: 1 << 20, cache: .none, create: true))
        #expect(refused.failure == .directIOUnsupported(path: path, reason: "open with O_DIRECT: " + SystemCallError.describe(errno: EINVAL)))
        #expect(refused.failure?.description.contains("set cache = \"writeback\"") == true)
        #expect(access(path, F_OK) != 0)
        let backend = try FileBackend(spec: BackendSpec(kind: .file, path: path, size: 1 << 20, cache: .writeback, create: true))
        let channel = try backend.makeChannel()
        defer { channel.close(); backend.close() }
        let source = TestBuffers(segments: [4096])
        source.fill(seed: 6)
        #expect(run(channel, BlockRequest(operation: .write, offset: 0, length: 4096, buffers: source.list)) == .success(4096))
        #expect(fileBytes(path, offset: 0, count: 4096) == source.bytes)
        // Existing file, O_DIRECT: refused the same way.
        #expect(openFile(BackendSpec(kind: .file, path: dir.file("ram/other.img"), size: 4096, create: true)).failure != nil)
    }

    @Test func fourKiBLogicalBlocks() throws {
        let dir = TemporaryDirectory()
        let (backend, channel, _) = try openChannel(dir, cache: .none, size: 1 << 20, blockSize: 4096)
        defer { channel.close(); backend.close() }
        let buffer = TestBuffers(segments: [4096])
        #expect(channel.submit(BlockRequest(operation: .write, offset: 512, length: 4096, buffers: buffer.list), token: 1) == EINVAL)
        buffer.fill(seed: 4)
        #expect(run(channel, BlockRequest(operation: .write, offset: 8192, length: 4096, buffers: buffer.list)) == .success(4096))
        #expect(backend.geometry.blockCount == 256)
        #expect(backend.geometry.logicalBlockSize == 4096)
    }

    /// A full filesystem: a 1 MiB tmpfs; writes beyond its space complete with ENOSPC.
    @Test(.enabled(if: getuid() == 0, "mounting a tmpfs needs root"), arguments: modes)
    func fullFilesystemGivesENOSPC(cache: BackendSpec.CacheMode) throws {
        let dir = TemporaryDirectory()
        let mountPoint = dir.file("mnt")
        try FileManager.default.createDirectory(atPath: mountPoint, withIntermediateDirectories: true)
        let mounted = runProgram("/bin/mount", ["-t", "tmpfs", "-o", "size=1m", "tmpfs", mountPoint])
        try #require(mounted.status == 0, "cannot mount tmpfs (needs root): \(mounted.output)")
        defer { runProgram("/bin/umount", [mountPoint]) }
        let path = mountPoint + "/full.img"
        let spec = BackendSpec(kind: .file, path: path, size: 4 << 20, cache: cache, create: true)
        let backend: FileBackend
        switch openFile(spec) {
        case .success(let opened):
            backend = opened
        case .failure(let error):
            // tmpfs without O_DIRECT support must fail clearly, never fall back silently.
            #expect(cache == .none)
            #expect(error == .directIOUnsupported(path: path, reason: SystemCallError.describe(errno: EINVAL))
                    || error.description.contains("writeback"))
            print("fullFilesystemGivesENOSPC: O_DIRECT refused on tmpfs: \(error)")
            return
        }
        let channel = try backend.makeChannel()
        defer { channel.close(); backend.close() }
        let chunk = TestBuffers(segments: [256 << 10])
        chunk.fill(seed: 11)
        var accepted: UInt64 = 0
        var sawENOSPC = false
        for i in 0..<12 {  // 3 MiB into a 1 MiB filesystem
            let result = run(channel, BlockRequest(operation: .write, offset: UInt64(i) * (256 << 10), length: 256 << 10,
                                                   buffers: chunk.list), token: UInt64(i))
            let r = try #require(result)
            accepted += r.bytesTransferred
            if r.errno == ENOSPC { sawENOSPC = true; break }
            #expect(r.errno == 0)
        }
        #expect(sawENOSPC)
        #expect(accepted <= 1 << 20)
        print("fullFilesystemGivesENOSPC(\(cache)): ENOSPC after \(accepted) bytes accepted")
    }
}
