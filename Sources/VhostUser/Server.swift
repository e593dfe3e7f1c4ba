import BlockIO
import CSystem
import GuestMemoryMap
import Logging
import Synchronization
import Virtio
import VirtioDevices
#if canImport(Glibc)
import Glibc
import SystemErrors
#endif

/// Why the server could not start.
public struct VhostUserServerError: ReasonedError, Sendable {
    /// Why it failed: a failed system call (socket, bind, listen) or another reason.
    public var reason: FailureReason
    public init(reason: FailureReason) { self.reason = reason }
}

/// A refused request: answered with a failure REPLY_ACK when the front-end asked for one, otherwise
/// (or when the request has its own reply) the connection is closed. Kept outside the generic server:
/// typed throws of a type nested in a generic context crash the 6.3 optimizer (FunctionSignatureOpts).
struct RequestFailure: Error {
    var reason: String
    var hasOwnReply = false
}

/// CLOCK_MONOTONIC in milliseconds (hand-over deadlines).
private func monotonicMilliseconds() -> Int { Int(IOCounters.now() / 1_000_000) }

/// A protocol violation that ends the connection.
struct ProtocolViolation: Error {
    var reason: String
    init(_ reason: String) { self.reason = reason }
}

/// A vhost-user back-end server on a UNIX socket: the protocol handled on a control thread, the rings
/// handed to the device's queue groups.
///
/// Connections and live migration on one host: the first front-end owns the device. A second connection
/// is accepted as the candidate successor (the destination QEMU of a migration, which attaches with the
/// same arguments while the source is still connected): it is set up like any front-end (features,
/// memory table, rings) but the device's rings run for one connection at a time. A connection that
/// starts a ring (SET_VRING_KICK) while the other one still runs rings waits (its socket is not read)
/// until the other has stopped all of them (GET_VRING_BASE, which drains their in-flight requests into
/// the source's memory first) or has disconnected; QEMU only starts the destination's rings after the
/// migration stream is loaded, so by then the source has stopped them. A wait longer than
/// `handoverTimeoutMilliseconds` means the second connection is not a migration: it is refused (closed,
/// with a log line). A third connection is refused at once. The device state (LUN map, unit attentions,
/// reservations, statistics) belongs to the controller and stays; the nexus is only lost (virtio-scsi:
/// I_T NEXUS LOSS) when the last connection goes away.
public final class VhostUserServer<Device: VirtioDeviceModel>: @unchecked Sendable {
    /// Socket path.
    public let socketPath: String
    /// The device model.
    public let device: Device
    private let log: Logger
    private var listenFD: Int32 = -1
    /// The listening socket was handed over (systemd socket activation): it is never unlinked.
    private var adopted = false
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
    /// Connections refused (a third one, or a second one that is not a migration hand-over).
    public var refusedCount: Int { refused.load(ordering: .relaxed) }
    private let refused = Atomic<Int>(0)
    /// Hand-overs done: a connection started its rings after another one had stopped them or left.
    public var handoverCount: Int { handovers.load(ordering: .relaxed) }
    private let handovers = Atomic<Int>(0)
    /// How long a connection's ring start waits for the other connection to stop its rings before the
    /// waiting connection is refused as not being a migration hand-over (set before `start`).
    public var handoverTimeoutMilliseconds = 10_000
    /// The open connections (control thread only): at most two.
    private var sessions: [Session] = []

    /// Creates a server (call `start`).
    public init(socketPath: String, device: Device, log: Logger) {
        self.socketPath = socketPath
        self.device = device
        self.log = log
        wakeFD = csys_eventfd(0, 1)
    }

    deinit {
        if wakeFD >= 0 { close(wakeFD) }
        if listenFD >= 0 { close(listenFD) }
    }

