import CSystem
import EventLoop
#if canImport(Glibc)
import Glibc
#endif

/// Message framing on the client socket (compare libvfio-user's tran_sock.c): receiving one message
/// with its SCM_RIGHTS fds (size checks, body timeout, oversized or truncated messages), and sending
/// replies and error replies with optional fds.
extension VfioUserServer {
    func closeReceivedFDs(from start: Int = 0) {
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

    func clientReadable(_ events: FDEvents) {
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
            log.warning("vfio-user: message \(header.messageID) command \(header.command): size \(header.size) below the header size")
            sendError(header, EINVAL)
            disconnect(reason: "malformed message size")
            return
        }
        let payloadLength = Int(header.size) - VfioUserHeader.size
        if Int(header.size) > Self.maxMessageSize {
            log.warning("vfio-user: message \(header.messageID) command \(header.command): size \(header.size) above \(Self.maxMessageSize)")
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
            log.warning("vfio-user: message \(header.messageID) command \(header.command): more than \(Self.maxMessageFDs) fds or control data truncated")
            sendError(header, EINVAL)
            return
        }
        if header.isReply {
            log.warning("vfio-user: unexpected reply message \(header.messageID) command \(header.command) (no DMA request of this server awaits it)")
            return
        }
        let payload = PayloadReader(UnsafeRawBufferPointer(rebasing: receiveBuffer[VfioUserHeader.size..<(VfioUserHeader.size + payloadLength)]))
        dispatch(header, payload)
    }


    func closeFDs(_ list: UnsafeMutablePointer<Int32>, _ count: Int) {
        for i in 0..<count where list[i] >= 0 {
            close(list[i])
            list[i] = -1
        }
    }

    func readInto(_ base: UnsafeMutableRawPointer, _ count: Int) -> Bool {
        var got = 0
        while got < count {
            let n = recv(clientFD, base + got, count - got, Int32(MSG_WAITALL))
            if n > 0 { got += n; continue }
            if n < 0 && errno == EINTR { continue }
            return false
        }
        return true
    }

    func discardBytes(_ count: Int) -> Bool {
        var left = count
        while left > 0 {
            let chunk = min(left, dmaBuffer.count)
            guard readInto(dmaBuffer.baseAddress!, chunk) else { return false }
            left -= chunk
        }
        return true
    }

    func send(_ length: Int, fds sendFDs: UnsafePointer<Int32>? = nil, fdCount sendCount: Int = 0) {
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
    func sendAll(_ base: UnsafeRawPointer, _ length: Int) -> Bool {
        var sent = 0
        while sent < length {
            let n = csys_send_with_fds(clientFD, base + sent, length - sent, nil, 0)
            if n <= 0 { return false }
            sent += n
        }
        return true
    }

    func sendError(_ request: VfioUserHeader, _ errnoValue: Int32) {
        stats.errorReplies += 1
        if request.wantsNoReply { return }
        let h = VfioUserHeader(messageID: request.messageID, command: request.command, size: UInt32(VfioUserHeader.size),
                               flags: VfioUserHeader.typeReply | VfioUserHeader.error, errorNumber: UInt32(errnoValue))
        h.encode(into: replyBuffer)
        send(VfioUserHeader.size)
    }

    /// Sends a reply whose payload `fill` writes.
    func reply(_ request: VfioUserHeader, _ fill: (inout PayloadWriter) -> Void) {
        if request.wantsNoReply { return }
        var w = PayloadWriter(UnsafeMutableRawBufferPointer(rebasing: replyBuffer[VfioUserHeader.size...]))
        fill(&w)
        if w.overflowed { sendError(request, E2BIG); return }
        let h = VfioUserHeader(messageID: request.messageID, command: request.command,
                               size: UInt32(VfioUserHeader.size + w.length), flags: VfioUserHeader.typeReply)
        h.encode(into: replyBuffer)
        send(VfioUserHeader.size + w.length)
    }

    func fail(_ h: VfioUserHeader, _ e: Int32, _ why: String) {
        log.warning("vfio-user: command \(h.command) (message \(h.messageID)) rejected: \(why) [errno \(e)]")
        sendError(h, e)
    }
}
