#if canImport(Glibc)
import Glibc
#endif
import BlockIO
import CLibAIO
import CSystem
import SystemErrors

/// One event-loop thread's channel to a ``FileBackend``.
///
/// - O_DIRECT (`cache = .none`): reads and writes go to the kernel through one libaio context per
///   channel. `submit` fills a preallocated iocb that points at the request's own iovecs (zero copy);
///   when an iovec is not aligned for O_DIRECT, the data goes through the slot's bounce buffer
///   (allocated on the slot's first unaligned request, grown only when a larger one comes).
///   FUA writes carry RWF_DSYNC; flush is IOCB_CMD_FDSYNC (or fdatasync on the worker when the file
///   refuses it). Discard and write-zeroes run on a worker thread (fallocate and ioctls can block).
/// - Buffered (`cache = .writeback`): every request runs on the channel's worker threads
///   (preadv2/pwritev2/fdatasync/fallocate), handed over on lock-free SPSC rings.
///
/// Completions of both engines wake the same eventfd, ``completionFD``. Not thread-safe: it may be
/// created on one thread and handed to its event-loop thread (hence `@unchecked Sendable`), but only
/// one thread may use it at a time.
/// The iovec array and the buffers of a request must stay valid until its completion has been reaped.
/// Call ``close()`` (after reaping everything in flight) to stop the workers and release the context.
public final class FileChannel: BlockChannel, @unchecked Sendable {
    private let backend: FileBackend
    private let core: ChannelCore
    private let fd: Int32
    private let direct: Bool
    private let readOnly: Bool
    private let logicalBlockSize: UInt64
    private let memoryAlignment: Int
    private let lengthAlignment: Int
    private let iovMax: Int
    private let queueDepth: Int

    private var context: io_context_t?
    /// The context's completion ring, read in user space (nil: its header is not the known one, so
    /// completions come from io_getevents).
    private let completionRing: AIOCompletionRing?
    private let iocbs: UnsafeMutablePointer<iocb>
    private let pending: UnsafeMutablePointer<UnsafeMutablePointer<iocb>?>
    private var pendingCount = 0
    private let events: UnsafeMutablePointer<io_event>
    private let zeroTimeout: UnsafeMutablePointer<timespec>
    private var aioInFlight = 0
    private var fdsyncSupported = true

    private let freeSlots: UnsafeMutablePointer<UInt32>
    private var freeCount: Int
    private let immediate: UnsafeMutablePointer<UInt32>
    private var immediateHead = 0
    private var immediateCount = 0
    private var immediateNeedsSignal = false

    private let workers: ContiguousArray<IOWorker>
    private var nextWorker = 0
    private var workersToWake: UInt32 = 0
    private var closed = false

    /// Readable (eventfd) when completions are ready.
    public let completionFD: Int32
    /// Requests queued or in flight.
    public private(set) var inFlight = 0

    init(backend: FileBackend, aioContextDepth: Int? = nil) throws(BlockBackendError) {
        let spec = backend.spec
        let depth = spec.queueDepth
        let efd = csys_eventfd(0, 1)
        guard efd >= 0 else {
            throw .systemCall(.current("eventfd", context: spec.path))
        }
        var ctx: io_context_t?
        if spec.cache == .none {
            let contextDepth = aioContextDepth ?? depth
            let r = io_setup(Int32(contextDepth), &ctx)
            if r != 0 {
                _ = Glibc.close(efd)
                throw .systemCall(SystemCallError("io_setup(\(contextDepth))", errno: -r,
                                                  context: spec.path + (r == -EAGAIN ? " (raise /proc/sys/fs/aio-max-nr)" : "")))
            }
        }
        let core = ChannelCore(slotCount: depth, fd: backend.fd, completionFD: efd,
                               isBlockDevice: backend.isBlockDevice, discardReadsZeroes: !backend.isBlockDevice)
        var started = ContiguousArray<IOWorker>()
        let workerCount = spec.cache == .none ? 1 : spec.workerThreads
        do {
            for _ in 0..<workerCount {
                let worker = try IOWorker(core: core, capacity: depth)
                try worker.start()
                started.append(worker)
            }
        } catch {
            for worker in started { worker.stop() }
            if let ctx { _ = io_destroy(ctx) }
            _ = Glibc.close(efd)
            throw error.within(spec.path)
        }

        self.backend = backend
        self.core = core
        self.fd = backend.fd
        self.direct = spec.cache == .none
        self.readOnly = backend.readOnly
        self.logicalBlockSize = UInt64(backend.logicalBlockSize)
        self.memoryAlignment = backend.directMemoryAlignment
        self.lengthAlignment = backend.directLengthAlignment
        self.iovMax = Int(csys_iov_max())
        self.queueDepth = depth
        self.context = ctx
        self.completionRing = ctx.flatMap { AIOCompletionRing($0) }
        self.completionFD = efd
        self.workers = started
        iocbs = .allocate(capacity: depth)
        iocbs.initialize(repeating: iocb(), count: depth)
        pending = .allocate(capacity: depth)
        pending.initialize(repeating: nil, count: depth)
        events = .allocate(capacity: depth)
        events.initialize(repeating: io_event(), count: depth)
        zeroTimeout = .allocate(capacity: 1)
        zeroTimeout.initialize(to: timespec(tv_sec: 0, tv_nsec: 0))
        freeSlots = .allocate(capacity: depth)
        for i in 0..<depth { (freeSlots + i).initialize(to: UInt32(depth - 1 - i)) }
        freeCount = depth
        immediate = .allocate(capacity: depth)
        immediate.initialize(repeating: 0, count: depth)
    }

