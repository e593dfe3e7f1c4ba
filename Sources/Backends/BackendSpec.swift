import SystemErrors
#if canImport(Glibc)
import Glibc
#endif

/// What a LUN is backed by and how it is opened: the value the gateway builds from a `[[lun]]` config entry.
public struct BackendSpec: Sendable, Equatable {
    /// The kind of backing store (raw values are the config spellings: `backend = "file"`).
    public enum Kind: String, Sendable, Equatable, CaseIterable {
        /// A regular file (created sparse when missing and `create` is set).
        case file
        /// A block device node (never created).
        case block
        /// No storage: reads and writes complete at once (benchmarks).
        case null
    }

    /// How data reaches the backing store (raw values are the config spellings: `cache = "none"`).
    public enum CacheMode: String, Sendable, Equatable, CaseIterable {
        /// O_DIRECT through libaio, bypassing the page cache (`cache = "none"`, the default).
        case none
        /// Buffered I/O through the page cache on worker threads (`cache = "writeback"`).
        case writeback
    }

    /// The kind of backing store.
    public var kind: Kind
    /// Path of the file or block device (ignored for `.null`).
    public var path: String
    /// Size in bytes: of a missing file that `create` makes, or the capacity of a null back-end.
    /// An existing file or device keeps its own size.
    public var size: UInt64
    /// Logical block size in bytes: 512 or 4096.
    public var logicalBlockSize: UInt32
    /// Physical block size reported to initiators (a power of two, a multiple of the logical block
    /// size, at most 65536); nil: a block device's own (BLKPBSZGET), the logical size for files and null.
    public var physicalBlockSize: UInt32?
    /// Open read-only; writes, discards and write-zeroes are refused with EROFS.
    public var readOnly: Bool
    /// Cache mode.
    public var cache: CacheMode
    /// Create a missing file, sparse, at `size` bytes.
    public var create: Bool
    /// Requests each channel can hold queued or in flight (1...4096).
    public var queueDepth: Int
    /// Worker threads per channel for buffered I/O (1...16). O_DIRECT channels use one worker for
    /// discard, write-zeroes and flush fallbacks.
    public var workerThreads: Int

    /// Creates a spec.
    public init(kind: Kind, path: String, size: UInt64 = 0, logicalBlockSize: UInt32 = 512, readOnly: Bool = false,
                cache: CacheMode = .none, create: Bool = false, queueDepth: Int = 256, workerThreads: Int = 2,
                physicalBlockSize: UInt32? = nil) {
        self.kind = kind
        self.path = path
        self.size = size
        self.logicalBlockSize = logicalBlockSize
        self.physicalBlockSize = physicalBlockSize
        self.readOnly = readOnly
        self.cache = cache
        self.create = create
        self.queueDepth = queueDepth
        self.workerThreads = workerThreads
    }
}

extension BackendSpec {
    /// Whether `physical` is a valid physical block size over `logical`: a power of two, a multiple
    /// of the logical block size, at most 65536 (READ CAPACITY(16) reports the ratio as an exponent).
    public static func isValidPhysicalBlockSize(_ physical: UInt32, logical: UInt32) -> Bool {
        physical >= logical && physical <= 65536 && physical.nonzeroBitCount == 1
    }
}

/// Why a back-end could not be opened or resized. Every description names the path and the reason.
public enum BackendOpenError: Error, CustomStringConvertible, Sendable, Equatable {
    /// The logical block size is neither 512 nor 4096.
    case invalidBlockSize(path: String, blockSize: UInt32)
    /// The physical block size is not a power-of-two multiple of the logical one up to 65536.
    case invalidPhysicalBlockSize(path: String, physical: UInt32, logical: UInt32)
    /// A queue depth or worker count outside its range.
    case invalidTuning(path: String, reason: String)
    /// The file does not exist and `create` is off (or the LUN is read-only).
    case missingFile(path: String)
    /// The path exists but is not a regular file.
    case notRegularFile(path: String)
    /// The path exists but is not a block device.
    case notBlockDevice(path: String)
    /// A size (configured, of the file, or of the device) is not a positive multiple of the block size.
    case sizeNotMultipleOfBlockSize(path: String, size: UInt64, blockSize: UInt32)
    /// The device's own logical block size is larger than the configured one.
    case blockSizeTooSmall(path: String, configured: UInt32, device: UInt32)
    /// Another ScsiGate process or another LUN already holds the lock on this file or device.
    case lockConflict(path: String)
    /// The block device is mounted or claimed by another program (EBUSY on O_EXCL).
    case deviceBusy(path: String)
    /// open(2) was refused for lack of permission.
    case permissionDenied(path: String, errno: Int32)
    /// The file or device is read-only but the LUN is configured writable.
    case readOnlyMedium(path: String)
    /// The filesystem or device refuses O_DIRECT (or needs a coarser alignment than the block size).
    case directIOUnsupported(path: String, reason: String)
    /// A shrink was requested without allowing it.
    case shrinkRefused(path: String, currentSize: UInt64, requestedSize: UInt64)
    /// A block device was asked for a size it does not have (devices are resized outside ScsiGate).
    case deviceSizeMismatch(path: String, deviceSize: UInt64, requestedSize: UInt64)
    /// The operation is not possible on this back-end (resize of a read-only or closed LUN, wrong kind).
    case unsupported(path: String, reason: String)
    /// Any other failed system call.
    case systemCall(SystemCallError)

    public var description: String {
        switch self {
        case let .invalidBlockSize(path, size):
            return "\(path): logical block size \(size) is not supported (use 512 or 4096)"
        case let .invalidPhysicalBlockSize(path, physical, logical):
            return "\(path): physical block size \(physical) must be a power of two from the logical block size \(logical) up to 65536"
        case let .invalidTuning(path, reason):
            return "\(path): \(reason)"
        case let .missingFile(path):
            return "\(path): does not exist (for a file LUN, set create = true and a size to create it sparse)"
        case let .notRegularFile(path):
            return "\(path): not a regular file (use backend = \"block\" for block devices)"
        case let .notBlockDevice(path):
            return "\(path): not a block device (use backend = \"file\" for regular files)"
        case let .sizeNotMultipleOfBlockSize(path, size, blockSize):
            return "\(path): size \(size) bytes is not a positive multiple of the block size \(blockSize)"
        case let .blockSizeTooSmall(path, configured, device):
            return "\(path): configured block size \(configured) is smaller than the device's logical block size \(device)"
        case let .lockConflict(path):
            return "\(path): already in use by another ScsiGate or LUN (lock held)"
        case let .deviceBusy(path):
            return "\(path): device is busy (mounted, or opened exclusively by another program)"
        case let .permissionDenied(path, errno):
            return "\(path): permission denied (\(SystemCallError.describe(errno: errno)))"
        case let .readOnlyMedium(path):
            return "\(path): file or device is read-only; set read_only = true for this LUN"
        case let .directIOUnsupported(path, reason):
            return "\(path): O_DIRECT not usable (\(reason)); set cache = \"writeback\" for this LUN"
        case let .shrinkRefused(path, current, requested):
            return "\(path): refusing to shrink from \(current) to \(requested) bytes without an explicit shrink flag"
        case let .deviceSizeMismatch(path, deviceSize, requested):
            return "\(path): block device has \(deviceSize) bytes, not \(requested); resize the device itself, then rescan"
        case let .unsupported(path, reason):
            return "\(path): \(reason)"
        case let .systemCall(error):
            return error.description
        }
    }
}

/// The calling thread's errno.
@inline(__always)
func currentErrno() -> Int32 { Glibc.errno }
