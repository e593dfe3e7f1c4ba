import CSystem
import EventLoop
#if canImport(Glibc)
import Glibc
#endif

/// A PCI device model served over vfio-user. All calls arrive on the server's event-loop thread.
public protocol VfioUserDevice: AnyObject {
    /// The function's config space (the server reads and writes it for region 7).
    var configSpace: PCIConfigSpace { get set }
    /// A BAR read of 1, 2, 4 or 8 bytes at `offset` (already checked to lie inside the BAR).
    func barRead(bar: Int, offset: UInt64, count: Int) -> UInt64
    /// A BAR write of 1, 2, 4 or 8 bytes at `offset` (already checked to lie inside the BAR).
    /// `posted` is true when the client asked for no reply: the guest vCPU did not wait for this write
    /// (QEMU posts BAR writes unless `x-no-posted-writes=on`), so the guest may already have moved on.
    func barWrite(bar: Int, offset: UInt64, count: Int, value: UInt64, posted: Bool)
    /// Device reset (VFIO_USER_DEVICE_RESET, client disconnect).
    func reset()
    /// Finish or abandon every guest memory access in progress: guest memory windows are about to change.
    func quiesce()
    /// Guest memory windows changed (after DMA_MAP/DMA_UNMAP): drop or revalidate cached translations.
    func memoryChanged()
    /// A page of a BAR the guest driver never touches, or nil. The server offers it to the client as a
    /// mappable area (sparse mmap of a private memfd). QEMU's
    /// vfio-user client then stops posting BAR writes ("a region directly mapped into the VM": a read can
    /// no longer be relied on to follow a posted write), so the guest waits for each register write,
    /// as a driver that reads DMA'd memory right after a command (PVSCSI CONFIG) requires.
    var synchronousWritesPage: (bar: Int, offset: UInt64)? { get }
    /// The client changed interrupt eventfds (SET_IRQS with DATA_EVENTFD, or a disable): a device that hands
    /// vector eventfds to other threads takes the new set (`InterruptController.eventFD`).
    func interruptsChanged()
}

extension VfioUserDevice {
    public var synchronousWritesPage: (bar: Int, offset: UInt64)? { nil }
    public func interruptsChanged() {}
}

/// Why a server could not start.
public struct VfioUserError: Error, Sendable, CustomStringConvertible {
    public var message: String
    public var errno: Int32
    public init(_ message: String, errno: Int32 = 0) {
        self.message = message
        self.errno = errno
    }
    public var description: String { message }
}

/// Where the server writes its log lines.
public typealias VfioUserLog = @Sendable (String) -> Void

/// Counters a test or the admin interface can read (on the loop thread).
public struct VfioUserStats: Sendable {
    public var messages = 0
    public var errorReplies = 0
    public var connections = 0
    public var disconnects = 0
    /// DMA_READ / DMA_WRITE messages sent (fd-less windows) and those that failed (error reply, timeout,
    /// garbage, disconnect).
    public var dmaReads = 0
    public var dmaWrites = 0
    public var dmaFailures = 0
    /// Client messages handled while a DMA reply was awaited.
    public var handledDuringDMA = 0
    /// Microseconds spent waiting for DMA replies (outermost waits).
    public var dmaWaitMicroseconds: UInt64 = 0
}

/// A vfio-user server for one PCI device on one UNIX socket (protocol 0.1 as spoken by QEMU's
/// vfio-user-pci client). One client at a time; a second connection is refused. On disconnect the
/// device is quiesced and reset, DMA windows unmapped and interrupt eventfds closed, so a new client
/// starts from power-on state.
///
/// Every field of every message is checked: a malformed message gets an error reply carrying an errno
/// and a log line; a message whose framing cannot be trusted (size below the header, oversized) also
/// closes the connection. No guest memory outside a DMA window is ever touched.
///
/// DMA windows sent without an fd (QEMU with plain `-m` RAM, and its ROM/VRAM windows) are reached with
/// VFIO_USER_DMA_READ / VFIO_USER_DMA_WRITE requests (`DMAWindows.remote`), in chunks of the smaller
/// max_data_xfer_size. Each waits at most `dmaTimeoutMilliseconds`; client messages arriving meanwhile are
/// handled at once and in order (nested waits allowed; memory-map side effects on the device put off until
/// no wait is in progress), and a synchronous BAR write is acknowledged before the device waits for DMA
/// (QEMU answers DMA only once that vCPU let go of its lock). A timeout, a malformed reply or a broken
/// stream marks DMA broken (those accesses fail at once) until DEVICE_RESET or a new client.
public final class VfioUserServer<Device: VfioUserDevice>: @unchecked Sendable {
    /// Protocol version this server speaks.
    public static var majorVersion: UInt16 { 0 }
    public static var minorVersion: UInt16 { 1 }
    /// Largest data count in a region read/write (advertised as max_data_xfer_size).
    public static var maxDataTransfer: Int { 1 << 20 }
    /// Largest number of fds accepted with one message (advertised as max_msg_fds).
    public static var maxMessageFDs: Int { 16 }
    /// Largest message accepted (payload + header).
    public static var maxMessageSize: Int { maxDataTransfer + 4096 }

    public let socketPath: String
    public let loop: EventLoop
    public let device: Device
    public let memory: DMAWindows
    public let interrupts: InterruptController
    public var stats = VfioUserStats()
    private let log: VfioUserLog

    private var listenFD: Int32 = -1
    /// The listening socket was handed over (systemd socket activation): it is never unlinked.
    private var adopted = false
    private(set) public var clientFD: Int32 = -1
    private var versionNegotiated = false
    private let receiveBuffer: UnsafeMutableRawBufferPointer
    private let replyBuffer: UnsafeMutableRawBufferPointer
    private let fds: UnsafeMutablePointer<Int32>
    private var fdCount = 0
    /// Milliseconds a client may take to send the rest of a message once its header arrived, and to make
    /// room for a reply; after that the client is dropped (the loop never waits longer on one client).
    public var bodyTimeoutMilliseconds: Int32 = 5000

