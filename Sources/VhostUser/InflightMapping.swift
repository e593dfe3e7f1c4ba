import CSystem
import Virtio
#if canImport(Glibc)
import Glibc
#endif

/// The in-flight shared memory handed to the front-end with GET_INFLIGHT_FD (or back with SET_INFLIGHT_FD).
/// It is vhost-user's (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD: a memfd the front-end keeps across back-end
/// restarts, one region per queue at a fixed stride); the per-queue region formats it hands to the rings,
/// `InflightQueueRegion` and `InflightPackedRegion`, are the transport-neutral part in `Virtio/Inflight.swift`.
final class InflightMapping: @unchecked Sendable {
    let fd: Int32
    let base: UnsafeMutableRawPointer
    let length: Int
    let mapBase: UnsafeMutableRawPointer
    let mapLength: Int
    let queues: Int
    let queueSize: Int
    /// Bytes between two queues' regions.
    let stride: Int

    /// Bytes per queue this back-end lays out: room for the packed layout (which also holds the split
    /// one, whichever format the rings negotiate after GET_INFLIGHT_FD), 64-byte aligned.
    static func perQueueBytes(_ size: Int) -> Int { (InflightPackedRegion.byteCount(queueSize: size) + 63) & ~63 }
    /// The split-only stride (regions made by earlier versions).
    static func splitPerQueueBytes(_ size: Int) -> Int { (InflightQueueRegion.byteCount(queueSize: size) + 63) & ~63 }

    struct Failure: Error, CustomStringConvertible {
        var description: String
    }

    private init(fd: Int32, mapBase: UnsafeMutableRawPointer, mapLength: Int, offset: Int, length: Int, queues: Int, queueSize: Int,
                 stride: Int) {
        self.stride = stride
        self.fd = fd
        self.mapBase = mapBase
        self.mapLength = mapLength
        self.base = mapBase + offset
        self.length = length
        self.queues = queues
        self.queueSize = queueSize
    }

    deinit {
        munmap(mapBase, mapLength)
        close(fd)
    }

    static func create(queues: Int, queueSize: Int) throws(Failure) -> InflightMapping {
        let length = queues * perQueueBytes(queueSize)
        let fd = csys_memfd_create("scsigate-inflight", 0)
        guard fd >= 0 else { throw Failure(description: "memfd_create: errno \(errno)") }
        guard ftruncate(fd, off_t(length)) == 0, let p = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), p != MAP_FAILED else {
            close(fd)
            throw Failure(description: "inflight region of \(length) bytes: errno \(errno)")
        }
        p.initializeMemory(as: UInt8.self, repeating: 0, count: length)
        return InflightMapping(fd: fd, mapBase: p, mapLength: length, offset: 0, length: length, queues: queues, queueSize: queueSize,
                               stride: perQueueBytes(queueSize))
    }

    static func adopt(fd: Int32, length: UInt64, offset: UInt64, queues: Int, queueSize: Int) throws(Failure) -> InflightMapping {
        let stride = length >= UInt64(queues * perQueueBytes(queueSize)) ? perQueueBytes(queueSize) : splitPerQueueBytes(queueSize)
        let need = UInt64(queues * stride)
        let (end, overflow) = offset.addingReportingOverflow(length)
        guard !overflow, length >= need, end <= UInt64(Int32.max) else {
            close(fd)
            throw Failure(description: "inflight region size \(length) offset \(offset) does not fit \(queues) queues of \(queueSize)")
        }
        let fileSize = csys_fd_size(fd)
        guard fileSize >= 0, UInt64(fileSize) >= end else {
            close(fd)
            throw Failure(description: "inflight fd is \(fileSize) bytes, needs \(end)")
        }
        guard let p = mmap(nil, Int(end), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), p != MAP_FAILED else {
            close(fd)
            throw Failure(description: "inflight mmap: errno \(errno)")
        }
        return InflightMapping(fd: fd, mapBase: p, mapLength: Int(end), offset: Int(offset), length: Int(length),
                               queues: queues, queueSize: queueSize, stride: stride)
    }

    /// A tracking region for one start of queue `queue` when its ring size matches the mapping's. The
    /// region keeps the mapping alive while its ring runs; the mapping holds no region (no cycle: the
    /// memfd and mapping go away with the last ring and the session that used them).
    func region(queue: Int, size: Int) -> InflightQueueRegion? {
        guard queue < queues, size == queueSize else { return nil }
        let r = InflightQueueRegion(base: base + queue * stride, size: size)
        r.owner = self
        return r
    }

    /// A packed-ring tracking region for one start of queue `queue` (nil when the size does not match or
    /// the adopted mapping has only split-sized regions).
    func packedRegion(queue: Int, size: Int) -> InflightPackedRegion? {
        guard queue < queues, size == queueSize, stride >= InflightPackedRegion.byteCount(queueSize: size) else { return nil }
        let r = InflightPackedRegion(base: base + queue * stride, size: size, usedPosition: 0, usedWrap: true)
        r.owner = self
        return r
    }
}
