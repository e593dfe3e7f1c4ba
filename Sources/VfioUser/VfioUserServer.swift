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
}

/// A vfio-user server for one PCI device on one UNIX socket (protocol 0.1 as spoken by QEMU's
/// vfio-user-pci client). One client at a time; a second connection is refused. On disconnect the
/// device is quiesced and reset, DMA windows unmapped and interrupt eventfds closed, so a new client
/// starts from power-on state.
///
/// Every field of every message is checked: a malformed message gets an error reply carrying an errno
/// and a log line; a message whose framing cannot be trusted (size below the header, oversized) also
/// closes the connection. No guest memory outside a DMA window is ever touched.
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
    public let memory: GuestMemory
    public let interrupts: InterruptController
    public var stats = VfioUserStats()
    private let log: VfioUserLog

    private var listenFD: Int32 = -1
    private(set) public var clientFD: Int32 = -1
    private var versionNegotiated = false
    private let receiveBuffer: UnsafeMutableRawBufferPointer
    private let replyBuffer: UnsafeMutableRawBufferPointer
    private let fds: UnsafeMutablePointer<Int32>
    private var fdCount = 0
    /// Milliseconds a client may take to send the rest of a message once its header arrived, and to make
    /// room for a reply; after that the client is dropped (the loop never waits longer on one client).
    public var bodyTimeoutMilliseconds: Int32 = 5000

    /// Creates a server (does not listen yet).
    public init(socketPath: String, loop: EventLoop, device: Device, msixVectors: Int, log: @escaping VfioUserLog) {
        self.socketPath = socketPath
        self.loop = loop
        self.device = device
        self.memory = GuestMemory()
        self.interrupts = InterruptController(msixVectors: msixVectors)
        self.log = log
        receiveBuffer = .allocate(byteCount: Self.maxMessageSize, alignment: 16)
        replyBuffer = .allocate(byteCount: Self.maxMessageSize, alignment: 16)
        fds = .allocate(capacity: Self.maxMessageFDs)
    }

    deinit {
        if clientFD >= 0 { close(clientFD) }
        if listenFD >= 0 { close(listenFD) }
        receiveBuffer.deallocate()
        replyBuffer.deallocate()
        fds.deallocate()
    }

    /// Binds the socket and registers it with the loop. Call on the loop thread (or before it runs).
    public func listen() throws(VfioUserError) {
        let fd = csys_unix_listen(socketPath, 4)
        guard fd >= 0 else { throw VfioUserError("cannot listen on \(socketPath): \(String(cString: strerror(-fd)))", errno: -fd) }
        listenFD = fd
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
            unlink(socketPath)
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
        stats.connections += 1
        log("vfio-user: client connected on \(socketPath)")
    }

    /// Drops the client: quiesce and reset the device, unmap guest memory, close interrupt fds.
    public func disconnect(reason: String) {
        guard clientFD >= 0 else { return }
        log("vfio-user: client disconnected (\(reason))")
        loop.unregister(fd: clientFD)
        close(clientFD)
        clientFD = -1
        versionNegotiated = false
        stats.disconnects += 1
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
            log("vfio-user: unexpected reply message \(header.messageID) (this server sends no commands)")
            return
        }
        let payload = PayloadReader(UnsafeRawBufferPointer(rebasing: receiveBuffer[VfioUserHeader.size..<(VfioUserHeader.size + payloadLength)]))
        dispatch(header, payload)
    }

    // MARK: Replies

    private func send(_ length: Int) {
        guard clientFD >= 0 else { return }
        var sent = 0
        while sent < length {
            let n = csys_send_with_fds(clientFD, replyBuffer.baseAddress! + sent, length - sent, nil, 0)
            if n <= 0 { disconnect(reason: "send failed"); return }
            sent += n
        }
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
            device.quiesce()
            device.reset()
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
            if let xfer = CapabilityJSON.unsignedValue(of: "max_data_xfer_size", in: text), xfer < 4096 {
                fail(h, EINVAL, "client max_data_xfer_size \(xfer) below 4096")
                return
            }
        }
        versionNegotiated = true
        let replyMinor = min(minor, Self.minorVersion)
        let caps = "{\"capabilities\":{\"max_msg_fds\":\(Self.maxMessageFDs),\"max_data_xfer_size\":\(Self.maxDataTransfer),\"pgsizes\":4096,\"max_dma_maps\":\(GuestMemory.maxRegions)}}"
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
        if fdCount == 1 { fds[0] = -1; fdCount = 0 }  // ownership passes to GuestMemory.map
        do {
            try memory.map(address: address, size: size, fileOffset: offset, readable: flags & 1 != 0,
                           writable: flags & 2 != 0, fd: fd)
        } catch {
            fail(h, error.errno, error.reason)
            return
        }
        device.memoryChanged()
        if fd < 0 {
            log("vfio-user: DMA window 0x\(String(address, radix: 16)) has no fd: the device cannot reach it (DMA_READ/WRITE not implemented)")
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
        device.quiesce()
        if flags & unmapAllFlag != 0 {
            guard address == 0 && size == 0 else { fail(h, EINVAL, "DMA_UNMAP all with address/size"); return }
            memory.unmapAll()
        } else {
            do { try memory.unmap(address: address, size: size) } catch {
                fail(h, error.errno, error.reason)
                return
            }
        }
        device.memoryChanged()
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
        reply(h) { w in
            w.u32(32)
            w.u32(info.flags)  // READ | WRITE, never MMAP: every access is a message
            w.u32(index)
            w.u32(0)
            w.u64(info.size)
            w.u64(0)
        }
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
        performWrite(region: region, offset: offset, count: count, data: data, posted: h.wantsNoReply)
        reply(h) { w in
            w.u64(offset)
            w.u32(region)
            w.u32(count)
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
