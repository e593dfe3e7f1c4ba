import BlockIO
import CSystem
import Synchronization
import Testing
import VhostUser
import VirtioDevices
import Virtio
#if canImport(Glibc)
import Glibc
#endif

/// Guest RAM for tests: a memfd mapped here, with a bump allocator of guest-physical addresses.
/// The VMM "user address" is deliberately different from the host pointer so translation is exercised.
final class TestGuestRAM: @unchecked Sendable {
    let fd: Int32
    let size: Int
    let host: UnsafeMutableRawPointer
    let gpaBase: UInt64 = 0x1_0000_0000
    let userBase: UInt64 = 0x7F00_0000_0000
    private var next = 0

    init(size: Int = 8 << 20) {
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
    func alloc(_ bytes: Int, align: Int = 64) -> UInt64 {
        next = (next + align - 1) & ~(align - 1)
        let offset = next
        next += bytes
        precondition(next <= size)
        host.advanced(by: offset).initializeMemory(as: UInt8.self, repeating: 0, count: bytes)
        return gpaBase + UInt64(offset)
    }

    func pointer(_ gpa: UInt64) -> UnsafeMutableRawPointer { host + Int(gpa - gpaBase) }
    func user(_ gpa: UInt64) -> UInt64 { userBase + (gpa - gpaBase) }

    func write(_ bytes: [UInt8], at gpa: UInt64) { bytes.withUnsafeBytes { pointer(gpa).copyMemory(from: $0.baseAddress!, byteCount: bytes.count) } }
    func read(_ gpa: UInt64, _ count: Int) -> [UInt8] { (0..<count).map { pointer(gpa).load(fromByteOffset: $0, as: UInt8.self) } }

    var regionPayload: [UInt8] {
        var p = [UInt8]()
        p.appendLE(gpaBase)
        p.appendLE(UInt64(size))
        p.appendLE(userBase)
        p.appendLE(UInt64(0))
        return p
    }
}

/// A driver-side split ring in test guest memory.
final class TestSplitRing: @unchecked Sendable {
    let ram: TestGuestRAM
    let size: Int
    let desc: UInt64
    let avail: UInt64
    let used: UInt64
    var availIdx: UInt16 = 0
    var nextFree = 0
    var lastUsed: UInt16 = 0

    init(ram: TestGuestRAM, size: Int) {
        self.ram = ram
        self.size = size
        desc = ram.alloc(16 * size, align: 16)
        avail = ram.alloc(6 + 2 * size, align: 2)
        used = ram.alloc(6 + 8 * size, align: 4)
    }

    struct Buffer {
        var gpa: UInt64
        var length: UInt32
        var writable: Bool
    }

    func setDescriptor(_ i: Int, addr: UInt64, len: UInt32, flags: UInt16, next: UInt16) {
        let d = ram.pointer(desc) + 16 * i
        d.storeBytes(of: addr.littleEndian, as: UInt64.self)
        d.storeBytes(of: len.littleEndian, toByteOffset: 8, as: UInt32.self)
        d.storeBytes(of: flags.littleEndian, toByteOffset: 12, as: UInt16.self)
        d.storeBytes(of: next.littleEndian, toByteOffset: 14, as: UInt16.self)
    }

