import VirtioTestSupport
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

/// A vhost-user front-end (the VMM side) for tests.
public final class TestFrontEnd {
    public let fd: Int32

    public init?(path: String) {
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
    public func send(_ request: UInt32, _ payload: [UInt8] = [], fds: [Int32] = [], needReply: Bool = false, sizeOverride: UInt32? = nil) -> Bool {
        var bytes = [UInt8]()
        bytes.appendLE(request)
        bytes.appendLE(UInt32(1) | (needReply ? VhostUserWire.flagNeedReply : 0))
        bytes.appendLE(sizeOverride ?? UInt32(payload.count))
        bytes += payload
        let n = bytes.withUnsafeBytes { b in fds.withUnsafeBufferPointer { csys_send_with_fds(fd, b.baseAddress, b.count, $0.baseAddress, Int32($0.count)) } }
        return n == bytes.count
    }

    public func send(_ request: VhostUserRequest, _ payload: [UInt8] = [], fds: [Int32] = [], needReply: Bool = false) {
        send(request.rawValue, payload, fds: fds, needReply: needReply)
    }

    /// Reads a reply; nil on EOF/timeout.
    public func receive() -> (request: UInt32, payload: [UInt8], fds: [Int32])? {
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

    public func getU64(_ request: VhostUserRequest) -> UInt64? {
        send(request)
        guard let r = receive(), r.request == request.rawValue else { return nil }
        return r.payload.readLE(UInt64.self, at: 0)
    }

    /// Sends with need-reply and returns the ack value (0 success).
    public func ack(_ request: VhostUserRequest, _ payload: [UInt8] = [], fds: [Int32] = []) -> UInt64? {
        send(request, payload, fds: fds, needReply: true)
        guard let r = receive(), r.request == request.rawValue else { return nil }
        return r.payload.readLE(UInt64.self, at: 0)
    }

    /// Whether the server closed the connection.
    public func isClosed() -> Bool {
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        guard poll(&p, 1, 5000) == 1 else { return false }
        var b: UInt8 = 0
        return recv(fd, &b, 1, Int32(MSG_PEEK) | Int32(MSG_DONTWAIT)) <= 0
    }

    public static func u64(_ v: UInt64) -> [UInt8] { var p = [UInt8](); p.appendLE(v); return p }
    public static func state(_ index: UInt32, _ num: UInt32) -> [UInt8] { var p = [UInt8](); p.appendLE(index); p.appendLE(num); return p }

    /// Negotiates features, memory and ring 0...n-1 as QEMU does. Returns the kick and call eventfds.
    /// `waitForRings`: false sends the ring starts without asking for replies (a start the server holds).
    public func setUp(ram: TestGuestRAM, rings: [TestSplitRing], features: UInt64, protocolFeatures: UInt64,
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
    public func startRing(_ index: UInt32, _ ring: TestSplitRing, ram: TestGuestRAM, base: UInt32 = 0,
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
    public func getVringBase(_ i: UInt32) -> UInt32? {
        send(.getVringBase, Self.state(i, 0))
        guard let r = receive(), r.request == VhostUserRequest.getVringBase.rawValue else { return nil }
        return r.payload.readLE(UInt32.self, at: 4)
    }
}