    // DMA by message (windows without an fd).
    /// Milliseconds one DMA_READ/DMA_WRITE may wait for its reply. Longer than QEMU's own 5 s reply timeout,
    /// so that a vCPU blocked on a synchronous request of its own (holding the lock QEMU's DMA handler needs)
    /// gives up first and the DMA still completes. A timeout marks DMA broken until reset or reconnection.
    public var dmaTimeoutMilliseconds: Int32 = 10_000
    /// Largest data count of one DMA message: the smaller of ours and the client's max_data_xfer_size.
    public private(set) var dmaChunk = 1 << 20
    /// A DMA reply timed out, was malformed or the socket failed: every later fd-less access fails at once
    /// (the device fails those requests) until DEVICE_RESET or a new client.
    public private(set) var dmaBroken = false
    private var nextRequestID: UInt16 = 0x8000
    private let dmaBuffer: UnsafeMutableRawBufferPointer
    private let dmaFDs: UnsafeMutablePointer<Int32>
    /// Client messages that arrive while a DMA reply is awaited are handled at once, in order (a QEMU vCPU may
    /// be blocked on one, holding the lock QEMU's DMA handler needs); one buffer per nesting level.
    private let inlineBuffers: UnsafeMutableRawBufferPointer
    /// DMA requests awaiting their reply, outermost first (a message handled during a wait may need DMA too).
    private var waiters: [(id: UInt16, command: UInt16, address: UInt64, count: Int, buffer: UnsafeMutableRawPointer, state: UInt8)] = []
    /// Nested DMA waits allowed.
    static var maxDMADepth: Int { 4 }
    /// Work put off until no DMA wait is in progress: the device's memory notifications and held unmaps.
    private var postponedMemoryChange = false
    private var postponedQuiesce = false
    private var postponedScheduled = false
    /// Set inside a DMA wait (which must not tear the connection down under the device's feet); acted on
    /// once the current message or callback is finished.
    private var pendingDisconnect: String? = nil
    private var inDMAWait: Bool { !waiters.isEmpty }
    /// A DMA wait read from the socket: a readiness the loop reported before may be stale (the message was
    /// handled inline), so the next `clientReadable` checks before its blocking receive.
    private var socketReadDuringWait = false
    /// The memfd offered as the synchronous-writes page (see `VfioUserDevice.synchronousWritesPage`).
    private var syncPageFD: Int32 = -1
    /// Whether the last GET_REGION_INFO offered the mappable page (QEMU then sends BAR writes synchronously).
    public private(set) var offeredMappedPage = false
    /// The synchronous BAR write being handled, until its reply is sent.
    private var pendingWriteAck: (header: VfioUserHeader, offset: UInt64, region: UInt32, count: UInt32)? = nil
    /// Synchronous BAR writes acknowledged before the device finished them (it needed DMA by message).
    public private(set) var writesAcknowledgedEarly = 0
    /// Largest client message handled while a DMA reply is awaited (bigger ones are refused with E2BIG).
    static var maxInlineMessage: Int { 64 << 10 }

    /// Creates a server (does not listen yet).
    public init(socketPath: String, loop: EventLoop, device: Device, msixVectors: Int, msiVectors: Int = 0,
                log: @escaping VfioUserLog) {
        self.socketPath = socketPath
        self.loop = loop
        self.device = device
        self.memory = DMAWindows()
        self.interrupts = InterruptController(msixVectors: msixVectors, msiVectors: msiVectors)
        self.log = log
        receiveBuffer = .allocate(byteCount: Self.maxMessageSize, alignment: 16)
        replyBuffer = .allocate(byteCount: Self.maxMessageSize, alignment: 16)
        fds = .allocate(capacity: Self.maxMessageFDs)
        dmaBuffer = .allocate(byteCount: Self.maxDataTransfer + 64, alignment: 16)
        dmaFDs = .allocate(capacity: Self.maxMessageFDs)
        inlineBuffers = .allocate(byteCount: Self.maxDMADepth * (Self.maxInlineMessage + 16), alignment: 16)
        waiters.reserveCapacity(Self.maxDMADepth)
        dmaChunk = Self.maxDataTransfer
        memory.remote = RemoteDMA(read: { [unowned self] address, buffer in self.remoteRead(address, into: buffer) },
                                  write: { [unowned self] address, buffer in self.remoteWrite(address, from: buffer) })
    }

    deinit {
        if clientFD >= 0 { close(clientFD) }
        if listenFD >= 0 { close(listenFD) }
        if syncPageFD >= 0 { close(syncPageFD) }
        receiveBuffer.deallocate()
        replyBuffer.deallocate()
        fds.deallocate()
        dmaBuffer.deallocate()
        dmaFDs.deallocate()
        inlineBuffers.deallocate()
    }

    /// Binds the socket and registers it with the loop. Call on the loop thread (or before it runs).
    /// With `adopting` (a listening UNIX stream socket handed over by systemd), serves that socket instead,
    /// owns the fd and never unlinks its path.
    public func listen(adopting listeningFD: Int32? = nil) throws(VfioUserError) {
        let fd = listeningFD ?? csys_unix_listen(socketPath, 4)
        guard fd >= 0 else { throw VfioUserError("cannot listen on \(socketPath): \(String(cString: strerror(-fd)))", errno: -fd) }
        listenFD = fd
        adopted = listeningFD != nil
        do {
            try loop.register(fd: fd) { [unowned self] _ in self.acceptClient() }
        } catch {
            close(fd)
            listenFD = -1
            throw VfioUserError("cannot watch \(socketPath): \(error)", errno: error.errno)
        }
        log("vfio-user: listening on \(socketPath)")
    }

    /// Stops listening, drops the client and removes the socket file. Call on the loop thread.
    public func shutdown() {
        if clientFD >= 0 { disconnect(reason: "server shutdown") }
        if listenFD >= 0 {
            loop.unregister(fd: listenFD)
            close(listenFD)
            listenFD = -1
            if !adopted { unlink(socketPath) }
        }
    }

    private func acceptClient() {
        let fd = csys_accept_nonblock(listenFD)
        guard fd >= 0 else { return }
        if clientFD >= 0 {
            log("vfio-user: refusing a second client on \(socketPath)")
            close(fd)
            return
        }
        _ = csys_set_recv_timeout(fd, bodyTimeoutMilliseconds)
        _ = csys_set_send_timeout(fd, bodyTimeoutMilliseconds)
        do {
            try loop.register(fd: fd, events: [.readable, .hangup]) { [unowned self] events in self.clientReadable(events) }
        } catch {
            log("vfio-user: cannot watch client: \(error)")
            close(fd)
            return
        }
        clientFD = fd
        versionNegotiated = false
        dmaBroken = false
        dmaChunk = Self.maxDataTransfer
        pendingDisconnect = nil
        offeredMappedPage = false
        stats.connections += 1
        log("vfio-user: client connected on \(socketPath)")
    }

    /// Drops the client: quiesce and reset the device, unmap guest memory, close interrupt fds.
    public func disconnect(reason: String) {
        guard clientFD >= 0 else { return }
        log("vfio-user: client disconnected (\(reason))")
        if stats.dmaReads + stats.dmaWrites > 0 {
            let n = UInt64(stats.dmaReads + stats.dmaWrites)
            log("vfio-user: DMA by message so far: \(stats.dmaReads) reads, \(stats.dmaWrites) writes, \(stats.dmaFailures) failed, \(stats.dmaWaitMicroseconds / max(1, n)) us average wait")
        }
        loop.unregister(fd: clientFD)
        close(clientFD)
        clientFD = -1
        versionNegotiated = false
        stats.disconnects += 1
        pendingDisconnect = nil
        postponedMemoryChange = false
        postponedQuiesce = false
        memory.holdUnmaps = false
        device.quiesce()
        device.reset()
        device.configSpace.reset()
        memory.unmapAll()
        device.memoryChanged()
        interrupts.reset()
    }