    /// Binds the socket (replacing a stale one) and starts the control thread. With `listeningFD` (a
    /// listening UNIX stream socket handed over by systemd), serves that socket instead, owns the fd and
    /// never unlinks its path, so a VMM can reconnect to it across gateway restarts.
    public func start(listeningFD: Int32? = nil) throws(VhostUserServerError) {
        if let listeningFD {
            listenFD = listeningFD
            adopted = true
            try startControlThread()
            return
        }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw .systemCall(.current("socket", context: "vhost-user socket \(socketPath)")) }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let pathBytes = Array(socketPath.utf8)
        let capacity = MemoryLayout.size(ofValue: addr.sun_path)
        guard pathBytes.count < capacity else {
            close(fd)
            throw VhostUserServerError("socket path \(socketPath) is longer than \(capacity - 1) bytes")
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
            throw .systemCall(SystemCallError("bind", errno: e, context: socketPath))
        }
        guard listen(fd, 4) == 0 else {
            let e = errno
            close(fd)
            throw .systemCall(SystemCallError("listen", errno: e, context: socketPath))
        }
        listenFD = fd
        try startControlThread()
    }

    private func startControlThread() throws(VhostUserServerError) {
        thread = spawnThread { [self] in controlLoop() }
        guard thread != nil else { throw VhostUserServerError("cannot start the control thread") }
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
            if !adopted { unlink(socketPath) }
        }
    }

    // MARK: Control thread

    private func controlLoop() {
        _ = csys_set_thread_name("vhost-ctl")
        while !stopping.load(ordering: .acquiring) {
            var fds = [pollfd(fd: listenFD, events: Int16(POLLIN), revents: 0), pollfd(fd: wakeFD, events: Int16(POLLIN), revents: 0)]
            let polled = sessions.filter { $0.pending == nil }
            for session in polled { fds.append(pollfd(fd: session.fd, events: Int16(POLLIN), revents: 0)) }
            let r = poll(&fds, nfds_t(fds.count), waitingTimeout())
            if r < 0 { if errno == EINTR { continue } else { break } }
            if fds[1].revents != 0 { break }
            for (k, session) in polled.enumerated() where fds[2 + k].revents != 0 {
                if !session.step() { closeSession(session) }
            }
            resumeWaiting()
            if fds[0].revents & Int16(POLLIN) != 0 { acceptConnection() }
        }
        while let session = sessions.last { closeSession(session) }
    }

    private func acceptConnection() {
        let conn = accept(listenFD, nil, nil)
        guard conn >= 0 else { return }
        _ = fcntl(conn, F_SETFD, FD_CLOEXEC)
        let number = connections.add(1, ordering: .relaxed).newValue
        guard sessions.count < 2 else {
            refused.add(1, ordering: .relaxed)
            log.warning(.init(stringLiteral: "\(socketPath): front-end #\(number) refused: front-ends #\(sessions[0].number) and #\(sessions[1].number) "
                + "are connected (one front-end plus one migration destination at most)"))
            Glibc.close(conn)
            return
        }
        if let first = sessions.first {
            log.info(.init(stringLiteral: "\(socketPath): front-end #\(number) connected while #\(first.number) is: accepted as its migration "
                + "successor (its rings start once #\(first.number) has stopped its rings or disconnected)"))
        } else {
            log.info("\(socketPath): front-end connected (#\(number))")
        }
        sessions.append(Session(server: self, fd: conn, number: number))
    }

    private func closeSession(_ session: Session) {
        session.teardown(last: sessions.count == 1)
        Glibc.close(session.fd)
        sessions.removeAll { $0 === session }
        if let other = sessions.first {
            log.info("\(socketPath): front-end #\(session.number) disconnected; #\(other.number) stays connected")
            other.becomeActiveIfRunning()
        } else {
            log.info("\(socketPath): front-end disconnected (#\(session.number))")
        }
    }

    /// Whether a connection other than `session` runs rings.
    private func otherRunsRings(_ session: Session) -> Bool {
        sessions.contains { $0 !== session && $0.runsRings }
    }

    /// Handles the held ring start of a waiting connection once the other one stopped its rings or left;
    /// refuses it when the wait timed out.
    private func resumeWaiting() {
        for session in sessions {
            guard let message = session.pending else { continue }
            if !otherRunsRings(session) {
                session.pending = nil
                log.info("\(socketPath): front-end #\(session.number): the other front-end stopped its rings; starting its own")
                if !session.handleHeld(message) { closeSession(session) }
            } else if monotonicMilliseconds() >= session.pendingDeadline {
                session.pending = nil
                for f in message.fds { Glibc.close(f) }
                refused.add(1, ordering: .relaxed)
                log.warning(.init(stringLiteral: "\(socketPath): front-end #\(session.number) refused: it starts rings while front-end "
                    + "#\(sessions.first { $0 !== session }?.number ?? 0) has run them for \(handoverTimeoutMilliseconds) ms "
                    + "(not a migration hand-over)"))
                closeSession(session)
            }
        }
    }

    /// Poll timeout: until the earliest waiting connection's deadline, or forever.
    private func waitingTimeout() -> Int32 {
        // A plain loop: this runs before every poll of the control thread (a key path here was instantiated at
        // run time on each call, 7 % of the CPU time of the vhost-user ring fuzz targets).
        var earliest: Int?
        for session in sessions where session.pending != nil { earliest = min(earliest ?? .max, session.pendingDeadline) }
        guard let deadline = earliest else { return -1 }
        return Int32(clamping: max(0, deadline - monotonicMilliseconds()) + 1)
    }

    func handedOver() { handovers.add(1, ordering: .relaxed) }

    func sendConfigChange() {
        backendChannel.withLock { fd in
            guard fd >= 0 else { return }
            let msg = VhostUserMessage(request: VhostUserBackendRequest.configChange.rawValue, flags: VhostUserWire.version, payload: [])
            let bytes = msg.encoded()
            let n = bytes.withUnsafeBytes { csys_send_with_fds(fd, $0.baseAddress, $0.count, nil, 0) }
            if n != bytes.count { log.warning("\(socketPath): config-change notification not sent (\(n))") }
        }
    }

    /// Points config-change notifications at `fd` (owned by its connection, which releases it before closing it).
    func setBackendChannel(_ fd: Int32) {
        backendChannel.withLock { $0 = fd }
    }

    /// Stops using `fd` for notifications if it is the current channel.
    func releaseBackendChannel(_ fd: Int32) {
        backendChannel.withLock { if $0 == fd { $0 = -1 } }
    }

    /// State of one front-end connection.
    final class Session {
        unowned let server: VhostUserServer
        let fd: Int32
        /// Connection number (for logs).
        let number: Int
        /// A ring start held while the other connection runs rings (the socket is not read meanwhile).
        var pending: VhostUserMessage?
        var pendingDeadline = 0
        /// The BACKEND_REQ channel this front-end sent (installed while this connection is the active one).
        var backendReqFD: Int32 = -1
        /// The dirty-page log (SET_LOG_BASE); used while VHOST_F_LOG_ALL is negotiated.
        var dirtyLog: DirtyLog?
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
            /// Used-ring guest address for dirty logging (SET_VRING_ADDR with VHOST_VRING_F_LOG).
            var logAddress: UInt64?
        }

        init(server: VhostUserServer, fd: Int32, number: Int) {
            self.server = server
            self.fd = fd
            self.number = number
            rings = Array(repeating: RingSetup(), count: server.device.queueCount)
        }

        var offeredFeatures: UInt64 {
            device.offeredFeatures | VirtioFeature.version1 | vhostUserFeatureProtocolFeatures | vhostFeatureLogAll
        }

        var offeredProtocolFeatures: UInt64 {
            VhostUserProtocolFeature.multiQueue | VhostUserProtocolFeature.replyAck
                | VhostUserProtocolFeature.inflightSharedMemory | VhostUserProtocolFeature.configureMemSlots
                | VhostUserProtocolFeature.backendRequest | VhostUserProtocolFeature.resetDevice
                | VhostUserProtocolFeature.logSharedMemory
                | (device.notifiesConfigChanges ? VhostUserProtocolFeature.config : 0)
        }

        func log(_ level: Logger.Level, _ text: String) { server.log.log(level: level, "\(server.socketPath): \(text)") }

        var runsRings: Bool { rings.contains { $0.running } }

        /// Reads and handles one message; false when the connection is to be closed.
        func step() -> Bool {
            do {
                guard let message = try receive() else { return false }
                server.messages.add(1, ordering: .relaxed)
                if message.request == VhostUserRequest.setVringKick.rawValue && server.otherRunsRings(self) {
                    // A successor's ring start: held until the source stopped its rings (see the server's doc).
                    pending = message
                    pendingDeadline = monotonicMilliseconds() + server.handoverTimeoutMilliseconds
                    log(.info, "front-end #\(number) starts a ring while the other front-end runs its rings: waiting for "
                        + "them to stop (migration hand-over)")
                    return true
                }
                try handle(message)
            } catch {
                log(.error, "closing connection #\(number): \(error.reason)")
                return false
            }
            return open
        }

        /// Handles a held message; false when the connection is to be closed.
        func handleHeld(_ message: VhostUserMessage) -> Bool {
            do { try handle(message) } catch {
                log(.error, "closing connection #\(number): \(error.reason)")
                return false
            }
            return open
        }

        /// This connection is the one whose rings run: the device talks to this front-end (features,
        /// config-change channel).
        func becomeActive() {
            device.setNegotiatedFeatures(features & ~(vhostUserFeatureProtocolFeatures | vhostFeatureLogAll))
            server.setBackendChannel(backendReqFD)
            updateConfigNotifier()
        }

        /// After the other connection left: this one is the only one, so the device follows it.
        func becomeActiveIfRunning() {
            server.setBackendChannel(backendReqFD)
            updateConfigNotifier()
            if runsRings { becomeActive() }
        }

        /// Whether this connection may change device-wide state now (no other connection runs rings).
        var mayDriveDevice: Bool { !server.otherRunsRings(self) }

        /// Dirty logging is on when VHOST_F_LOG_ALL is negotiated and a log was given.
        var activeLog: DirtyLog? { features & vhostFeatureLogAll != 0 ? dirtyLog : nil }

        /// Applies the logging state to the running rings.
        func applyDirtyLog() {
            for i in rings.indices where rings[i].running {
                device.setDirtyLog(i, activeLog, usedRingLogAddress: rings[i].logAddress)
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
            ring.setDirtyLog(activeLog, usedRingLogAddress: r.logAddress)
            if !runsRings {
                // The first ring of this connection: the device now serves this front-end.
                if server.sessions.count > 1 {
                    server.handedOver()
                    log(.info, "front-end #\(number) takes over the device (migration hand-over)")
                }
                becomeActive()
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

        /// Stops this connection's rings and releases its resources; `last`: no other connection stays,
        /// so the device's front-end is gone (the nexus is lost). A connection that hands over to (or leaves
        /// behind) another one changes nothing the guest can see.
        func teardown(last: Bool) {
            stopAllRings()
            for i in rings.indices {
                for fd in [rings[i].kickFD, rings[i].callFD, rings[i].errFD] where fd >= 0 { close(fd) }
            }
            rings = []
            if let message = pending {
                for f in message.fds { close(f) }
                pending = nil
            }
            server.releaseBackendChannel(backendReqFD)
            if backendReqFD >= 0 { close(backendReqFD) }
            backendReqFD = -1
            if last {
                device.setConfigChangeNotifier(nil)
                device.connectionClosed()
            }
            memory = GuestMemory()
            inflight = nil
            dirtyLog = nil
        }
    }
}
