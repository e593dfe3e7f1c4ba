import CSystem
import VfioUser
#if canImport(Glibc)
import Glibc
#endif

/// A reply as the test client received it.
public struct TestReply {
    public init(header: VfioUserHeader, payload: [UInt8]) {
        self.header = header
        self.payload = payload
    }
    public var header: VfioUserHeader
    public var payload: [UInt8]
    public var isError: Bool { header.isError }
    public var errorNumber: Int32 { Int32(bitPattern: header.errorNumber) }
    public func u32(_ o: Int) -> UInt32 { payload.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: o, as: UInt32.self) } }
    public func u64(_ o: Int) -> UInt64 { payload.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: o, as: UInt64.self) } }
}

/// Little-endian payload builder.
public struct Payload {
    public var bytes: [UInt8] = []
    public init() {}
    public mutating func u16(_ v: UInt16) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    public mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    public mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
}

public enum TestClientError: Error { case connect(Int32), io(String) }

/// How the test client answers the server's DMA_READ / DMA_WRITE requests.
public enum DMAServing {
    /// Serve them from `dmaMemory` (as QEMU does with pci_dma_read/write).
    case serve
    /// Never answer.
    case ignore
    /// Answer with a reply of the wrong size.
    case garbage
    /// Answer with an error reply (EFAULT).
    case refuse
    /// Answer with a reply far longer than any DMA reply may be (1 MiB + 4 KiB of payload).
    case oversized
}

/// A minimal blocking vfio-user client (the role QEMU's vfio-user-pci plays). It serves the server's
/// DMA_READ/DMA_WRITE requests from `dmaMemory` whenever it reads the socket.
public final class VfioUserTestClient {
    public let fd: Int32
    private var nextID: UInt16 = 1
    /// Guest memory reachable by DMA messages: [dmaBase, dmaBase + dmaSize).
    public var dmaMemory: UnsafeMutableRawPointer? = nil
    public var dmaBase: UInt64 = 0
    public var dmaSize = 0
    public var dmaServing = DMAServing.serve
    /// Requests served (reads, writes) and the largest count seen.
    public var dmaReadsServed = 0
    public var dmaWritesServed = 0
    public var largestDMA = 0
    /// Runs (once) when the next DMA request arrives, before it is answered.
    public var onDMARequest: ((VfioUserTestClient) throws -> Void)? = nil
    private var stashed: [UInt16: TestReply] = [:]

    public init(path: String) throws {
        var attempt = 0
        var s: Int32 = -1
        while attempt < 200 {
            s = csys_unix_connect(path)
            if s >= 0 { break }
            usleep(10_000)
            attempt += 1
        }
        guard s >= 0 else { throw TestClientError.connect(-s) }
        fd = s
        _ = csys_set_recv_timeout(fd, 5000)
    }

    deinit { close(fd) }

    /// Sends raw bytes (for malformed messages).
    public func sendRaw(_ bytes: [UInt8], fds: [Int32] = []) {
        bytes.withUnsafeBytes { raw in
            fds.withUnsafeBufferPointer { f in
                _ = csys_send_with_fds(fd, raw.baseAddress, raw.count, f.baseAddress, Int32(f.count))
            }
        }
    }

    /// Builds a message with a correct header.
    public func message(_ command: VfioUserCommand, _ payload: [UInt8], flags: UInt32 = 0, sizeOverride: UInt32? = nil) -> (UInt16, [UInt8]) {
        let id = nextID
        nextID &+= 1
        var bytes = [UInt8](repeating: 0, count: 16)
        let h = VfioUserHeader(messageID: id, command: command.rawValue,
                               size: sizeOverride ?? UInt32(16 + payload.count), flags: flags)
        bytes.withUnsafeMutableBytes { h.encode(into: $0) }
        return (id, bytes + payload)
    }