    private func closeReceivedFDs(from start: Int = 0) {
        var i = start
        while i < fdCount {
            if fds[i] >= 0 { close(fds[i]) }
            fds[i] = -1
            i += 1
        }
        fdCount = start
    }

    /// Reads exactly `count` bytes into `buffer` at `offset` (blocking with the receive timeout).
    private func readExactly(_ count: Int, at offset: Int) -> Bool {
        var got = 0
        while got < count {
            let n = recv(clientFD, receiveBuffer.baseAddress! + offset + got, count - got, Int32(MSG_WAITALL))
            if n > 0 { got += n; continue }
            if n < 0 && errno == EINTR { continue }
            return false
        }
        return true
    }

    private func discard(_ count: Int) -> Bool {
        var left = count
        while left > 0 {
            let chunk = min(left, receiveBuffer.count)
            guard readExactly(chunk, at: 0) else { return false }
            left -= chunk
        }
        return true
    }

    private func clientReadable(_ events: FDEvents) {
        guard clientFD >= 0 else { return }
        runPostponedWork()
        if socketReadDuringWait {
            socketReadDuringWait = false
            var pfd = pollfd(fd: clientFD, events: Int16(POLLIN), revents: 0)
            guard clientFD >= 0, poll(&pfd, 1, 0) > 0 else { return }
        }
        receiveOne()
        runPostponedWork()
    }

    private func receiveOne() {
        var nfds: Int32 = 0
        var truncated: Int32 = 0
        let n = csys_recv_with_fds(clientFD, receiveBuffer.baseAddress, VfioUserHeader.size, fds,
                                   Int32(Self.maxMessageFDs), &nfds, &truncated)
        if n == 0 { disconnect(reason: "end of stream"); return }
        if n < 0 {
            if -n == EAGAIN || -n == EINTR { return }
            disconnect(reason: "recv: \(String(cString: strerror(Int32(-n))))")
            return
        }
        fdCount = Int(nfds)
        defer { closeReceivedFDs() }
        if n < VfioUserHeader.size && !readExactly(VfioUserHeader.size - n, at: n) {
            disconnect(reason: "short header")
            return
        }
        guard let header = VfioUserHeader(UnsafeRawBufferPointer(rebasing: receiveBuffer[0..<VfioUserHeader.size])) else { return }
        stats.messages += 1
        if header.size < UInt32(VfioUserHeader.size) {
            log("vfio-user: message \(header.messageID) command \(header.command): size \(header.size) below the header size")
            sendError(header, EINVAL)
            disconnect(reason: "malformed message size")
            return
        }
        let payloadLength = Int(header.size) - VfioUserHeader.size
        if Int(header.size) > Self.maxMessageSize {
            log("vfio-user: message \(header.messageID) command \(header.command): size \(header.size) above \(Self.maxMessageSize)")
            if payloadLength <= 64 << 20 && discard(payloadLength) {
                sendError(header, E2BIG)
            } else {
                disconnect(reason: "oversized message")
            }
            return
        }
        if payloadLength > 0 && !readExactly(payloadLength, at: VfioUserHeader.size) {
            disconnect(reason: "truncated message body")
            return
        }
        if truncated != 0 {
            log("vfio-user: message \(header.messageID) command \(header.command): more than \(Self.maxMessageFDs) fds or control data truncated")
            sendError(header, EINVAL)
            return
        }
        if header.isReply {
            log("vfio-user: unexpected reply message \(header.messageID) command \(header.command) (no DMA request of this server awaits it)")
            return
        }
        let payload = PayloadReader(UnsafeRawBufferPointer(rebasing: receiveBuffer[VfioUserHeader.size..<(VfioUserHeader.size + payloadLength)]))
        dispatch(header, payload)
    }

    // MARK: DMA by message

    /// DMA_READ of `destination.count` bytes at guest `address`, in chunks of at most `dmaChunk` bytes.
    func remoteRead(_ address: UInt64, into destination: UnsafeMutableRawBufferPointer) -> Bool {
        guard let base = destination.baseAddress else { return true }
        var done = 0
        while done < destination.count {
            let n = min(dmaChunk, destination.count - done)
            guard transfer(write: false, address: address &+ UInt64(done), buffer: base + done, count: n) else { return false }
            done += n
        }
        return true
    }

    /// DMA_WRITE of `source` at guest `address`, in chunks of at most `dmaChunk` bytes.
    func remoteWrite(_ address: UInt64, from source: UnsafeRawBufferPointer) -> Bool {
        guard let base = source.baseAddress else { return true }
        var done = 0
        while done < source.count {
            let n = min(dmaChunk, source.count - done)
            guard transfer(write: true, address: address &+ UInt64(done), buffer: UnsafeMutableRawPointer(mutating: base + done), count: n) else { return false }
            done += n
        }
        return true
    }

    private static func monotonicMicroseconds() -> UInt64 {
        var t = timespec()
        clock_gettime(CLOCK_MONOTONIC, &t)
        return UInt64(t.tv_sec) * 1_000_000 + UInt64(t.tv_nsec) / 1000
    }

    private static func monotonicMilliseconds() -> Int64 {
        var t = timespec()
        clock_gettime(CLOCK_MONOTONIC, &t)
        return Int64(t.tv_sec) * 1000 + Int64(t.tv_nsec) / 1_000_000
    }

    private func dmaFailed(_ why: String, broken: Bool) -> Bool {
        stats.dmaFailures += 1
        log("vfio-user: DMA by message failed: \(why)\(broken ? "; DMA marked broken until reset or reconnection" : "")")
        if broken { dmaBroken = true }
        return false
    }

