import BlockIO
import CSystem
import Synchronization
import Virtio
import VirtioDevices
#if canImport(Glibc)
import Glibc
#endif

/// Guest RAM for tests: a memfd mapped here, with a bump allocator of guest-physical addresses.
/// The VMM "user address" is deliberately different from the host pointer so translation is exercised.
public final class TestGuestRAM: @unchecked Sendable {
    public let fd: Int32
    public let size: Int
    public let host: UnsafeMutableRawPointer
    public let gpaBase: UInt64 = 0x1_0000_0000
    public let userBase: UInt64 = 0x7F00_0000_0000
    private var next = 0

    public init(size: Int = 8 << 20) {
        self.size = size
        fd = csys_memfd_create("test-guest", 0)
        precondition(fd >= 0)
        precondition(ftruncate(fd, off_t(size)) == 0)
        let p = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        precondition(p != MAP_FAILED && p != nil)
        host = p!
    }

    deinit {
        munmap(host, size)
        close(fd)
    }

    /// Allocates `bytes` (aligned) and returns the guest physical address.
    public func alloc(_ bytes: Int, align: Int = 64) -> UInt64 {
        next = (next + align - 1) & ~(align - 1)
        let offset = next
        next += bytes
        precondition(next <= size)
        host.advanced(by: offset).initializeMemory(as: UInt8.self, repeating: 0, count: bytes)
        return gpaBase + UInt64(offset)
    }

    public func pointer(_ gpa: UInt64) -> UnsafeMutableRawPointer { host + Int(gpa - gpaBase) }
    public func user(_ gpa: UInt64) -> UInt64 { userBase + (gpa - gpaBase) }

    public func write(_ bytes: [UInt8], at gpa: UInt64) { bytes.withUnsafeBytes { pointer(gpa).copyMemory(from: $0.baseAddress!, byteCount: bytes.count) } }
    public func read(_ gpa: UInt64, _ count: Int) -> [UInt8] { (0..<count).map { pointer(gpa).load(fromByteOffset: $0, as: UInt8.self) } }

    public var regionPayload: [UInt8] {
        var p = [UInt8]()
        p.appendLE(gpaBase)
        p.appendLE(UInt64(size))
        p.appendLE(userBase)
        p.appendLE(UInt64(0))
        return p
    }
}

/// A driver-side split ring in test guest memory.
public final class TestSplitRing: @unchecked Sendable {
    public let ram: TestGuestRAM
    public let size: Int
    public let desc: UInt64
    public let avail: UInt64
    public let used: UInt64
    public var availIdx: UInt16 = 0
    public var nextFree = 0
    public var lastUsed: UInt16 = 0

    public init(ram: TestGuestRAM, size: Int) {
        self.ram = ram
        self.size = size
        desc = ram.alloc(16 * size, align: 16)
        avail = ram.alloc(6 + 2 * size, align: 2)
        used = ram.alloc(6 + 8 * size, align: 4)
    }

    public struct Buffer {
        public var gpa: UInt64
        public var length: UInt32
        public var writable: Bool
        public init(gpa: UInt64, length: UInt32, writable: Bool) {
            self.gpa = gpa
            self.length = length
            self.writable = writable
        }
    }

    public func setDescriptor(_ i: Int, addr: UInt64, len: UInt32, flags: UInt16, next: UInt16) {
        let d = ram.pointer(desc) + 16 * i
        d.storeBytes(of: addr.littleEndian, as: UInt64.self)
        d.storeBytes(of: len.littleEndian, toByteOffset: 8, as: UInt32.self)
        d.storeBytes(of: flags.littleEndian, toByteOffset: 12, as: UInt16.self)
        d.storeBytes(of: next.littleEndian, toByteOffset: 14, as: UInt16.self)
    }

    /// Writes a chain of buffers at free descriptors and returns its head (not yet published).
    @discardableResult
    public func addChain(_ buffers: [Buffer]) -> UInt16 {
        let head = nextFree
        for (k, b) in buffers.enumerated() {
            let i = (head + k) % size
            let last = k == buffers.count - 1
            setDescriptor(i, addr: b.gpa, len: b.length, flags: (last ? 0 : 1) | (b.writable ? 2 : 0), next: UInt16((i + 1) % size))
        }
        nextFree = (head + buffers.count) % size
        return UInt16(head)
    }

