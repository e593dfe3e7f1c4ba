import BlockIO
import CSystem
import SCSI
import Synchronization
import Virtio
#if canImport(Glibc)
import Glibc
#endif

/// Per-request-queue slot tables (preallocated at attach).
final class SCSIQueueSlots {
    let queue: RunningQueue
    let size: Int
    let tasks: UnsafeMutablePointer<SCSITask>
    let responseVectors: UnsafeMutablePointer<iovec>
    let responseCounts: UnsafeMutablePointer<Int>
    let entries: UnsafeMutablePointer<UInt16>
    /// Per slot: the `LUNChannelTable` use the task is counted on (-1: none).
    let uses: UnsafeMutablePointer<Int32>
    /// Per slot: arrival time (`IOCounters.now()`).
    let arrivals: UnsafeMutablePointer<UInt64>
    /// Base of this queue's slots in the group's task set.
    let taskSetBase: Int
    /// Request-queue number (virtqueue index - 2): the statistics queue slot.
    let requestQueue: Int
    /// Which start of a ring these slots serve (back-end tokens carry it, so that a late completion for
    /// an abandoned start never lands on a later start of the same queue index).
    let generation: UInt32
    /// Per slot: a back-end request of the task is submitted and not yet reaped.
    let inBackend: UnsafeMutablePointer<Bool>
    /// Per slot: the back-end was already asked to abort it (one abort per submission).
    let abortRequested: UnsafeMutablePointer<Bool>
    static let responseVectorCapacity = 4

    init(queue: RunningQueue, taskSetBase: Int, generation: UInt32) {
        self.queue = queue
        size = queue.ring.size
        self.taskSetBase = taskSetBase
        self.generation = generation
        inBackend = .allocate(capacity: size)
        inBackend.initialize(repeating: false, count: size)
        abortRequested = .allocate(capacity: size)
        abortRequested.initialize(repeating: false, count: size)
        requestQueue = queue.index - VirtioSCSI.firstRequestQueue
        uses = .allocate(capacity: size)
        uses.initialize(repeating: -1, count: size)
        arrivals = .allocate(capacity: size)
        arrivals.initialize(repeating: 0, count: size)
        tasks = .allocate(capacity: size)
        tasks.initialize(repeating: SCSITask(nexus: ITNexus(initiator: 0), lun: nil, tag: 0, cdb: CDB()), count: size)
        responseVectors = .allocate(capacity: size * Self.responseVectorCapacity)
        responseVectors.initialize(repeating: iovec(iov_base: nil, iov_len: 0), count: size * Self.responseVectorCapacity)
        responseCounts = .allocate(capacity: size)
        responseCounts.initialize(repeating: 0, count: size)
        entries = .allocate(capacity: size)
        entries.initialize(repeating: 1, count: size)
    }

    deinit {
        tasks.deinitialize(count: size)
        tasks.deallocate()
        responseVectors.deallocate()
        responseCounts.deallocate()
        entries.deallocate()
        uses.deallocate()
        arrivals.deallocate()
        inBackend.deallocate()
        abortRequested.deallocate()
    }

    func response(_ head: UInt16) -> IOVectorList {
        IOVectorList(base: responseVectors + Int(head) * Self.responseVectorCapacity, count: responseCounts[Int(head)])
    }

    /// The back-end token of request `head`: queue index (bits 48-63), ring generation (16-47), head (0-15).
    @inline(__always)
    func token(_ head: UInt16) -> UInt64 {
        UInt64(queue.index) << 48 | UInt64(generation) << 16 | UInt64(head)
    }
}

/// The parts of a back-end token (see `SCSIQueueSlots.token` and `BlkQueueSlots.token`).
struct BackendToken {
    var queueIndex: Int
    var generation: UInt32
    var head: UInt16

    @inline(__always)
    init(_ token: UInt64) {
        queueIndex = Int(token >> 48)
        generation = UInt32(truncatingIfNeeded: token >> 16)
        head = UInt16(truncatingIfNeeded: token)
    }
}

/// A control-queue request waiting for its TMF to finish.
struct PendingControl {
    var head: UInt16
    var entries: UInt16
    var response: UnsafeMutableRawPointer
}


/// Moves a non-Sendable value into a @Sendable closure that runs on the same loop thread.
struct UncheckedBox<T>: @unchecked Sendable {
    var value: T
    init(_ value: T) { self.value = value }
}
