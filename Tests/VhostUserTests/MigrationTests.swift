import TestSupport
import VirtioTestSupport
import VhostUserTestSupport
import BlockIO
import CSystem
import GuestMemoryMap
import Testing
import VhostUser
import VirtioDevices
import Virtio
#if canImport(Glibc)
import Glibc
#endif

/// The dirty-page log as the VMM shares it: a memfd bitmap covering the test guest's RAM, read here
/// through a second mapping.
final class TestDirtyLog {
    let fd: Int32
    let size: Int
    let view: DirtyLog

    init(ram: TestGuestRAM) throws {
        let pages = (ram.gpaBase + UInt64(ram.size)) >> 12
        size = Int((pages + 7) / 8)
        fd = csys_memfd_create("test-dirty-log", 0)
        precondition(fd >= 0 && ftruncate(fd, off_t(size)) == 0)
        view = try DirtyLog(fd: dup(fd), size: UInt64(size), offset: 0)
    }

    deinit { close(fd) }

    /// SET_LOG_BASE as QEMU sends it (size, offset 0, the memfd); returns whether the empty reply came.
    func send(to client: TestFrontEnd) -> Bool {
        var p = [UInt8]()
        p.appendLE(UInt64(size))
        p.appendLE(UInt64(0))
        client.send(.setLogBase, p, fds: [fd])
        guard let r = client.receive() else { return false }
        return r.request == VhostUserRequest.setLogBase.rawValue && r.payload.isEmpty
    }

    /// Page numbers that `length` bytes at `gpa` touch.
    static func pages(_ gpa: UInt64, _ length: Int) -> Set<UInt64> {
        Set((gpa >> 12)...((gpa + UInt64(length) - 1) >> 12))
    }
}

/// A virtio-blk request laid out at chosen guest addresses: header, optional data-out, optional data-in, status.
struct BlkTestRequest {
    var header: UInt64
    var dataIn: UInt64 = 0
    var status: UInt64

    /// Writes the chain on `ring`, publishes it and kicks.
    static func submit(ram: TestGuestRAM, ring: TestSplitRing, kick: Int32, type: UInt32, sector: UInt64, out: [UInt8] = [],
                       dataIn: (gpa: UInt64, length: Int)? = nil) -> BlkTestRequest {
        var buffers = ram.blkRequestOut(type: type, sector: sector, out: out, align: 4096)
        let header = buffers[0].gpa
        if let dataIn { buffers.append(.init(gpa: dataIn.gpa, length: UInt32(dataIn.length), writable: true)) }
        let status = ram.alloc(1, align: 4096)
        ram.pointer(status).storeBytes(of: 0xFF, as: UInt8.self)
        buffers.append(.init(gpa: status, length: 1, writable: true))
        ring.publish(ring.addChain(buffers))
        _ = csys_eventfd_signal(kick, 1)
        return BlkTestRequest(header: header, dataIn: dataIn?.gpa ?? 0, status: status)
    }
}

/// SET_VRING_ADDR for a running ring with VHOST_VRING_F_LOG and the used ring's guest address, as QEMU
/// sends it when dirty logging starts.
func vringAddressWithLog(_ ram: TestGuestRAM, _ ring: TestSplitRing, index: UInt32, log: Bool) -> [UInt8] {
    var addr = [UInt8]()
    addr.appendLE(index)
    addr.appendLE(log ? vhostVringFlagLog : 0)
    addr.appendLE(ram.user(ring.desc))
    addr.appendLE(ram.user(ring.used))
    addr.appendLE(ram.user(ring.avail))
    addr.appendLE(log ? ring.used : 0)
    return addr
}

@Suite(.serialized) struct DirtyLogTests {
    static let features = VirtioFeature.version1 | VirtioFeature.ringIndirectDescriptors | vhostUserFeatureProtocolFeatures

    @Test func markSetsExactlyThePagesARangeTouches() throws {
        let ram = TestGuestRAM(size: 1 << 20)
        let log = try TestDirtyLog(ram: ram)
        // 8 KiB starting 100 bytes before a page boundary: three pages.
        let start = ram.gpaBase + 0x3000 - 100
        log.view.mark(guestPhysical: start, length: 8192)
        #expect(Set(log.view.markedPages) == TestDirtyLog.pages(start, 8192))
        #expect(log.view.markedPages.count == 3)
        log.view.clear()
        // One byte, the last byte of a page; zero length marks nothing; past the bitmap is ignored.
        log.view.mark(guestPhysical: ram.gpaBase + 0x4FFF, length: 1)
        log.view.mark(guestPhysical: ram.gpaBase, length: 0)
        log.view.mark(guestPhysical: UInt64.max - 10, length: 100)
        #expect(log.view.markedPages == [(ram.gpaBase + 0x4FFF) >> 12])
    }