    /// A chain through an indirect table.
    public func addIndirect(_ buffers: [Buffer]) -> UInt16 {
        let table = ram.alloc(16 * buffers.count, align: 16)
        for (k, b) in buffers.enumerated() {
            let d = ram.pointer(table) + 16 * k
            let last = k == buffers.count - 1
            d.storeBytes(of: b.gpa, as: UInt64.self)
            d.storeBytes(of: b.length, toByteOffset: 8, as: UInt32.self)
            d.storeBytes(of: (last ? 0 : 1) | (b.writable ? 2 : 0) as UInt16, toByteOffset: 12, as: UInt16.self)
            d.storeBytes(of: UInt16(k + 1), toByteOffset: 14, as: UInt16.self)
        }
        let head = nextFree
        setDescriptor(head, addr: table, len: UInt32(16 * buffers.count), flags: 4, next: 0)
        nextFree = (head + 1) % size
        return UInt16(head)
    }

    /// Puts `head` in the avail ring and publishes the index.
    public func publish(_ head: UInt16) {
        let a = ram.pointer(avail)
        a.storeBytes(of: head, toByteOffset: 4 + 2 * Int(availIdx % UInt16(size)), as: UInt16.self)
        availIdx &+= 1
        csys_store_release_u16(a + 2, availIdx)
    }

    public func setAvailIndex(_ v: UInt16) { csys_store_release_u16(ram.pointer(avail) + 2, v) }
    public var usedIndex: UInt16 { csys_load_acquire_u16(ram.pointer(used) + 2) }
    public var usedFlags: UInt16 { csys_load_acquire_u16(ram.pointer(used)) }
    public func setAvailFlags(_ v: UInt16) { csys_store_release_u16(ram.pointer(avail), v) }
    public func setUsedEvent(_ v: UInt16) { ram.pointer(avail).storeBytes(of: v, toByteOffset: 4 + 2 * size, as: UInt16.self) }
    public var availEvent: UInt16 { csys_load_acquire_u16(ram.pointer(used) + 4 + 8 * size) }

    /// The used element at position `i`.
    public func usedElement(_ i: UInt16) -> (id: UInt32, len: UInt32) {
        let e = ram.pointer(used) + 4 + 8 * Int(i % UInt16(size))
        return (e.load(as: UInt32.self), e.load(fromByteOffset: 4, as: UInt32.self))
    }

    public var addressPayload: [UInt8] { [] }
}

/// An in-memory back-end: requests complete on `commit`, signalled through an eventfd (or, when
/// `synchronous`, with no completion fd at all: the device reaps right after committing).
public final class MemoryChannel: BlockChannel, @unchecked Sendable {
    public let storage: UnsafeMutableRawBufferPointer
    public let completionFD: Int32
    private var queued: [(UInt64, BlockResult)] = []
    private var ready: [(UInt64, BlockResult)] = []
    public let operations = Mutex<[BlockOperation]>([])
    /// When set, completions wait until `release` is called (to test draining and TMFs).
    public let hold = Atomic<Bool>(false)
    private var held: [(UInt64, BlockResult)] = []
    public let releaseFD: Int32

    public init(bytes: Int, synchronous: Bool = false) {
        storage = .allocate(byteCount: bytes, alignment: 4096)
        storage.initializeMemory(as: UInt8.self, repeating: 0)
        completionFD = synchronous ? -1 : csys_eventfd(0, 1)
        releaseFD = csys_eventfd(0, 1)
    }

    deinit {
        storage.deallocate()
        if completionFD >= 0 { Glibc.close(completionFD) }
        Glibc.close(releaseFD)
    }

    public func submit(_ request: BlockRequest, token: UInt64) -> Int32 {
        operations.withLock { $0.append(request.operation) }
        let off = Int(request.offset)
        let len = Int(request.length)
        guard off + len <= storage.count else { queued.append((token, .failure(EIO))); return 0 }
        switch request.operation {
        case .read:
            let n = request.buffers.scatter(at: 0, from: UnsafeRawBufferPointer(rebasing: storage[off..<(off + len)]))
            queued.append((token, .success(UInt64(n))))
        case .write:
            let n = request.buffers.gather(from: 0, into: UnsafeMutableRawBufferPointer(rebasing: storage[off..<(off + len)]))
            queued.append((token, .success(UInt64(n))))
        case .flush:
            queued.append((token, .success(0)))
        case .discard, .writeZeroes:
            UnsafeMutableRawBufferPointer(rebasing: storage[off..<(off + len)]).initializeMemory(as: UInt8.self, repeating: 0)
            queued.append((token, .success(0)))
        }
        return 0
    }

    public func commit() {
        if hold.load(ordering: .acquiring) {
            held += queued
        } else {
            ready += queued
            if completionFD >= 0 { _ = csys_eventfd_signal(completionFD, 1) }
        }
        queued.removeAll()
    }

