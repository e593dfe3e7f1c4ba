import BlockIO
import CSystem
import GuestMemoryMap
#if canImport(Glibc)
import Glibc
#endif

/// Why a descriptor chain was refused. The request is then failed (returned with length 0).
public enum DescriptorChainError: Error, Sendable, Equatable {
    /// A descriptor index past the end of its table.
    case descriptorOutOfTable(UInt32)
    /// More descriptors than the table holds: a loop.
    case loop
    /// A buffer of length 0.
    case zeroLength
    /// A buffer (or indirect table) outside the guest memory table.
    case outOfGuestMemory
    /// More segments than a request slot holds.
    case tooManySegments
    /// INDIRECT used without VIRTIO_F_RING_INDIRECT_DESC, not at the chain head, or together with NEXT.
    case misplacedIndirect
    /// An indirect descriptor inside an indirect table.
    case nestedIndirect
    /// Indirect table length 0 or not a multiple of 16.
    case badIndirectTable
    /// A device-readable buffer after a device-writable one.
    case readableAfterWritable
}

/// A parsed request: its id and its buffers as host iovecs in the slot's preallocated storage
/// (readable ones first, then writable ones). Valid until the id is returned with `push`.
public struct DescriptorChain: @unchecked Sendable {
    /// The id to return in the used ring (split: head index; packed: buffer id).
    public var head: UInt16
    /// Ring entries the chain occupied (packed rings advance the used position by this much).
    public var ringEntries: UInt16
    /// Start of the slot's iovecs.
    public var vectors: UnsafeMutablePointer<iovec>
    /// Number of device-readable iovecs (first in `vectors`).
    public var readableCount: Int
    /// Number of device-writable iovecs (after the readable ones).
    public var writableCount: Int
    /// Total device-readable bytes.
    public var readableBytes: UInt64
    /// Total device-writable bytes.
    public var writableBytes: UInt64

    /// The device-readable buffers.
    public var readable: IOVectorList { IOVectorList(base: vectors, count: readableCount) }
    /// The device-writable buffers.
    public var writable: IOVectorList { IOVectorList(base: vectors + readableCount, count: writableCount) }
}

/// What `Virtqueue.pop` found.
public enum VirtqueuePopResult: Sendable {
    /// Nothing available.
    case empty
    /// A well-formed request.
    case chain(DescriptorChain)
    /// A malformed request: return it with `push(head:ringEntries:length: 0)` and do not touch its buffers.
    case invalid(head: UInt16, ringEntries: UInt16, DescriptorChainError)
    /// The ring itself is corrupt; the queue is now broken and does no more work.
    case broken
}

/// Why a virtqueue could not be started.
public enum VirtqueueSetupError: Error, Sendable, Equatable, CustomStringConvertible {
    case badSize(Int)
    case ringOutsideMemory(area: String)
    case misaligned(area: String)

    public var description: String {
        switch self {
        case let .badSize(n): return "queue size \(n) is invalid"
        case let .ringOutsideMemory(area): return "\(area) lies outside guest memory"
        case let .misaligned(area): return "\(area) is misaligned"
        }
    }
}

/// One virtqueue (split or packed) over guest memory, driven by a single event-loop thread.
///
/// Every index, descriptor and address read from the ring is checked; a malformed chain fails that
/// request and ring corruption (avail index jump, id out of range, id already in flight, endless
/// packed chain) marks the queue broken. Buffers land in per-slot iovec storage allocated once.
public final class Virtqueue: @unchecked Sendable {
    /// Number of descriptors.
    public let size: Int
    /// Ring format and features.
    public let options: VirtqueueOptions
    /// Iovecs per request slot.
    public let segmentsPerSlot: Int
    /// The memory table the ring pointers were resolved against.
    public private(set) var memory: GuestMemory

    private var desc: UnsafeMutableRawPointer
    private var driver: UnsafeMutableRawPointer
    private var device: UnsafeMutableRawPointer
    private let addresses: VirtqueueAddresses

    // Split state.
    private var lastAvail: UInt16 = 0
    private var usedIndex: UInt16 = 0
    // Packed state.
    private var availPosition: UInt16 = 0
    private var availWrap = true
    private var usedPosition: UInt16 = 0
    private var usedWrap = true
    // Notification state.
    private var lastSignalledUsed: UInt16 = 0
    private var pendingUsed = 0

