#if canImport(Glibc)
import Glibc
#endif
import BlockIO
import CSystem
import SystemErrors
import Synchronization

/// A LUN backed by a raw file or a block device, driven by libaio (O_DIRECT, `cache = .none`) or by
/// worker threads over the page cache (`cache = .writeback`).
///
/// Opening takes an exclusive `flock` on the file or device (block devices are also opened with O_EXCL),
/// so a second LUN or a second ScsiGate on the same backing store is refused with
/// ``BackendOpenError/lockConflict(path:)``. A missing file is created sparse at `spec.size` when
/// `spec.create` is set; an existing file keeps its size until ``resize(to:allowShrink:)`` is called.
///
/// The back-end is shared between threads; each event-loop thread gets its own ``FileChannel``.
/// Its descriptors stay open until ``close()`` has been called and every channel is closed.
public final class FileBackend: BlockBackend, @unchecked Sendable {
    /// The per-thread channel type.
    public typealias Channel = FileChannel

    /// The spec this back-end was opened with.
    public let spec: BackendSpec
    /// Whether the backing store is a block device.
    public let isBlockDevice: Bool
    /// Whether the file was created by this open (it did not exist).
    public let created: Bool
    /// Largest read or write accepted in one request, in bytes.
    public static let maxTransferBytes: UInt32 = 8 << 20

    /// The open descriptor (O_DIRECT in `.none` cache mode).
    let fd: Int32
    /// For block devices: the descriptor holding the flock (the I/O descriptor holds the O_EXCL claim).
    private let lockFD: Int32
    /// Required memory alignment of O_DIRECT buffers.
    let directMemoryAlignment: Int
    /// Required length/offset alignment of O_DIRECT transfers.
    let directLengthAlignment: Int
    let logicalBlockSize: UInt32
    let physicalBlockSize: UInt32
    let readOnly: Bool
    /// Files: always (punch hole, or zeroing when the filesystem cannot). Devices: per sysfs.
    let supportsDiscard: Bool
    private let capacity: Atomic<UInt64>
    private let closeRequested = Atomic<Bool>(false)
    private let descriptorClosed = Atomic<Bool>(false)
    private let channelCount = Atomic<Int>(0)

    /// Channels still open; the file and its lock are released when this reaches 0 after `close()`.
    public var openChannelCount: Int { channelCount.load(ordering: .sequentiallyConsistent) }
    private let adminLock = Mutex<Void>(())