    /// Called on the loop thread (via the completion fd) after `releaseHeld`.
    public func reap(_ handler: (UInt64, BlockResult) -> Void) -> Int {
        var v: UInt64 = 0
        _ = csys_eventfd_drain(completionFD, &v)
        if !hold.load(ordering: .acquiring) && !held.isEmpty {
            ready += held
            held.removeAll()
        }
        let items = ready
        ready.removeAll()
        for (t, r) in items { handler(t, r) }
        return items.count
    }

    /// Lets held completions go (from any thread: the loop picks them up on the next reap).
    public func releaseHeld() {
        hold.store(false, ordering: .releasing)
        _ = csys_eventfd_signal(completionFD, 1)
    }

    public var inFlight: Int { queued.count + ready.count + held.count }

    /// Tokens the device asked to abort, and how many LUN resets it asked for (loop thread).
    public let abortedTokens = Mutex<[UInt64]>([])
    public let resets = Atomic<Int>(0)
    /// When set, `abort` and `resetLogicalUnit` succeed: the held request(s) complete with ECANCELED
    /// (as the iSCSI back-end does when the target honours ABORT TASK / LUN RESET).
    public let cancels = Atomic<Bool>(false)

    public func abort(token: UInt64) -> Bool {
        abortedTokens.withLock { $0.append(token) }
        guard cancels.load(ordering: .acquiring) else { return false }
        cancel { $0 == token }
        return true
    }

    public func resetLogicalUnit() -> Bool {
        resets.add(1, ordering: .relaxed)
        guard cancels.load(ordering: .acquiring) else { return false }
        cancel { _ in true }
        return true
    }

    /// Completes the held requests matching `which` with ECANCELED (on the loop thread).
    private func cancel(_ which: (UInt64) -> Bool) {
        var kept: [(UInt64, BlockResult)] = []
        for item in held {
            if which(item.0) { ready.append((item.0, .failure(ECANCELED))) } else { kept.append(item) }
        }
        held = kept
        _ = csys_eventfd_signal(completionFD, 1)
    }

    /// How many times the device closed this channel.
    public let closeCount = Atomic<Int>(0)
    public func close() { closeCount.add(1, ordering: .relaxed) }

    public func bytes(_ offset: Int, _ count: Int) -> [UInt8] { Array(storage[offset..<(offset + count)]) }
}

/// Waits until `condition` holds (polling), up to `seconds`.
public func waitFor(seconds: Double = 5, _ condition: () -> Bool) -> Bool {
    let deadline = Double(clockSeconds()) + seconds
    while clockSeconds() < deadline {
        if condition() { return true }
        usleep(1000)
    }
    return condition()
}

public func clockSeconds() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

/// A unique socket path for a test.
public func testSocketPath(_ name: String) -> String {
    "/tmp/sg-\(name)-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock"
}



/// A virtio-scsi command laid out in guest RAM, ready for `TestSplitRing.addChain`: the request header
/// (LUN, tag, CDB padded to 32 bytes), the data-out buffer, the response and the data-in buffer.
public struct TestSCSIRequest {
    public var buffers: [TestSplitRing.Buffer]
    /// Guest address of the response (virtio_scsi_cmd_resp).
    public var response: UInt64
    /// Guest address of the data-in buffer (0 when there is none).
    public var dataIn: UInt64
    public init(buffers: [TestSplitRing.Buffer], response: UInt64, dataIn: UInt64) {
        self.buffers = buffers
        self.response = response
        self.dataIn = dataIn
    }
}

extension TestGuestRAM {
    /// Writes one virtio-scsi command into guest RAM (`dataAlign`: alignment of the data buffers, 4096 for
    /// O_DIRECT back-ends that take them zero-copy).
    public func scsiRequest(lun: [UInt8] = [1, 0, 0x40, 0, 0, 0, 0, 0], tag: UInt64, cdb: [UInt8], out: [UInt8] = [],
                     inLength: Int = 0, responseLength: Int = 108, dataAlign: Int = 64) -> TestSCSIRequest {
        var req = lun
        req.appendLE(tag)
        req += [0, 0, 0]
        req += cdb + [UInt8](repeating: 0, count: 32 - cdb.count)
        let r = alloc(req.count)
        write(req, at: r)
        var buffers = [TestSplitRing.Buffer(gpa: r, length: UInt32(req.count), writable: false)]
        if !out.isEmpty {
            let d = alloc(out.count, align: dataAlign)
            write(out, at: d)
            buffers.append(.init(gpa: d, length: UInt32(out.count), writable: false))
        }
        let response = alloc(responseLength)
        buffers.append(.init(gpa: response, length: UInt32(responseLength), writable: true))
        var dataIn: UInt64 = 0
        if inLength > 0 {
            dataIn = alloc(inLength, align: dataAlign)
            buffers.append(.init(gpa: dataIn, length: UInt32(inLength), writable: true))
        }
        return TestSCSIRequest(buffers: buffers, response: response, dataIn: dataIn)
    }
}