    private let busy: UnsafeMutablePointer<Bool>
    private let slotVectors: UnsafeMutablePointer<iovec>
    // The public counters and flags below are read from other modules, so Swift cannot prove their accesses
    // free of overlap and checks each at run time (about 100 instructions, seven per request in pop and
    // push). A queue is used on its loop thread only and no access to them spans a call: the checks are off.
    /// Requests popped and not yet pushed back.
    @exclusivity(unchecked) public private(set) var inFlight = 0
    /// Requests popped and pushed since the queue started (progress counters for watchdogs).
    @exclusivity(unchecked) public private(set) var popCount: UInt64 = 0
    @exclusivity(unchecked) public private(set) var pushCount: UInt64 = 0
    /// Whether the queue found its ring corrupt and stopped.
    @exclusivity(unchecked) public private(set) var isBroken = false
    /// Why the queue broke (for the log).
    @exclusivity(unchecked) public private(set) var brokenReason = ""

    /// Optional in-flight tracking region for this queue (vhost-user INFLIGHT_SHMFD, split rings).
    private var inflight: InflightQueueRegion?
    /// The same for packed rings.
    private var packedInflight: InflightPackedRegion?
    /// Packed buffers a previous back-end left in flight, popped again first (from their saved descriptors).
    private var packedResubmit: [(id: UInt16, entry: UInt16, count: UInt16)] = []
    private var packedResubmitCursor = 0

    /// Creates a queue over rings at `addresses` (VMM user addresses) in `memory`.
    /// `base` is the vhost-user ring base: split: next avail index; packed: bits 0-14 avail position,
    /// bit 15 avail wrap counter, bits 16-30 used position, bit 31 used wrap counter (0 there: same as avail).
    public init(size: Int, options: VirtqueueOptions, addresses: VirtqueueAddresses, memory: GuestMemory,
                base: UInt32, segmentsPerSlot: Int) throws(VirtqueueSetupError) {
        guard size > 0, size <= 32768, options.packed || size & (size - 1) == 0 else { throw .badSize(size) }
        self.size = size
        self.options = options
        self.addresses = addresses
        self.memory = memory
        self.segmentsPerSlot = max(1, segmentsPerSlot)
        let rings = try Self.resolve(size: size, options: options, addresses: addresses, memory: memory)
        desc = rings.0
        driver = rings.1
        device = rings.2
        busy = .allocate(capacity: size)
        busy.initialize(repeating: false, count: size)
        slotVectors = .allocate(capacity: size * self.segmentsPerSlot)
        slotVectors.initialize(repeating: iovec(iov_base: nil, iov_len: 0), count: size * self.segmentsPerSlot)
        writtenVectors = .allocate(capacity: size)
        writtenVectors.initialize(repeating: 0, count: size)
        if options.packed {
            availPosition = UInt16(base & 0x7FFF) % UInt16(size)
            availWrap = base & 0x8000 != 0
            if base >> 16 == 0 {
                usedPosition = availPosition
                usedWrap = availWrap
            } else {
                usedPosition = UInt16((base >> 16) & 0x7FFF) % UInt16(size)
                usedWrap = base & 0x8000_0000 != 0
            }
            lastSignalledUsed = usedPosition
        } else {
            lastAvail = UInt16(truncatingIfNeeded: base)
            usedIndex = csys_load_acquire_u16(device + 2)
            lastSignalledUsed = usedIndex
        }
    }

    deinit {
        busy.deallocate()
        slotVectors.deallocate()
        writtenVectors.deallocate()
    }

    private static func resolve(size: Int, options: VirtqueueOptions, addresses: VirtqueueAddresses,
                                memory: GuestMemory) throws(VirtqueueSetupError)
        -> (UnsafeMutableRawPointer, UnsafeMutableRawPointer, UnsafeMutableRawPointer) {
        let n = UInt64(size)
        let descBytes = 16 * n
        let driverBytes: UInt64 = options.packed ? 4 : 6 + 2 * n
        let deviceBytes: UInt64 = options.packed ? 4 : 6 + 8 * n
        guard addresses.descriptorTable % 16 == 0 else { throw .misaligned(area: "descriptor table") }
        guard addresses.driverArea % 2 == 0 else { throw .misaligned(area: "driver area") }
        guard addresses.deviceArea % 4 == 0 else { throw .misaligned(area: "device area") }
        guard let d = memory.pointer(userAddress: addresses.descriptorTable, length: descBytes) else {
            throw .ringOutsideMemory(area: "descriptor table")
        }
        guard let a = memory.pointer(userAddress: addresses.driverArea, length: driverBytes) else {
            throw .ringOutsideMemory(area: "driver area")
        }
        guard let u = memory.pointer(userAddress: addresses.deviceArea, length: deviceBytes) else {
            throw .ringOutsideMemory(area: "device area")
        }
        return (d, a, u)
    }

