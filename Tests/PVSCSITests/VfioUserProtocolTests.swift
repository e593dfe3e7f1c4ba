import PVSCSITestSupport
import VfioUserTestSupport
import CSystem
import PVSCSI
import Testing
import VfioUser
#if canImport(Glibc)
import Glibc
#endif

/// Malformed vfio-user messages against a PVSCSI controller: each gets an error reply with an errno (or,
/// when the framing cannot be trusted, a closed connection) and the server keeps serving.
@Suite(.serialized) struct VfioUserProtocolTests {
    func negotiated() throws -> Fixture {
        let f = try Fixture(startup: false)
        #expect(try !f.client.negotiateVersion().isError)
        return f
    }

    /// A fresh client still gets served (the server survived).
    func expectServerAlive(_ f: Fixture) throws {
        if f.clientConnected {
            #expect(try f.client.read32(7, 0) == 0x07C0_15AD)
        } else {
            let c = try VfioUserTestClient(path: f.path)
            #expect(try !c.negotiateVersion().isError)
            #expect(try c.read32(7, 0) == 0x07C0_15AD)
        }
    }

    @Test func commandBeforeVersionIsRejected() throws {
        let f = try Fixture(startup: false)
        let r = try f.client.regionRead(7, offset: 0, count: 4)
        #expect(r.isError && r.errorNumber == EINVAL)
        #expect(try !f.client.negotiateVersion().isError)
        try expectServerAlive(f)
    }

    @Test func versionWithWrongMajorOrBadJSONIsRejected() throws {
        let f = try Fixture(startup: false)
        var p = Payload()
        p.u16(1); p.u16(0)
        #expect(try f.client.request(.version, p.bytes).errorNumber == ENOTSUP)
        var q = Payload()
        q.u16(0); q.u16(1)
        for bad in ["{\"capabilities\":{", "{\"a\":1}}", "not json", "{\"capabilities\":{}}X\u{1}"] {
            #expect(try f.client.request(.version, q.bytes + Array(bad.utf8) + [0]).errorNumber == EINVAL)
        }
        #expect(try f.client.request(.version, q.bytes + Array("{}".utf8)).errorNumber == EINVAL)  // no NUL
        #expect(try f.client.request(.version, [0, 0]).errorNumber == EINVAL)  // short
        #expect(try f.client.request(.version, q.bytes + Array("{\"capabilities\":{\"max_data_xfer_size\":12}}".utf8) + [0]).errorNumber == EINVAL)
        // A version without capabilities is fine.
        #expect(try !f.client.request(.version, q.bytes).isError)
    }

    @Test func shortHeaderSizeGetsAnErrorAndTheConnectionCloses() throws {
        let f = try negotiated()
        let (id, bytes) = f.client.message(.deviceGetInfo, [], sizeOverride: 8)
        f.client.sendRaw(bytes)
        let r = try f.client.receive()
        #expect(r.header.messageID == id)
        #expect(r.isError && r.errorNumber == EINVAL)
        #expect(f.client.serverClosed())
        try expectServerAlive(f)
        #expect(f.logLines.contains("below the header size"))
    }