    deinit {
        close()
        iocbs.deallocate()
        pending.deallocate()
        events.deallocate()
        zeroTimeout.deallocate()
        freeSlots.deallocate()
        immediate.deallocate()
    }

    /// Stops the workers (they finish what they hold), destroys the AIO context (waiting for its
    /// requests) and closes the eventfd. Completions not yet reaped are dropped. Idempotent.
    public func close() {
        if closed { return }
        closed = true
        for worker in workers { worker.stop() }
        if let context { _ = io_destroy(context) }
        context = nil
        _ = Glibc.close(completionFD)
        backend.channelClosed()
    }

    // MARK: Submission

    /// Queues one request. Returns 0, or a positive errno when it cannot be queued:
    /// EAGAIN (all `queueDepth` slots busy), EINVAL (offset or length not a multiple of the logical
    /// block size, transfer above `FileBackend.maxTransferBytes`, buffers shorter than the length or
    /// with a null base), EROFS (write, discard or write-zeroes on a read-only LUN), ERANGE (write,
    /// discard or write-zeroes beyond the capacity), ENOMEM (no bounce buffer), EBADF (closed).
    /// Reads past the end are submitted and complete short.
    public func submit(_ request: BlockRequest, token: UInt64) -> Int32 {
        if closed { return EBADF }
        guard freeCount > 0 else { return EAGAIN }
        let operation = request.operation
        let offset = request.offset
        let length = request.length
        var directVectors = 0
        // Offsets must fit off_t together with the length (hostile values must not trap below).
        guard offset <= UInt64(Int64.max), length <= UInt64(Int64.max) - offset else { return ERANGE }
        switch operation {
        case .read, .write, .discard, .writeZeroes:
            if operation != .read && readOnly { return EROFS }
            guard offset % logicalBlockSize == 0, length % logicalBlockSize == 0 else { return EINVAL }
            if operation != .read {
                let capacity = backend.capacityBytes
                guard offset <= capacity, length <= capacity - offset else { return ERANGE }
            }
            if operation == .read || operation == .write {
                guard length <= UInt64(FileBackend.maxTransferBytes) else { return EINVAL }
                directVectors = plan(request.buffers, length: length)
                if directVectors == -2 { return EINVAL }
            }
        case .flush:
            break
        }

        freeCount -= 1
        let index = Int(freeSlots[freeCount])
        let slot = core.slots + index
        slot.pointee.token = token
        slot.pointee.operation = operation
        slot.pointee.offset = offset
        slot.pointee.length = length
        slot.pointee.buffers = request.buffers
        slot.pointee.forceUnitAccess = request.forceUnitAccess
        slot.pointee.mayUnmap = request.mayUnmap
        slot.pointee.bounced = false
        slot.pointee.status = 0
        slot.pointee.bytes = 0
        inFlight += 1

        if length == 0 && operation != .flush {
            pushImmediate(index)
            return 0
        }
        if direct && (operation == .read || operation == .write) {
            let cb = iocbs + index
            if directVectors > 0, let vectors = request.buffers.base {
                if operation == .read {
                    io_prep_preadv(cb, fd, vectors, Int32(directVectors), Int64(offset))
                } else {
                    io_prep_pwritev2(cb, fd, vectors, Int32(directVectors), Int64(offset),
                                     request.forceUnitAccess ? csys_rwf_dsync() : 0)
                }
            } else {
                guard let bounce = bounceBuffer(slot, bytes: Int(length)) else {
                    releaseSlot(index)
                    return ENOMEM
                }
                slot.pointee.bounced = true
                slot.pointee.bounceVector = iovec(iov_base: bounce, iov_len: Int(length))
                if operation == .write {
                    let copied = request.buffers.gather(
                        from: 0, into: UnsafeMutableRawBufferPointer(start: bounce, count: Int(length)))
                    assert(copied == Int(length))
                }
                let vector = UnsafeMutablePointer(slot.pointer(to: \IOSlot.bounceVector)!)
                if operation == .read {
                    io_prep_preadv(cb, fd, vector, 1, Int64(offset))
                } else {
                    io_prep_pwritev2(cb, fd, vector, 1, Int64(offset),
                                     request.forceUnitAccess ? csys_rwf_dsync() : 0)
                }
            }
            queueAIO(cb, index: index)
        } else if direct && operation == .flush && fdsyncSupported {
            let cb = iocbs + index
            io_prep_fdsync(cb, fd)
            queueAIO(cb, index: index)
        } else {
            pushToWorker(index)
        }
        return 0
    }