    /// Switches to a new memory table (SET_MEM_TABLE while running). Returns false and breaks the
    /// queue when the rings are no longer inside guest memory.
    @discardableResult
    public func updateMemory(_ newMemory: GuestMemory) -> Bool {
        do {
            let rings = try Self.resolve(size: size, options: options, addresses: addresses, memory: newMemory)
            memory = newMemory
            desc = rings.0
            driver = rings.1
            device = rings.2
            return true
        } catch {
            memory = newMemory
            markBroken("rings outside the new memory table: \(error)")
            return false
        }
    }

    /// Attaches in-flight tracking (split rings only). Call before the first pop. Requests the
    /// region still marks in flight (a previous back-end died with them) are popped again first, and
    /// the avail index resumes after them. Returns how many will be resubmitted.
    @discardableResult
    public func attachInflight(_ region: InflightQueueRegion) -> Int {
        guard !options.packed, region.size == size else { return 0 }
        inflight = region
        let n = size
        let used = device
        let pending = region.recover(publishedUsedIndex: usedIndex) { i in
            UInt16(truncatingIfNeeded: used.loadUnaligned(fromByteOffset: 4 + 8 * Int(i % UInt16(n)), as: UInt32.self).littleEndian)
        }
        resubmit = pending
        resubmitCursor = 0
        if !pending.isEmpty { lastAvail = usedIndex &+ UInt16(truncatingIfNeeded: pending.count) }
        return pending.count
    }

    private var resubmit: [UInt16] = []
    private var resubmitCursor = 0

    /// Attaches packed-ring in-flight tracking. Call before the first pop. Buffers the region still
    /// marks in flight are popped again first, from the descriptors the region saved; the used
    /// position continues where the region recorded it and the avail position after the resubmitted
    /// chains. Returns how many will be resubmitted.
    @discardableResult
    public func attachInflight(packed region: InflightPackedRegion) -> Int {
        guard options.packed, region.size == size else { return 0 }
        packedInflight = region
        let table = desc
        let n = size
        let recovery = region.recover(fallbackUsedPosition: usedPosition, fallbackUsedWrap: usedWrap) { position in
            csys_load_acquire_u16(table + 16 * (Int(position) % n) + 14)
        }
        packedResubmit = recovery.buffers
        packedResubmitCursor = 0
        // With nothing in flight the recovered position is the region's own (the device's real position) or the base.
        usedPosition = recovery.usedPosition % UInt16(size)
        usedWrap = recovery.usedWrap
        let advanced = Int(usedPosition) + recovery.ringEntries
        availWrap = advanced >= size ? !usedWrap : usedWrap
        availPosition = UInt16(advanced % size)
        lastSignalledUsed = usedPosition
        return recovery.buffers.count
    }

    /// Pops a packed buffer a previous back-end left in flight, from its saved descriptors.
    private func popPackedResubmitted() -> VirtqueuePopResult {
        let b = packedResubmit[packedResubmitCursor]
        packedResubmitCursor += 1
        guard Int(b.id) < size, !busy[Int(b.id)], let region = packedInflight else { return popPacked() }
        busy[Int(b.id)] = true
        inFlight += 1
        popCount &+= 1
        var chain = DescriptorChain(head: b.id, ringEntries: b.count, vectors: vectors(of: b.id), readableCount: 0,
                                    writableCount: 0, readableBytes: 0, writableBytes: 0)
        var count = 0
        var sawWritable = false
        for k in 0..<Int(b.count) {
            guard let d = region.savedDescriptor(entry: b.entry, k) else {
                return .invalid(head: b.id, ringEntries: b.count, .descriptorOutOfTable(UInt32(k)))
            }
            if d.flags & 4 != 0 {
                guard options.indirect, b.count == 1 else {
                    return .invalid(head: b.id, ringEntries: b.count, .misplacedIndirect)
                }
                if let error = appendIndirect(d.address, d.length, to: &chain, count: &count, sawWritable: &sawWritable) {
                    return .invalid(head: b.id, ringEntries: b.count, error)
                }
                return .chain(chain)
            }
            if let error = append(d.address, d.length, writable: d.flags & 2 != 0, to: &chain, count: &count, sawWritable: &sawWritable) {
                return .invalid(head: b.id, ringEntries: b.count, error)
            }
        }
        return .chain(chain)
    }

