import CSystem
import Synchronization
import Virtio
#if canImport(Glibc)
import Glibc
#endif

/// Why the server could not start.
public struct VhostUserServerError: Error, CustomStringConvertible, Sendable {
    public var message: String
    public var description: String { message }
}

/// A refused request: answered with a failure REPLY_ACK when the front-end asked for one, otherwise
/// (or when the request has its own reply) the connection is closed. Kept outside the generic server:
/// typed throws of a type nested in a generic context crash the 6.3 optimizer (FunctionSignatureOpts).
struct RequestFailure: Error {
    var reason: String
    var hasOwnReply = false
}

/// A protocol violation that ends the connection.
struct ProtocolViolation: Error {
    var reason: String
    init(_ reason: String) { self.reason = reason }
}

/// A vhost-user back-end server on a UNIX socket: one front-end connection at a time (a new one may
/// connect after the previous closed), the protocol handled on a control thread, the rings handed to
/// the device's queue groups.
public final class VhostUserServer<Device: VhostUserDevice>: @unchecked Sendable {
    /// Socket path.
    public let socketPath: String
    /// The device model.
    public let device: Device
    private let log: VhostUserLogger
    private var listenFD: Int32 = -1
    private let wakeFD: Int32
    private var thread: pthread_t?
    private let stopping = Atomic<Bool>(false)
    private let backendChannel = Mutex<Int32>(-1)
    /// Connections accepted so far (for tests and logs).
    public var connectionCount: Int { connections.load(ordering: .relaxed) }
    private let connections = Atomic<Int>(0)
    /// Messages handled so far.
    public var messageCount: Int { messages.load(ordering: .relaxed) }
    private let messages = Atomic<Int>(0)

    /// Creates a server (call `start`).
    public init(socketPath: String, device: Device, log: @escaping VhostUserLogger) {
        self.socketPath = socketPath
        self.device = device
        self.log = log
        wakeFD = csys_eventfd(0, 1)
    }

    deinit {
        if wakeFD >= 0 { close(wakeFD) }
        if listenFD >= 0 { close(listenFD) }
    }