    /// One DMA_READ or DMA_WRITE round trip. While the reply is awaited, client messages are handled at once, in
    /// arrival order (their memory-map side effects on the device are put off until no wait is in progress); one
    /// of them may need DMA itself (nested waits, up to `maxDMADepth`). Bounded by `dmaTimeoutMilliseconds`.
    private func transfer(write: Bool, address: UInt64, buffer: UnsafeMutableRawPointer, count: Int) -> Bool {
        guard clientFD >= 0, versionNegotiated, pendingDisconnect == nil else { return dmaFailed("no client", broken: false) }
        guard !dmaBroken else { stats.dmaFailures += 1; return false }
        guard waiters.count < Self.maxDMADepth else { return dmaFailed("DMA requests nested deeper than \(Self.maxDMADepth)", broken: false) }
        guard count > 0, count <= dmaChunk else { return dmaFailed("count \(count)", broken: false) }
        let command: VfioUserCommand = write ? .dmaWrite : .dmaRead
        let id = nextRequestID
        nextRequestID = nextRequestID == UInt16.max ? 0x8000 : nextRequestID + 1
        let size = VfioUserHeader.size + 16 + (write ? count : 0)
        let out = dmaBuffer.baseAddress!
        VfioUserHeader(messageID: id, command: command.rawValue, size: UInt32(size), flags: VfioUserHeader.typeCommand)
            .encode(into: dmaBuffer)
        out.storeBytes(of: address, toByteOffset: 16, as: UInt64.self)
        out.storeBytes(of: UInt64(count), toByteOffset: 24, as: UInt64.self)
        if write { (out + 32).copyMemory(from: buffer, byteCount: count) }
        if write { stats.dmaWrites += 1 } else { stats.dmaReads += 1 }
        acknowledgeWriteEarly()
        guard sendAll(out, size) else {
            pendingDisconnect = pendingDisconnect ?? "send of a DMA request failed"
            schedulePostponedWork()
            return dmaFailed("send failed", broken: true)
        }
        let me = waiters.count
        waiters.append((id: id, command: command.rawValue, address: address, count: count, buffer: buffer, state: 0))
        let started = me == 0 ? Self.monotonicMicroseconds() : 0
        defer {
            if me == 0 { stats.dmaWaitMicroseconds &+= Self.monotonicMicroseconds() &- started }
            waiters.removeLast()
            if waiters.isEmpty && (postponedMemoryChange || postponedQuiesce || pendingDisconnect != nil || memory.holdUnmaps) {
                schedulePostponedWork()
            }
        }
        let deadline = Self.monotonicMilliseconds() + Int64(dmaTimeoutMilliseconds)
        var header = (UInt64(0), UInt64(0))
        while waiters[me].state == 0 {
            if dmaBroken || pendingDisconnect != nil { return false }
            let left = deadline - Self.monotonicMilliseconds()
            if left <= 0 {
                failAllWaiters()
                return dmaFailed("no reply to \(write ? "DMA_WRITE" : "DMA_READ") of \(count) bytes at 0x\(String(address, radix: 16)) within \(dmaTimeoutMilliseconds) ms", broken: true)
            }
            var pfd = pollfd(fd: clientFD, events: Int16(POLLIN), revents: 0)
            let ready = poll(&pfd, 1, Int32(min(left, Int64(Int32.max))))
            if ready < 0 && errno == EINTR { continue }
            if ready == 0 { continue }
            if ready < 0 { return brokenStream("poll failed during DMA") }
            // One message header (with any fds it carries).
            socketReadDuringWait = true
            var nfds: Int32 = 0
            var truncated: Int32 = 0
            let n = withUnsafeMutableBytes(of: &header) { raw in
                csys_recv_with_fds(clientFD, raw.baseAddress, VfioUserHeader.size, dmaFDs, Int32(Self.maxMessageFDs), &nfds, &truncated)
            }
            if n == 0 || (n < 0 && -n != EAGAIN && -n != EINTR) { return brokenStream("connection closed while a DMA reply was awaited") }
            if n < 0 { continue }
            let received = Int(nfds)
            var got = n
            while got < VfioUserHeader.size {
                let m = withUnsafeMutableBytes(of: &header) { raw in recv(clientFD, raw.baseAddress! + got, VfioUserHeader.size - got, Int32(MSG_WAITALL)) }
                if m < 0 && errno == EINTR { continue }
                if m <= 0 { break }
                got += m
            }
            guard got == VfioUserHeader.size, let h = withUnsafeBytes(of: &header, { VfioUserHeader($0) }),
                  h.size >= UInt32(VfioUserHeader.size) else {
                closeFDs(dmaFDs, received)
                return brokenStream("malformed message header while a DMA reply was awaited")
            }
            let payload = Int(h.size) - VfioUserHeader.size
            if h.isReply {
                closeFDs(dmaFDs, received)
                // A DMA_READ reply holds at most 16 + dmaChunk bytes: anything longer is garbage (never copied
                // past the buffer).
                guard payload <= dmaBuffer.count, readInto(dmaBuffer.baseAddress!, payload) else {
                    return brokenStream("oversized or truncated reply (\(h.size) bytes)")
                }
                completeWaiter(h, payload: payload)
                continue
            }
            // A client request: handle it now.
            guard payload <= Self.maxInlineMessage else {
                closeFDs(dmaFDs, received)
                guard payload <= 64 << 20, discardBytes(payload) else { return brokenStream("oversized client message during DMA") }
                log("vfio-user: message \(h.messageID) command \(h.command) of \(h.size) bytes during a DMA wait refused")
                sendError(h, E2BIG)
                continue
            }
            let slot = inlineBuffers.baseAddress! + (waiters.count - 1) * (Self.maxInlineMessage + 16)
            guard readInto(slot, payload) else {
                closeFDs(dmaFDs, received)
                return brokenStream("truncated client message during DMA")
            }
            stats.handledDuringDMA += 1
            handleInline(h, UnsafeRawBufferPointer(start: slot, count: payload), fdCount: received, truncated: truncated != 0)
        }
        return waiters[me].state == 1
    }

    /// The socket cannot be trusted any more: fail every wait, drop the client once the device work is over.
    private func brokenStream(_ why: String) -> Bool {
        pendingDisconnect = pendingDisconnect ?? why
        failAllWaiters()
        return dmaFailed(why, broken: true)
    }

    private func failAllWaiters() {
        for k in 0..<waiters.count where waiters[k].state == 0 { waiters[k].state = 2 }
    }

    /// Matches a reply (payload in `dmaBuffer`) to an awaiting DMA request and completes it.
    private func completeWaiter(_ h: VfioUserHeader, payload: Int) {
        guard let k = waiters.firstIndex(where: { $0.id == h.messageID && $0.command == h.command && $0.state == 0 }) else {
            log("vfio-user: unexpected reply message \(h.messageID) command \(h.command) while awaiting a DMA reply: ignored")
            return
        }
        let w = waiters[k]
        let write = h.command == VfioUserCommand.dmaWrite.rawValue
        if h.isError {
            waiters[k].state = 2
            _ = dmaFailed("client refused \(write ? "DMA_WRITE" : "DMA_READ") of \(w.count) bytes at 0x\(String(w.address, radix: 16)) (errno \(h.errorNumber))", broken: false)
            return
        }
        let p = PayloadReader(UnsafeRawBufferPointer(start: dmaBuffer.baseAddress!, count: payload))
        if write {
            // QEMU answers with the header alone; the spec's reply repeats address and count.
            if payload == 0 || (payload >= 16 && p.u64(0) == w.address && p.u64(8) == UInt64(w.count)) {
                waiters[k].state = 1
            } else {
                failAllWaiters()
                _ = dmaFailed("malformed DMA_WRITE reply (\(payload) bytes)", broken: true)
            }
            return
        }
        guard payload == 16 + w.count, p.u64(0) == w.address, p.u64(8) == UInt64(w.count) else {
            failAllWaiters()
            _ = dmaFailed("malformed DMA_READ reply: \(payload) bytes for \(w.count) at 0x\(String(w.address, radix: 16))", broken: true)
            return
        }
        w.buffer.copyMemory(from: dmaBuffer.baseAddress! + 16, byteCount: w.count)
        waiters[k].state = 1
    }