    /// Marks the queue broken with a reason; it then pops nothing.
    public func markBroken(_ reason: String) {
        if !isBroken { brokenReason = reason }
        isBroken = true
    }

    /// The vhost-user ring base to report in GET_VRING_BASE.
    public var ringBase: UInt32 {
        if options.packed {
            return UInt32(availPosition) | (availWrap ? 0x8000 : 0) | UInt32(usedPosition) << 16 | (usedWrap ? 0x8000_0000 : 0)
        }
        return UInt32(lastAvail)
    }

    /// The iovec storage of slot `id`.
    @inline(__always)
    public func vectors(of id: UInt16) -> UnsafeMutablePointer<iovec> { slotVectors + Int(id) * segmentsPerSlot }

    // MARK: Available side

    /// Whether the driver has made a buffer available that has not been popped.
    public var hasAvailable: Bool {
        if isBroken { return false }
        if options.packed { return packedResubmitCursor < packedResubmit.count || packedAvailable(at: availPosition, wrap: availWrap) }
        if resubmitCursor < resubmit.count { return true }
        return csys_load_acquire_u16(driver + 2) != lastAvail
    }

    /// Takes the next available request.
    public func pop() -> VirtqueuePopResult {
        if isBroken { return .broken }
        let result = options.packed ? popPacked() : popSplit()
        recordWritable(result)
        return result
    }

    private func popSplit() -> VirtqueuePopResult {
        if resubmitCursor < resubmit.count {
            let head = resubmit[resubmitCursor]
            resubmitCursor += 1
            guard Int(head) < size, !busy[Int(head)] else { return popSplit() }
            busy[Int(head)] = true
            inFlight += 1
            popCount &+= 1
            inflight?.begin(head)
            switch walkSplit(head: head) {
            case let .success(chain): return .chain(chain)
            case let .failure(error): return .invalid(head: head, ringEntries: 1, error)
            }
        }
        let availIdx = csys_load_acquire_u16(driver + 2)
        let pending = availIdx &- lastAvail
        if pending == 0 { return .empty }
        if Int(pending) > size {
            markBroken("avail index jumped by \(pending) (queue size \(size))")
            return .broken
        }
        let head = csys_load_relaxed_u16(driver + 4 + 2 * Int(lastAvail % UInt16(size)))
        guard Int(head) < size else {
            markBroken("avail ring entry \(head) is past the descriptor table (size \(size))")
            return .broken
        }
        guard !busy[Int(head)] else {
            markBroken("descriptor \(head) made available while still in flight")
            return .broken
        }
        lastAvail &+= 1
        busy[Int(head)] = true
        inFlight += 1
        popCount &+= 1
        if let inflight { inflight.begin(head) }
        switch walkSplit(head: head) {
        case let .success(chain): return .chain(chain)
        case let .failure(error): return .invalid(head: head, ringEntries: 1, error)
        }
    }