    @Test func refusesALogLargerThanItsFile() throws {
        let fd = csys_memfd_create("small-log", 0)
        #expect(ftruncate(fd, 4096) == 0)
        #expect(throws: DirtyLog.Failure.self) { try DirtyLog(fd: fd, size: 8192, offset: 0) }
    }

    @Test func dataInSpanningPagesStatusAndUsedRingAreLoggedOnlyWhileLogging() throws {
        let f = try BlkFixture(extraProtocolFeatures: VhostUserProtocolFeature.logSharedMemory)
        let log = try TestDirtyLog(ram: f.ram)
        let stored = (0..<12288).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ 1) }
        stored.withUnsafeBytes { f.channel.storage.copyMemory(from: $0) }
        #expect(f.client.getU64(.getFeatures)! & vhostFeatureLogAll != 0)
        #expect(f.client.getU64(.getProtocolFeatures)! & VhostUserProtocolFeature.logSharedMemory != 0)

        // Logging on: log base, used-ring log address on the running ring, then LOG_ALL.
        #expect(log.send(to: f.client))
        #expect(f.client.ack(.setVringAddr, vringAddressWithLog(f.ram, f.ring, index: 0, log: true)) == 0)
        #expect(f.client.ack(.setFeatures, TestFrontEnd.u64(Self.features | vhostFeatureLogAll)) == 0)
        // Before any request, only the device's own notification writes (used->flags or avail_event, written as
        // the loop starts and stops polling) may be marked: no data page, no used entry.
        let deviceArea = TestDirtyLog.pages(f.ring.used, 2).union(TestDirtyLog.pages(f.ring.used + 4 + 8 * UInt64(f.ring.size), 2))
        #expect(Set(log.view.markedPages).isSubset(of: deviceArea))

        // A read of 12 KiB into a buffer that starts 512 bytes before a page boundary: 4 pages.
        let dataIn = f.ram.alloc(16384, align: 4096) + 4096 - 512
        let r = BlkTestRequest.submit(ram: f.ram, ring: f.ring, kick: f.kick, type: VirtioBlk.typeIn, sector: 0,
                                      dataIn: (dataIn, 12288))
        #expect(waitFor { f.ring.usedIndex == 1 })
        #expect(f.ram.read(dataIn, 12288) == stored, "data-in bytes")
        let expected = TestDirtyLog.pages(dataIn, 12288).union(TestDirtyLog.pages(r.status, 1))
            .union(TestDirtyLog.pages(f.ring.used + 2, 2)).union(TestDirtyLog.pages(f.ring.used + 4, 8))
        #expect(TestDirtyLog.pages(dataIn, 12288).count == 4)
        #expect(Set(log.view.markedPages) == expected)
        #expect(!log.view.isMarked(page: r.header >> 12))

        // A write marks its status byte and the used ring, never the data it read from the guest.
        log.view.clear()
        let w = BlkTestRequest.submit(ram: f.ram, ring: f.ring, kick: f.kick, type: VirtioBlk.typeOut, sector: 64,
                                      out: [UInt8](repeating: 7, count: 4096))
        #expect(waitFor { f.ring.usedIndex == 2 })
        #expect(Set(log.view.markedPages) == TestDirtyLog.pages(w.status, 1).union(TestDirtyLog.pages(f.ring.used, 4 + 16)))

        // Logging off (LOG_ALL cleared while the ring runs): nothing is marked any more.
        #expect(f.client.ack(.setFeatures, TestFrontEnd.u64(Self.features)) == 0)
        log.view.clear()
        _ = BlkTestRequest.submit(ram: f.ram, ring: f.ring, kick: f.kick, type: VirtioBlk.typeIn, sector: 0, dataIn: (dataIn, 12288))
        #expect(waitFor { f.ring.usedIndex == 3 })
        #expect(log.view.markedPages.isEmpty)

        // And on again.
        #expect(f.client.ack(.setFeatures, TestFrontEnd.u64(Self.features | vhostFeatureLogAll)) == 0)
        let again = BlkTestRequest.submit(ram: f.ram, ring: f.ring, kick: f.kick, type: VirtioBlk.typeIn, sector: 0,
                                          dataIn: (dataIn, 12288))
        #expect(waitFor { f.ring.usedIndex == 4 })
        #expect(TestDirtyLog.pages(dataIn, 12288).union(TestDirtyLog.pages(again.status, 1)).isSubset(of: Set(log.view.markedPages)))
        #expect(f.log.contains("dirty logging on"))
        #expect(f.log.contains("dirty logging off"))
    }

    @Test func packedRingLogsTheWritableBuffersAndTheDescriptorsWrittenBack() throws {
        let ram = TestGuestRAM(size: 1 << 20)
        let log = try TestDirtyLog(ram: ram)
        let memory = try GuestMemory.map([(GuestMemoryRegionDescriptor(guestPhysicalAddress: ram.gpaBase, size: UInt64(ram.size),
                                                                       userAddress: ram.userBase, mmapOffset: 0), ram.fd)], limit: 8)
        let ring = TestPackedRing(ram: ram, size: 16)
        let queue = try Virtqueue(size: 16, options: VirtqueueOptions(features: VirtioFeature.version1 | VirtioFeature.ringPacked),
                                  addresses: VirtqueueAddresses(descriptorTable: ram.user(ring.desc), driverArea: ram.user(ring.driverEvent),
                                                                deviceArea: ram.user(ring.deviceEvent)),
                                  memory: memory, base: 0x8000, segmentsPerSlot: 8)
        queue.setDirtyLog(log.view, usedRingLogAddress: ring.deviceEvent)
        let header = ram.alloc(16, align: 4096)
        let data = ram.alloc(12288, align: 4096) + 2048
        let status = ram.alloc(1, align: 4096)
        ring.add(id: 5, [.init(gpa: header, length: 16, writable: false), .init(gpa: data, length: 8192, writable: true),
                         .init(gpa: status, length: 1, writable: true)])
        guard case let .chain(chain) = queue.pop() else {
            Issue.record("no chain popped")
            return
        }
        #expect(chain.head == 5 && chain.writableCount == 2)
        #expect(log.view.markedPages.isEmpty)
        queue.push(head: chain.head, ringEntries: chain.ringEntries, length: 8193)
        _ = queue.flush()
        let expected = TestDirtyLog.pages(data, 8192).union(TestDirtyLog.pages(status, 1)).union(TestDirtyLog.pages(ring.desc, 16))
        #expect(TestDirtyLog.pages(data, 8192).count == 3)
        #expect(Set(log.view.markedPages) == expected)
        #expect(!log.view.isMarked(page: header >> 12))
    }

    @Test func requestInFlightWhenLoggingStartsIsLoggedAtCompletion() throws {
        let f = try BlkFixture(extraProtocolFeatures: VhostUserProtocolFeature.logSharedMemory)
        let log = try TestDirtyLog(ram: f.ram)
        f.channel.hold.store(true, ordering: .releasing)
        let dataIn = f.ram.alloc(4096, align: 4096)
        let r = BlkTestRequest.submit(ram: f.ram, ring: f.ring, kick: f.kick, type: VirtioBlk.typeIn, sector: 8, dataIn: (dataIn, 4096))
        #expect(waitFor { f.channel.operations.withLock { $0.count } == 1 })
        #expect(log.send(to: f.client))
        #expect(f.client.ack(.setFeatures, TestFrontEnd.u64(Self.features | vhostFeatureLogAll)) == 0)
        f.channel.releaseHeld()
        #expect(waitFor { f.ring.usedIndex == 1 })
        // No used-ring log address was given: only the buffers the device wrote.
        #expect(Set(log.view.markedPages) == TestDirtyLog.pages(dataIn, 4096).union(TestDirtyLog.pages(r.status, 1)))
    }

    @Test func hostileLoggingMessagesAreRefused() throws {
        let f = try BlkFixture(extraProtocolFeatures: VhostUserProtocolFeature.logSharedMemory)
        // Unknown address flags, and new ring addresses while the ring runs: refused, the ring keeps running.
        var bad = vringAddressWithLog(f.ram, f.ring, index: 0, log: true)
        bad[4] = 3
        #expect(f.client.ack(.setVringAddr, bad) == 1)
        var moved = vringAddressWithLog(f.ram, f.ring, index: 0, log: true)
        moved.replaceSubrange(8..<16, with: TestFrontEnd.u64(f.ram.user(f.ring.desc) + 4096))
        #expect(f.client.ack(.setVringAddr, moved) == 1)
        #expect(f.request(type: VirtioBlk.typeFlush, sector: 0)?.0 == VirtioBlk.statusOK)
        // SET_LOG_FD is accepted (its fd closed); SET_LOG_BASE without its fd ends the connection (it has its own reply).
        let logCall = csys_eventfd(0, 1)
        #expect(f.client.ack(.setLogFD, [], fds: [logCall]) == 0)
        close(logCall)
        var p = [UInt8]()
        p.appendLE(UInt64(4096))
        p.appendLE(UInt64(0))
        f.client.send(.setLogBase, p)
        #expect(f.client.isClosed())
    }

    @Test func badLogBaseClosesTheConnection() throws {
        let f = try BlkFixture(extraProtocolFeatures: VhostUserProtocolFeature.logSharedMemory)
        let fd = csys_memfd_create("short-log", 0)
        #expect(ftruncate(fd, 4096) == 0)
        var p = [UInt8]()
        p.appendLE(UInt64(1 << 20))
        p.appendLE(UInt64(0))
        f.client.send(.setLogBase, p, fds: [fd])
        close(fd)
        #expect(f.client.isClosed())
        #expect(f.log.contains("dirty log"))
    }
}

