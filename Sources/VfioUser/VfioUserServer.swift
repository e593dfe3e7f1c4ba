import CSystem
import EventLoop
#if canImport(Glibc)
import Glibc
import Logging
import SystemErrors
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
    /// The client is about to read `count` bytes of config space at `offset` (already checked to lie inside it): a
    /// device with a config-space window into its BARs fills the window's data now.
    func configWillRead(offset: Int, count: Int)
    /// The client wrote `count` bytes of config space at `offset` (through the write masks).
    func configDidWrite(offset: Int, count: Int)
}

extension VfioUserDevice {
    public var synchronousWritesPage: (bar: Int, offset: UInt64)? { nil }
    public func interruptsChanged() {}
    public func configWillRead(offset: Int, count: Int) {}
    public func configDidWrite(offset: Int, count: Int) {}
}

/// Why a server could not start.
public struct VfioUserError: ReasonedError, Sendable {
    /// Why it failed: a failed system call (listening socket, event loop, eventfd, thread) or another reason (an unsupported device shape, a thread that would not start).
    public var reason: FailureReason
    public init(reason: FailureReason) { self.reason = reason }
}

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
    let log: Logger

    private var listenFD: Int32 = -1
    /// The listening socket was handed over (systemd socket activation): it is never unlinked.
    private var adopted = false
    private(set) public var clientFD: Int32 = -1
    var versionNegotiated = false
    let receiveBuffer: UnsafeMutableRawBufferPointer
    let replyBuffer: UnsafeMutableRawBufferPointer
    let fds: UnsafeMutablePointer<Int32>
    var fdCount = 0
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
    public internal(set) var dmaBroken = false
    var nextRequestID: UInt16 = 0x8000
    let dmaBuffer: UnsafeMutableRawBufferPointer
    let dmaFDs: UnsafeMutablePointer<Int32>
    /// Client messages that arrive while a DMA reply is awaited are handled at once, in order (a QEMU vCPU may
    /// be blocked on one, holding the lock QEMU's DMA handler needs); one buffer per nesting level.
    let inlineBuffers: UnsafeMutableRawBufferPointer
    /// DMA requests awaiting their reply, outermost first (a message handled during a wait may need DMA too).
    var waiters: [(id: UInt16, command: UInt16, address: UInt64, count: Int, buffer: UnsafeMutableRawPointer, state: UInt8)] = []
    /// Nested DMA waits allowed.
    static var maxDMADepth: Int { 4 }
    /// Work put off until no DMA wait is in progress: the device's memory notifications and held unmaps.
    var postponedMemoryChange = false
    var postponedQuiesce = false
    var postponedScheduled = false
    /// Set inside a DMA wait (which must not tear the connection down under the device's feet); acted on
    /// once the current message or callback is finished.
    var pendingDisconnect: String? = nil
    var inDMAWait: Bool { !waiters.isEmpty }
    /// A DMA wait read from the socket: a readiness the loop reported before may be stale (the message was
    /// handled inline), so the next `clientReadable` checks before its blocking receive.
    var socketReadDuringWait = false
    /// The memfd offered as the synchronous-writes page (see `VfioUserDevice.synchronousWritesPage`).
    var syncPageFD: Int32 = -1
    /// Whether the last GET_REGION_INFO offered the mappable page (QEMU then sends BAR writes synchronously).
    public internal(set) var offeredMappedPage = false
    /// The synchronous BAR write being handled, until its reply is sent.
    var pendingWriteAck: (header: VfioUserHeader, offset: UInt64, region: UInt32, count: UInt32)? = nil
    /// Synchronous BAR writes acknowledged before the device finished them (it needed DMA by message).
    public internal(set) var writesAcknowledgedEarly = 0
    /// Largest client message handled while a DMA reply is awaited (bigger ones are refused with E2BIG).
    static var maxInlineMessage: Int { 64 << 10 }

    /// Creates a server (does not listen yet).
    public init(socketPath: String, loop: EventLoop, device: Device, msixVectors: Int, msiVectors: Int = 0,
                log: Logger) {
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
        guard fd >= 0 else { throw .systemCall(SystemCallError("socket/bind/listen", errno: -fd, context: "cannot listen on \(socketPath)")) }
        listenFD = fd
        adopted = listeningFD != nil
        do {
            try loop.register(fd: fd) { [unowned self] _ in self.acceptClient() }
        } catch {
            close(fd)
            listenFD = -1
            throw .systemCall(error.within("cannot watch \(socketPath)"))
        }
        log.info("vfio-user: listening on \(socketPath)")
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
            log.warning("vfio-user: refusing a second client on \(socketPath)")
            close(fd)
            return
        }
        _ = csys_set_recv_timeout(fd, bodyTimeoutMilliseconds)
        _ = csys_set_send_timeout(fd, bodyTimeoutMilliseconds)
        do {
            try loop.register(fd: fd, events: [.readable, .hangup]) { [unowned self] events in self.clientReadable(events) }
        } catch {
            log.error("vfio-user: cannot watch client: \(error)")
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
        log.info("vfio-user: client connected on \(socketPath)")
    }

    /// Drops the client: quiesce and reset the device, unmap guest memory, close interrupt fds.
    public func disconnect(reason: String) {
        guard clientFD >= 0 else { return }
        log.info("vfio-user: client disconnected (\(reason))")
        if stats.dmaReads + stats.dmaWrites > 0 {
            let n = UInt64(stats.dmaReads + stats.dmaWrites)
            log.info("vfio-user: DMA by message so far: \(stats.dmaReads) reads, \(stats.dmaWrites) writes, \(stats.dmaFailures) failed, \(stats.dmaWaitMicroseconds / max(1, n)) us average wait")
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

    func dispatch(_ h: VfioUserHeader, _ p: PayloadReader) {
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
                log.info("vfio-user: client accepts up to \(fdsCap) fds per message")
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
        log.info("vfio-user: negotiated version \(Self.majorVersion).\(replyMinor)")
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
}