    private func walkSplit(head: UInt16) -> Result<DescriptorChain, DescriptorChainError> {
        var chain = DescriptorChain(head: head, ringEntries: 1, vectors: vectors(of: head), readableCount: 0,
                                    writableCount: 0, readableBytes: 0, writableBytes: 0)
        var table = desc
        var tableSize = size
        var index = Int(head)
        var walked = 0
        var inIndirect = false
        var count = 0
        var sawWritable = false
        while true {
            guard index < tableSize else { return .failure(.descriptorOutOfTable(UInt32(index))) }
            walked += 1
            guard walked <= tableSize else { return .failure(.loop) }
            let d = table + 16 * index
            let addr = d.loadUnaligned(as: UInt64.self).littleEndian
            let len = d.loadUnaligned(fromByteOffset: 8, as: UInt32.self).littleEndian
            let flags = d.loadUnaligned(fromByteOffset: 12, as: UInt16.self).littleEndian
            let next = d.loadUnaligned(fromByteOffset: 14, as: UInt16.self).littleEndian
            if flags & 4 != 0 {
                if inIndirect { return .failure(.nestedIndirect) }
                guard options.indirect, walked == 1, flags & 1 == 0 else { return .failure(.misplacedIndirect) }
                guard len > 0, len % 16 == 0 else { return .failure(.badIndirectTable) }
                guard let t = memory.pointer(guestPhysical: addr, length: UInt64(len)) else {
                    return .failure(.outOfGuestMemory)
                }
                table = t
                tableSize = Int(len / 16)
                index = 0
                walked = 0
                inIndirect = true
                continue
            }
            guard len > 0 else { return .failure(.zeroLength) }
            let writable = flags & 2 != 0
            if writable {
                sawWritable = true
            } else if sawWritable {
                return .failure(.readableAfterWritable)
            }
            switch memory.translate(guestPhysical: addr, length: len, write: writable, into: chain.vectors, start: count,
                                    capacity: segmentsPerSlot) {
            case let .ok(n):
                count += n
                if writable {
                    chain.writableCount += n
                    chain.writableBytes += UInt64(len)
                } else {
                    chain.readableCount += n
                    chain.readableBytes += UInt64(len)
                }
            case .outOfRange: return .failure(.outOfGuestMemory)
            case .tooManySegments: return .failure(.tooManySegments)
            }
            guard flags & 1 != 0 else { break }
            index = Int(next)
        }
        return .success(chain)
    }

    @inline(__always)
    private func packedAvailable(at position: UInt16, wrap: Bool) -> Bool {
        let flags = csys_load_acquire_u16(desc + 16 * Int(position) + 14)
        let avail = flags & 0x80 != 0
        let used = flags & 0x8000 != 0
        return avail == wrap && used != wrap
    }

    private func popPacked() -> VirtqueuePopResult {
        if packedResubmitCursor < packedResubmit.count { return popPackedResubmitted() }
        guard packedAvailable(at: availPosition, wrap: availWrap) else { return .empty }
        // Find the end of the chain: the buffer id is in its last descriptor.
        var position = availPosition
        var entries = 0
        var flags = csys_load_relaxed_u16(desc + 16 * Int(position) + 14)
        while true {
            entries += 1
            if entries > size {
                markBroken("packed descriptor chain longer than the queue")
                return .broken
            }
            if flags & 1 == 0 { break }
            position = position + 1 == UInt16(size) ? 0 : position + 1
            flags = csys_load_relaxed_u16(desc + 16 * Int(position) + 14)
        }
        let id = desc.loadUnaligned(fromByteOffset: 16 * Int(position) + 12, as: UInt16.self).littleEndian
        guard Int(id) < size else {
            markBroken("packed buffer id \(id) out of range (queue size \(size))")
            return .broken
        }
        guard !busy[Int(id)] else {
            markBroken("packed buffer id \(id) reused while in flight")
            return .broken
        }
        let start = availPosition
        let advanced = Int(availPosition) + entries
        if advanced >= size {
            availPosition = UInt16(advanced - size)
            availWrap.toggle()
        } else {
            availPosition = UInt16(advanced)
        }
        busy[Int(id)] = true
        inFlight += 1
        popCount &+= 1
        if let packedInflight {
            let table = desc
            let n = size
            packedInflight.begin(id: id, count: entries, usedPosition: usedPosition, usedWrap: usedWrap) { k in
                let d = table + 16 * ((Int(start) + k) % n)
                return SavedPackedDescriptor(address: d.loadUnaligned(as: UInt64.self).littleEndian,
                                             length: d.loadUnaligned(fromByteOffset: 8, as: UInt32.self).littleEndian,
                                             flags: d.loadUnaligned(fromByteOffset: 14, as: UInt16.self).littleEndian,
                                             id: d.loadUnaligned(fromByteOffset: 12, as: UInt16.self).littleEndian)
            }
        }
        switch walkPacked(start: start, entries: entries, id: id) {
        case let .success(chain): return .chain(chain)
        case let .failure(error): return .invalid(head: id, ringEntries: UInt16(entries), error)
        }
    }

