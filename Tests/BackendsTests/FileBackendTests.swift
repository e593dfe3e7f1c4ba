import BlockIO
import CSystem
import Foundation
import Glibc
import TestSupport
import Testing
@testable import Backends
import SystemErrors

/// Opening, creating, locking, sizing and resizing file back-ends.
@Suite struct FileBackendTests {
    @Test func missingFileIsCreatedSparse() throws {
        let dir = TemporaryDirectory()
        let path = dir.file("new.img")
        let backend = try FileBackend(spec: BackendSpec(kind: .file, path: path, size: 64 << 20, create: true))
        defer { backend.close() }
        #expect(backend.created)
        let st = statOf(path)
        #expect(st.st_size == 64 << 20)
        #expect(st.st_blocks == 0)  // sparse: nothing allocated
        #expect(backend.geometry == BlockGeometry(logicalBlockSize: 512, physicalBlockSize: 512, blockCount: (64 << 20) / 512,
                                                  readOnly: false, supportsDiscard: true, supportsWriteZeroes: true,
                                                  discardReadsZeroes: true, volatileWriteCache: true,
                                                  maxTransferBytes: FileBackend.maxTransferBytes, discardGranularity: 512))
    }

    @Test("a file reports the configured physical block size, else the logical one; a bad one is refused")
    func physicalBlockSize() throws {
        let dir = TemporaryDirectory()
        let path = dir.file("phys.img")
        let plain = try FileBackend(spec: BackendSpec(kind: .file, path: path, size: 1 << 20, create: true))
        #expect(plain.geometry.physicalBlockSize == 512)
        plain.close()
        let told = try openEventually(BackendSpec(kind: .file, path: path, size: 1 << 20, physicalBlockSize: 4096))
        #expect(told.geometry.physicalBlockSize == 4096)
        #expect(told.geometry.logicalBlockSize == 512)
        told.close()
        for bad: UInt32 in [256, 1536, 131072] {
            #expect(throws: BackendOpenError.invalidPhysicalBlockSize(path: path, physical: bad, logical: 512)) {
                _ = try FileBackend(spec: BackendSpec(kind: .file, path: path, physicalBlockSize: bad))
            }
        }
        let null = try NullBackend(spec: BackendSpec(kind: .null, path: "", size: 1 << 20, logicalBlockSize: 4096,
                                                     physicalBlockSize: 16384))
        #expect(null.geometry.physicalBlockSize == 16384)
    }

    @Test func existingFileIsNeverTruncatedOrGrown() throws {
        let dir = TemporaryDirectory()
        let path = dir.file("existing.img")
        makeFilledFile(path, size: 1 << 20, byte: 0xAB)
        for configured: UInt64 in [4 << 20, 512 << 10] {
            let backend = try openEventually(BackendSpec(kind: .file, path: path, size: configured, create: true))
            #expect(!backend.created)
            #expect(backend.geometry.capacityBytes == 1 << 20)
            backend.close()
            #expect(statOf(path).st_size == 1 << 20)
            #expect(fileBytes(path, offset: (1 << 20) - 16, count: 16) == [UInt8](repeating: 0xAB, count: 16))
        }
    }

    @Test func missingFileWithoutCreateIsRefused() {
        let dir = TemporaryDirectory()
        let path = dir.file("absent.img")
        let result = openFile(BackendSpec(kind: .file, path: path, size: 1 << 20, create: false))
        #expect(result.failure == .missingFile(path: path))
        #expect(result.failure?.description.contains(path) == true)
        #expect(access(path, F_OK) != 0)
        // Read-only LUNs never create.
        #expect(openFile(BackendSpec(kind: .file, path: path, size: 1 << 20, readOnly: true, create: true)).failure
                == .missingFile(path: path))
    }

    @Test func sizesMustBeMultiplesOfTheBlockSize() {
        let dir = TemporaryDirectory()
        let odd = dir.file("odd.img")
        makeFilledFile(odd, size: 1000, byte: 1)
        #expect(openFile(BackendSpec(kind: .file, path: odd)).failure
                == .sizeNotMultipleOfBlockSize(path: odd, size: 1000, blockSize: 512))
        let fresh = dir.file("fresh.img")
        #expect(openFile(BackendSpec(kind: .file, path: fresh, size: 1536, logicalBlockSize: 4096, create: true)).failure
                == .sizeNotMultipleOfBlockSize(path: fresh, size: 1536, blockSize: 4096))
        #expect(access(fresh, F_OK) != 0)  // nothing left behind
        let empty = dir.file("empty.img")
        makeFilledFile(empty, size: 0, byte: 0)
        #expect(openFile(BackendSpec(kind: .file, path: empty)).failure
                == .sizeNotMultipleOfBlockSize(path: empty, size: 0, blockSize: 512))
        #expect(openFile(BackendSpec(kind: .file, path: odd, logicalBlockSize: 1024)).failure
                == .invalidBlockSize(path: odd, blockSize: 1024))
    }

    @Test func wrongKindsOfPathAreRefused() {
        let dir = TemporaryDirectory()
        #expect(openFile(BackendSpec(kind: .file, path: dir.path, cache: .writeback)).failure == .notRegularFile(path: dir.path))
        let file = dir.file("plain.img")
        makeFilledFile(file, size: 4096, byte: 0)
        #expect(openFile(BackendSpec(kind: .block, path: file)).failure == .notBlockDevice(path: file))
        #expect(openFile(BackendSpec(kind: .null, path: file)).failure != nil)
    }

    @Test func secondOpenOfTheSameFileIsALockConflict() throws {
        let dir = TemporaryDirectory()
        let path = dir.file("locked.img")
        let first = try FileBackend(spec: BackendSpec(kind: .file, path: path, size: 1 << 20, create: true))
        let channel = try first.makeChannel()
        for cache in [BackendSpec.CacheMode.none, .writeback] {
            let second = openFile(BackendSpec(kind: .file, path: path, size: 1 << 20, cache: cache, create: true))
            #expect(second.failure == .lockConflict(path: path))
            #expect(second.failure?.description == "\(path): already in use by another ScsiGate or LUN (lock held)")
        }
        // The lock outlives close() while a channel is open, and is released with the last channel.
        first.close()
        #expect(openFile(BackendSpec(kind: .file, path: path)).failure == .lockConflict(path: path))
        #expect(throws: BlockBackendError.self) { try first.makeChannel() }
        channel.close()
        let third = try openEventually(BackendSpec(kind: .file, path: path))
        third.close()
    }

    @Test func lockIsVisibleToOtherProcesses() throws {
        let dir = TemporaryDirectory()
        let path = dir.file("shared.img")
        let backend = try FileBackend(spec: BackendSpec(kind: .file, path: path, size: 1 << 20, create: true))
        // flock(1) in another process cannot take the lock while we hold it...
        #expect(runProgram("/usr/bin/flock", ["-n", path, "true"]).status == 1)
        backend.close()
        #expect(eventually { runProgram("/usr/bin/flock", ["-n", path, "true"]).status == 0 })

        // ...and we cannot open a file another process holds.
        let holder = Process()
        holder.executableURL = URL(fileURLWithPath: "/usr/bin/flock")
        holder.arguments = [path, "-c", "echo locked; sleep 2"]
        let pipe = Pipe()
        holder.standardOutput = pipe
        try holder.run()
        let line = pipe.fileHandleForReading.availableData
        #expect(String(decoding: line, as: UTF8.self).hasPrefix("locked"))
        #expect(openFile(BackendSpec(kind: .file, path: path)).failure == .lockConflict(path: path))
        holder.waitUntilExit()
        // Released when the other process exits.
        let after = try openEventually(BackendSpec(kind: .file, path: path))
        after.close()
    }

    @Test func resizeGrowsAndShrinksOnlyWhenAllowed() throws {
        let dir = TemporaryDirectory()
        let path = dir.file("resize.img")
        let backend = try FileBackend(spec: BackendSpec(kind: .file, path: path, size: 1 << 20, create: true))
        let channel = try backend.makeChannel()
        defer { channel.close(); backend.close() }
        let buffer = TestBuffers(segments: [4096])
        buffer.fill(seed: 2)
        let beyond = BlockRequest(operation: .write, offset: 1 << 20, length: 4096, buffers: buffer.list)
        #expect(channel.submit(beyond, token: 1) == ERANGE)

        let grown = try backend.resize(to: 2 << 20)
        #expect(grown.blockCount == (2 << 20) / 512)
        #expect(statOf(path).st_size == 2 << 20)
        #expect(run(channel, beyond) == .success(4096))

        #expect(throws: BackendOpenError.shrinkRefused(path: path, currentSize: 2 << 20, requestedSize: 1 << 20)) {
            try backend.resize(to: 1 << 20)
        }
        #expect(throws: BackendOpenError.sizeNotMultipleOfBlockSize(path: path, size: 1000, blockSize: 512)) {
            try backend.resize(to: 1000)
        }
        #expect(statOf(path).st_size == 2 << 20)
        let shrunk = try backend.resize(to: 1 << 20, allowShrink: true)
        #expect(shrunk.capacityBytes == 1 << 20)
        #expect(statOf(path).st_size == 1 << 20)
        #expect(channel.submit(beyond, token: 2) == ERANGE)
    }

    @Test func readOnlyLUNRefusesWritesAndResize() throws {
        let dir = TemporaryDirectory()
        let path = dir.file("ro.img")
        makeFilledFile(path, size: 1 << 20, byte: 0x5A)
        let backend = try FileBackend(spec: BackendSpec(kind: .file, path: path, readOnly: true))
        let channel = try backend.makeChannel()
        defer { channel.close(); backend.close() }
        #expect(backend.geometry.readOnly)
        let buffer = TestBuffers(segments: [4096])
        #expect(channel.submit(BlockRequest(operation: .write, offset: 0, length: 4096, buffers: buffer.list), token: 1) == EROFS)
        #expect(channel.submit(BlockRequest(operation: .discard, offset: 0, length: 4096), token: 1) == EROFS)
        #expect(channel.submit(BlockRequest(operation: .writeZeroes, offset: 0, length: 4096), token: 1) == EROFS)
        #expect(run(channel, BlockRequest(operation: .read, offset: 0, length: 4096, buffers: buffer.list)) == .success(4096))
        #expect(buffer.bytes == [UInt8](repeating: 0x5A, count: 4096))
        #expect(throws: BackendOpenError.self) { try backend.resize(to: 2 << 20) }
    }

    @Test func specSpellingsMatchTheConfig() {
        #expect(BackendSpec.Kind(rawValue: "block") == .block)
        #expect(BackendSpec.CacheMode(rawValue: "writeback") == .writeback)
        #expect(BackendSpec.CacheMode(rawValue: "none") == BackendSpec(kind: .file, path: "x").cache)
        #expect(BackendSpec.Kind(rawValue: "iscsi") == nil)
    }

    @Test func errorDescriptionsNameThePathAndReason() {
        let p = "/srv/lun0.img"
        #expect(BackendOpenError.directIOUnsupported(path: p, reason: "x").description.contains("cache = \"writeback\""))
        #expect(BackendOpenError.missingFile(path: p).description.hasPrefix(p))
        #expect(BackendOpenError.systemCall(SystemCallError("fstat", errno: EIO, context: p)).description.contains("fstat failed: errno 5"))
        #expect(BackendOpenError.permissionDenied(path: p, errno: EACCES).description.contains("permission denied"))
    }
}

extension Result {
    /// The error, if any.
    var failure: Failure? {
        if case .failure(let error) = self { return error }
        return nil
    }
}