/// A virtio-blk controller with a source front-end (ring running, on `sourceRAM`) and room for a destination.
final class HandoverFixture: @unchecked Sendable {
    let sourceRAM = TestGuestRAM()
    let destinationRAM = TestGuestRAM()
    let sourceRing: TestSplitRing
    let destinationRing: TestSplitRing
    let channel = MemoryChannel(bytes: 1 << 20)
    let device: VirtioBlkDevice<MemoryChannel>
    let server: VhostUserServer<VirtioBlkDevice<MemoryChannel>>
    let log = TestLog()
    var source: TestFrontEnd!
    var sourceFDs: [(kick: Int32, call: Int32)] = []
    let path = testSocketPath("handover")
    static let protocolFeatures = VhostUserProtocolFeature.replyAck | VhostUserProtocolFeature.multiQueue
        | VhostUserProtocolFeature.logSharedMemory

    init(handoverTimeoutMilliseconds: Int = 10_000) throws {
        sourceRing = TestSplitRing(ram: sourceRAM, size: 16)
        destinationRing = TestSplitRing(ram: destinationRAM, size: 16)
        let geometry = BlockGeometry(logicalBlockSize: 512, physicalBlockSize: 4096, blockCount: 2048, readOnly: false)
        let ch = channel
        device = try VirtioBlkDevice(geometry: geometry, options: VirtioBlkOptions(queues: 1, serial: "SG-MIG"),
                                     channelFactory: { ch }, log: log.logger)
        server = VhostUserServer(socketPath: path, device: device, log: log.logger)
        server.handoverTimeoutMilliseconds = handoverTimeoutMilliseconds
        try server.start()
        source = TestFrontEnd(path: path)
        sourceFDs = source.setUp(ram: sourceRAM, rings: [sourceRing], features: DirtyLogTests.features,
                                 protocolFeatures: Self.protocolFeatures)
    }