extension TestGuestRAM {
    /// The device-readable part of a virtio-blk request in guest RAM: the 16-byte header (type, sector) and,
    /// when `out` is not empty, the data-out buffer (each allocated at `align`).
    public func blkRequestOut(type: UInt32, sector: UInt64, out: [UInt8] = [], align: Int = 64) -> [TestSplitRing.Buffer] {
        let header = alloc(16, align: align)
        var h = [UInt8]()
        h.appendLE(type)
        h.appendLE(UInt32(0))
        h.appendLE(sector)
        write(h, at: header)
        var buffers = [TestSplitRing.Buffer(gpa: header, length: 16, writable: false)]
        if !out.isEmpty {
            let d = alloc(out.count, align: align)
            write(out, at: d)
            buffers.append(.init(gpa: d, length: UInt32(out.count), writable: false))
        }
        return buffers
    }
}

/// A driver-side packed ring in test guest memory.
public final class TestPackedRing: @unchecked Sendable {
    public let ram: TestGuestRAM
    public let size: Int
    public let desc: UInt64
    public let driverEvent: UInt64
    public let deviceEvent: UInt64
    public var next = 0
    public var wrap = true

    public init(ram: TestGuestRAM, size: Int) {
        self.ram = ram
        self.size = size
        desc = ram.alloc(16 * size, align: 16)
        driverEvent = ram.alloc(4, align: 4)
        deviceEvent = ram.alloc(4, align: 4)
    }

    /// Makes a chain available under buffer `id` (head flags written last); returns its first position.
    @discardableResult
    public func add(id: UInt16, _ buffers: [TestSplitRing.Buffer]) -> Int {
        let start = next
        var headFlags: UInt16 = 0
        for (k, b) in buffers.enumerated() {
            let d = ram.pointer(desc) + 16 * next
            d.storeBytes(of: b.gpa, as: UInt64.self)
            d.storeBytes(of: b.length, toByteOffset: 8, as: UInt32.self)
            d.storeBytes(of: id, toByteOffset: 12, as: UInt16.self)
            let flags: UInt16 = (k < buffers.count - 1 ? 1 : 0) | (b.writable ? 2 : 0) | (wrap ? 0x80 : 0x8000)
            if k == 0 { headFlags = flags } else { d.storeBytes(of: flags, toByteOffset: 14, as: UInt16.self) }
            next += 1
            if next == size { next = 0; wrap.toggle() }
        }
        csys_store_release_u16(ram.pointer(desc) + 16 * start + 14, headFlags)
        return start
    }

    /// The descriptor at `position` as the device left it (id, length, flags).
    public func used(at position: Int) -> (id: UInt16, len: UInt32, flags: UInt16) {
        let d = ram.pointer(desc) + 16 * position
        return (d.load(fromByteOffset: 12, as: UInt16.self), d.load(fromByteOffset: 8, as: UInt32.self),
                csys_load_acquire_u16(d + 14))
    }

    /// Whether the device wrote a used descriptor at `position` for wrap counter `wrap`.
    public func isUsed(at position: Int, wrap: Bool) -> Bool {
        let f = used(at: position).flags
        return (f & 0x80 != 0) == wrap && (f & 0x8000 != 0) == wrap
    }
}

extension TestGuestRAM {
    /// A virtio-blk request in this RAM: the header, the data out, room for the data in and the status
    /// byte (0xFF until the device writes it), as the buffers of one chain.
    public func blkRequest(type: UInt32, sector: UInt64, out: [UInt8] = [], inLength: Int = 0)
        -> (buffers: [TestSplitRing.Buffer], status: UInt64) {
        var buffers = blkRequestOut(type: type, sector: sector, out: out)
        if inLength > 0 { buffers.append(.init(gpa: alloc(inLength), length: UInt32(inLength), writable: true)) }
        let status = alloc(1)
        pointer(status).storeBytes(of: 0xFF, as: UInt8.self)
        buffers.append(.init(gpa: status, length: 1, writable: true))
        return (buffers, status)
    }
}