    /// -2: invalid buffers; -1: needs the bounce buffer; n > 0: the first n iovecs cover `length`
    /// exactly and are aligned for O_DIRECT (or the channel is buffered, which has no alignment needs).
    @inline(__always)
    private func plan(_ list: IOVectorList, length: UInt64) -> Int {
        guard let base = list.base else { return length == 0 ? 0 : -2 }
        var sum: UInt64 = 0
        var i = 0
        var aligned = true
        while i < list.count && sum < length {
            let element = base[i]
            // size_t arrives as Int: a length above Int.max (negative here) is as invalid as a null base.
            if element.iov_len < 0 || (element.iov_len > 0 && element.iov_base == nil) { return -2 }
            if direct && aligned {
                let address = Int(bitPattern: element.iov_base)
                if address % memoryAlignment != 0 || element.iov_len % lengthAlignment != 0 { aligned = false }
            }
            sum += UInt64(element.iov_len)
            i += 1
        }
        if sum < length { return -2 }
        if !direct { return i }
        if !aligned || sum != length || i > iovMax { return -1 }
        return i
    }

    private func bounceBuffer(_ slot: UnsafeMutablePointer<IOSlot>, bytes: Int) -> UnsafeMutableRawPointer? {
        if let existing = slot.pointee.bounce, slot.pointee.bounceCapacity >= bytes { return existing }
        let rounded = (bytes + 65535) & ~65535
        guard let fresh = FileBackend.allocateAligned(bytes: rounded, alignment: max(memoryAlignment, 4096)) else {
            return nil
        }
        free(slot.pointee.bounce)
        slot.pointee.bounce = fresh
        slot.pointee.bounceCapacity = rounded
        return fresh
    }

    @inline(__always)
    private func queueAIO(_ cb: UnsafeMutablePointer<iocb>, index: Int) {
        io_set_eventfd(cb, completionFD)
        cb.pointee.data = UnsafeMutableRawPointer(bitPattern: index + 1)
        pending[pendingCount] = cb
        pendingCount += 1
    }

    @inline(__always)
    private func pushToWorker(_ index: Int) {
        let w = nextWorker
        nextWorker = w + 1 == workers.count ? 0 : w + 1
        let pushed = workers[w].requests.push(UInt32(index))
        // Each ring holds queueDepth entries and at most queueDepth slots exist.
        precondition(pushed, "worker ring overflow")
        workersToWake |= 1 << UInt32(w)
    }

    @inline(__always)
    private func pushImmediate(_ index: Int) {
        immediate[(immediateHead + immediateCount) % queueDepth] = UInt32(index)
        immediateCount += 1
        immediateNeedsSignal = true
    }

    @inline(__always)
    private func releaseSlot(_ index: Int) {
        freeSlots[freeCount] = UInt32(index)
        freeCount += 1
        inFlight -= 1
    }

    /// Sends the queued requests: one io_submit for the AIO batch (a partial or EAGAIN submit keeps the
    /// rest queued for the next `commit` or `reap`), one wake-up per sleeping worker.
    public func commit() {
        if closed { return }
        if pendingCount > 0, let context {
            var start = 0
            while start < pendingCount {
                let r = Int(io_submit(context, pendingCount - start, pending + start))
                if r > 0 {
                    aioInFlight += r
                    start += r
                    continue
                }
                if r == -EINTR { continue }
                if r == -EAGAIN || r == 0 {
                    // Kernel resources exhausted: retry after completions free them. With nothing in
                    // flight no completion would come, so wake the loop to retry from `reap`.
                    if aioInFlight == 0 { immediateNeedsSignal = true }
                    break
                }
                // The first iocb was refused: complete it (or reroute an unsupported fdsync).
                let cb = pending[start]!
                start += 1
                let index = Int(bitPattern: cb.pointee.data) - 1
                if Int32(cb.pointee.aio_lio_opcode) == Int32(IO_CMD_FDSYNC.rawValue) && (r == -EINVAL || r == -EOPNOTSUPP) {
                    fdsyncSupported = false
                    pushToWorker(index)
                } else {
                    core.slots[index].status = Int32(-r)
                    core.slots[index].bytes = 0
                    pushImmediate(index)
                }
            }
            if start > 0 {
                let remaining = pendingCount - start
                if remaining > 0 { pending.update(from: pending + start, count: remaining) }
                pendingCount = remaining
            }
        }
        if workersToWake != 0 {
            var mask = workersToWake
            workersToWake = 0
            while mask != 0 {
                let w = mask.trailingZeroBitCount
                mask &= mask - 1
                workers[w].wakeIfSleeping()
            }
        }
        if immediateNeedsSignal {
            immediateNeedsSignal = false
            core.signalCompletion()
        }
    }