    private func walkPacked(start: UInt16, entries: Int, id: UInt16) -> Result<DescriptorChain, DescriptorChainError> {
        var chain = DescriptorChain(head: id, ringEntries: UInt16(entries), vectors: vectors(of: id), readableCount: 0,
                                    writableCount: 0, readableBytes: 0, writableBytes: 0)
        var count = 0
        var sawWritable = false
        var position = Int(start)
        for e in 0..<entries {
            let d = desc + 16 * position
            position = position + 1 == size ? 0 : position + 1
            let addr = d.loadUnaligned(as: UInt64.self).littleEndian
            let len = d.loadUnaligned(fromByteOffset: 8, as: UInt32.self).littleEndian
            let flags = d.loadUnaligned(fromByteOffset: 14, as: UInt16.self).littleEndian
            if flags & 4 != 0 {
                guard options.indirect, entries == 1, e == 0 else { return .failure(.misplacedIndirect) }
                if let error = appendIndirect(addr, len, to: &chain, count: &count, sawWritable: &sawWritable) {
                    return .failure(error)
                }
                return .success(chain)
            }
            if let error = append(addr, len, writable: flags & 2 != 0, to: &chain, count: &count, sawWritable: &sawWritable) {
                return .failure(error)
            }
        }
        return .success(chain)
    }

    /// Appends the buffers of a packed indirect table.
    private func appendIndirect(_ addr: UInt64, _ len: UInt32, to chain: inout DescriptorChain, count: inout Int,
                                sawWritable: inout Bool) -> DescriptorChainError? {
        guard len > 0, len % 16 == 0 else { return .badIndirectTable }
        guard let table = memory.pointer(guestPhysical: addr, length: UInt64(len)) else { return .outOfGuestMemory }
        let n = Int(len / 16)
        for i in 0..<n {
            let t = table + 16 * i
            let taddr = t.loadUnaligned(as: UInt64.self).littleEndian
            let tlen = t.loadUnaligned(fromByteOffset: 8, as: UInt32.self).littleEndian
            let tflags = t.loadUnaligned(fromByteOffset: 14, as: UInt16.self).littleEndian
            if tflags & 4 != 0 { return .nestedIndirect }
            if let error = append(taddr, tlen, writable: tflags & 2 != 0, to: &chain, count: &count, sawWritable: &sawWritable) {
                return error
            }
        }
        return nil
    }

    @inline(__always)
    private func append(_ addr: UInt64, _ len: UInt32, writable: Bool, to chain: inout DescriptorChain, count: inout Int,
                        sawWritable: inout Bool) -> DescriptorChainError? {
        guard len > 0 else { return .zeroLength }
        if writable {
            sawWritable = true
        } else if sawWritable {
            return .readableAfterWritable
        }
        switch memory.translate(guestPhysical: addr, length: len, write: writable, into: chain.vectors, start: count,
                                capacity: segmentsPerSlot) {
        case let .ok(n):
            count += n
            if writable {
                chain.writableCount += n
                chain.writableBytes += UInt64(len)
            } else {
                chain.readableCount += n
                chain.readableBytes += UInt64(len)
            }
            return nil
        case .outOfRange: return .outOfGuestMemory
        case .tooManySegments: return .tooManySegments
        }
    }

    // MARK: Used side

    /// Returns request `head` to the driver with `length` bytes written. Visible after `flush`
    /// (split) or at once (packed, whose entries carry their own flags).
    public func push(head: UInt16, ringEntries: UInt16 = 1, length: UInt32) {
        guard Int(head) < size, busy[Int(head)] else { return }
        busy[Int(head)] = false
        inFlight -= 1
        pushCount &+= 1
        if isBroken { return }
        if let dirtyLog { logWritable(head, dirtyLog) }
        pendingUsed += 1
        if options.packed {
            let d = desc + 16 * Int(usedPosition)
            let flags: UInt16 = usedWrap ? 0x8080 : 0
            let advanced = Int(usedPosition) + Int(max(1, ringEntries))
            let nextPosition = UInt16(advanced >= size ? advanced - size : advanced)
            let nextWrap = advanced >= size ? !usedWrap : usedWrap
            if let packedInflight { packedInflight.willComplete(id: head, usedPosition: nextPosition, usedWrap: nextWrap) }
            d.storeBytes(of: head.littleEndian, toByteOffset: 12, as: UInt16.self)
            d.storeBytes(of: length.littleEndian, toByteOffset: 8, as: UInt32.self)
            csys_store_release_u16(d + 14, (flags | (length > 0 ? 2 : 0)).littleEndian)
            usedPosition = nextPosition
            usedWrap = nextWrap
            if let packedInflight { packedInflight.completed(id: head) }
        } else {
            if let inflight { inflight.willComplete(head) }
            let e = device + 4 + 8 * Int(usedIndex % UInt16(size))
            e.storeBytes(of: UInt32(head).littleEndian, as: UInt32.self)
            e.storeBytes(of: length.littleEndian, toByteOffset: 4, as: UInt32.self)
            usedIndex &+= 1
            if let inflight { inflight.completed(head) }
        }
    }