    /// Handles a client message that arrived during a DMA wait, with its own fds (the outer message's are kept).
    private func handleInline(_ h: VfioUserHeader, _ payload: UnsafeRawBufferPointer, fdCount received: Int, truncated: Bool) {
        var saved = (Int32(-1), Int32(-1), Int32(-1), Int32(-1), Int32(-1), Int32(-1), Int32(-1), Int32(-1),
                     Int32(-1), Int32(-1), Int32(-1), Int32(-1), Int32(-1), Int32(-1), Int32(-1), Int32(-1))
        let savedCount = fdCount
        withUnsafeMutableBytes(of: &saved) { raw in
            let keep = raw.baseAddress!.assumingMemoryBound(to: Int32.self)
            for i in 0..<savedCount { keep[i] = fds[i] }
        }
        for i in 0..<received {
            fds[i] = dmaFDs[i]
            dmaFDs[i] = -1
        }
        fdCount = received
        stats.messages += 1
        if truncated {
            log("vfio-user: message \(h.messageID) command \(h.command): more than \(Self.maxMessageFDs) fds or control data truncated")
            sendError(h, EINVAL)
        } else {
            let outerAck = pendingWriteAck
            pendingWriteAck = nil
            dispatch(h, PayloadReader(payload))
            pendingWriteAck = outerAck
        }
        closeReceivedFDs()
        withUnsafeBytes(of: &saved) { raw in
            let keep = raw.baseAddress!.assumingMemoryBound(to: Int32.self)
            for i in 0..<savedCount { fds[i] = keep[i] }
        }
        fdCount = savedCount
    }

    private func closeFDs(_ list: UnsafeMutablePointer<Int32>, _ count: Int) {
        for i in 0..<count where list[i] >= 0 {
            close(list[i])
            list[i] = -1
        }
    }

    private func readInto(_ base: UnsafeMutableRawPointer, _ count: Int) -> Bool {
        var got = 0
        while got < count {
            let n = recv(clientFD, base + got, count - got, Int32(MSG_WAITALL))
            if n > 0 { got += n; continue }
            if n < 0 && errno == EINTR { continue }
            return false
        }
        return true
    }

    private func discardBytes(_ count: Int) -> Bool {
        var left = count
        while left > 0 {
            let chunk = min(left, dmaBuffer.count)
            guard readInto(dmaBuffer.baseAddress!, chunk) else { return false }
            left -= chunk
        }
        return true
    }

    /// Device notifications (quiesce, memory changed), held unmaps and a disconnect put off by DMA waits.
    private func runPostponedWork() {
        guard !inDMAWait else { return }
        if postponedQuiesce {
            postponedQuiesce = false
            device.quiesce()
        }
        if memory.holdUnmaps {
            memory.holdUnmaps = false
            memory.releaseHeldUnmaps()
        }
        if postponedMemoryChange {
            postponedMemoryChange = false
            device.memoryChanged()
        }
        if let reason = pendingDisconnect {
            pendingDisconnect = nil
            disconnect(reason: reason)
        }
    }

    /// Runs the postponed work from the loop once the current callback (device work) has returned.
    private func schedulePostponedWork() {
        guard !postponedScheduled else { return }
        postponedScheduled = true
        let task = LoopTask { [unowned self] in
            self.postponedScheduled = false
            self.runPostponedWork()
        }
        loop.execute { task.body() }
    }

    /// Quiesce and memory notifications from DMA_MAP/UNMAP/DEVICE_RESET: now, or after the DMA waits in progress.
    private func deviceQuiesce() {
        if inDMAWait { postponedQuiesce = true } else { device.quiesce() }
    }

    private func deviceMemoryChanged() {
        if inDMAWait { postponedMemoryChange = true } else { device.memoryChanged() }
    }

    // MARK: Replies

    private func send(_ length: Int, fds sendFDs: UnsafePointer<Int32>? = nil, fdCount sendCount: Int = 0) {
        guard clientFD >= 0 else { return }
        if inDMAWait {
            // Inside a DMA wait (early acknowledgement or an error for an oversized message): never
            // disconnect here, the caller's device work is still running.
            if !sendAll(replyBuffer.baseAddress!, length) { pendingDisconnect = pendingDisconnect ?? "send failed" }
            return
        }
        var sent = 0
        while sent < length {
            let n = csys_send_with_fds(clientFD, replyBuffer.baseAddress! + sent, length - sent,
                                       sent == 0 ? sendFDs : nil, sent == 0 ? Int32(sendCount) : 0)
            if n <= 0 { disconnect(reason: "send failed"); return }
            sent += n
        }
    }

    /// Sends `length` bytes at `base` without fds; false on failure (the caller decides what to tear down).
    private func sendAll(_ base: UnsafeRawPointer, _ length: Int) -> Bool {
        var sent = 0
        while sent < length {
            let n = csys_send_with_fds(clientFD, base + sent, length - sent, nil, 0)
            if n <= 0 { return false }
            sent += n
        }
        return true
    }

    private func sendError(_ request: VfioUserHeader, _ errnoValue: Int32) {
        stats.errorReplies += 1
        if request.wantsNoReply { return }
        let h = VfioUserHeader(messageID: request.messageID, command: request.command, size: UInt32(VfioUserHeader.size),
                               flags: VfioUserHeader.typeReply | VfioUserHeader.error, errorNumber: UInt32(errnoValue))
        h.encode(into: replyBuffer)
        send(VfioUserHeader.size)
    }

    /// Sends a reply whose payload `fill` writes.
    private func reply(_ request: VfioUserHeader, _ fill: (inout PayloadWriter) -> Void) {
        if request.wantsNoReply { return }
        var w = PayloadWriter(UnsafeMutableRawBufferPointer(rebasing: replyBuffer[VfioUserHeader.size...]))
        fill(&w)
        if w.overflowed { sendError(request, E2BIG); return }
        let h = VfioUserHeader(messageID: request.messageID, command: request.command,
                               size: UInt32(VfioUserHeader.size + w.length), flags: VfioUserHeader.typeReply)
        h.encode(into: replyBuffer)
        send(VfioUserHeader.size + w.length)
    }

    private func fail(_ h: VfioUserHeader, _ e: Int32, _ why: String) {
        log("vfio-user: command \(h.command) (message \(h.messageID)) rejected: \(why) [errno \(e)]")
        sendError(h, e)
    }

    // MARK: Dispatch

