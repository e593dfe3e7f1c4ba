import CSystem
import EventLoop
#if canImport(Glibc)
import Glibc
#endif

/// DMA for the client's memory (compare libvfio-user's dma.c): DMA_MAP / DMA_UNMAP handlers, and
/// DMA_READ / DMA_WRITE by message for windows without an fd, with re-entrant waiters (client messages
/// arriving during a wait are handled inline) and device notifications put off until no wait is in progress.
extension VfioUserServer {
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
        log.error("vfio-user: DMA by message failed: \(why)\(broken ? "; DMA marked broken until reset or reconnection" : "")")
        if broken { dmaBroken = true }
        return false
    }

    /// One DMA_READ or DMA_WRITE round trip. While the reply is awaited, client messages are handled at once, in
    /// arrival order (their memory-map side effects on the device are put off until no wait is in progress); one
    /// of them may need DMA itself (nested waits, up to `maxDMADepth`). Bounded by `dmaTimeoutMilliseconds`.
    func transfer(write: Bool, address: UInt64, buffer: UnsafeMutableRawPointer, count: Int) -> Bool {
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
                log.warning("vfio-user: message \(h.messageID) command \(h.command) of \(h.size) bytes during a DMA wait refused")
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
            log.warning("vfio-user: unexpected reply message \(h.messageID) command \(h.command) while awaiting a DMA reply: ignored")
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
            log.warning("vfio-user: message \(h.messageID) command \(h.command): more than \(Self.maxMessageFDs) fds or control data truncated")
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

    /// Device notifications (quiesce, memory changed), held unmaps and a disconnect put off by DMA waits.
    func runPostponedWork() {
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
    func deviceQuiesce() {
        if inDMAWait { postponedQuiesce = true } else { device.quiesce() }
    }

    private func deviceMemoryChanged() {
        if inDMAWait { postponedMemoryChange = true } else { device.memoryChanged() }
    }


    func handleDMAMap(_ h: VfioUserHeader, _ p: PayloadReader) {
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
            log.info("vfio-user: DMA window 0x\(String(address, radix: 16)) +0x\(String(size, radix: 16)) has no fd: reached with DMA_READ/DMA_WRITE messages (\(dmaChunk) bytes each at most)")
        }
        reply(h) { _ in }
    }

    func handleDMAUnmap(_ h: VfioUserHeader, _ p: PayloadReader) {
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
}

/// A closure handed to the event loop (non-generic, so the @Sendable wrapper captures no generic metatype).
private final class LoopTask: @unchecked Sendable {
    let body: () -> Void
    init(_ body: @escaping () -> Void) { self.body = body }
}