    /// Binds the socket (replacing a stale one) and starts the control thread.
    public func start() throws(VhostUserServerError) {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw VhostUserServerError(message: "socket: errno \(errno)") }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let pathBytes = Array(socketPath.utf8)
        let capacity = MemoryLayout.size(ofValue: addr.sun_path)
        guard pathBytes.count < capacity else {
            close(fd)
            throw VhostUserServerError(message: "socket path \(socketPath) is longer than \(capacity - 1) bytes")
        }
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in pathBytes.enumerated() { raw[i] = b }
            raw[pathBytes.count] = 0
        }
        unlink(socketPath)
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else {
            let e = errno
            close(fd)
            throw VhostUserServerError(message: "bind \(socketPath): \(String(cString: strerror(e)))")
        }
        guard listen(fd, 4) == 0 else {
            let e = errno
            close(fd)
            throw VhostUserServerError(message: "listen \(socketPath): \(String(cString: strerror(e)))")
        }
        listenFD = fd
        thread = spawnThread { [self] in controlLoop() }
        guard thread != nil else { throw VhostUserServerError(message: "cannot start the control thread") }
    }

    /// Closes the connection (draining in-flight I/O), stops the control thread and removes the socket.
    public func stop() {
        stopping.store(true, ordering: .releasing)
        _ = csys_eventfd_signal(wakeFD, 1)
        if let thread {
            pthread_join(thread, nil)
            self.thread = nil
        }
        if listenFD >= 0 {
            close(listenFD)
            listenFD = -1
            unlink(socketPath)
        }
    }

    // MARK: Control thread

    private func controlLoop() {
        _ = csys_set_thread_name("vhost-ctl")
        while !stopping.load(ordering: .acquiring) {
            var fds = [pollfd(fd: listenFD, events: Int16(POLLIN), revents: 0), pollfd(fd: wakeFD, events: Int16(POLLIN), revents: 0)]
            let r = poll(&fds, 2, -1)
            if r < 0 { if errno == EINTR { continue } else { break } }
            if fds[1].revents != 0 { break }
            guard fds[0].revents & Int16(POLLIN) != 0 else { continue }
            let conn = accept(listenFD, nil, nil)
            guard conn >= 0 else { continue }
            _ = fcntl(conn, F_SETFD, FD_CLOEXEC)
            connections.add(1, ordering: .relaxed)
            log(.info, "\(socketPath): front-end connected")
            let session = Session(server: self, fd: conn)
            session.run()
            session.teardown()
            close(conn)
            log(.info, "\(socketPath): front-end disconnected")
        }
    }

    fileprivate func sendConfigChange() {
        backendChannel.withLock { fd in
            guard fd >= 0 else { return }
            let msg = VhostUserMessage(request: VhostUserBackendRequest.configChange.rawValue, flags: VhostUserWire.version, payload: [])
            let bytes = msg.encoded()
            let n = bytes.withUnsafeBytes { csys_send_with_fds(fd, $0.baseAddress, $0.count, nil, 0) }
            if n != bytes.count { log(.warning, "\(socketPath): config-change notification not sent (\(n))") }
        }
    }

    fileprivate func setBackendChannel(_ new: Int32) {
        let old = backendChannel.withLock { fd -> Int32 in
            let old = fd
            fd = new
            return old
        }
        if old >= 0 { close(old) }
    }

    /// State of one front-end connection.
    private final class Session {
        unowned let server: VhostUserServer
        let fd: Int32
        var device: Device { server.device }
        var features: UInt64 = 0
        var featuresSet = false
        var protocolFeatures: UInt64 = 0
        var memory = GuestMemory()
        var rings: [RingSetup]
        var inflight: InflightMapping?
        var open = true

        struct RingSetup {
            var size = 0
            var addresses: VirtqueueAddresses?
            var base: UInt32 = 0
            var kickFD: Int32 = -1
            var callFD: Int32 = -1
            var errFD: Int32 = -1
            var enabled = false
            var running = false
        }

        init(server: VhostUserServer, fd: Int32) {
            self.server = server
            self.fd = fd
            rings = Array(repeating: RingSetup(), count: server.device.queueCount)
        }

        var offeredFeatures: UInt64 {
            device.offeredFeatures | VirtioFeature.version1 | vhostUserFeatureProtocolFeatures
        }

        var offeredProtocolFeatures: UInt64 {
            VhostUserProtocolFeature.multiQueue | VhostUserProtocolFeature.replyAck
                | VhostUserProtocolFeature.inflightSharedMemory | VhostUserProtocolFeature.configureMemSlots
                | VhostUserProtocolFeature.backendRequest | VhostUserProtocolFeature.resetDevice
                | device.offeredProtocolFeatures
        }

        func log(_ level: VhostUserLogLevel, _ text: String) { server.log(level, "\(server.socketPath): \(text)") }

        func run() {
            while open && !server.stopping.load(ordering: .acquiring) {
                var fds = [pollfd(fd: fd, events: Int16(POLLIN), revents: 0), pollfd(fd: server.wakeFD, events: Int16(POLLIN), revents: 0)]
                let r = poll(&fds, 2, -1)
                if r < 0 { if errno == EINTR { continue } else { return } }
                if fds[1].revents != 0 { return }
                do {
                    guard let message = try receive() else { return }
                    server.messages.add(1, ordering: .relaxed)
                    try handle(message)
                } catch {
                    log(.error, "closing connection: \(error.reason)")
                    return
                }
            }
        }

        /// Reads one message; nil on EOF.
        func receive() throws(ProtocolViolation) -> VhostUserMessage? {
            var header = [UInt8](repeating: 0, count: VhostUserWire.headerSize)
            var fds = [Int32](repeating: -1, count: VhostUserWire.maxFDs)
            var nfds: Int32 = 0
            var truncated: Int32 = 0
            let n = header.withUnsafeMutableBytes { buf in
                fds.withUnsafeMutableBufferPointer { f in
                    csys_recv_with_fds(fd, buf.baseAddress, buf.count, f.baseAddress, Int32(VhostUserWire.maxFDs), &nfds, &truncated)
                }
            }
            var received = Array(fds.prefix(Int(nfds)))
            func fail(_ reason: String) -> ProtocolViolation {
                for f in received { close(f) }
                return ProtocolViolation(reason)
            }
            if n == 0 { for f in received { close(f) }; return nil }
            if n < 0 { throw fail("recvmsg: errno \(-n)") }
            if truncated != 0 { throw fail("too many file descriptors in one message (limit \(VhostUserWire.maxFDs))") }
            var got = Int(n)
            while got < VhostUserWire.headerSize {
                let m = header.withUnsafeMutableBytes { recv(fd, $0.baseAddress! + got, $0.count - got, 0) }
                if m <= 0 { throw fail("short header") }
                got += m
            }
            let request = header.readLE(UInt32.self, at: 0)!
            let flags = header.readLE(UInt32.self, at: 4)!
            let size = Int(header.readLE(UInt32.self, at: 8)!)
            guard flags & 3 == VhostUserWire.version else { throw fail("request \(request): unsupported protocol version \(flags & 3)") }
            guard size <= VhostUserWire.maxPayload else { throw fail("request \(request): payload size \(size) exceeds \(VhostUserWire.maxPayload)") }
            var payload = [UInt8](repeating: 0, count: size)
            got = 0
            while got < size {
                var extra = [Int32](repeating: -1, count: 4)
                var extraCount: Int32 = 0
                let m = payload.withUnsafeMutableBytes { buf in
                    extra.withUnsafeMutableBufferPointer { f in
                        csys_recv_with_fds(fd, buf.baseAddress! + got, size - got, f.baseAddress, 4, &extraCount, &truncated)
                    }
                }
                received += extra.prefix(Int(extraCount))
                if m <= 0 { throw fail("request \(request): payload cut short (\(got) of \(size) bytes)") }
                got += m
            }
            if received.count > VhostUserWire.maxFDs { throw fail("too many file descriptors") }
            return VhostUserMessage(request: request, flags: flags, payload: payload, fds: received)
        }

        func send(_ request: UInt32, _ payload: [UInt8], fds: [Int32] = []) {
            let msg = VhostUserMessage(request: request, flags: VhostUserWire.version | VhostUserWire.flagReply, payload: payload)
            let bytes = msg.encoded()
            let n = bytes.withUnsafeBytes { b in
                fds.withUnsafeBufferPointer { f in csys_send_with_fds(fd, b.baseAddress, b.count, f.baseAddress, Int32(f.count)) }
            }
            if n != bytes.count {
                log(.warning, "reply to request \(request) not sent (\(n))")
                open = false
            }
        }

        func sendU64(_ request: UInt32, _ value: UInt64) {
            var p = [UInt8]()
            p.appendLE(value)
            send(request, p)
        }

        /// Handles a message; throws to close the connection.
        func handle(_ message: VhostUserMessage) throws(ProtocolViolation) {
            var fds = message.fds
            defer { for f in fds { close(f) } }
            guard let request = VhostUserRequest(rawValue: message.request) else {
                throw ProtocolViolation("unknown request \(message.request)")
            }
            let ackNegotiated = protocolFeatures & VhostUserProtocolFeature.replyAck != 0
            do {
                let hasOwnReply = try dispatch(request, message.payload, &fds)
                if ackNegotiated && message.needsReply && !hasOwnReply { sendU64(message.request, 0) }
            } catch let failure as RequestFailure {
                log(.warning, "request \(request) failed: \(failure.reason)")
                if ackNegotiated && message.needsReply && !failure.hasOwnReply {
                    sendU64(message.request, 1)
                } else {
                    throw ProtocolViolation("request \(request): \(failure.reason)")
                }
            } catch let violation as ProtocolViolation {
                throw violation
            } catch {
                throw ProtocolViolation("request \(request): \(error)")
            }
        }

        func expectSize(_ payload: [UInt8], _ size: Int, _ fds: [Int32], _ fdCount: Int, own: Bool = false) throws(RequestFailure) {
            guard payload.count == size else {
                throw RequestFailure(reason: "payload size \(payload.count), expected \(size)", hasOwnReply: own)
            }
            guard fds.count == fdCount else {
                throw RequestFailure(reason: "\(fds.count) file descriptors, expected \(fdCount)", hasOwnReply: own)
            }
        }

        func ringIndex(_ raw: UInt32) throws(RequestFailure) -> Int {
            guard Int(raw) < rings.count else { throw RequestFailure(reason: "ring index \(raw) >= \(rings.count)") }
            return Int(raw)
        }

        /// Returns whether the request sent its own reply.
        func dispatch(_ request: VhostUserRequest, _ p: [UInt8], _ fds: inout [Int32]) throws -> Bool {
            switch request {
            case .getFeatures:
                try expectSize(p, 0, fds, 0, own: true)
                sendU64(request.rawValue, offeredFeatures)
                return true
            case .setFeatures:
                try expectSize(p, 8, fds, 0)
                let f = p.readLE(UInt64.self, at: 0)!
                guard f & ~offeredFeatures == 0 else {
                    throw RequestFailure(reason: String(format16(f & ~offeredFeatures)) + " not offered")
                }
                features = f
                featuresSet = true
                log(.info, "features \(format16(f)) (\(VirtqueueOptions(features: f).packed ? "packed" : "split") rings)")
                device.setNegotiatedFeatures(f & ~vhostUserFeatureProtocolFeatures)
                return false
            case .getProtocolFeatures:
                try expectSize(p, 0, fds, 0, own: true)
                sendU64(request.rawValue, offeredProtocolFeatures)
                return true
            case .setProtocolFeatures:
                try expectSize(p, 8, fds, 0)
                let f = p.readLE(UInt64.self, at: 0)!
                guard f & ~offeredProtocolFeatures == 0 else { throw RequestFailure(reason: "protocol features \(format16(f)) not offered") }
                protocolFeatures = f
                updateConfigNotifier()
                return false
            case .setOwner:
                try expectSize(p, 0, fds, 0)
                return false
            case .resetOwner, .resetDevice:
                try expectSize(p, 0, fds, 0)
                stopAllRings()
                features = 0
                featuresSet = false
                return false
            case .getQueueNum:
                try expectSize(p, 0, fds, 0, own: true)
                sendU64(request.rawValue, UInt64(rings.count))
                return true
            case .getMaxMemSlots:
                try expectSize(p, 0, fds, 0, own: true)
                sendU64(request.rawValue, UInt64(VhostUserWire.maxMemSlots))
                return true
            case .setMemTable:
                guard p.count >= 8, let n = p.readLE(UInt32.self, at: 0) else { throw RequestFailure(reason: "short memory table") }
                guard n >= 1, Int(n) <= VhostUserWire.maxMemTableRegions else { throw RequestFailure(reason: "\(n) memory regions") }
                try expectSize(p, 8 + 32 * Int(n), fds, Int(n))
                var table: [(GuestMemoryRegionDescriptor, Int32)] = []
                for i in 0..<Int(n) {
                    table.append((region(p, at: 8 + 32 * i), fds[i]))
                }
                do {
                    let newMemory = try GuestMemory.map(table, limit: VhostUserWire.maxMemTableRegions)
                    memory = newMemory
                    device.updateMemory(newMemory)
                    log(.info, "memory table: \(n) region(s)")
                } catch {
                    throw RequestFailure(reason: "memory table: \(error)")
                }
                return false
            case .addMemReg:
                try expectSize(p, 40, fds, 1)
                let d = region(p, at: 8)
                do {
                    let mapped = try MappedGuestRegion(d, fd: fds[0], index: memory.regionCount)
                    let newMemory = try memory.adding(mapped, limit: VhostUserWire.maxMemSlots)
                    memory = newMemory
                    device.updateMemory(newMemory)
                    log(.info, "memory region added: guest 0x\(String(d.guestPhysicalAddress, radix: 16)), \(d.size) bytes; \(newMemory.regionCount) region(s)")
                } catch {
                    throw RequestFailure(reason: "add region: \(error)")
                }
                return false
            case .remMemReg:
                guard p.count == 40, fds.count <= 1 else { throw RequestFailure(reason: "bad REM_MEM_REG size \(p.count) / fds \(fds.count)") }
                do {
                    let newMemory = try memory.removing(region(p, at: 8))
                    memory = newMemory
                    device.updateMemory(newMemory)
                    log(.info, "memory region removed: \(newMemory.regionCount) region(s) left")
                } catch {
                    throw RequestFailure(reason: "remove region: \(error)")
                }
                return false
            case .setVringNum:
                try expectSize(p, 8, fds, 0)
                let i = try ringIndex(p.readLE(UInt32.self, at: 0)!)
                let num = Int(p.readLE(UInt32.self, at: 4)!)
                guard num >= 1, num <= device.maxQueueSize else {
                    throw RequestFailure(reason: "ring \(i) size \(num) outside 1...\(device.maxQueueSize)")
                }
                // virtio 1.2 2.7: a split ring's Queue Size is a power of 2; a packed ring's need not be.
                guard VirtqueueOptions(features: features).packed || num & (num - 1) == 0 else {
                    throw RequestFailure(reason: "ring \(i) size \(num) of a split ring is not a power of 2")
                }
                guard !rings[i].running else { throw RequestFailure(reason: "ring \(i) is running") }
                rings[i].size = num
                return false
            case .setVringAddr:
                try expectSize(p, 40, fds, 0)
                let i = try ringIndex(p.readLE(UInt32.self, at: 0)!)
                guard !rings[i].running else { throw RequestFailure(reason: "ring \(i) is running") }
                rings[i].addresses = VirtqueueAddresses(descriptorTable: p.readLE(UInt64.self, at: 8)!,
                                                        driverArea: p.readLE(UInt64.self, at: 24)!,
                                                        deviceArea: p.readLE(UInt64.self, at: 16)!)
                return false
            case .setVringBase:
                try expectSize(p, 8, fds, 0)
                let i = try ringIndex(p.readLE(UInt32.self, at: 0)!)
                guard !rings[i].running else { throw RequestFailure(reason: "ring \(i) is running") }
                rings[i].base = p.readLE(UInt32.self, at: 4)!
                return false
            case .getVringBase:
                try expectSize(p, 8, fds, 0, own: true)
                let raw = p.readLE(UInt32.self, at: 0)!
                guard Int(raw) < rings.count else { throw RequestFailure(reason: "ring index \(raw)", hasOwnReply: true) }
                let base = stopRing(Int(raw))
                var reply = [UInt8]()
                reply.appendLE(raw)
                reply.appendLE(base)
                send(request.rawValue, reply)
                return true
            case .setVringKick, .setVringCall, .setVringErr:
                try expectSize(p, 8, fds, fds.count)
                let v = p.readLE(UInt64.self, at: 0)!
                let i = try ringIndex(UInt32(v & 0xFF))
                let noFD = v & 0x100 != 0
                guard v & ~UInt64(0x1FF) == 0 else { throw RequestFailure(reason: "reserved bits in \(format16(v))") }
                guard fds.count == (noFD ? 0 : 1) else { throw RequestFailure(reason: "\(fds.count) fds with flag \(noFD ? "no-fd" : "fd")") }
                let newFD = noFD ? -1 : fds.removeFirst()
                switch request {
                case .setVringKick:
                    guard newFD >= 0 else { throw RequestFailure(reason: "ring \(i): polling without a kick fd is not supported") }
                    if rings[i].running { _ = stopRing(i) }
                    if rings[i].kickFD >= 0 { close(rings[i].kickFD) }
                    rings[i].kickFD = newFD
                    if protocolFeatures == 0 && features & vhostUserFeatureProtocolFeatures == 0 { rings[i].enabled = true }
                    try startRing(i)
                case .setVringCall:
                    if rings[i].running {
                        let old = device.replaceCallFD(i, with: newFD)
                        if let old, old >= 0 { close(old) }
                    } else if rings[i].callFD >= 0 {
                        close(rings[i].callFD)
                    }
                    rings[i].callFD = newFD
                default:
                    if rings[i].errFD >= 0 { close(rings[i].errFD) }
                    rings[i].errFD = newFD
                }
                return false
            case .setVringEnable:
                try expectSize(p, 8, fds, 0)
                let i = try ringIndex(p.readLE(UInt32.self, at: 0)!)
                let state = p.readLE(UInt32.self, at: 4)!
                guard state <= 1 else { throw RequestFailure(reason: "enable state \(state)") }
                rings[i].enabled = state == 1
                if rings[i].running { device.setQueueEnabled(i, state == 1) }
                return false
            case .getConfig:
                guard p.count >= 12, p.count <= 12 + VhostUserWire.maxConfigSize, fds.isEmpty else {
                    throw RequestFailure(reason: "GET_CONFIG size \(p.count)", hasOwnReply: true)
                }
                let offset = Int(p.readLE(UInt32.self, at: 0)!)
                let size = Int(p.readLE(UInt32.self, at: 4)!)
                let config = device.readConfig()
                var reply = [UInt8]()
                reply.appendLE(UInt32(offset))
                if size == p.count - 12, offset <= config.count, size <= config.count - offset {
                    reply.appendLE(UInt32(size))
                    reply.appendLE(UInt32(0))
                    reply += config[offset..<(offset + size)]
                } else {
                    log(.warning, "GET_CONFIG offset \(offset) size \(size) outside \(config.count) bytes")
                    reply.appendLE(UInt32(0))
                    reply.appendLE(UInt32(0))
                }
                send(request.rawValue, reply)
                return true
            case .setConfig:
                guard p.count >= 12, p.count <= 12 + VhostUserWire.maxConfigSize, fds.isEmpty else {
                    throw RequestFailure(reason: "SET_CONFIG size \(p.count)")
                }
                let offset = Int(p.readLE(UInt32.self, at: 0)!)
                let size = Int(p.readLE(UInt32.self, at: 4)!)
                guard size == p.count - 12 else { throw RequestFailure(reason: "SET_CONFIG size field \(size)") }
                guard device.writeConfig(offset: offset, bytes: Array(p[12...])) else {
                    throw RequestFailure(reason: "SET_CONFIG offset \(offset) size \(size) refused")
                }
                return false
            case .setBackendReqFD:
                try expectSize(p, 0, fds, 1)
                server.setBackendChannel(fds.removeFirst())
                updateConfigNotifier()
                return false
            case .getInflightFD:
                guard p.count == 24 || p.count == 20, fds.isEmpty else { throw RequestFailure(reason: "GET_INFLIGHT_FD size \(p.count)", hasOwnReply: true) }
                let queues = Int(p.readLE(UInt16.self, at: 16)!)
                let size = Int(p.readLE(UInt16.self, at: 18)!)
                guard queues >= 1, queues <= rings.count, size >= 1, size <= device.maxQueueSize else {
                    throw RequestFailure(reason: "inflight for \(queues) queues of \(size)", hasOwnReply: true)
                }
                let mapping: InflightMapping
                do { mapping = try InflightMapping.create(queues: queues, queueSize: size) } catch {
                    throw RequestFailure(reason: "\(error)", hasOwnReply: true)
                }
                inflight = mapping
                log(.info, "in-flight region created: \(queues) queue(s) of \(size), \(mapping.length) bytes")
                var reply = [UInt8]()
                reply.appendLE(UInt64(mapping.length))
                reply.appendLE(UInt64(0))
                reply.appendLE(UInt16(queues))
                reply.appendLE(UInt16(size))
                reply.appendLE(UInt32(0))
                send(request.rawValue, reply, fds: [mapping.fd])
                return true
            case .setInflightFD:
                guard p.count == 24 || p.count == 20 else { throw RequestFailure(reason: "SET_INFLIGHT_FD size \(p.count)") }
                guard fds.count == 1 else { throw RequestFailure(reason: "SET_INFLIGHT_FD with \(fds.count) fds") }
                let length = p.readLE(UInt64.self, at: 0)!
                let offset = p.readLE(UInt64.self, at: 8)!
                let queues = Int(p.readLE(UInt16.self, at: 16)!)
                let size = Int(p.readLE(UInt16.self, at: 18)!)
                guard queues >= 1, queues <= rings.count, size >= 1, size <= device.maxQueueSize else {
                    throw RequestFailure(reason: "inflight for \(queues) queues of \(size)")
                }
                do {
                    inflight = try InflightMapping.adopt(fd: fds.removeFirst(), length: length, offset: offset,
                                                         queues: queues, queueSize: size)
                    log(.info, "in-flight region adopted: \(queues) queue(s) of \(size)")
                } catch {
                    throw RequestFailure(reason: "\(error)")
                }
                return false
            case .setLogBase, .setLogFD, .sendRARP, .netSetMTU, .iotlbMessage, .setVringEndian, .setStatus, .getStatus:
                throw RequestFailure(reason: "not supported")
            }
        }

        func region(_ p: [UInt8], at offset: Int) -> GuestMemoryRegionDescriptor {
            GuestMemoryRegionDescriptor(guestPhysicalAddress: p.readLE(UInt64.self, at: offset)!,
                                        size: p.readLE(UInt64.self, at: offset + 8)!,
                                        userAddress: p.readLE(UInt64.self, at: offset + 16)!,
                                        mmapOffset: p.readLE(UInt64.self, at: offset + 24)!)
        }

        func format16(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }

        func updateConfigNotifier() {
            let want = VhostUserProtocolFeature.backendRequest | VhostUserProtocolFeature.config
            if protocolFeatures & want == want {
                let s = server
                device.setConfigChangeNotifier { s.sendConfigChange() }
            } else {
                device.setConfigChangeNotifier(nil)
            }
        }

        func startRing(_ i: Int) throws(RequestFailure) {
            let r = rings[i]
            guard let addresses = r.addresses, r.size > 0 else { throw RequestFailure(reason: "ring \(i) kicked before SET_VRING_NUM/ADDR") }
            guard featuresSet || features == 0 else { throw RequestFailure(reason: "ring \(i) started before SET_FEATURES") }
            let options = VirtqueueOptions(features: features)
            let ring: Virtqueue
            do {
                // A driver may chain up to the ring size in descriptors (QEMU advertises seg_max = virtqueue_size - 2
                // for virtio-scsi), each possibly split across two memory regions at worst once: size the slots for it.
                // A virtio-mmio driver may pick a larger ring than the command line's virtqueue_size, but seg_max
                // stays: slots of a 1024 ring sized for 1024 segments would take 16 MiB of iovecs per ring.
                ring = try Virtqueue(size: r.size, options: options, addresses: addresses, memory: memory, base: r.base,
                                     segmentsPerSlot: max(device.segmentsPerSlot, min(r.size, device.expectedQueueSize) + 8))
            } catch {
                throw RequestFailure(reason: "ring \(i): \(error)")
            }
            if let inflight {
                var resubmitted = 0
                if options.packed, let region = inflight.packedRegion(queue: i, size: r.size) {
                    resubmitted = ring.attachInflight(packed: region)
                } else if !options.packed, let region = inflight.region(queue: i, size: r.size) {
                    resubmitted = ring.attachInflight(region)
                }
                if resubmitted > 0 { log(.info, "ring \(i): resubmitting \(resubmitted) in-flight request(s)") }
            }
            if r.size != device.expectedQueueSize {
                log(.info, "ring \(i): \(r.size) entries (\(options.packed ? "packed" : "split")), chosen by the driver (queue_size \(device.expectedQueueSize))")
            }
            let running = RunningQueue(index: i, ring: ring, kickFD: r.kickFD, callFD: r.callFD, enabled: r.enabled)
            rings[i].running = true
            device.startQueue(running)
        }

        /// Stops ring `i` (draining) and returns its base; the kick fd is closed.
        func stopRing(_ i: Int) -> UInt32 {
            guard rings[i].running else { return rings[i].base }
            rings[i].running = false
            var base = rings[i].base
            if let q = device.stopQueue(i) {
                base = q.ring.ringBase
                if q.abandoned {
                    log(.error, "ring \(i) did not drain; its \(q.ring.inFlight) late request(s) will be dropped")
                } else if q.callFD != rings[i].callFD, q.callFD >= 0 {
                    close(q.callFD)
                }
            }
            rings[i].base = base
            if rings[i].kickFD >= 0 {
                close(rings[i].kickFD)
                rings[i].kickFD = -1
            }
            return base
        }

        func stopAllRings() {
            for i in rings.indices where rings[i].running { _ = stopRing(i) }
        }

        func teardown() {
            stopAllRings()
            for i in rings.indices {
                for fd in [rings[i].kickFD, rings[i].callFD, rings[i].errFD] where fd >= 0 { close(fd) }
            }
            rings = []
            device.setConfigChangeNotifier(nil)
            server.setBackendChannel(-1)
            device.connectionClosed()
            memory = GuestMemory()
            inflight = nil
        }
    }
}

/// The in-flight shared memory handed to the front-end with GET_INFLIGHT_FD (or back with SET_INFLIGHT_FD).
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
