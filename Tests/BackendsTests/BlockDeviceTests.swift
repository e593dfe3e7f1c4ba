import BlockIO
import CSystem
import Foundation
import Glibc
import TestSupport
import Testing
@testable import Backends

/// FileBackend on a real block device: a loop device over a file (needs root and /dev/loop-control).
@Suite(.serialized, .enabled(if: getuid() == 0, "loop devices need root")) struct BlockDeviceTests {
    /// Attaches a loop device to `file`; nil (with the reason) when not possible.
    static func attach(_ file: String) -> (device: String?, reason: String) {
        let r = runProgram("/usr/sbin/losetup", ["--find", "--show", file])
        let device = r.output.trimmingCharacters(in: .whitespacesAndNewlines)
        return r.status == 0 && device.hasPrefix("/dev/loop") ? (device, "") : (nil, r.output)
    }

    @Test(arguments: [BackendSpec.CacheMode.none, .writeback])
    func loopDeviceGeometryIOAndRescan(cache: BackendSpec.CacheMode) throws {
        let dir = TemporaryDirectory()
        let image = dir.file("loop.img")
        makeFilledFile(image, size: 8 << 20, byte: 0)
        let (attached, reason) = Self.attach(image)
        let device = try #require(attached, "losetup failed: \(reason)")
        defer { runProgram("/usr/sbin/losetup", ["-d", device]) }

        #expect(openFile(BackendSpec(kind: .file, path: device)).failure == .notRegularFile(path: device))
        let backend = try FileBackend(spec: BackendSpec(kind: .block, path: device, cache: cache))
        #expect(backend.isBlockDevice)
        let geometry = backend.geometry
        #expect(geometry.capacityBytes == 8 << 20)
        #expect(geometry.logicalBlockSize == 512)
        #expect(geometry.physicalBlockSize >= 512)
        #expect(!geometry.readOnly)
        #expect(!geometry.discardReadsZeroes)
        #expect(geometry.supportsDiscard)  // loop devices discard by punching holes in their file

        // A second LUN on the same device is refused.
        let second = openFile(BackendSpec(kind: .block, path: device, cache: cache))
        #expect(second.failure == .lockConflict(path: device))
        #expect(runProgram("/usr/bin/flock", ["-n", device, "true"]).status == 1)

        let channel = try backend.makeChannel()
        let source = TestBuffers(segments: [4096, 4096])
        source.fill(seed: 77)
        #expect(run(channel, BlockRequest(operation: .write, offset: 1 << 20, length: 8192, buffers: source.list,
                                          forceUnitAccess: true)) == .success(8192))
        #expect(run(channel, BlockRequest(operation: .flush, offset: 0, length: 0), token: 2) == .success(0))
        let target = TestBuffers(segments: [1000, 7192], misalign: 1)
        #expect(run(channel, BlockRequest(operation: .read, offset: 1 << 20, length: 8192, buffers: target.list),
                    token: 3) == .success(8192))
        #expect(target.bytes == source.bytes)
        #expect(run(channel, BlockRequest(operation: .writeZeroes, offset: 1 << 20, length: 4096), token: 4) == .success(4096))
        #expect(run(channel, BlockRequest(operation: .discard, offset: 2 << 20, length: 1 << 20), token: 5) == .success(1 << 20))
        // BLKDISCARD reached the loop driver, which punched a hole in the backing file.
        let imageFD = open(image, O_RDONLY)
        #expect(csys_seek_hole(imageFD, 2 << 20) == 2 << 20)
        #expect(csys_seek_data(imageFD, 2 << 20) == 3 << 20)
        close(imageFD)
        #expect(run(channel, BlockRequest(operation: .read, offset: 1 << 20, length: 8192, buffers: target.list),
                    token: 6) == .success(8192))
        #expect(Array(target.bytes.prefix(4096)) == [UInt8](repeating: 0, count: 4096))
        #expect(Array(target.bytes.suffix(4096)) == Array(source.bytes.suffix(4096)))
        channel.close()

        // Grow the backing file, let the loop driver see it, then rescan through resize.
        #expect(truncate(image, 12 << 20) == 0)
        #expect(runProgram("/usr/sbin/losetup", ["-c", device]).status == 0)
        #expect(throws: BackendOpenError.deviceSizeMismatch(path: device, deviceSize: 12 << 20, requestedSize: 16 << 20)) {
            try backend.resize(to: 16 << 20)
        }
        #expect(try backend.resize(to: 0).capacityBytes == 12 << 20)
        backend.close()
    }

    @Test func deviceOpenRefusals() throws {
        let dir = TemporaryDirectory()
        let image = dir.file("loop2.img")
        makeFilledFile(image, size: 4 << 20, byte: 0)

        // Claimed with O_EXCL by someone else (as a mount would): busy, not a lock conflict.
        let (attached, reason) = Self.attach(image)
        let device = try #require(attached, "losetup failed: \(reason)")
        let claim = open(device, O_RDONLY | O_EXCL)
        #expect(claim >= 0)
        #expect(openFile(BackendSpec(kind: .block, path: device)).failure == .deviceBusy(path: device))
        close(claim)
        // A configured block size below the device's sector size is refused.
        runProgram("/usr/sbin/losetup", ["-d", device])

        let big = runProgram("/usr/sbin/losetup", ["--find", "--show", "--sector-size", "4096", image])
        let bigDevice = big.output.trimmingCharacters(in: .whitespacesAndNewlines)
        try #require(big.status == 0, "losetup --sector-size failed: \(big.output)")
        #expect(openFile(BackendSpec(kind: .block, path: bigDevice, logicalBlockSize: 512)).failure
                == .blockSizeTooSmall(path: bigDevice, configured: 512, device: 4096))
        let fourK = try FileBackend(spec: BackendSpec(kind: .block, path: bigDevice, logicalBlockSize: 4096))
        #expect(fourK.geometry.blockCount == 1024)
        fourK.close()
        runProgram("/usr/sbin/losetup", ["-d", bigDevice])

        // A read-only device: writable LUN refused with a clear reason, read-only LUN accepted.
        let ro = runProgram("/usr/sbin/losetup", ["--find", "--show", "--read-only", image])
        let roDevice = ro.output.trimmingCharacters(in: .whitespacesAndNewlines)
        try #require(ro.status == 0, "losetup --read-only failed: \(ro.output)")
        defer { runProgram("/usr/sbin/losetup", ["-d", roDevice]) }
        #expect(openFile(BackendSpec(kind: .block, path: roDevice)).failure == .readOnlyMedium(path: roDevice))
        let readOnly = try FileBackend(spec: BackendSpec(kind: .block, path: roDevice, readOnly: true))
        #expect(readOnly.geometry.readOnly)
        readOnly.close()
        #expect(openFile(BackendSpec(kind: .block, path: dir.file("no-such-device"))).failure
                == .missingFile(path: dir.file("no-such-device")))
    }
}