    private func dispatch(_ h: VfioUserHeader, _ p: PayloadReader) {
        guard let command = VfioUserCommand(rawValue: h.command) else {
            fail(h, ENOSYS, "unknown command")
            return
        }
        if command != .version && !versionNegotiated {
            fail(h, EINVAL, "command before VERSION")
            return
        }
        let expectsFDs = command == .dmaMap || command == .deviceSetIRQs
        if !expectsFDs && fdCount > 0 {
            fail(h, EINVAL, "\(fdCount) unexpected fds")
            return
        }
        switch command {
        case .version: handleVersion(h, p)
        case .dmaMap: handleDMAMap(h, p)
        case .dmaUnmap: handleDMAUnmap(h, p)
        case .deviceGetInfo: handleGetInfo(h, p)
        case .deviceGetRegionInfo: handleGetRegionInfo(h, p)
        case .deviceGetIRQInfo: handleGetIRQInfo(h, p)
        case .deviceSetIRQs: handleSetIRQs(h, p)
        case .regionRead: handleRegionRead(h, p)
        case .regionWrite: handleRegionWrite(h, p)
        case .regionWriteMulti: handleRegionWriteMulti(h, p)
        case .deviceReset:
            deviceQuiesce()
            device.reset()
            dmaBroken = false
            reply(h) { _ in }
        case .deviceGetRegionIOFDs, .dirtyPages, .deviceFeature, .migDataRead, .migDataWrite:
            fail(h, ENOTSUP, "not supported by this device")
        case .dmaRead, .dmaWrite:
            fail(h, EINVAL, "server-to-client command sent by the client")
        }
    }

    private func handleVersion(_ h: VfioUserHeader, _ p: PayloadReader) {
        guard let major = p.u16(0), let minor = p.u16(2) else { fail(h, EINVAL, "VERSION payload shorter than 4 bytes"); return }
        guard major == Self.majorVersion else { fail(h, ENOTSUP, "VERSION major \(major), need \(Self.majorVersion)"); return }
        if p.count > 4 {
            let json = p.slice(4, p.count - 4)!
            guard let length = CapabilityJSON.validate(json) else {
                fail(h, EINVAL, "VERSION capabilities are not a bounded NUL-terminated JSON object")
                return
            }
            let text = UnsafeRawBufferPointer(rebasing: json[0..<length])
            if let fdsCap = CapabilityJSON.unsignedValue(of: "max_msg_fds", in: text) {
                log("vfio-user: client accepts up to \(fdsCap) fds per message")
            }
            if let xfer = CapabilityJSON.unsignedValue(of: "max_data_xfer_size", in: text) {
                guard xfer >= 4096 else {
                    fail(h, EINVAL, "client max_data_xfer_size \(xfer) below 4096")
                    return
                }
                dmaChunk = Int(min(xfer, UInt64(Self.maxDataTransfer)))
            }
        }
        versionNegotiated = true
        let replyMinor = min(minor, Self.minorVersion)
        let caps = "{\"capabilities\":{\"max_msg_fds\":\(Self.maxMessageFDs),\"max_data_xfer_size\":\(Self.maxDataTransfer),\"pgsizes\":4096,\"max_dma_maps\":\(DMAWindows.maxRegions)}}"
        reply(h) { w in
            w.u16(Self.majorVersion)
            w.u16(replyMinor)
            var c = caps
            c.withUTF8 { w.raw(UnsafeRawBufferPointer($0)) }
            if let nul = w.space(1) { nul[0] = 0 }
        }
        log("vfio-user: negotiated version \(Self.majorVersion).\(replyMinor)")
    }

    private func handleDMAMap(_ h: VfioUserHeader, _ p: PayloadReader) {
        guard p.count >= 32, let argsz = p.u32(0), let flags = p.u32(4), let offset = p.u64(8),
              let address = p.u64(16), let size = p.u64(24) else { fail(h, EINVAL, "DMA_MAP payload shorter than 32 bytes"); return }
        guard argsz >= 32 else { fail(h, EINVAL, "DMA_MAP argsz \(argsz)"); return }
        guard flags & ~UInt32(0x3) == 0 else { fail(h, EINVAL, "DMA_MAP flags 0x\(String(flags, radix: 16))"); return }
        guard fdCount <= 1 else { fail(h, EINVAL, "DMA_MAP with \(fdCount) fds"); return }
        let fd: Int32 = fdCount == 1 ? fds[0] : -1
        if fdCount == 1 { fds[0] = -1; fdCount = 0 }  // ownership passes to DMAWindows.map
        do {
            try memory.map(address: address, size: size, fileOffset: offset, readable: flags & 1 != 0,
                           writable: flags & 2 != 0, fd: fd)
        } catch {
            fail(h, error.errno, error.reason)
            return
        }
        deviceMemoryChanged()
        if fd < 0 {
            log("vfio-user: DMA window 0x\(String(address, radix: 16)) +0x\(String(size, radix: 16)) has no fd: reached with DMA_READ/DMA_WRITE messages (\(dmaChunk) bytes each at most)")
        }
        reply(h) { _ in }
    }

    private func handleDMAUnmap(_ h: VfioUserHeader, _ p: PayloadReader) {
        guard p.count >= 24, let argsz = p.u32(0), let flags = p.u32(4), let address = p.u64(8), let size = p.u64(16) else {
            fail(h, EINVAL, "DMA_UNMAP payload shorter than 24 bytes")
            return
        }
        guard argsz >= 24 else { fail(h, EINVAL, "DMA_UNMAP argsz \(argsz)"); return }
        let unmapAllFlag: UInt32 = 1 << 1
        guard flags & ~unmapAllFlag == 0 else { fail(h, ENOTSUP, "DMA_UNMAP flags 0x\(String(flags, radix: 16)) (dirty bitmaps unsupported)"); return }
        deviceQuiesce()
        // During a DMA wait the device may still hold pointers into the window: unmap it later.
        if inDMAWait { memory.holdUnmaps = true }
        if flags & unmapAllFlag != 0 {
            guard address == 0 && size == 0 else { fail(h, EINVAL, "DMA_UNMAP all with address/size"); return }
            memory.unmapAll()
        } else {
            do { try memory.unmap(address: address, size: size) } catch {
                fail(h, error.errno, error.reason)
                return
            }
        }
        deviceMemoryChanged()
        reply(h) { w in
            w.u32(24)
            w.u32(flags)
            w.u64(address)
            w.u64(size)
        }
    }

    private func handleGetInfo(_ h: VfioUserHeader, _ p: PayloadReader) {
        guard let argsz = p.u32(0), p.count >= 16 else { fail(h, EINVAL, "DEVICE_GET_INFO payload shorter than 16 bytes"); return }
        guard argsz >= 16 else { fail(h, EINVAL, "DEVICE_GET_INFO argsz \(argsz)"); return }
        reply(h) { w in
            w.u32(16)
            w.u32(0x3)  // VFIO_DEVICE_FLAGS_RESET | VFIO_DEVICE_FLAGS_PCI
            w.u32(UInt32(VfioPCIRegion.count))
            w.u32(UInt32(VfioPCIIRQ.count))
        }
    }

