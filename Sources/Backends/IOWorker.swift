#if canImport(Glibc)
import Glibc
#endif
import BlockIO
import CSystem
import SystemErrors
import Synchronization

/// Per-request state of one channel slot. Owned by the channel thread, or by a worker between the
/// worker ring's `push` and the completion ring's `push` (the rings order the accesses).
struct IOSlot {
    var token: UInt64 = 0
    var operation: BlockOperation = .read
    var offset: UInt64 = 0
    var length: UInt64 = 0
    var buffers: IOVectorList = .empty
    var forceUnitAccess = false
    var mayUnmap = false
    /// The AIO transfer goes through `bounce` instead of `buffers`.
    var bounced = false
    var bounce: UnsafeMutableRawPointer?
    var bounceCapacity = 0
    var bounceVector = iovec(iov_base: nil, iov_len: 0)
    /// Result: 0 or a positive errno, and bytes transferred.
    var status: Int32 = 0
    var bytes: UInt64 = 0
}

/// The memory and descriptors a channel shares with its worker threads.
final class ChannelCore: @unchecked Sendable {
    let slots: UnsafeMutablePointer<IOSlot>
    let slotCount: Int
    let fd: Int32
    let completionFD: Int32
    let isBlockDevice: Bool
    let discardReadsZeroes: Bool

    init(slotCount: Int, fd: Int32, completionFD: Int32, isBlockDevice: Bool, discardReadsZeroes: Bool) {
        self.slotCount = slotCount
        self.slots = .allocate(capacity: slotCount)
        self.slots.initialize(repeating: IOSlot(), count: slotCount)
        self.fd = fd
        self.completionFD = completionFD
        self.isBlockDevice = isBlockDevice
        self.discardReadsZeroes = discardReadsZeroes
    }

    deinit {
        for i in 0..<slotCount { free(slots[i].bounce) }
        slots.deinitialize(count: slotCount)
        slots.deallocate()
    }

    /// Set by the first worker completion since the channel last looked; cleared by `reap` after it has
    /// drained the eventfd and before it pops the completion rings. Workers write the eventfd only when
    /// they set it, so a burst of completions costs one eventfd write instead of one each.
    let workerSignalPending = Atomic<Bool>(false)

    /// Wakes the event loop. An eventfd write fails only when the counter would overflow, in which case
    /// the descriptor is already readable, so the result needs no handling beyond that.
    @inline(__always)
    func signalCompletion() {
        let r = csys_eventfd_signal(completionFD, 1)
        assert(r == 0 || r == -EAGAIN, "eventfd write failed: \(r)")
    }

    /// Worker side: wakes the loop unless a wake-up is already pending.
    @inline(__always)
    func signalWorkerCompletion() {
        if !workerSignalPending.exchange(true, ordering: .sequentiallyConsistent) { signalCompletion() }
    }
}

/// A thread that runs blocking requests (buffered reads and writes, fdatasync, fallocate, block-device
/// ioctls) for one channel, so the event loop never blocks.
///
/// Requests arrive as slot indices on an SPSC ring from the channel; results go back on another SPSC
/// ring and the channel's completion eventfd is signalled. An idle worker sleeps on its own eventfd;
/// the channel writes to it only when the worker said it was going to sleep (Dekker-style handshake
/// through sequentially consistent atomics).
final class IOWorker: @unchecked Sendable {
    let requests: SPSCRing
    let completions: SPSCRing
    private let wakeFD: Int32
    private let sleeping = Atomic<Bool>(false)
    private let stopping = Atomic<Bool>(false)
    private let core: ChannelCore
    private let scratch: UnsafeMutablePointer<iovec>
    private let scratchCapacity: Int
    private let zeroes: UnsafeMutableRawPointer
    private static let zeroBufferBytes = 256 << 10
    private var thread = pthread_t()
    private var running = false