    @Test func truncatedMessageThenHangupIsSurvived() throws {
        let f = try negotiated()
        let (_, bytes) = f.client.message(.regionRead, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16])
        f.client.sendRaw(Array(bytes.prefix(10)))
        f.guest = nil
        f.client = nil
        var waited = 0
        while f.clientConnected && waited < 200 { usleep(10_000); waited += 1 }
        try expectServerAlive(f)
    }

    @Test func oversizedMessageIsRejected() throws {
        let f = try negotiated()
        var p = Payload()
        p.u64(0); p.u32(0); p.u32(UInt32(1 << 21))
        p.bytes += [UInt8](repeating: 0, count: 1 << 21)
        let (id, bytes) = f.client.message(.regionWrite, p.bytes)
        f.client.sendRaw(bytes)
        let r = try f.client.receive()
        #expect(r.header.messageID == id)
        #expect(r.errorNumber == E2BIG)
        try expectServerAlive(f)
    }

    @Test func payloadSizeMismatchIsRejected() throws {
        let f = try negotiated()
        var p = Payload()
        p.u64(0); p.u32(0); p.u32(4)
        p.bytes += [1, 2, 3, 4, 5, 6, 7, 8]  // 8 data bytes for count 4
        #expect(try f.client.request(.regionWrite, p.bytes).errorNumber == EINVAL)
        var q = Payload()
        q.u64(0); q.u32(0); q.u32(4)
        q.bytes += [1, 2]  // too few
        #expect(try f.client.request(.regionWrite, q.bytes).errorNumber == EINVAL)
        #expect(try f.client.request(.deviceGetRegionInfo, [32, 0, 0, 0, 0, 0, 0, 0]).errorNumber == EINVAL)
        #expect(try f.client.request(.deviceGetInfo, [16, 0]).errorNumber == EINVAL)
        #expect(try f.client.request(.dmaMap, [UInt8](repeating: 0, count: 16)).errorNumber == EINVAL)
        #expect(try f.client.request(.dmaUnmap, [UInt8](repeating: 0, count: 8)).errorNumber == EINVAL)
        #expect(try f.client.request(.deviceSetIRQs, [UInt8](repeating: 0, count: 12)).errorNumber == EINVAL)
        #expect(try f.client.request(.regionRead, [UInt8](repeating: 0, count: 15)).errorNumber == EINVAL)
        #expect(try f.client.request(.regionWriteMulti, [1, 0, 0, 0, 0, 0, 0, 0]).errorNumber == EINVAL)
        try expectServerAlive(f)
    }

    @Test func badRegionIndexOffsetAndCountAreRejected() throws {
        let f = try negotiated()
        let c = f.client!
        #expect(try c.regionRead(9, offset: 0, count: 4).errorNumber == EINVAL)
        #expect(try c.regionRead(0xFFFF_FFFF, offset: 0, count: 4).errorNumber == EINVAL)
        #expect(try c.regionRead(1, offset: 0, count: 4).errorNumber == EINVAL)  // BAR1 not implemented
        #expect(try c.regionRead(0, offset: 32764, count: 8).errorNumber == EINVAL)
        #expect(try c.regionRead(0, offset: UInt64.max - 1, count: 4).errorNumber == EINVAL)
        #expect(try c.regionRead(0, offset: 0, count: 0).errorNumber == EINVAL)
        #expect(try c.regionRead(0, offset: 0, count: 3).errorNumber == EINVAL)
        #expect(try c.regionRead(7, offset: 254, count: 4).errorNumber == EINVAL)
        #expect(try c.regionRead(7, offset: 0, count: 0x10_0001).errorNumber == EINVAL)
        #expect(try c.regionWrite(0, offset: 32768, data: [0, 0, 0, 0]).errorNumber == EINVAL)
        var q = Payload()
        q.u32(32); q.u32(0); q.u32(9); q.u32(0); q.u64(0); q.u64(0)
        #expect(try c.request(.deviceGetRegionInfo, q.bytes).errorNumber == EINVAL)
        var irq = Payload()
        irq.u32(16); irq.u32(0); irq.u32(5); irq.u32(0)
        #expect(try c.request(.deviceGetIRQInfo, irq.bytes).errorNumber == EINVAL)
        // Whole config space in one read is fine.
        let all = try c.regionRead(7, offset: 0, count: 256)
        #expect(!all.isError && all.payload.count == 16 + 256)
        #expect(f.serverStats.errorReplies >= 12)
        try expectServerAlive(f)
    }

    @Test func tooManyOrUnexpectedFDsAreRejectedAndClosed() throws {
        let f = try negotiated()
        var fds: [Int32] = []
        for _ in 0..<20 { fds.append(csys_eventfd(0, 1)) }
        defer { for fd in fds { close(fd) } }
        var p = Payload()
        p.u32(20); p.u32(4 | 32); p.u32(2); p.u32(0); p.u32(1)
        #expect(try f.client.request(.deviceSetIRQs, p.bytes, fds: fds).errorNumber == EINVAL)
        // An fd with a command that takes none.
        var r = Payload()
        r.u64(0); r.u32(7); r.u32(4)
        #expect(try f.client.request(.regionRead, r.bytes, fds: [fds[0]]).errorNumber == EINVAL)
        // Count and fds disagree.
        #expect(try f.client.setIRQs(index: 2, flags: 4 | 32, start: 0, count: 1, fds: [fds[0], fds[1]]).errorNumber == EINVAL)
        // Two fds on DMA_MAP.
        #expect(try f.client.request(.dmaMap, {
            var m = Payload(); m.u32(32); m.u32(3); m.u64(0); m.u64(0x10_0000); m.u64(0x1000); return m.bytes }(), fds: [fds[0], fds[1]]).errorNumber == EINVAL)
        try expectServerAlive(f)
    }

    @Test func setIRQsRangeAndFlagsAreChecked() throws {
        let f = try negotiated()
        let c = f.client!
        let e = csys_eventfd(0, 1)
        defer { close(e) }
        #expect(try c.setIRQs(index: 7, flags: 4 | 32, start: 0, count: 1, fds: [e]).errorNumber == EINVAL)
        #expect(try c.setIRQs(index: 2, flags: 4 | 32, start: 1, count: 1, fds: [e]).errorNumber == EINVAL)
        #expect(try c.setIRQs(index: 2, flags: 4 | 32, start: 0xFFFF_FFFF, count: 2, fds: [e, e]).errorNumber == EINVAL)
        #expect(try c.setIRQs(index: 2, flags: 1 | 2 | 32, start: 0, count: 1).errorNumber == EINVAL)
        #expect(try c.setIRQs(index: 2, flags: 1 | 8 | 16, start: 0, count: 1).errorNumber == EINVAL)
        #expect(try c.setIRQs(index: 2, flags: 0x40 | 1 | 32, start: 0, count: 1).errorNumber == EINVAL)
        #expect(try c.setIRQs(index: 2, flags: 2 | 32, start: 0, count: 1, data: []).errorNumber == EINVAL)  // bool array missing
        #expect(try c.setIRQs(index: 1, flags: 4 | 32, start: 1, count: 1, fds: [e]).errorNumber == EINVAL)  // one MSI vector
        #expect(try c.setIRQs(index: 3, flags: 4 | 32, start: 0, count: 1, fds: [e]).errorNumber == EINVAL)  // no ERR vectors
        // Valid: install, trigger by DATA_NONE, then disable all.
        #expect(try !c.setIRQs(index: 2, flags: 4 | 32, start: 0, count: 1, fds: [e]).isError)
        #expect(try !c.setIRQs(index: 2, flags: 1 | 32, start: 0, count: 1).isError)
        var pfd = pollfd(fd: e, events: Int16(POLLIN), revents: 0)
        #expect(poll(&pfd, 1, 1000) == 1)
        #expect(try !c.setIRQs(index: 2, flags: 1 | 32, start: 0, count: 0).isError)
        try expectServerAlive(f)
    }

    @Test func dmaMapOverlappingOrOutOfRangeIsRejected() throws {
        let f = try negotiated()
        let c = f.client!
        let memfd = csys_memfd_create("dma-test", 0)
        defer { close(memfd) }
        #expect(ftruncate(memfd, 1 << 20) == 0)
        #expect(try !c.dmaMap(address: 0x10_0000, size: 0x8_0000, fd: memfd).isError)
        let overlap = try c.dmaMap(address: 0x14_0000, size: 0x8_0000, fd: memfd)
        #expect(overlap.errorNumber == EEXIST)
        #expect(try c.dmaMap(address: 0x0F_F000, size: 0x2000, fd: memfd).errorNumber == EEXIST)
        #expect(try c.dmaMap(address: UInt64.max - 0xFFF, size: 0x2000, fd: memfd).errorNumber == EINVAL)  // wraps
        #expect(try c.dmaMap(address: 0x100_0000, size: 0, fd: memfd).errorNumber == EINVAL)
        #expect(try c.dmaMap(address: 0x100_0800, size: 0x1000, fd: memfd).errorNumber == EINVAL)  // unaligned
        #expect(try c.dmaMap(address: 0x100_0000, size: 0x20_0000, fd: memfd).errorNumber == EINVAL)  // past end of file
        #expect(try c.dmaMap(address: 0x100_0000, size: 0x1000, offset: 0x10_0000, fd: memfd).errorNumber == EINVAL)
        #expect(try c.dmaMap(address: 0x100_0000, size: 0x1000, flags: 0x10, fd: memfd).errorNumber == EINVAL)
        #expect(try c.dmaUnmap(address: 0x10_0000, size: 0x1000).errorNumber == EINVAL)  // not an exact match
        #expect(try c.dmaUnmap(address: 0x10_0000, size: 0x8_0000, flags: 1).errorNumber == ENOTSUP)
        #expect(f.dmaWindowCount == 1)
        #expect(try !c.dmaUnmap(address: 0x10_0000, size: 0x8_0000).isError)
        #expect(f.dmaWindowCount == 0)
        try expectServerAlive(f)
    }

    @Test func unknownAndUnsupportedCommandsGetErrors() throws {
        let f = try negotiated()
        let (id, bytes) = f.client.message(.version, [])
        var raw = bytes
        raw[2] = 99  // command 99
        f.client.sendRaw(raw)
        let r = try f.client.receive()
        #expect(r.header.messageID == id && r.errorNumber == ENOSYS)
        #expect(try f.client.request(.deviceGetRegionIOFDs, [UInt8](repeating: 0, count: 16)).errorNumber == ENOTSUP)
        #expect(try f.client.request(.deviceFeature, [UInt8](repeating: 0, count: 16)).errorNumber == ENOTSUP)
        #expect(try f.client.request(.dmaRead, [UInt8](repeating: 0, count: 16)).errorNumber == EINVAL)
        // A reply-typed message from the client is ignored (no answer), the next request still works.
        let (_, reply) = f.client.message(.deviceReset, [], flags: VfioUserHeader.typeReply)
        f.client.sendRaw(reply)
        try expectServerAlive(f)
    }

    @Test func noReplyFlagSuppressesTheReply() throws {
        let f = try negotiated()
        var p = Payload()
        p.u64(0x3C); p.u32(7); p.u32(1)
        p.bytes += [0x0B]
        let (_, bytes) = f.client.message(.regionWrite, p.bytes, flags: VfioUserHeader.noReply)
        f.client.sendRaw(bytes)
        // The next reply is for the next request, and the posted write took effect.
        #expect(try f.client.read32(7, 0x3C) & 0xFF == 0x0B)
    }

    @Test func deviceResetReturnsTheDeviceToPowerOnState() throws {
        let f = try Fixture()
        #expect(f.ringsReady)
        #expect(try !f.client.request(.deviceReset).isError)
        #expect(!f.ringsReady)
        #expect(try f.guest.readRegister(PVSCSI.Register.interruptMask) == 0)
    }

    @Test func clientThatNeverReadsRepliesIsDroppedNotWaitedOnForever() throws {
        let f = try Fixture(connect: false)
        let server = f.controller.server
        _ = f.controller.sync { server.bodyTimeoutMilliseconds = 300; return 0 }
        let c = try VfioUserTestClient(path: f.path)
        var size: Int32 = 4096
        setsockopt(c.fd, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        #expect(try !c.negotiateVersion().isError)
        // Ask for 1 MiB of config-space reads replies (256 bytes each) without reading any of them.
        var p = Payload()
        p.u64(0); p.u32(7); p.u32(256)
        let (_, one) = c.message(.regionRead, p.bytes)
        var burst: [UInt8] = []
        for _ in 0..<4096 { burst += one }
        var flags = fcntl(c.fd, F_GETFL)
        flags |= O_NONBLOCK
        _ = fcntl(c.fd, F_SETFL, flags)
        _ = burst.withUnsafeBytes { send(c.fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        var waited = 0
        while f.clientConnected && waited < 500 { usleep(10_000); waited += 1 }
        #expect(!f.clientConnected)
        try expectServerAlive(f)
    }
}