    /// Size and access flags of a region.
    private func regionInfo(_ index: Int) -> (size: UInt64, flags: UInt32) {
        if index == VfioPCIRegion.config { return (UInt64(PCIConfigSpace.size), 0x3) }
        if index >= 0 && index < 6 && index < device.configSpace.bars.count {
            let bar = device.configSpace.bars[index]
            return bar.size > 0 ? (UInt64(bar.size), 0x3) : (0, 0)
        }
        return (0, 0)
    }

    private func handleGetRegionInfo(_ h: VfioUserHeader, _ p: PayloadReader) {
        guard p.count >= 32, let argsz = p.u32(0), let index = p.u32(8) else { fail(h, EINVAL, "GET_REGION_INFO payload shorter than 32 bytes"); return }
        guard argsz >= 32 else { fail(h, EINVAL, "GET_REGION_INFO argsz \(argsz)"); return }
        guard index < UInt32(VfioPCIRegion.count) else { fail(h, EINVAL, "GET_REGION_INFO index \(index)"); return }
        let info = regionInfo(Int(index))
        // The synchronous-writes page: a sparse mmap area (one page of a private memfd) in that BAR. Also with
        // guest memory reached by DMA messages: a synchronous write is acknowledged early when the device needs
        // DMA meanwhile (no deadlock).
        var area: UInt64? = nil
        if let page = device.synchronousWritesPage, page.bar == Int(index), info.size > 0,
           page.offset % 4096 == 0, page.offset + 4096 <= info.size, preparedSyncPage(size: page.offset + 4096) {
            area = page.offset
        }
        let flagMMAP: UInt32 = 1 << 2, flagCaps: UInt32 = 1 << 3
        let needed: UInt32 = area == nil ? 32 : 64
        let withCaps = area != nil && argsz >= needed
        offeredMappedPage = area != nil || (offeredMappedPage && Int(index) != device.synchronousWritesPage?.bar)
        if h.wantsNoReply { return }
        var w = PayloadWriter(UnsafeMutableRawBufferPointer(rebasing: replyBuffer[VfioUserHeader.size...]))
        w.u32(needed)
        w.u32(info.flags | (area != nil ? flagMMAP | flagCaps : 0))  // READ | WRITE; MMAP only for that page
        w.u32(index)
        w.u32(area != nil ? 32 : 0)  // where the capability is (QEMU checks it even when argsz was too small)
        w.u64(info.size)
        w.u64(0)
        if withCaps, let offset = area {
            w.u16(1)  // VFIO_REGION_INFO_CAP_SPARSE_MMAP
            w.u16(1)
            w.u32(0)
            w.u32(1)  // one area
            w.u32(0)
            w.u64(offset)
            w.u64(4096)
        }
        let header = VfioUserHeader(messageID: h.messageID, command: h.command, size: UInt32(VfioUserHeader.size + w.length),
                                    flags: VfioUserHeader.typeReply)
        header.encode(into: replyBuffer)
        var fd = syncPageFD
        send(VfioUserHeader.size + w.length, fds: withCaps ? withUnsafePointer(to: &fd) { $0 } : nil, fdCount: withCaps ? 1 : 0)
        if withCaps { log("vfio-user: region \(index): page 0x\(String(area!, radix: 16)) offered for mmap (the client then sends BAR writes synchronously)") }
    }

    /// Creates (once) the memfd behind the synchronous-writes page.
    private func preparedSyncPage(size: UInt64) -> Bool {
        if syncPageFD >= 0 { return true }
        let fd = csys_memfd_create("scsigate-vfio-user-page", 0)
        guard fd >= 0 else { return false }
        guard ftruncate(fd, off_t(size)) == 0 else { close(fd); return false }
        syncPageFD = fd
        return true
    }

    private func handleGetIRQInfo(_ h: VfioUserHeader, _ p: PayloadReader) {
        guard p.count >= 16, let argsz = p.u32(0), let index = p.u32(8) else { fail(h, EINVAL, "GET_IRQ_INFO payload shorter than 16 bytes"); return }
        guard argsz >= 16 else { fail(h, EINVAL, "GET_IRQ_INFO argsz \(argsz)"); return }
        guard index < UInt32(VfioPCIIRQ.count) else { fail(h, EINVAL, "GET_IRQ_INFO index \(index)"); return }
        let count = interrupts.count(for: Int(index))
        var flags: UInt32 = 0
        if count > 0 {
            flags = 0x1 | 0x2  // EVENTFD | MASKABLE
            if Int(index) == VfioPCIIRQ.intx { flags |= 0x4 }  // AUTOMASKED
            else { flags |= 0x8 }  // NORESIZE
        }
        reply(h) { w in
            w.u32(16)
            w.u32(flags)
            w.u32(index)
            w.u32(UInt32(count))
        }
    }

    private func handleSetIRQs(_ h: VfioUserHeader, _ p: PayloadReader) {
        guard p.count >= 20, let argsz = p.u32(0), let flags = p.u32(4), let index = p.u32(8),
              let start = p.u32(12), let count = p.u32(16) else { fail(h, EINVAL, "SET_IRQS payload shorter than 20 bytes"); return }
        guard argsz >= 20 else { fail(h, EINVAL, "SET_IRQS argsz \(argsz)"); return }
        guard index < UInt32(VfioPCIIRQ.count) else { fail(h, EINVAL, "SET_IRQS index \(index)"); return }
        let dataNone: UInt32 = 1, dataBool: UInt32 = 2, dataEventfd: UInt32 = 4
        let actionMask: UInt32 = 8, actionUnmask: UInt32 = 16, actionTrigger: UInt32 = 32
        let data = flags & 0x7
        let action = flags & 0x38
        guard flags & ~UInt32(0x3F) == 0, data.nonzeroBitCount == 1, action.nonzeroBitCount == 1 else {
            fail(h, EINVAL, "SET_IRQS flags 0x\(String(flags, radix: 16))")
            return
        }
        let idx = Int(index)
        let available = interrupts.count(for: idx)
        if data == dataNone && action == actionTrigger && count == 0 {
            guard start == 0 else { fail(h, EINVAL, "SET_IRQS disable with start \(start)"); return }
            interrupts.disableAll(index: idx)
            device.interruptsChanged()
            reply(h) { _ in }
            return
        }
        let (end, overflow) = start.addingReportingOverflow(count)
        guard !overflow, count > 0, Int(end) <= available else {
            fail(h, EINVAL, "SET_IRQS index \(index) start \(start) count \(count) beyond \(available) vectors")
            return
        }
        switch data {
        case dataEventfd:
            guard action == actionTrigger else { fail(h, ENOTSUP, "SET_IRQS eventfd for mask/unmask"); return }
            guard fdCount == 0 || fdCount == Int(count) else {
                fail(h, EINVAL, "SET_IRQS count \(count) with \(fdCount) fds")
                return
            }
            for i in 0..<Int(count) {
                var fd: Int32 = -1
                if fdCount > 0 { fd = fds[i]; fds[i] = -1 }
                interrupts.assign(index: idx, vector: Int(start) + i, fd: fd)
            }
            if fdCount > 0 {
                let name = idx == VfioPCIIRQ.intx ? "INTx" : idx == VfioPCIIRQ.msi ? "MSI" : idx == VfioPCIIRQ.msix ? "MSI-X" : "index \(idx)"
                log("vfio-user: interrupt eventfd for \(name) vector \(start)\(count > 1 ? "...\(start + count - 1)" : "")")
            }
            device.interruptsChanged()
        case dataBool, dataNone:
            guard fdCount == 0 else { fail(h, EINVAL, "SET_IRQS fds without DATA_EVENTFD"); return }
            if data == dataBool && p.count < 20 + Int(count) { fail(h, EINVAL, "SET_IRQS bool array shorter than count"); return }
            for i in 0..<Int(count) {
                if data == dataBool && p.u8(20 + i) == 0 { continue }
                let v = Int(start) + i
                switch action {
                case actionMask: interrupts.mask(index: idx, vector: v)
                case actionUnmask: interrupts.unmask(index: idx, vector: v)
                default: interrupts.trigger(index: idx, vector: v)
                }
            }
        default:
            fail(h, EINVAL, "SET_IRQS data flags")
            return
        }
        reply(h) { _ in }
    }