    /// The destination: connects and sets everything up; its ring start is sent without waiting.
    func connectDestination() -> (TestFrontEnd, [(kick: Int32, call: Int32)]) {
        let destination = TestFrontEnd(path: path)!
        let fds = destination.setUp(ram: destinationRAM, rings: [destinationRing], features: DirtyLogTests.features,
                                    protocolFeatures: Self.protocolFeatures, waitForRings: false)
        return (destination, fds)
    }

    deinit {
        source = nil
        server.stop()
        device.shutdown()
        for f in sourceFDs { close(f.kick); close(f.call) }
    }
}

@Suite(.serialized) struct HandoverTests {
    @Test func destinationWaitsForTheSourceToDrainAndStopItsRings() throws {
        let f = try HandoverFixture()
        let stored = [UInt8](repeating: 0x5A, count: 4096)
        stored.withUnsafeBytes { f.channel.storage.copyMemory(from: $0) }
        // A source read stays in flight in the back-end.
        f.channel.hold.store(true, ordering: .releasing)
        let sourceIn = f.sourceRAM.alloc(4096, align: 4096)
        let s = BlkTestRequest.submit(ram: f.sourceRAM, ring: f.sourceRing, kick: f.sourceFDs[0].kick, type: VirtioBlk.typeIn,
                                      sector: 0, dataIn: (sourceIn, 4096))
        #expect(waitFor { f.channel.operations.withLock { $0.count } == 1 })

        // The destination attaches while the source is connected, and makes a request available.
        let (destination, fds) = f.connectDestination()
        defer { for x in fds { close(x.kick); close(x.call) } }
        let destinationIn = f.destinationRAM.alloc(4096, align: 4096)
        let d = BlkTestRequest.submit(ram: f.destinationRAM, ring: f.destinationRing, kick: fds[0].kick, type: VirtioBlk.typeIn,
                                      sector: 0, dataIn: (destinationIn, 4096))
        #expect(waitFor { f.log.contains("waiting for them to stop") })
        usleep(200_000)
        // Its ring did not start: nothing of it reached the back-end, nothing was completed in its memory.
        #expect(f.channel.operations.withLock { $0.count } == 1)
        #expect(f.destinationRing.usedIndex == 0)
        #expect(f.server.handoverCount == 0)

        // The source stops its ring: the held request completes into the source's memory first.
        f.channel.releaseHeld()
        #expect(f.source.getVringBase(0) == 1)
        #expect(f.sourceRing.usedIndex == 1)
        #expect(f.sourceRAM.read(s.status, 1) == [VirtioBlk.statusOK])
        #expect(f.sourceRAM.read(sourceIn, 4096) == stored)

        // Now the destination's ring runs: its own request completes once, in its own memory.
        #expect(waitFor { f.destinationRing.usedIndex == 1 })
        #expect(f.destinationRAM.read(d.status, 1) == [VirtioBlk.statusOK])
        #expect(f.destinationRAM.read(destinationIn, 4096) == stored)
        #expect(f.server.handoverCount == 1)
        #expect(f.log.contains("takes over the device"))
        // Nothing completed twice: two back-end requests, one used entry on each side.
        usleep(100_000)
        #expect(f.channel.operations.withLock { $0.count } == 2)
        #expect(f.sourceRing.usedIndex == 1)
        #expect(f.destinationRing.usedIndex == 1)

        // The source leaves; the destination keeps working.
        f.source = nil
        #expect(waitFor { f.log.contains("stays connected") })
        _ = BlkTestRequest.submit(ram: f.destinationRAM, ring: f.destinationRing, kick: fds[0].kick, type: VirtioBlk.typeIn,
                                  sector: 8, dataIn: (destinationIn, 4096))
        #expect(waitFor { f.destinationRing.usedIndex == 2 })
        _ = destination
    }