    /// Slots that own a bounce buffer (diagnostics and tests).
    var bounceSlotCount: Int {
        var n = 0
        for i in 0..<queueDepth where core.slots[i].bounce != nil { n += 1 }
        return n
    }

    /// AIO requests prepared but not yet accepted by io_submit (diagnostics and tests).
    var queuedForSubmission: Int { pendingCount }

    /// Whether flushes still go through IOCB_CMD_FDSYNC (false once the file refused it).
    var usesAIOFlush: Bool { direct && fdsyncSupported }

    // MARK: Completion

    /// Delivers every ready completion to `handler` (token, result) and returns how many.
    /// Negative AIO results become the errno; short transfers report the bytes actually moved.
    /// Requests still queued because the kernel was out of resources are resubmitted at the end.
    public func reap(_ handler: (UInt64, BlockResult) -> Void) -> Int {
        if closed { return 0 }
        var counter: UInt64 = 0
        let drained = csys_eventfd_drain(completionFD, &counter)
        assert(drained == 0 || drained == -EAGAIN, "eventfd read failed: \(drained)")
        // After the drain, before popping: a worker completing from now on signals again.
        core.workerSignalPending.store(false, ordering: .sequentiallyConsistent)
        return collect(handler, systemCalls: true)
    }

    /// Delivers the completions found without a system call (AIO completions from the context's ring
    /// in user space, worker and immediate completions) and returns how many. The eventfd stays as it
    /// is: readable while it counts completions, so a loop going to sleep wakes and `reap`s.
    public func poll(_ handler: (UInt64, BlockResult) -> Void) -> Int {
        if closed { return 0 }
        return collect(handler, systemCalls: false)
    }

    @inline(__always)
    private func collect(_ handler: (UInt64, BlockResult) -> Void, systemCalls: Bool) -> Int {
        var delivered = 0
        while aioInFlight > 0 {
            let n: Int
            if let completionRing {
                n = completionRing.pop(into: events, capacity: queueDepth)
            } else if systemCalls, let context {
                n = Int(io_getevents(context, 0, queueDepth, events, zeroTimeout))
                if n == -EINTR { continue }
            } else {
                break
            }
            if n <= 0 { break }
            for i in 0..<n {
                let event = events[i]
                let index = Int(bitPattern: event.data) - 1
                // Our own iocb tags come back; anything else (a corrupt ring) is not a slot of ours.
                guard index >= 0 && index < queueDepth else { continue }
                aioInFlight -= 1
                finishAIO(core.slots + index, result: Int(bitPattern: event.res))
                deliver(index, handler)
                delivered += 1
            }
            if completionRing == nil && n < queueDepth { break }
        }
        for worker in workers {
            while let index = worker.completions.pop() {
                deliver(Int(index), handler)
                delivered += 1
            }
        }
        while immediateCount > 0 {
            let index = Int(immediate[immediateHead])
            immediateHead = immediateHead + 1 == queueDepth ? 0 : immediateHead + 1
            immediateCount -= 1
            deliver(index, handler)
            delivered += 1
        }
        if pendingCount > 0 || immediateNeedsSignal || workersToWake != 0 { commit() }
        return delivered
    }

    @inline(__always)
    private func finishAIO(_ slot: UnsafeMutablePointer<IOSlot>, result: Int) {
        if result < 0 {
            slot.pointee.status = Int32(-result)
            slot.pointee.bytes = 0
            return
        }
        let length = slot.pointee.length
        let bytes = min(UInt64(result), length)
        slot.pointee.status = 0
        slot.pointee.bytes = slot.pointee.operation == .flush ? 0 : bytes
        if slot.pointee.bounced && slot.pointee.operation == .read && bytes > 0, let bounce = slot.pointee.bounce {
            slot.pointee.buffers.scatter(at: 0, from: UnsafeRawBufferPointer(start: bounce, count: Int(bytes)))
        }
    }

    @inline(__always)
    private func deliver(_ index: Int, _ handler: (UInt64, BlockResult) -> Void) {
        let slot = core.slots + index
        let token = slot.pointee.token
        let result = BlockResult(errno: slot.pointee.status, bytesTransferred: slot.pointee.bytes)
        slot.pointee.buffers = .empty
        releaseSlot(index)
        handler(token, result)
    }
}