    init(core: ChannelCore, capacity: Int) throws(BlockBackendError) {
        let efd = csys_eventfd(0, 0)
        guard efd >= 0 else { throw .systemCall(.current("eventfd", context: "I/O worker")) }
        guard let zero = FileBackend.allocateAligned(bytes: Self.zeroBufferBytes, alignment: 4096) else {
            _ = Glibc.close(efd)
            throw .systemCall(SystemCallError("posix_memalign", errno: ENOMEM, context: "I/O worker zero buffer"))
        }
        zero.initializeMemory(as: UInt8.self, repeating: 0, count: Self.zeroBufferBytes)
        self.zeroes = zero
        self.wakeFD = efd
        self.core = core
        self.requests = SPSCRing(minimumCapacity: capacity)
        self.completions = SPSCRing(minimumCapacity: capacity)
        self.scratchCapacity = Int(csys_iov_max())
        self.scratch = .allocate(capacity: scratchCapacity)
        self.scratch.initialize(repeating: iovec(iov_base: nil, iov_len: 0), count: scratchCapacity)
    }

    deinit {
        free(zeroes)
        scratch.deallocate()
        _ = Glibc.close(wakeFD)
    }

    /// Starts the thread.
    func start() throws(BlockBackendError) {
        let context = Unmanaged.passRetained(self).toOpaque()
        let r = pthread_create(&thread, nil, { argument in
            let worker = Unmanaged<IOWorker>.fromOpaque(argument!).takeRetainedValue()
            _ = csys_set_thread_name("scsigate-io")
            worker.run()
            return nil
        }, context)
        guard r == 0 else {
            Unmanaged<IOWorker>.fromOpaque(context).release()
            throw .systemCall(SystemCallError("pthread_create", errno: r, context: "I/O worker"))
        }
        running = true
    }

    /// Wakes the worker if it is sleeping (call after pushing requests).
    @inline(__always)
    func wakeIfSleeping() {
        if sleeping.load(ordering: .sequentiallyConsistent) {
            let r = csys_eventfd_signal(wakeFD, 1)
            assert(r == 0 || r == -EAGAIN, "eventfd write failed: \(r)")
        }
    }

    /// Finishes the queued requests, stops the thread and waits for it.
    func stop() {
        guard running else { return }
        running = false
        stopping.store(true, ordering: .sequentiallyConsistent)
        let r = csys_eventfd_signal(wakeFD, 1)
        assert(r == 0 || r == -EAGAIN, "eventfd write failed: \(r)")
        _ = pthread_join(thread, nil)
    }

    private func run() {
        var counter: UInt64 = 0
        while true {
            if let index = requests.pop() {
                perform(core.slots + Int(index))
                let pushed = completions.push(index)
                assert(pushed, "completion ring overflow")
                core.signalWorkerCompletion()
                continue
            }
            if stopping.load(ordering: .sequentiallyConsistent) { return }
            sleeping.store(true, ordering: .sequentiallyConsistent)
            if !requests.isEmpty || stopping.load(ordering: .sequentiallyConsistent) {
                sleeping.store(false, ordering: .sequentiallyConsistent)
                continue
            }
            // Blocking read; EINTR is retried inside. Any other failure would be a bug: stop spinning hard.
            if csys_eventfd_drain(wakeFD, &counter) != 0 { _ = usleep(1000) }
            sleeping.store(false, ordering: .sequentiallyConsistent)
        }
    }

    private func perform(_ slot: UnsafeMutablePointer<IOSlot>) {
        let fd = core.fd
        let length = slot.pointee.length
        var status: Int32 = 0
        var bytes: UInt64 = 0
        switch slot.pointee.operation {
        case .read:
            (status, bytes) = transfer(slot, write: false)
        case .write:
            (status, bytes) = transfer(slot, write: true)
        case .flush:
            if fdatasync(fd) != 0 { status = currentErrno() }
        case .discard:
            status = discard(offset: slot.pointee.offset, length: length)
            bytes = status == 0 ? length : 0
        case .writeZeroes:
            status = writeZeroes(offset: slot.pointee.offset, length: length, mayUnmap: slot.pointee.mayUnmap)
            bytes = status == 0 ? length : 0
        }
        slot.pointee.status = status
        slot.pointee.bytes = bytes
    }