    /// Publishes pushed entries and says whether the driver wants an interrupt for them
    /// (VRING_AVAIL_F_NO_INTERRUPT, used_event, or the packed driver event suppression).
    public func flush() -> Bool {
        guard pendingUsed > 0, !isBroken else { return false }
        pendingUsed = 0
        if options.packed {
            // The entries were written in `push`: log them now, after the writes.
            if let dirtyLog { logUsedRing(dirtyLog) }
            csys_fence_seq_cst()
            let offWrap = csys_load_relaxed_u16(driver)
            let flags = csys_load_relaxed_u16(driver + 2) & 3
            let old = lastSignalledUsed
            lastSignalledUsed = usedPosition
            switch flags {
            case 0: return true
            case 1: return false
            default:
                guard options.eventIndex else { return true }
                var off = offWrap & 0x7FFF
                let wrap = offWrap >> 15 != 0
                if wrap != usedWrap { off = off &- UInt16(size) }
                return (usedPosition &- off &- 1) < (usedPosition &- old)
            }
        }
        csys_store_release_u16(device + 2, usedIndex)
        // Logged after the index is written (as libvhost-user does): a VMM that reads and clears the log
        // between a mark and its write would otherwise copy the page without the write and lose it.
        if let dirtyLog { logUsedRing(dirtyLog) }
        if let inflight { inflight.published(usedIndex: usedIndex) }
        csys_fence_seq_cst()
        let old = lastSignalledUsed
        lastSignalledUsed = usedIndex
        if options.eventIndex {
            let usedEvent = csys_load_relaxed_u16(driver + 4 + 2 * size)
            return (usedIndex &- usedEvent &- 1) < (usedIndex &- old)
        }
        return csys_load_relaxed_u16(driver) & 1 == 0
    }

    /// Whether the driver may be waiting for an interrupt about entries already published: split rings
    /// with EVENT_IDX say so precisely (the driver sets used_event to the last entry it consumed when it
    /// re-enables interrupts, so used_event behind the used index means entries it has not seen);
    /// otherwise true unless the driver disabled interrupts.
    public var driverAwaitsInterrupt: Bool {
        if isBroken { return false }
        if options.packed { return csys_load_acquire_u16(driver + 2) & 3 != 1 }
        if options.eventIndex { return csys_load_acquire_u16(driver + 4 + 2 * size) != usedIndex }
        return csys_load_acquire_u16(driver) & 1 == 0
    }

    /// Whether `driverAwaitsInterrupt` is exact (split ring with EVENT_IDX).
    public var interruptNeedIsExact: Bool { !options.packed && options.eventIndex }

    // MARK: Kick suppression for adaptive polling

    /// Asks the driver not to kick (while the loop polls the ring).
    public func disableNotifications() {
        if options.packed {
            csys_store_relaxed_u16(device + 2, 1)
            if dirtyLog != nil { logDeviceArea(offset: 2) }
        } else if !options.eventIndex {
            csys_store_relaxed_u16(device, 1)
            if dirtyLog != nil { logDeviceArea(offset: 0) }
        }
    }

    /// Asks the driver to kick again, then re-checks the ring. Returns true when work arrived
    /// meanwhile (the caller must not sleep).
    public func enableNotificationsAndCheck() -> Bool {
        if isBroken { return false }
        if options.packed {
            csys_store_relaxed_u16(device + 2, 0)
            if dirtyLog != nil { logDeviceArea(offset: 2) }
        } else if options.eventIndex {
            csys_store_relaxed_u16(device + 4 + 8 * size, lastAvail)
            if dirtyLog != nil { logDeviceArea(offset: 4 + 8 * size) }
        } else {
            csys_store_relaxed_u16(device, 0)
            if dirtyLog != nil { logDeviceArea(offset: 0) }
        }
        csys_fence_seq_cst()
        return hasAvailable
    }

    // MARK: Dirty logging (live migration)

