import CSystem
#if canImport(Glibc)
import Glibc
#endif

/// One libFuzzer target: a name (the corpus directory under Tests/Fuzz/Corpus), the function that feeds
/// one input to the real code, and the meaningful seed inputs it starts from.
public struct FuzzTarget: Sendable {
    /// Name used by `Tests/Fuzz/fuzz.sh` and as the corpus directory name.
    public let name: String
    /// What the target drives.
    public let summary: String
    /// Feeds one input. Crashes (traps, sanitizer reports) are the findings; the function returns normally otherwise.
    public let run: @Sendable (UnsafeRawBufferPointer) -> Void
    /// Seed inputs: (file name, bytes).
    public let seeds: @Sendable () -> [(String, [UInt8])]

    public init(name: String, summary: String, run: @escaping @Sendable (UnsafeRawBufferPointer) -> Void,
                seeds: @escaping @Sendable () -> [(String, [UInt8])]) {
        self.name = name
        self.summary = summary
        self.run = run
        self.seeds = seeds
    }

    /// Runs one input given as an array (replay, tests).
    public func run(_ bytes: [UInt8]) {
        bytes.withUnsafeBytes { run($0) }
    }
}

/// Every target, in `fuzz.sh --list` order.
public enum FuzzTargets {
    public static let all: [FuzzTarget] = [
        VirtqueueFuzz.split, VirtqueueFuzz.packed,
        VirtioDeviceFuzz.scsi, VirtioDeviceFuzz.blk,
        VhostUserMessageFuzz.target,
        VfioUserMessageFuzz.target, PVSCSIFuzz.target, VfioUserVirtioFuzz.target,
        CDBFuzz.target,
        ConfigFuzz.target, JSONRPCFuzz.target,
    ]

    public static func named(_ name: String) -> FuzzTarget? { all.first { $0.name == name } }
}

/// Reads a fuzz input front to back; past the end it yields zeroes, so every input is usable.
public struct FuzzReader {
    let bytes: UnsafeRawBufferPointer
    public private(set) var offset = 0

    public init(_ bytes: UnsafeRawBufferPointer) { self.bytes = bytes }

    public var remaining: Int { max(0, bytes.count - offset) }
    public var isEmpty: Bool { remaining == 0 }

    public mutating func u8() -> UInt8 {
        guard offset < bytes.count else { return 0 }
        defer { offset += 1 }
        return bytes[offset]
    }

    public mutating func u16() -> UInt16 { UInt16(u8()) | UInt16(u8()) << 8 }
    public mutating func u32() -> UInt32 { UInt32(u16()) | UInt32(u16()) << 16 }
    public mutating func u64() -> UInt64 { UInt64(u32()) | UInt64(u32()) << 32 }

    /// Up to `count` bytes (fewer at the end).
    public mutating func take(_ count: Int) -> UnsafeRawBufferPointer {
        let n = min(max(0, count), remaining)
        defer { offset += n }
        return UnsafeRawBufferPointer(rebasing: bytes[offset ..< offset + n])
    }

    /// Everything left.
    public mutating func rest() -> UnsafeRawBufferPointer { take(remaining) }
}

/// Little-endian byte building for seeds.
public struct SeedBytes {
    public var bytes: [UInt8] = []
    public init() {}
    public mutating func u8(_ v: UInt8) { bytes.append(v) }
    public mutating func u16(_ v: UInt16) { withUnsafeBytes(of: v.littleEndian) { bytes += $0 } }
    public mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { bytes += $0 } }
    public mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { bytes += $0 } }
    public mutating func append(_ b: [UInt8]) { bytes += b }
    public mutating func zeros(_ n: Int) { bytes += [UInt8](repeating: 0, count: n) }
}

/// A memfd of `size` bytes mapped shared: guest RAM for the device targets.
final class SharedRAM: @unchecked Sendable {
    let fd: Int32
    let size: Int
    let host: UnsafeMutableRawPointer

    init(size: Int, name: String) {
        self.size = size
        fd = csys_memfd_create(name, 0)
        precondition(fd >= 0, "memfd_create failed")
        precondition(ftruncate(fd, off_t(size)) == 0, "ftruncate failed")
        let p = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        precondition(p != MAP_FAILED && p != nil, "mmap failed")
        host = p!
    }

    /// Zeroes the RAM and copies `bytes` to `offset` (clipped at the end).
    func load(_ bytes: UnsafeRawBufferPointer, at offset: Int) {
        let n = min(bytes.count, size - offset)
        if n > 0 { (host + offset).copyMemory(from: bytes.baseAddress!, byteCount: n) }
    }

    func clear() { host.initializeMemory(as: UInt8.self, repeating: 0, count: size) }
}

/// A private scratch directory for the sockets and files of one target (removed at exit by the OS tmp cleaner;
/// the fuzzer runs for the life of the process).
func scratchDirectory(_ tag: String) -> String {
    var template = Array("/tmp/scsigate-fuzz-\(tag)-XXXXXX".utf8CString)
    let p = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
    precondition(p != nil, "mkdtemp failed")
    return String(cString: p!)
}