    /// Writes a chain of buffers at free descriptors and returns its head (not yet published).
    @discardableResult
    func addChain(_ buffers: [Buffer]) -> UInt16 {
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
    func addIndirect(_ buffers: [Buffer]) -> UInt16 {
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
    func publish(_ head: UInt16) {
        let a = ram.pointer(avail)
        a.storeBytes(of: head, toByteOffset: 4 + 2 * Int(availIdx % UInt16(size)), as: UInt16.self)
        availIdx &+= 1
        csys_store_release_u16(a + 2, availIdx)
    }

    func setAvailIndex(_ v: UInt16) { csys_store_release_u16(ram.pointer(avail) + 2, v) }
    var usedIndex: UInt16 { csys_load_acquire_u16(ram.pointer(used) + 2) }
    var usedFlags: UInt16 { csys_load_acquire_u16(ram.pointer(used)) }
    func setAvailFlags(_ v: UInt16) { csys_store_release_u16(ram.pointer(avail), v) }
    func setUsedEvent(_ v: UInt16) { ram.pointer(avail).storeBytes(of: v, toByteOffset: 4 + 2 * size, as: UInt16.self) }
    var availEvent: UInt16 { csys_load_acquire_u16(ram.pointer(used) + 4 + 8 * size) }

    /// The used element at position `i`.
    func usedElement(_ i: UInt16) -> (id: UInt32, len: UInt32) {
        let e = ram.pointer(used) + 4 + 8 * Int(i % UInt16(size))
        return (e.load(as: UInt32.self), e.load(fromByteOffset: 4, as: UInt32.self))
    }

    var addressPayload: [UInt8] { [] }
}

/// An in-memory back-end: requests complete on `commit`, signalled through an eventfd (or, when
/// `synchronous`, with no completion fd at all: the device reaps right after committing).
final class MemoryChannel: BlockChannel, @unchecked Sendable {
    let storage: UnsafeMutableRawBufferPointer
    let completionFD: Int32
    private var queued: [(UInt64, BlockResult)] = []
    private var ready: [(UInt64, BlockResult)] = []
    let operations = Mutex<[BlockOperation]>([])
    /// When set, completions wait until `release` is called (to test draining and TMFs).
    let hold = Atomic<Bool>(false)
    private var held: [(UInt64, BlockResult)] = []
    let releaseFD: Int32

    init(bytes: Int, synchronous: Bool = false) {
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

    func submit(_ request: BlockRequest, token: UInt64) -> Int32 {
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

    func commit() {
        if hold.load(ordering: .acquiring) {
            held += queued
        } else {
            ready += queued
            if completionFD >= 0 { _ = csys_eventfd_signal(completionFD, 1) }
        }
        queued.removeAll()
    }

    /// Called on the loop thread (via the completion fd) after `releaseHeld`.
    func reap(_ handler: (UInt64, BlockResult) -> Void) -> Int {
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
    func releaseHeld() {
        hold.store(false, ordering: .releasing)
        _ = csys_eventfd_signal(completionFD, 1)
    }

    var inFlight: Int { queued.count + ready.count + held.count }

    /// Tokens the device asked to abort, and how many LUN resets it asked for (loop thread).
    let abortedTokens = Mutex<[UInt64]>([])
    let resets = Atomic<Int>(0)
    /// When set, `abort` and `resetLogicalUnit` succeed: the held request(s) complete with ECANCELED
    /// (as the iSCSI back-end does when the target honours ABORT TASK / LUN RESET).
    let cancels = Atomic<Bool>(false)

    func abort(token: UInt64) -> Bool {
        abortedTokens.withLock { $0.append(token) }
        guard cancels.load(ordering: .acquiring) else { return false }
        cancel { $0 == token }
        return true
    }

    func resetLogicalUnit() -> Bool {
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
    let closeCount = Atomic<Int>(0)
    func close() { closeCount.add(1, ordering: .relaxed) }

    func bytes(_ offset: Int, _ count: Int) -> [UInt8] { Array(storage[offset..<(offset + count)]) }
}

/// A vhost-user front-end (the VMM side) for tests.
final class TestFrontEnd {
    let fd: Int32

    init?(path: String) {
        let s = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in path.utf8.enumerated() { raw[i] = b }
        }
        var ok = false
        for _ in 0..<200 {
            let rc = withUnsafePointer(to: &addr) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(s, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
            if rc == 0 { ok = true; break }
            usleep(10_000)
        }
        guard ok else { close(s); return nil }
        var tv = timeval(tv_sec: 10, tv_usec: 0)
        setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        fd = s
    }

    deinit { close(fd) }

    @discardableResult
    func send(_ request: UInt32, _ payload: [UInt8] = [], fds: [Int32] = [], needReply: Bool = false, sizeOverride: UInt32? = nil) -> Bool {
        var bytes = [UInt8]()
        bytes.appendLE(request)
        bytes.appendLE(UInt32(1) | (needReply ? VhostUserWire.flagNeedReply : 0))
        bytes.appendLE(sizeOverride ?? UInt32(payload.count))
        bytes += payload
        let n = bytes.withUnsafeBytes { b in fds.withUnsafeBufferPointer { csys_send_with_fds(fd, b.baseAddress, b.count, $0.baseAddress, Int32($0.count)) } }
        return n == bytes.count
    }

    func send(_ request: VhostUserRequest, _ payload: [UInt8] = [], fds: [Int32] = [], needReply: Bool = false) {
        send(request.rawValue, payload, fds: fds, needReply: needReply)
    }

    /// Reads a reply; nil on EOF/timeout.
    func receive() -> (request: UInt32, payload: [UInt8], fds: [Int32])? {
        var header = [UInt8](repeating: 0, count: 12)
        var fds = [Int32](repeating: -1, count: 8)
        var nfds: Int32 = 0
        var trunc: Int32 = 0
        let n = header.withUnsafeMutableBytes { b in fds.withUnsafeMutableBufferPointer { csys_recv_with_fds(fd, b.baseAddress, 12, $0.baseAddress, 8, &nfds, &trunc) } }
        guard n == 12 else { return nil }
        let size = Int(header.readLE(UInt32.self, at: 8)!)
        var payload = [UInt8](repeating: 0, count: size)
        if size > 0 {
            let m = payload.withUnsafeMutableBytes { recv(fd, $0.baseAddress, size, Int32(MSG_WAITALL)) }
            guard m == size else { return nil }
        }
        return (header.readLE(UInt32.self, at: 0)!, payload, Array(fds.prefix(Int(nfds))))
    }

    func getU64(_ request: VhostUserRequest) -> UInt64? {
        send(request)
        guard let r = receive(), r.request == request.rawValue else { return nil }
        return r.payload.readLE(UInt64.self, at: 0)
    }

    /// Sends with need-reply and returns the ack value (0 success).
    func ack(_ request: VhostUserRequest, _ payload: [UInt8] = [], fds: [Int32] = []) -> UInt64? {
        send(request, payload, fds: fds, needReply: true)
        guard let r = receive(), r.request == request.rawValue else { return nil }
        return r.payload.readLE(UInt64.self, at: 0)
    }

    /// Whether the server closed the connection.
    func isClosed() -> Bool {
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        guard poll(&p, 1, 5000) == 1 else { return false }
        var b: UInt8 = 0
        return recv(fd, &b, 1, Int32(MSG_PEEK) | Int32(MSG_DONTWAIT)) <= 0
    }

    static func u64(_ v: UInt64) -> [UInt8] { var p = [UInt8](); p.appendLE(v); return p }
    static func state(_ index: UInt32, _ num: UInt32) -> [UInt8] { var p = [UInt8](); p.appendLE(index); p.appendLE(num); return p }

    /// Negotiates features, memory and ring 0...n-1 as QEMU does. Returns the kick and call eventfds.
    /// `waitForRings`: false sends the ring starts without asking for replies (a start the server holds).
    func setUp(ram: TestGuestRAM, rings: [TestSplitRing], features: UInt64, protocolFeatures: UInt64,
               waitForRings: Bool = true) -> [(kick: Int32, call: Int32)] {
        let offered = getU64(.getFeatures) ?? 0
        #expect(offered & features == features)
        send(.setFeatures, Self.u64(features))
        let pf = getU64(.getProtocolFeatures) ?? 0
        #expect(pf & protocolFeatures == protocolFeatures)
        send(.setProtocolFeatures, Self.u64(protocolFeatures))
        send(.setOwner)
        var table = [UInt8]()
        table.appendLE(UInt32(1))
        table.appendLE(UInt32(0))
        table += ram.regionPayload
        #expect(ack(.setMemTable, table, fds: [ram.fd]) == 0)
        return rings.enumerated().map { startRing(UInt32($0.offset), $0.element, ram: ram, waitForAck: waitForRings) }
    }

    /// Sets up and starts ring `index` on `ring` from `base` (num, base, addresses, call, kick, enable), as QEMU
    /// does. Returns the new kick and call eventfds (the caller closes them).
    /// `waitForAck`: false sends the kick and enable without asking for replies (a start the server holds).
    func startRing(_ index: UInt32, _ ring: TestSplitRing, ram: TestGuestRAM, base: UInt32 = 0,
                   waitForAck: Bool = true) -> (kick: Int32, call: Int32) {
        send(.setVringNum, Self.state(index, UInt32(ring.size)))
        send(.setVringBase, Self.state(index, base))
        var addr = [UInt8]()
        addr.appendLE(index)
        addr.appendLE(UInt32(0))
        addr.appendLE(ram.user(ring.desc))
        addr.appendLE(ram.user(ring.used))
        addr.appendLE(ram.user(ring.avail))
        addr.appendLE(UInt64(0))
        send(.setVringAddr, addr)
        let kick = csys_eventfd(0, 1)
        let call = csys_eventfd(0, 1)
        send(.setVringCall, Self.u64(UInt64(index)), fds: [call])
        if waitForAck {
            #expect(ack(.setVringKick, Self.u64(UInt64(index)), fds: [kick]) == 0)
            #expect(ack(.setVringEnable, Self.state(index, 1)) == 0)
        } else {
            send(.setVringKick, Self.u64(UInt64(index)), fds: [kick])
            send(.setVringEnable, Self.state(index, 1))
        }
        return (kick, call)
    }

    /// Stops ring `i` and returns its base.
    func getVringBase(_ i: UInt32) -> UInt32? {
        send(.getVringBase, Self.state(i, 0))
        guard let r = receive(), r.request == VhostUserRequest.getVringBase.rawValue else { return nil }
        return r.payload.readLE(UInt32.self, at: 4)
    }
}

/// Waits until `condition` holds (polling), up to `seconds`.
func waitFor(seconds: Double = 5, _ condition: () -> Bool) -> Bool {
    let deadline = Double(clockSeconds()) + seconds
    while clockSeconds() < deadline {
        if condition() { return true }
        usleep(1000)
    }
    return condition()
}

func clockSeconds() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

/// A unique socket path for a test.
func testSocketPath(_ name: String) -> String {
    "/tmp/sg-\(name)-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock"
}

/// A log sink that records lines.
final class TestLog: @unchecked Sendable {
    let lines = Mutex<[String]>([])
    var logger: DeviceLogger { { [self] _, text in lines.withLock { $0.append(text) } } }
    func contains(_ s: String) -> Bool { lines.withLock { $0.contains { $0.contains(s) } } }
}


/// A virtio-scsi command laid out in guest RAM, ready for `TestSplitRing.addChain`: the request header
/// (LUN, tag, CDB padded to 32 bytes), the data-out buffer, the response and the data-in buffer.
struct TestSCSIRequest {
    var buffers: [TestSplitRing.Buffer]
    /// Guest address of the response (virtio_scsi_cmd_resp).
    var response: UInt64
    /// Guest address of the data-in buffer (0 when there is none).
    var dataIn: UInt64
}

extension TestGuestRAM {
    /// Writes one virtio-scsi command into guest RAM (`dataAlign`: alignment of the data buffers, 4096 for
    /// O_DIRECT back-ends that take them zero-copy).
    func scsiRequest(lun: [UInt8] = [1, 0, 0x40, 0, 0, 0, 0, 0], tag: UInt64, cdb: [UInt8], out: [UInt8] = [],
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
    func blkRequestOut(type: UInt32, sector: UInt64, out: [UInt8] = [], align: Int = 64) -> [TestSplitRing.Buffer] {
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