    /// The dirty-page log while the front-end migrates (nil otherwise: the data path then pays one
    /// branch in `push` and one in `flush`). Set on the queue's loop thread with `setDirtyLog`.
    private var dirtyLog: DirtyLog?
    /// Guest physical address of the split used ring (vhost-user `log_guest_addr`), nil when the front-end
    /// did not ask for used-ring logging (VHOST_VRING_F_LOG).
    private var usedRingLogAddress: UInt64?
    /// Per slot: device-readable iovec count (low 16 bits) and device-writable count (high 16 bits) of the
    /// request in flight there, recorded at pop so that its writable buffers are known at push.
    private let writtenVectors: UnsafeMutablePointer<UInt32>

    /// Starts (`log` non-nil) or stops dirty logging. From then on every push marks the pages of the
    /// request's device-writable buffers (data-in, status, response, sense: whatever the device may have
    /// written) before the used entry is written, and every flush marks the used-ring entries and index it
    /// publishes when `usedRingLogAddress` is set (split: the used ring at that guest address; packed: the
    /// descriptor ring entries written back, at the descriptor table's guest address). Requests popped
    /// before logging started are covered too (their buffers were recorded at pop).
    public func setDirtyLog(_ log: DirtyLog?, usedRingLogAddress: UInt64?) {
        dirtyLog = log
        self.usedRingLogAddress = usedRingLogAddress
        deviceAreaLogAddress = usedRingLogAddress.flatMap {
            options.packed ? memory.guestPhysical(userAddress: addresses.deviceArea) : $0
        }
    }

    /// Guest physical address of the device area (split: the used ring; packed: the device event suppression
    /// structure) while used-ring logging is on.
    private var deviceAreaLogAddress: UInt64?

    /// Marks the 2 bytes the device wrote at `offset` in its area: the notification flags, the split avail_event
    /// or the packed device event suppression (the VMM copies them like any other write).
    private func logDeviceArea(offset: Int) {
        guard let dirtyLog, let base = deviceAreaLogAddress else { return }
        dirtyLog.mark(guestPhysical: base + UInt64(offset), length: 2)
    }

    @inline(__always)
    private func recordWritable(_ result: VirtqueuePopResult) {
        switch result {
        case let .chain(chain): writtenVectors[Int(chain.head)] = UInt32(chain.readableCount & 0xFFFF) | UInt32(chain.writableCount & 0xFFFF) << 16
        case let .invalid(head, _, _): if Int(head) < size { writtenVectors[Int(head)] = 0 }
        default: break
        }
    }

    /// Marks the pages of request `head`'s device-writable buffers.
    private func logWritable(_ head: UInt16, _ log: DirtyLog) {
        let record = writtenVectors[Int(head)]
        let first = Int(record & 0xFFFF)
        let count = Int(record >> 16)
        guard first + count <= segmentsPerSlot else { return }
        let v = vectors(of: head) + first
        for i in 0..<count {
            guard let base = v[i].iov_base, let gpa = memory.guestPhysical(host: base) else { continue }
            log.mark(guestPhysical: gpa, length: UInt64(v[i].iov_len))
        }
    }

    /// Marks the used-ring entries published since the last flush, and the split used index.
    private func logUsedRing(_ log: DirtyLog) {
        guard let used = usedRingLogAddress else { return }
        if options.packed {
            guard let table = memory.guestPhysical(userAddress: addresses.descriptorTable) else { return }
            let distance = (Int(usedPosition) - Int(lastSignalledUsed) + size) % size
            markRing(log, base: table, entryBytes: 16, from: Int(lastSignalledUsed), count: distance == 0 ? size : distance)
        } else {
            log.mark(guestPhysical: used + 2, length: 2)
            markRing(log, base: used + 4, entryBytes: 8, from: Int(lastSignalledUsed % UInt16(size)),
                     count: min(size, Int(usedIndex &- lastSignalledUsed)))
        }
    }

    /// Marks `count` ring entries from `from`, wrapping at the ring size.
    private func markRing(_ log: DirtyLog, base: UInt64, entryBytes: Int, from: Int, count: Int) {
        let head = min(count, size - from)
        log.mark(guestPhysical: base + UInt64(from * entryBytes), length: UInt64(head * entryBytes))
        if count > head { log.mark(guestPhysical: base, length: UInt64((count - head) * entryBytes)) }
    }
}