    @Test func destinationStartsWhenTheSourceDisconnects() throws {
        let f = try HandoverFixture()
        let (destination, fds) = f.connectDestination()
        defer { for x in fds { close(x.kick); close(x.call) } }
        let destinationIn = f.destinationRAM.alloc(4096, align: 4096)
        _ = BlkTestRequest.submit(ram: f.destinationRAM, ring: f.destinationRing, kick: fds[0].kick, type: VirtioBlk.typeIn,
                                  sector: 0, dataIn: (destinationIn, 4096))
        #expect(waitFor { f.log.contains("waiting for them to stop") })
        #expect(f.destinationRing.usedIndex == 0)
        f.source = nil
        #expect(waitFor { f.destinationRing.usedIndex == 1 })
        #expect(f.server.handoverCount == 0 || f.server.handoverCount == 1)
        _ = destination
    }

    @Test func packedRingsWithInflightRegionsHandOverAfterTheSourceDrained() throws {
        let log = TestLog()
        let channel = MemoryChannel(bytes: 1 << 20)
        let path = testSocketPath("handover-packed")
        let geometry = BlockGeometry(logicalBlockSize: 512, physicalBlockSize: 512, blockCount: 2048)
        let device = try VirtioBlkDevice(geometry: geometry, options: VirtioBlkOptions(queues: 1, serial: "SG-MIG-PACKED"),
                                         channelFactory: { channel }, log: log.logger)
        let server = VhostUserServer(socketPath: path, device: device, log: log.logger)
        try server.start()
        defer { server.stop(); device.shutdown() }
        let sourceRAM = TestGuestRAM(), destinationRAM = TestGuestRAM()
        let sourceRing = TestPackedRing(ram: sourceRAM, size: 16), destinationRing = TestPackedRing(ram: destinationRAM, size: 16)
        let source = try InflightTests.connectPacked(path: path, ram: sourceRAM, ring: sourceRing, base: 0x8000, inflightFD: -1)
        defer { close(source.inflightFD); close(source.kick); close(source.call) }
        // A source WRITE stays in the back-end (tracked in the source's in-flight region).
        channel.hold.store(true, ordering: .releasing)
        let write = sourceRAM.blkRequest(type: VirtioBlk.typeOut, sector: 3, out: [UInt8](repeating: 0xC3, count: 512))
        sourceRing.add(id: 1, write.buffers)
        _ = csys_eventfd_signal(source.kick, 1)
        #expect(waitFor { channel.inFlight == 1 })
        // The destination gets its own in-flight region and holds its ring start.
        let destination = try InflightTests.connectPacked(path: path, ram: destinationRAM, ring: destinationRing, base: 0x8000,
                                                          inflightFD: -1, waitForRing: false)
        defer { close(destination.inflightFD); close(destination.kick); close(destination.call) }
        let read = destinationRAM.blkRequest(type: VirtioBlk.typeIn, sector: 3, inLength: 512)
        destinationRing.add(id: 7, read.buffers)
        _ = csys_eventfd_signal(destination.kick, 1)
        #expect(waitFor { log.contains("waiting for them to stop") })
        #expect(!destinationRing.isUsed(at: 0, wrap: true))
        // The source stops: its WRITE completes into its ring first; the base covers 3 descriptors, used too.
        channel.releaseHeld()
        let base = source.client.getVringBase(0)
        #expect(base == UInt32(0x8003_8003), "avail position 3, wrap; used position 3, wrap")
        #expect(sourceRing.isUsed(at: 0, wrap: true) && sourceRing.used(at: 0).id == 1)
        #expect(sourceRAM.pointer(write.status).load(as: UInt8.self) == VirtioBlk.statusOK)
        // The destination's READ then runs once, in its own memory, and sees the WRITE's data.
        #expect(waitFor { destinationRing.isUsed(at: 0, wrap: true) })
        #expect(destinationRing.used(at: 0).id == 7)
        #expect(destinationRAM.read(read.buffers[1].gpa, 512) == [UInt8](repeating: 0xC3, count: 512))
        #expect(server.handoverCount == 1)
        usleep(100_000)
        #expect(channel.operations.withLock { $0.count } == 2)
        _ = destination.client
    }