    /// Checks a region access; returns the region size or nil after replying with an error.
    private func checkAccess(_ h: VfioUserHeader, region: UInt32, offset: UInt64, count: UInt32) -> Bool {
        guard region < UInt32(VfioPCIRegion.count) else { fail(h, EINVAL, "region index \(region)"); return false }
        let info = regionInfo(Int(region))
        guard info.size > 0 else { fail(h, EINVAL, "region \(region) not implemented"); return false }
        guard count > 0, Int(count) <= Self.maxDataTransfer else { fail(h, EINVAL, "region access count \(count)"); return false }
        let (end, overflow) = offset.addingReportingOverflow(UInt64(count))
        guard !overflow, end <= info.size else {
            fail(h, EINVAL, "region \(region) access [0x\(String(offset, radix: 16)), +\(count)) beyond size 0x\(String(info.size, radix: 16))")
            return false
        }
        if Int(region) != VfioPCIRegion.config && !(count == 1 || count == 2 || count == 4 || count == 8) {
            fail(h, EINVAL, "BAR access of \(count) bytes (1, 2, 4 or 8 supported)")
            return false
        }
        return true
    }

    private func handleRegionRead(_ h: VfioUserHeader, _ p: PayloadReader) {
        guard p.count >= 16, let offset = p.u64(0), let region = p.u32(8), let count = p.u32(12) else {
            fail(h, EINVAL, "REGION_READ payload shorter than 16 bytes")
            return
        }
        guard checkAccess(h, region: region, offset: offset, count: count) else { return }
        var ok = true
        reply(h) { w in
            w.u64(offset)
            w.u32(region)
            w.u32(count)
            guard let out = w.space(Int(count)) else { return }
            if Int(region) == VfioPCIRegion.config {
                ok = device.configSpace.read(offset: Int(offset), into: out)
            } else {
                let v = device.barRead(bar: Int(region), offset: offset, count: Int(count))
                for i in 0..<Int(count) { out[i] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(i))) }
            }
        }
        if !ok { log("vfio-user: config read out of range") }
    }

    private func performWrite(region: UInt32, offset: UInt64, count: UInt32, data: UnsafeRawBufferPointer, posted: Bool) {
        if Int(region) == VfioPCIRegion.config {
            _ = device.configSpace.write(offset: Int(offset), from: data)
        } else {
            var v: UInt64 = 0
            for i in 0..<Int(count) { v |= UInt64(data[i]) << (8 * UInt64(i)) }
            device.barWrite(bar: Int(region), offset: offset, count: Int(count), value: v, posted: posted)
        }
    }

    private func handleRegionWrite(_ h: VfioUserHeader, _ p: PayloadReader) {
        guard p.count >= 16, let offset = p.u64(0), let region = p.u32(8), let count = p.u32(12) else {
            fail(h, EINVAL, "REGION_WRITE payload shorter than 16 bytes")
            return
        }
        guard checkAccess(h, region: region, offset: offset, count: count) else { return }
        guard let data = p.slice(16, Int(count)), p.count == 16 + Int(count) else {
            fail(h, EINVAL, "REGION_WRITE payload \(p.count) bytes does not match count \(count)")
            return
        }
        // A synchronous BAR write is acknowledged early if the device needs DMA by message meanwhile (`transfer`):
        // QEMU answers DMA_READ/WRITE only once the vCPU waiting for this reply has let go of its lock.
        if !h.wantsNoReply && Int(region) != VfioPCIRegion.config { pendingWriteAck = (h, offset, region, count) }
        performWrite(region: region, offset: offset, count: count, data: data, posted: h.wantsNoReply)
        if h.wantsNoReply || Int(region) == VfioPCIRegion.config || pendingWriteAck != nil {
            pendingWriteAck = nil
            reply(h) { w in
                w.u64(offset)
                w.u32(region)
                w.u32(count)
            }
        }
    }

    /// Sends the reply of the synchronous BAR write being handled, if not sent yet (before a DMA wait).
    private func acknowledgeWriteEarly() {
        guard let ack = pendingWriteAck else { return }
        pendingWriteAck = nil
        writesAcknowledgedEarly += 1
        reply(ack.header) { w in
            w.u64(ack.offset)
            w.u32(ack.region)
            w.u32(ack.count)
        }
    }

    private func handleRegionWriteMulti(_ h: VfioUserHeader, _ p: PayloadReader) {
        guard let n = p.u64(0), n > 0, n <= 256 else { fail(h, EINVAL, "REGION_WRITE_MULTI count"); return }
        guard p.count >= 8 + Int(n) * 24 else { fail(h, EINVAL, "REGION_WRITE_MULTI payload shorter than its count"); return }
        for i in 0..<Int(n) {
            let base = 8 + i * 24
            guard let offset = p.u64(base), let region = p.u32(base + 8), let count = p.u32(base + 12),
                  count <= 8, let data = p.slice(base + 16, Int(count)) else { fail(h, EINVAL, "REGION_WRITE_MULTI entry \(i)"); return }
            guard checkAccess(h, region: region, offset: offset, count: count) else { return }
            performWrite(region: region, offset: offset, count: count, data: data, posted: true)
        }
        reply(h) { w in w.u64(n) }
    }
}

/// A closure handed to the event loop (non-generic, so the @Sendable wrapper captures no generic metatype).
private final class LoopTask: @unchecked Sendable {
    let body: () -> Void
    init(_ body: @escaping () -> Void) { self.body = body }
}