    /// Opens (and if asked creates) the file or block device named by `spec`.
    public init(spec: BackendSpec) throws(BackendOpenError) {
        let path = spec.path
        guard spec.logicalBlockSize == 512 || spec.logicalBlockSize == 4096 else {
            throw .invalidBlockSize(path: path, blockSize: spec.logicalBlockSize)
        }
        if let physical = spec.physicalBlockSize,
           !BackendSpec.isValidPhysicalBlockSize(physical, logical: spec.logicalBlockSize) {
            throw .invalidPhysicalBlockSize(path: path, physical: physical, logical: spec.logicalBlockSize)
        }
        guard (1...4096).contains(spec.queueDepth) else {
            throw .invalidTuning(path: path, reason: "queue depth \(spec.queueDepth) is outside 1...4096")
        }
        guard (1...16).contains(spec.workerThreads) else {
            throw .invalidTuning(path: path, reason: "worker threads \(spec.workerThreads) is outside 1...16")
        }
        let lbs = UInt64(spec.logicalBlockSize)
        let direct = spec.cache == .none
        var flags = (spec.readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC
        if direct { flags |= csys_o_direct() }

        var createdFile = false
        var fd: Int32
        var lockFD: Int32 = -1
        switch spec.kind {
        case .null:
            throw .unsupported(path: path, reason: "a null back-end is opened with NullBackend, not FileBackend")
        case .file:
            fd = open(path, flags)
            if fd < 0 && currentErrno() == ENOENT {
                guard spec.create, !spec.readOnly else { throw .missingFile(path: path) }
                guard spec.size > 0, spec.size % lbs == 0 else {
                    throw .sizeNotMultipleOfBlockSize(path: path, size: spec.size, blockSize: spec.logicalBlockSize)
                }
                fd = open(path, flags | O_CREAT | O_EXCL, 0o644)
                if fd >= 0 {
                    createdFile = true
                } else if currentErrno() == EEXIST {
                    fd = open(path, flags)  // created concurrently by someone else: open what is there
                } else if currentErrno() == EINVAL && direct {
                    // The kernel creates the file before refusing O_DIRECT: remove what this open made.
                    _ = unlink(path)
                    throw Self.openError(path: path, errno: EINVAL, direct: direct)
                }
            }
            if fd < 0 { throw Self.openError(path: path, errno: currentErrno(), direct: direct) }
        case .block:
            // Lock first on a plain descriptor, so a second ScsiGate or LUN gets the lock-conflict error;
            // then claim the device with O_EXCL (refused while mounted or claimed by another program).
            let probe = open(path, O_RDONLY | O_CLOEXEC)
            if probe < 0 { throw Self.openError(path: path, errno: currentErrno(), direct: direct) }
            let locked = csys_flock_exclusive(probe)
            if locked != 0 {
                _ = Glibc.close(probe)
                if locked == -EWOULDBLOCK || locked == -EAGAIN { throw .lockConflict(path: path) }
                throw .systemCall(SystemCallError("flock", errno: -locked, context: path))
            }
            fd = open(path, flags | O_EXCL)
            if fd < 0 {
                let e = currentErrno()
                var deviceReadOnly: Int32 = 0
                let roQuery = csys_blk_roget(probe, &deviceReadOnly)
                _ = Glibc.close(probe)
                if e == EBUSY { throw .deviceBusy(path: path) }
                // A read-only device refuses a writable open with EACCES: say what is actually wrong.
                if (e == EACCES || e == EROFS) && roQuery == 0 && deviceReadOnly != 0 { throw .readOnlyMedium(path: path) }
                throw Self.openError(path: path, errno: e, direct: direct)
            }
            lockFD = probe
        }

        // From here on, every failure closes the descriptors (and removes a file this open created).
        func fail(_ error: BackendOpenError) -> BackendOpenError {
            if createdFile { _ = unlink(path) }
            _ = Glibc.close(fd)
            if lockFD >= 0 { _ = Glibc.close(lockFD) }
            return error
        }

        var st = stat()
        guard fstat(fd, &st) == 0 else { throw fail(.systemCall(SystemCallError("fstat", errno: currentErrno(), context: path))) }
        let type = st.st_mode & S_IFMT
        let isBlock = spec.kind == .block
        if isBlock {
            guard type == S_IFBLK else { throw fail(.notBlockDevice(path: path)) }
        } else {
            guard type == S_IFREG else { throw fail(.notRegularFile(path: path)) }
        }

        let lockResult = isBlock ? 0 : csys_flock_exclusive(fd)
        if lockResult != 0 {
            if lockResult == -EWOULDBLOCK || lockResult == -EAGAIN { throw fail(.lockConflict(path: path)) }
            throw fail(.systemCall(SystemCallError("flock", errno: -lockResult, context: path)))
        }

        var size: UInt64
        var physical = spec.logicalBlockSize
        var deviceReadOnly = false
        var deviceDiscards = true
        if isBlock {
            var bytes: UInt64 = 0
            var r = csys_blk_getsize64(fd, &bytes)
            guard r == 0 else { throw fail(.systemCall(SystemCallError("ioctl(BLKGETSIZE64)", errno: -r, context: path))) }
            var logical: UInt32 = 0
            r = csys_blk_sszget(fd, &logical)
            guard r == 0 else { throw fail(.systemCall(SystemCallError("ioctl(BLKSSZGET)", errno: -r, context: path))) }
            var phys: UInt32 = 0
            r = csys_blk_pbszget(fd, &phys)
            guard r == 0 else { throw fail(.systemCall(SystemCallError("ioctl(BLKPBSZGET)", errno: -r, context: path))) }
            var ro: Int32 = 0
            r = csys_blk_roget(fd, &ro)
            guard r == 0 else { throw fail(.systemCall(SystemCallError("ioctl(BLKROGET)", errno: -r, context: path))) }
            guard logical <= spec.logicalBlockSize else {
                throw fail(.blockSizeTooSmall(path: path, configured: spec.logicalBlockSize, device: logical))
            }
            if ro != 0 && !spec.readOnly { throw fail(.readOnlyMedium(path: path)) }
            deviceReadOnly = ro != 0
            let discard = csys_blk_discard_supported(fd)
            guard discard >= 0 else {
                throw fail(.systemCall(SystemCallError("read of queue/discard_max_bytes in sysfs", errno: -discard, context: path)))
            }
            deviceDiscards = discard == 1
            size = bytes
            physical = spec.physicalBlockSize ?? max(phys, spec.logicalBlockSize)
        } else if createdFile {
            guard ftruncate(fd, off_t(spec.size)) == 0 else {
                throw fail(.systemCall(SystemCallError("ftruncate", errno: currentErrno(), context: path)))
            }
            size = spec.size
            // A file has no physical block; like QEMU's disks, report the logical size unless told.
            physical = spec.physicalBlockSize ?? spec.logicalBlockSize
        } else {
            size = UInt64(st.st_size)
            physical = spec.physicalBlockSize ?? spec.logicalBlockSize
        }
        guard size > 0, size % lbs == 0 else {
            throw fail(.sizeNotMultipleOfBlockSize(path: path, size: size, blockSize: spec.logicalBlockSize))
        }

        var memAlign = Int(spec.logicalBlockSize)
        var lenAlign = Int(spec.logicalBlockSize)
        if direct {
            var m: UInt32 = 0
            var o: UInt32 = 0
            let r = csys_dio_alignment(fd, &m, &o)
            if r == 0 {
                if o > spec.logicalBlockSize {
                    throw fail(.directIOUnsupported(
                        path: path, reason: "it needs \(o)-byte aligned transfers, larger than the block size"))
                }
                memAlign = Int(max(m, 1))
                lenAlign = Int(o)
            } else if r != -EOPNOTSUPP {
                throw fail(.systemCall(SystemCallError("statx(STATX_DIOALIGN)", errno: -r, context: path)))
            }
            // Probe one block: some filesystems accept O_DIRECT at open and refuse it at I/O time.
            if let probe = Self.allocateAligned(bytes: Int(spec.logicalBlockSize), alignment: 4096) {
                let n = pread(fd, probe, Int(spec.logicalBlockSize), 0)
                let e = currentErrno()
                free(probe)
                if n < 0 {
                    if e == EINVAL { throw fail(.directIOUnsupported(path: path, reason: SystemCallError.describe(errno: e))) }
                    throw fail(.systemCall(SystemCallError("pread (O_DIRECT probe)", errno: e, context: path)))
                }
            }
        }

        self.spec = spec
        self.fd = fd
        self.lockFD = lockFD
        self.created = createdFile
        self.isBlockDevice = isBlock
        self.logicalBlockSize = spec.logicalBlockSize
        self.physicalBlockSize = physical
        self.readOnly = spec.readOnly || deviceReadOnly
        self.supportsDiscard = deviceDiscards
        self.directMemoryAlignment = memAlign
        self.directLengthAlignment = lenAlign
        self.capacity = Atomic(size)
    }

    deinit { closeDescriptor() }

    private static func openError(path: String, errno e: Int32, direct: Bool) -> BackendOpenError {
        switch e {
        case ENOENT: return .missingFile(path: path)
        case EACCES, EPERM: return .permissionDenied(path: path, errno: e)
        case EROFS: return .readOnlyMedium(path: path)
        case EISDIR: return .notRegularFile(path: path)
        case EINVAL where direct: return .directIOUnsupported(path: path, reason: "open with O_DIRECT: " + SystemCallError.describe(errno: e))
        default: return .systemCall(SystemCallError("open", errno: e, context: path))
        }
    }

    static func allocateAligned(bytes: Int, alignment: Int) -> UnsafeMutableRawPointer? {
        var pointer: UnsafeMutableRawPointer?
        guard posix_memalign(&pointer, alignment, bytes) == 0 else { return nil }
        return pointer
    }

    /// Current capacity in bytes.
    @inline(__always)
    var capacityBytes: UInt64 { capacity.load(ordering: .acquiring) }

    /// Size and capabilities: files report discard and write-zeroes with zeroes read back after discard;
    /// block devices report discard when their queue accepts it (`discard_max_bytes` > 0), as a hint
    /// (reads after discard are not guaranteed to be zero), and write-zeroes always (BLKZEROOUT).
    public var geometry: BlockGeometry {
        BlockGeometry(logicalBlockSize: logicalBlockSize, physicalBlockSize: physicalBlockSize,
                      blockCount: capacityBytes / UInt64(logicalBlockSize), readOnly: readOnly,
                      supportsDiscard: supportsDiscard, supportsWriteZeroes: true, discardReadsZeroes: !isBlockDevice,
                      volatileWriteCache: true, maxTransferBytes: Self.maxTransferBytes,
                      discardGranularity: isBlockDevice ? physicalBlockSize : logicalBlockSize)
    }

    /// Creates a channel for one event-loop thread.
    public func makeChannel() throws(BlockBackendError) -> FileChannel {
        try makeChannel(aioContextDepth: nil)
    }

    /// Creates a channel; `aioContextDepth` overrides the io_setup size (tests use a small one to
    /// exercise partial io_submit and EAGAIN).
    func makeChannel(aioContextDepth: Int?) throws(BlockBackendError) -> FileChannel {
        channelCount.add(1, ordering: .sequentiallyConsistent)
        if closeRequested.load(ordering: .sequentiallyConsistent) {
            channelClosed()
            throw BlockBackendError("\(spec.path): back-end is closed")
        }
        do {
            return try FileChannel(backend: self, aioContextDepth: aioContextDepth)
        } catch {
            channelClosed()
            throw error
        }
    }

    /// Called by a channel when it closes.
    func channelClosed() {
        let remaining = channelCount.subtract(1, ordering: .sequentiallyConsistent).newValue
        if remaining == 0 && closeRequested.load(ordering: .sequentiallyConsistent) { closeDescriptor() }
    }

    /// Allocation state of the bytes at `offset` (GET LBA STATUS): for files, the data or hole extent
    /// that starts there (`lseek` SEEK_DATA / SEEK_HOLE), clipped to `length`; nil for block devices, after
    /// `close()`, or when the filesystem cannot tell. Pass it to `LogicalUnit(allocationQuery:)` as
    /// `{ backend.allocationStatus(offset: $0, length: $1) }`.
    public func allocationStatus(offset: UInt64, length: UInt64) -> AllocationExtent? {
        guard !isBlockDevice, length > 0, !closeRequested.load(ordering: .acquiring) else { return nil }
        let end = capacityBytes
        guard offset < end else { return nil }
        let limit = min(length, end - offset)
        let data = csys_seek_data(fd, offset)
        if data == -Int64(ENXIO) { return AllocationExtent(state: .deallocated, length: limit) }  // hole to EOF
        guard data >= 0 else { return nil }
        if UInt64(data) > offset { return AllocationExtent(state: .deallocated, length: min(UInt64(data) - offset, limit)) }
        let hole = csys_seek_hole(fd, offset)
        guard hole > Int64(offset) else { return nil }
        return AllocationExtent(state: .mapped, length: min(UInt64(hole) - offset, limit))
    }

    /// Releases the file (descriptor and lock) once every channel is closed; refuses new channels.
    public func close() {
        closeRequested.store(true, ordering: .sequentiallyConsistent)
        if channelCount.load(ordering: .sequentiallyConsistent) == 0 { closeDescriptor() }
    }

    private func closeDescriptor() {
        if !descriptorClosed.exchange(true, ordering: .sequentiallyConsistent) {
            _ = Glibc.close(fd)
            if lockFD >= 0 { _ = Glibc.close(lockFD) }
        }
    }

    /// Changes the capacity (admin plane). Files grow with ftruncate (sparse); shrinking needs
    /// `allowShrink` and must only be done with no I/O in flight beyond the new end. Block devices are
    /// resized outside ScsiGate: their size is re-read, and `newSize` must be 0 or equal to it.
    /// Returns the new geometry.
    @discardableResult
    public func resize(to newSize: UInt64, allowShrink: Bool = false) throws(BackendOpenError) -> BlockGeometry {
        let path = spec.path
        let result: Result<Void, BackendOpenError> = adminLock.withLock { _ in
            if closeRequested.load(ordering: .sequentiallyConsistent) {
                return .failure(.unsupported(path: path, reason: "back-end is closed"))
            }
            if isBlockDevice {
                var bytes: UInt64 = 0
                let r = csys_blk_getsize64(fd, &bytes)
                guard r == 0 else { return .failure(.systemCall(SystemCallError("ioctl(BLKGETSIZE64)", errno: -r, context: path))) }
                guard bytes > 0, bytes % UInt64(logicalBlockSize) == 0 else {
                    return .failure(.sizeNotMultipleOfBlockSize(path: path, size: bytes, blockSize: logicalBlockSize))
                }
                guard newSize == 0 || newSize == bytes else {
                    return .failure(.deviceSizeMismatch(path: path, deviceSize: bytes, requestedSize: newSize))
                }
                capacity.store(bytes, ordering: .releasing)
                return .success(())
            }
            guard !readOnly else { return .failure(.unsupported(path: path, reason: "cannot resize a read-only LUN")) }
            guard newSize > 0, newSize % UInt64(logicalBlockSize) == 0 else {
                return .failure(.sizeNotMultipleOfBlockSize(path: path, size: newSize, blockSize: logicalBlockSize))
            }
            let current = capacityBytes
            if newSize < current && !allowShrink {
                return .failure(.shrinkRefused(path: path, currentSize: current, requestedSize: newSize))
            }
            if newSize == current { return .success(()) }
            if newSize < current { capacity.store(newSize, ordering: .releasing) }  // refuse new I/O past the end first
            guard ftruncate(fd, off_t(newSize)) == 0 else {
                let e = currentErrno()
                capacity.store(current, ordering: .releasing)
                return .failure(.systemCall(SystemCallError("ftruncate", errno: e, context: path)))
            }
            capacity.store(newSize, ordering: .releasing)
            return .success(())
        }
        try result.get()
        return geometry
    }
}