    @Test func thirdConnectionIsRefused() throws {
        let f = try HandoverFixture()
        let (destination, fds) = f.connectDestination()
        defer { for x in fds { close(x.kick); close(x.call) } }
        let third = TestFrontEnd(path: f.path)!
        #expect(third.isClosed())
        #expect(f.server.refusedCount == 1)
        #expect(f.log.contains("refused"))
        // The first two are still served.
        #expect(f.source.getU64(.getFeatures) != nil)
        _ = destination
    }

    @Test func secondConnectionThatIsNotAMigrationIsRefused() throws {
        let f = try HandoverFixture(handoverTimeoutMilliseconds: 300)
        let (intruder, fds) = f.connectDestination()
        defer { for x in fds { close(x.kick); close(x.call) } }
        #expect(intruder.isClosed())
        #expect(f.server.refusedCount == 1)
        #expect(f.log.contains("not a migration hand-over"))
        // The source still runs its ring.
        let s = BlkTestRequest.submit(ram: f.sourceRAM, ring: f.sourceRing, kick: f.sourceFDs[0].kick, type: VirtioBlk.typeIn,
                                      sector: 0, dataIn: (f.sourceRAM.alloc(512, align: 4096), 512))
        #expect(waitFor { f.sourceRing.usedIndex == 1 })
        #expect(f.sourceRAM.read(s.status, 1) == [VirtioBlk.statusOK])
    }
}