    /// preadv2/pwritev2 loop over the slot's iovecs, trimmed to the request length. A read that reaches
    /// the end of the file stops there and reports the bytes read; an error reports the bytes done before it.
    private func transfer(_ slot: UnsafeMutablePointer<IOSlot>, write: Bool) -> (Int32, UInt64) {
        let list = slot.pointee.buffers
        let length = slot.pointee.length
        let offset = slot.pointee.offset
        let flags = write && slot.pointee.forceUnitAccess ? csys_rwf_dsync() : 0
        guard let base = list.base else { return length == 0 ? (0, 0) : (EINVAL, 0) }
        var done: UInt64 = 0
        var index = 0
        var skip = 0
        while done < length {
            var count = 0
            var planned: UInt64 = 0
            var i = index
            var s = skip
            while i < list.count && count < scratchCapacity && done + planned < length {
                let element = base[i]
                let available = element.iov_len - s
                if available == 0 { i += 1; s = 0; continue }
                guard let start = element.iov_base else { return (EINVAL, done) }
                let take = min(UInt64(available), length - done - planned)
                scratch[count] = iovec(iov_base: start + s, iov_len: Int(take))
                count += 1
                planned += take
                if take == UInt64(available) { i += 1; s = 0 } else { s += Int(take) }
            }
            if count == 0 { return (EINVAL, done) }
            let n = write
                ? csys_pwritev2(core.fd, scratch, Int32(count), offset + done, flags)
                : csys_preadv2(core.fd, scratch, Int32(count), offset + done, flags)
            if n < 0 { return (Int32(-n), done) }
            if n == 0 { break }
            done += UInt64(n)
            var advance = n
            while advance > 0 && index < list.count {
                let available = base[index].iov_len - skip
                if advance >= available {
                    advance -= available
                    index += 1
                    skip = 0
                } else {
                    skip += advance
                    advance = 0
                }
            }
        }
        return (0, done)
    }

    private func discard(offset: UInt64, length: UInt64) -> Int32 {
        if core.isBlockDevice {
            let r = csys_blk_discard(core.fd, offset, length)
            // Discard is a hint on devices (discardReadsZeroes is false): unsupported is not an error.
            if r == 0 || r == -EOPNOTSUPP { return 0 }
            return -r
        }
        let r = csys_punch_hole(core.fd, offset, length)
        if r == 0 { return 0 }
        if r != -EOPNOTSUPP { return -r }
        // Files promise zeroes after discard: without hole punching, zero the range another way.
        return writeZeroes(offset: offset, length: length, mayUnmap: false)
    }

    private func writeZeroes(offset: UInt64, length: UInt64, mayUnmap: Bool) -> Int32 {
        if core.isBlockDevice {
            let r = csys_blk_zeroout(core.fd, offset, length)
            if r == 0 { return 0 }
            if r != -EOPNOTSUPP { return -r }
            return writeZeroBuffers(offset: offset, length: length)
        }
        if mayUnmap && core.discardReadsZeroes {
            let r = csys_punch_hole(core.fd, offset, length)
            if r == 0 { return 0 }
            if r != -EOPNOTSUPP { return -r }
        }
        let r = csys_zero_range(core.fd, offset, length, 1)
        if r == 0 { return 0 }
        if r != -EOPNOTSUPP { return -r }
        return writeZeroBuffers(offset: offset, length: length)
    }

    /// Writes zeroes from an aligned buffer (valid for O_DIRECT descriptors too).
    private func writeZeroBuffers(offset: UInt64, length: UInt64) -> Int32 {
        var done: UInt64 = 0
        while done < length {
            let chunk = Int(min(UInt64(Self.zeroBufferBytes), length - done))
            var vector = iovec(iov_base: zeroes, iov_len: chunk)
            let n = csys_pwritev2(core.fd, &vector, 1, offset + done, 0)
            if n < 0 { return Int32(-n) }
            if n == 0 { return EIO }
            done += UInt64(n)
        }
        return 0
    }
}