/// A connected unix stream socket (client side of a vhost-user or vfio-user server).
final class UnixClient {
    let fd: Int32

    init?(path: String) {
        fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return nil }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in bytes.prefix(raw.count - 1).enumerated() { raw[i] = b }
        }
        var tv = timeval(tv_sec: 10, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        let r = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        if r != 0 { Glibc.close(fd); return nil }
    }

    deinit { Glibc.close(fd) }

    /// Sends `bytes` with `fds` attached; false when the peer is gone.
    @discardableResult
    func send(_ bytes: UnsafeRawBufferPointer, fds: [Int32] = []) -> Bool {
        var sent = 0
        var first = true
        while sent < bytes.count || (first && bytes.isEmpty && !fds.isEmpty) {
            let n = fds.withUnsafeBufferPointer { f in
                csys_send_with_fds(fd, bytes.baseAddress.map { $0 + sent }, bytes.count - sent, first ? f.baseAddress : nil, first ? Int32(f.count) : 0)
            }
            if n <= 0 { return false }
            first = false
            sent += n
            if bytes.isEmpty { break }
        }
        return true
    }

    func send(_ bytes: [UInt8], fds: [Int32] = []) -> Bool { bytes.withUnsafeBytes { send($0, fds: fds) } }

    /// Reads exactly `count` bytes (nil on EOF, error or timeout); received fds are closed.
    func receive(_ count: Int) -> [UInt8]? {
        var out = [UInt8](repeating: 0, count: count)
        var got = 0
        while got < count {
            var fds = [Int32](repeating: -1, count: 8)
            var nfds: Int32 = 0
            var truncated: Int32 = 0
            let n = out.withUnsafeMutableBytes { b in
                fds.withUnsafeMutableBufferPointer { f in
                    csys_recv_with_fds(fd, b.baseAddress! + got, count - got, f.baseAddress, 8, &nfds, &truncated)
                }
            }
            for f in fds.prefix(Int(nfds)) { Glibc.close(f) }
            if n <= 0 { return nil }
            got += n
        }
        return out
    }

    /// Half-closes and reads until the server closes its end (it has then handled every message).
    func finish() {
        shutdown(fd, Int32(SHUT_WR))
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            var fds = [Int32](repeating: -1, count: 8)
            var nfds: Int32 = 0
            var truncated: Int32 = 0
            let n = buffer.withUnsafeMutableBytes { b in
                fds.withUnsafeMutableBufferPointer { f in
                    csys_recv_with_fds(fd, b.baseAddress!, b.count, f.baseAddress, 8, &nfds, &truncated)
                }
            }
            for f in fds.prefix(Int(nfds)) { Glibc.close(f) }
            if n <= 0 { return }
        }
    }
}

/// File descriptors a fuzz input may attach to a message: kind 0 memfd (64 KiB), 1 eventfd, 2 /dev/null,
/// 3 a closed number. The caller closes them after sending (the receiver got its own copies).
func makeFuzzFD(kind: UInt8) -> Int32 {
    switch kind % 4 {
    case 0:
        let fd = csys_memfd_create("fuzz-fd", 0)
        if fd >= 0 { _ = ftruncate(fd, 64 << 10) }
        return fd
    case 1: return csys_eventfd(0, 1)
    case 2: return open("/dev/null", O_RDWR | O_CLOEXEC)
    default: return -1
    }
}

/// Sends a stream of chunks read from `reader` on `client`: each chunk is one byte of fd kinds
/// (bits 0-2: how many fds, up to 7, bits 3-7 select kinds), a 16-bit length and that many bytes.
/// This lets the fuzzer split messages across writes and attach fds anywhere, as a hostile front-end can.
func sendChunks(_ reader: inout FuzzReader, on client: UnixClient, maxChunks: Int = 64) {
    var chunks = 0
    while !reader.isEmpty && chunks < maxChunks {
        chunks += 1
        let control = reader.u8()
        let count = Int(control & 7)
        var fds: [Int32] = []
        for i in 0 ..< count {
            let fd = makeFuzzFD(kind: UInt8(truncatingIfNeeded: (Int(control) >> 3) &+ i))
            if fd >= 0 { fds.append(fd) }
        }
        let length = Int(reader.u16())
        let data = reader.take(length)
        let ok = client.send(data, fds: fds)
        for f in fds { Glibc.close(f) }
        if !ok { return }
    }
}

/// Seed helper: one chunk (see `sendChunks`).
func chunk(_ bytes: [UInt8], fds: [UInt8] = []) -> [UInt8] {
    var control = UInt8(fds.count)
    if let k = fds.first { control |= k << 3 }
    var s = SeedBytes()
    s.u8(control)
    s.u16(UInt16(bytes.count))
    s.append(bytes)
    return s.bytes
}