    /// Receives one message (blocking with timeout).
    public func receive() throws -> TestReply {
        var head = [UInt8](repeating: 0, count: 16)
        try readExactly(&head)
        guard let h = head.withUnsafeBytes({ VfioUserHeader($0) }) else { throw TestClientError.io("bad header") }
        guard h.size >= 16 else { throw TestClientError.io("reply size \(h.size)") }
        var body = [UInt8](repeating: 0, count: Int(h.size) - 16)
        if !body.isEmpty { try readExactly(&body) }
        return TestReply(header: h, payload: body)
    }

    private func readExactly(_ buffer: inout [UInt8]) throws {
        var got = 0
        let count = buffer.count
        while got < count {
            let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress! + got, count - got, 0) }
            if n > 0 { got += n; continue }
            if n < 0 && errno == EINTR { continue }
            throw TestClientError.io(n == 0 ? "end of stream" : "recv errno \(errno)")
        }
    }

    /// Sends a command and waits for its reply (serving DMA requests meanwhile).
    @discardableResult
    public func request(_ command: VfioUserCommand, _ payload: [UInt8] = [], fds: [Int32] = []) throws -> TestReply {
        let (id, bytes) = message(command, payload)
        sendRaw(bytes, fds: fds)
        return try awaitReply(id)
    }

    /// Receives until the reply to `id`, serving server requests in between.
    public func awaitReply(_ id: UInt16) throws -> TestReply {
        while true {
            if let r = stashed.removeValue(forKey: id) { return r }
            let r = try receive()
            if !r.header.isReply { try serve(r); continue }
            guard r.header.messageID == id else {
                // The reply of an outer request (a DMA request's hook sent this one while that reply was due).
                guard stashed.count < 8 else { throw TestClientError.io("reply id \(r.header.messageID) for \(id)") }
                stashed[r.header.messageID] = r
                continue
            }
            return r
        }
    }

    /// Serves every server request already waiting on the socket (or arriving within `milliseconds`).
    public func pump(milliseconds: Int32 = 0) throws {
        var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        while poll(&pfd, 1, milliseconds) == 1 {
            let r = try receive()
            guard !r.header.isReply else { throw TestClientError.io("unexpected reply \(r.header.messageID)") }
            try serve(r)
        }
    }

    /// Answers one DMA_READ / DMA_WRITE request according to `dmaServing`.
    public func serve(_ r: TestReply) throws {
        let h = r.header
        guard h.command == VfioUserCommand.dmaRead.rawValue || h.command == VfioUserCommand.dmaWrite.rawValue,
              r.payload.count >= 16 else { throw TestClientError.io("unexpected server request \(h.command)") }
        let address = r.u64(0)
        let count = Int(r.u64(8))
        largestDMA = max(largestDMA, count)
        let inside = address >= dmaBase && count >= 0 && Int(address - dmaBase) + count <= dmaSize && dmaMemory != nil
        func replyHeader(_ size: Int, error: UInt32 = 0) -> [UInt8] {
            var b = [UInt8](repeating: 0, count: 16)
            let reply = VfioUserHeader(messageID: h.messageID, command: h.command, size: UInt32(size),
                                       flags: VfioUserHeader.typeReply | (error != 0 ? VfioUserHeader.error : 0), errorNumber: error)
            b.withUnsafeMutableBytes { reply.encode(into: $0) }
            return b
        }
        if let hook = onDMARequest {
            onDMARequest = nil
            try hook(self)
        }
        switch dmaServing {
        case .ignore: return
        case .refuse: sendRaw(replyHeader(16, error: UInt32(EFAULT))); return
        case .oversized:
            let payload = [UInt8](repeating: 0xAB, count: (1 << 20) + 4096)
            sendRaw(replyHeader(16 + payload.count) + payload)
            return
        case .garbage:
            var p = Payload()
            p.u64(address); p.u64(UInt64(count))
            sendRaw(replyHeader(16 + 16 + 3) + p.bytes + [1, 2, 3])
            return
        case .serve: break
        }
        guard inside else { sendRaw(replyHeader(16, error: UInt32(EFAULT))); return }
        let host = dmaMemory! + Int(address - dmaBase)
        if h.command == VfioUserCommand.dmaRead.rawValue {
            dmaReadsServed += 1
            var p = Payload()
            p.u64(address); p.u64(UInt64(count))
            p.bytes += Array(UnsafeRawBufferPointer(start: host, count: count))
            sendRaw(replyHeader(16 + p.bytes.count) + p.bytes)
        } else {
            guard r.payload.count == 16 + count else { sendRaw(replyHeader(16, error: UInt32(EINVAL))); return }
            dmaWritesServed += 1
            r.payload.withUnsafeBytes { host.copyMemory(from: $0.baseAddress! + 16, byteCount: count) }
            sendRaw(replyHeader(16))  // as QEMU: the header alone
        }
    }

    /// Whether the server closed the connection (recv returns 0 within the timeout).
    public func serverClosed() -> Bool {
        var b: UInt8 = 0
        let n = recv(fd, &b, 1, 0)
        return n == 0
    }

    // MARK: Convenience

    public func negotiateVersion(maxDataTransfer: Int = 1048576) throws -> TestReply {
        var p = Payload()
        p.u16(0)
        p.u16(1)
        let json = "{\"capabilities\":{\"max_msg_fds\":16,\"max_data_xfer_size\":\(maxDataTransfer),\"pgsizes\":4096,\"migration\":{\"pgsize\":4096,\"max_bitmap_size\":1048576},\"write_multiple\":true}}"
        p.bytes += Array(json.utf8) + [0]
        return try request(.version, p.bytes)
    }

    public func dmaMap(address: UInt64, size: UInt64, offset: UInt64 = 0, flags: UInt32 = 3, fd: Int32?) throws -> TestReply {
        var p = Payload()
        p.u32(32)
        p.u32(flags)
        p.u64(offset)
        p.u64(address)
        p.u64(size)
        return try request(.dmaMap, p.bytes, fds: fd.map { [$0] } ?? [])
    }

    public func dmaUnmap(address: UInt64, size: UInt64, flags: UInt32 = 0) throws -> TestReply {
        var p = Payload()
        p.u32(24)
        p.u32(flags)
        p.u64(address)
        p.u64(size)
        return try request(.dmaUnmap, p.bytes)
    }

    public func regionRead(_ region: UInt32, offset: UInt64, count: UInt32) throws -> TestReply {
        var p = Payload()
        p.u64(offset)
        p.u32(region)
        p.u32(count)
        return try request(.regionRead, p.bytes)
    }

    public func regionWrite(_ region: UInt32, offset: UInt64, data: [UInt8]) throws -> TestReply {
        var p = Payload()
        p.u64(offset)
        p.u32(region)
        p.u32(UInt32(data.count))
        p.bytes += data
        return try request(.regionWrite, p.bytes)
    }

    public func read32(_ region: UInt32, _ offset: UInt64) throws -> UInt32 {
        let r = try regionRead(region, offset: offset, count: 4)
        guard !r.isError, r.payload.count == 20 else { throw TestClientError.io("region read failed errno \(r.errorNumber)") }
        return r.u32(16)
    }

    public func write32(_ region: UInt32, _ offset: UInt64, _ value: UInt32) throws {
        let r = try regionWrite(region, offset: offset, data: withUnsafeBytes(of: value.littleEndian) { Array($0) })
        guard !r.isError else { throw TestClientError.io("region write failed errno \(r.errorNumber)") }
    }

    /// A posted write (NO_REPLY), as QEMU sends BAR writes by default.
    public func postWrite32(_ region: UInt32, _ offset: UInt64, _ value: UInt32) {
        var p = Payload()
        p.u64(offset)
        p.u32(region)
        p.u32(4)
        p.u32(value)
        let (_, bytes) = message(.regionWrite, p.bytes, flags: VfioUserHeader.noReply)
        sendRaw(bytes)
    }

    public func setIRQs(index: UInt32, flags: UInt32, start: UInt32, count: UInt32, data: [UInt8] = [], fds: [Int32] = []) throws -> TestReply {
        var p = Payload()
        p.u32(UInt32(20 + data.count))
        p.u32(flags)
        p.u32(index)
        p.u32(start)
        p.u32(count)
        p.bytes += data
        return try request(.deviceSetIRQs, p.bytes, fds: fds)
    }
}
