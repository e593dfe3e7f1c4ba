import TestSupport
import VfioUserTestSupport
import BlockIO
import CSystem
import PVSCSI
import SCSI
import VfioUser
#if canImport(Glibc)
import Glibc
#endif

/// A completion descriptor as the guest reads it.
public struct GuestCompletion: Equatable {
    public var context: UInt64
    public var dataLength: UInt64
    public var senseLength: UInt32
    public var hostStatus: UInt16
    public var scsiStatus: UInt16

    public init(context: UInt64, dataLength: UInt64, senseLength: UInt32, hostStatus: UInt16, scsiStatus: UInt16) {
        self.context = context
        self.dataLength = dataLength
        self.senseLength = senseLength
        self.hostStatus = hostStatus
        self.scsiStatus = scsiStatus
    }
}

/// One request to place on the ring.
public struct GuestRequest {
    public var context: UInt64
    public var target: UInt8 = 0
    public var bus: UInt8 = 0
    public var lun: [UInt8] = [0, 0, 0, 0, 0, 0, 0, 0]
    public var cdb: [UInt8]
    public var flags: UInt32 = PVSCSI.flagDirectionNone
    public var dataAddress: UInt64 = 0
    public var dataLength: UInt64 = 0
    public var senseAddress: UInt64 = 0
    public var senseLength: UInt32 = 0
    public var tag: UInt8 = 0x20

    public init(context: UInt64, target: UInt8 = 0, bus: UInt8 = 0, lun: [UInt8] = [0, 0, 0, 0, 0, 0, 0, 0], cdb: [UInt8],
                flags: UInt32 = PVSCSI.flagDirectionNone, dataAddress: UInt64 = 0, dataLength: UInt64 = 0,
                senseAddress: UInt64 = 0, senseLength: UInt32 = 0, tag: UInt8 = 0x20) {
        self.context = context
        self.target = target
        self.bus = bus
        self.lun = lun
        self.cdb = cdb
        self.flags = flags
        self.dataAddress = dataAddress
        self.dataLength = dataLength
        self.senseAddress = senseAddress
        self.senseLength = senseLength
        self.tag = tag
    }
}

/// A PVSCSI "driver" on guest memory (a memfd exported with DMA_MAP), talking to the device over the
/// vfio-user test client, in the order Linux vmw_pvscsi uses.
public final class TestGuest {
    public static let iova: UInt64 = 0x10_0000
    public static let size = 8 << 20
    public let client: VfioUserTestClient
    public let memfd: Int32
    public let memory: UnsafeMutableRawPointer
    public var msixFD: Int32 = -1
    public var intxFD: Int32 = -1

    // Page numbers inside the guest area.
    public static let ringsStatePage = 0
    public static let requestRingPage = 1  // up to 32 pages
    public static let completionRingPage = 40  // up to 32 pages
    public static let messageRingPage = 80  // up to 16 pages
    public static let configPage = 100
    public static let sgPage = 101  // 16 pages
    public static let sensePage = 120
    public static let dataPage = 128

    public var requestEntries: UInt32 = 0
    public var completionEntries: UInt32 = 0
    public var messageEntries: UInt32 = 0
    public var requestProducer: UInt32 = 0

    public init(client: VfioUserTestClient) {
        self.client = client
        memfd = csys_memfd_create("pvscsi-guest", 0)
        precondition(memfd >= 0)
        precondition(ftruncate(memfd, off_t(Self.size)) == 0)
        memory = csys_mmap_shared(memfd, UInt64(Self.size), 0, 1)!
    }

    deinit {
        _ = csys_munmap(memory, UInt64(Self.size))
        close(memfd)
        if msixFD >= 0 { close(msixFD) }
        if intxFD >= 0 { close(intxFD) }
    }

    public func address(page: Int, offset: Int = 0) -> UInt64 { Self.iova + UInt64(page * 4096 + offset) }
    public func ppn(page: Int) -> UInt64 { address(page: page) >> 12 }
    public func pointer(_ iova: UInt64) -> UnsafeMutableRawPointer { memory + Int(iova - Self.iova) }

    public func load32(page: Int, offset: Int) -> UInt32 { csys_load32_acquire(memory + page * 4096 + offset) }
    public func store32(page: Int, offset: Int, _ v: UInt32) { csys_store32_release(memory + page * 4096 + offset, v) }

    // MARK: vfio-user bring-up

    /// VERSION, DMA_MAP of the memfd (or, with `withoutFD`, of memory only reachable by DMA messages),
    /// device info, and MSI-X (or INTx) eventfds.
    public func connect(useMSIX: Bool = true, withoutFD: Bool = false, maxDataTransfer: Int = 1048576) throws {
        let v = try client.negotiateVersion(maxDataTransfer: maxDataTransfer)
        precondition(!v.isError)
        if withoutFD {
            client.dmaMemory = memory
            client.dmaBase = Self.iova
            client.dmaSize = Self.size
            let m = try client.dmaMap(address: Self.iova, size: UInt64(Self.size), fd: nil)
            precondition(!m.isError, "DMA_MAP failed \(m.errorNumber)")
        } else {
            let dup1 = dup(memfd)
            let m = try client.dmaMap(address: Self.iova, size: UInt64(Self.size), fd: dup1)
            close(dup1)
            precondition(!m.isError, "DMA_MAP failed \(m.errorNumber)")
        }
        if useMSIX {
            msixFD = csys_eventfd(0, 1)
            let r = try client.setIRQs(index: UInt32(VfioPCIIRQ.msix), flags: 4 | 32, start: 0, count: 1, fds: [msixFD])
            precondition(!r.isError)
        } else {
            intxFD = csys_eventfd(0, 1)
            let r = try client.setIRQs(index: UInt32(VfioPCIIRQ.intx), flags: 4 | 32, start: 0, count: 1, fds: [intxFD])
            precondition(!r.isError)
        }
    }

    // MARK: Registers and commands

    public func readRegister(_ offset: UInt64) throws -> UInt32 { try client.read32(0, offset) }
    public func writeRegister(_ offset: UInt64, _ value: UInt32) throws { try client.write32(0, offset, value) }

    /// Writes a command and its descriptor words; returns COMMAND_STATUS.
    @discardableResult
    public func command(_ command: PVSCSI.Command, _ words: [UInt32] = []) throws -> UInt32 {
        try writeRegister(PVSCSI.Register.command, command.rawValue)
        for w in words { try writeRegister(PVSCSI.Register.commandData, w) }
        return try readRegister(PVSCSI.Register.commandStatus)
    }

    public static func words(_ values: [UInt64], pairs: Bool) -> [UInt32] {
        values.flatMap { [UInt32(truncatingIfNeeded: $0), UInt32(truncatingIfNeeded: $0 >> 32)] }
    }

    public func setupRingsWords(requestPages: UInt32, completionPages: UInt32, statePPN: UInt64? = nil,
                         requestPPNs: [UInt64]? = nil, completionPPNs: [UInt64]? = nil) -> [UInt32] {
        var w: [UInt32] = [requestPages, completionPages]
        w += Self.words([statePPN ?? ppn(page: Self.ringsStatePage)], pairs: true)
        var req = [UInt64](repeating: 0, count: 32)
        var cmp = [UInt64](repeating: 0, count: 32)
        for i in 0..<min(Int(requestPages), 32) { req[i] = requestPPNs?[i] ?? ppn(page: Self.requestRingPage + i) }
        for i in 0..<min(Int(completionPages), 32) { cmp[i] = completionPPNs?[i] ?? ppn(page: Self.completionRingPage + i) }
        w += Self.words(req, pairs: true)
        w += Self.words(cmp, pairs: true)
        return w
    }

    public func setupRings(requestPages: UInt32 = 1, completionPages: UInt32 = 1) throws -> UInt32 {
        memset(memory, 0, 100 * 4096)
        let status = try command(.setupRings, setupRingsWords(requestPages: requestPages, completionPages: completionPages))
        requestEntries = requestPages &* 32
        completionEntries = completionPages &* 128
        requestProducer = 0
        return status
    }

    public func setupMessageRing(pages: UInt32 = 1) throws -> UInt32 {
        var w: [UInt32] = [pages, 0]
        var ppns = [UInt64](repeating: 0, count: 16)
        for i in 0..<min(Int(pages), 16) { ppns[i] = ppn(page: Self.messageRingPage + i) }
        w += Self.words(ppns, pairs: true)
        messageEntries = pages &* 32
        return try command(.setupMessageRing, w)
    }

    /// The Linux vmw_pvscsi probe order: CONFIG, ADAPTER_RESET, SETUP_MSG_RING probe, SETUP_RINGS,
    /// SETUP_MSG_RING, request-threshold probe, unmask. Returns the CONFIG page's numPhys.
    @discardableResult
    public func linuxStartup(expectConfig: Bool = true) throws -> UInt32 {
        let configAddress = address(page: Self.configPage)
        let header = pointer(configAddress)
        memset(header, 0, 4096)
        header.storeBytes(of: UInt16(0x1A), toByteOffset: 6, as: UInt16.self)
        header.storeBytes(of: UInt16(0x02), toByteOffset: 8, as: UInt16.self)
        var config: [UInt32] = Self.words([configAddress, UInt64(PVSCSI.configControllerAddress) << 32], pairs: true)
        config += [PVSCSI.configPageController, 0]
        try command(.config, config)
        let numPhys = header.load(fromByteOffset: 480 - 8, as: UInt32.self)
        precondition(!expectConfig || header.load(fromByteOffset: 6, as: UInt16.self) == 0, "CONFIG page status")
        try command(.adapterReset)
        try writeRegister(PVSCSI.Register.command, PVSCSI.Command.setupMessageRing.rawValue)
        let probe = try readRegister(PVSCSI.Register.commandStatus)
        precondition(probe == UInt32(PVSCSI.setupMessageRingWords), "SETUP_MSG_RING probe returned \(probe)")
        let rings = try setupRings()
        precondition(rings == 0)
        let messages = try setupMessageRing()
        precondition(messages == 0)
        try writeRegister(PVSCSI.Register.command, PVSCSI.Command.setupRequestCallThreshold.rawValue)
        let threshold = try readRegister(PVSCSI.Register.commandStatus)
        precondition(threshold == PVSCSI.commandFailed)
        try writeRegister(PVSCSI.Register.interruptMask, PVSCSI.interruptCompletion0 | PVSCSI.interruptCompletion1
                          | PVSCSI.interruptMessage0 | PVSCSI.interruptMessage1)
        return numPhys
    }

    // MARK: Requests

    public func place(_ r: GuestRequest) {
        let index = requestProducer & (requestEntries - 1)
        let p = memory + Self.requestRingPage * 4096 + Int(index) * 128
        memset(p, 0, 128)
        p.storeBytes(of: r.context, toByteOffset: 0, as: UInt64.self)
        p.storeBytes(of: r.dataAddress, toByteOffset: 8, as: UInt64.self)
        p.storeBytes(of: r.dataLength, toByteOffset: 16, as: UInt64.self)
        p.storeBytes(of: r.senseAddress, toByteOffset: 24, as: UInt64.self)
        p.storeBytes(of: r.senseLength, toByteOffset: 32, as: UInt32.self)
        p.storeBytes(of: r.flags, toByteOffset: 36, as: UInt32.self)
        for (i, b) in r.cdb.prefix(16).enumerated() { p.storeBytes(of: b, toByteOffset: 40 + i, as: UInt8.self) }
        p.storeBytes(of: UInt8(r.cdb.count), toByteOffset: 56, as: UInt8.self)
        for (i, b) in r.lun.prefix(8).enumerated() { p.storeBytes(of: b, toByteOffset: 57 + i, as: UInt8.self) }
        p.storeBytes(of: r.tag, toByteOffset: 65, as: UInt8.self)
        p.storeBytes(of: r.bus, toByteOffset: 66, as: UInt8.self)
        p.storeBytes(of: r.target, toByteOffset: 67, as: UInt8.self)
        requestProducer &+= 1
        store32(page: Self.ringsStatePage, offset: PVSCSI.RingsState.requestProducer, requestProducer)
    }

    public func kick(rw: Bool = true) throws {
        try writeRegister(rw ? PVSCSI.Register.kickRWIO : PVSCSI.Register.kickNonRWIO, 0)
    }

    /// CLOCK_MONOTONIC in milliseconds (the deadlines of the waits below).
    private static func monotonicMilliseconds() -> Int64 {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        return Int64(now.tv_sec) * 1000 + Int64(now.tv_nsec) / 1_000_000
    }

    /// Waits for an interrupt eventfd to fire.
    public func waitInterrupt(milliseconds: Int32 = 5000) -> Bool {
        let fd = msixFD >= 0 ? msixFD : intxFD
        let end = Self.monotonicMilliseconds() + Int64(milliseconds)
        while true {
            let left = end - Self.monotonicMilliseconds()
            if left <= 0 { return false }
            // The client socket too: the server may ask for DMA (memory without fd) before it interrupts.
            var pfds = [pollfd(fd: fd, events: Int16(POLLIN), revents: 0), pollfd(fd: client.fd, events: Int16(POLLIN), revents: 0)]
            guard poll(&pfds, 2, Int32(left)) > 0 else { return false }
            if pfds[1].revents != 0 { if (try? client.pump()) == nil { return false } }
            if pfds[0].revents != 0 {
                var v: UInt64 = 0
                _ = csys_eventfd_drain(fd, &v)
                return true
            }
        }
    }

    /// Clears interrupt signals already delivered (run() may return before it consumed the last one).
    public func drainInterrupts() {
        var v: UInt64 = 0
        if msixFD >= 0 { _ = csys_eventfd_drain(msixFD, &v) }
        if intxFD >= 0 { _ = csys_eventfd_drain(intxFD, &v) }
    }

    /// Whether no completion arrives within `milliseconds`. Counts completions, not interrupt signals: run() may return
    /// before the interrupt of its last completion was delivered, and that late signal is no new completion.
    public func noCompletion(milliseconds: Int32) -> Bool {
        let end = Self.monotonicMilliseconds() + Int64(milliseconds)
        while true {
            let left = end - Self.monotonicMilliseconds()
            guard left > 0 else { return takeCompletions().isEmpty }
            if waitInterrupt(milliseconds: Int32(left)), !takeCompletions().isEmpty { return false }
        }
    }

    /// Consumes the completion ring.
    public func takeCompletions() -> [GuestCompletion] {
        var out: [GuestCompletion] = []
        let producer = load32(page: Self.ringsStatePage, offset: PVSCSI.RingsState.completionProducer)
        var consumer = load32(page: Self.ringsStatePage, offset: PVSCSI.RingsState.completionConsumer)
        while consumer != producer {
            let index = consumer & (completionEntries - 1)
            let p = memory + Self.completionRingPage * 4096 + Int(index) * 32
            out.append(GuestCompletion(context: p.load(fromByteOffset: 0, as: UInt64.self),
                                       dataLength: p.load(fromByteOffset: 8, as: UInt64.self),
                                       senseLength: p.load(fromByteOffset: 16, as: UInt32.self),
                                       hostStatus: p.load(fromByteOffset: 20, as: UInt16.self),
                                       scsiStatus: p.load(fromByteOffset: 22, as: UInt16.self)))
            consumer &+= 1
        }
        store32(page: Self.ringsStatePage, offset: PVSCSI.RingsState.completionConsumer, consumer)
        return out
    }

    /// Submits, kicks and waits until `count` completions arrived (or the timeout passes).
    public func run(_ requests: [GuestRequest], expect count: Int? = nil, milliseconds: Int32 = 5000) throws -> [GuestCompletion] {
        for r in requests { place(r) }
        try kick()
        var got: [GuestCompletion] = takeCompletions()
        let want = count ?? requests.count
        while got.count < want {
            guard waitInterrupt(milliseconds: milliseconds) else { break }
            got += takeCompletions()
        }
        return got
    }

    /// Writes an SG list into an SG page.
    public func writeSG(page: Int, _ elements: [(UInt64, UInt32, UInt32)]) {
        let p = memory + page * 4096
        for (i, e) in elements.enumerated() {
            p.storeBytes(of: e.0, toByteOffset: i * 16, as: UInt64.self)
            p.storeBytes(of: e.1, toByteOffset: i * 16 + 8, as: UInt32.self)
            p.storeBytes(of: e.2, toByteOffset: i * 16 + 12, as: UInt32.self)
        }
    }

    /// Consumes the message ring: (type, bus, target, lun[1]).
    public func takeMessages() -> [(UInt32, UInt32, UInt32, UInt8)] {
        var out: [(UInt32, UInt32, UInt32, UInt8)] = []
        let producer = load32(page: Self.ringsStatePage, offset: PVSCSI.RingsState.messageProducer)
        var consumer = load32(page: Self.ringsStatePage, offset: PVSCSI.RingsState.messageConsumer)
        while consumer != producer {
            let p = memory + Self.messageRingPage * 4096 + Int(consumer & (messageEntries - 1)) * 128
            out.append((p.load(fromByteOffset: 0, as: UInt32.self), p.load(fromByteOffset: 4, as: UInt32.self),
                        p.load(fromByteOffset: 8, as: UInt32.self), p.load(fromByteOffset: 13, as: UInt8.self)))
            consumer &+= 1
        }
        store32(page: Self.ringsStatePage, offset: PVSCSI.RingsState.messageConsumer, consumer)
        return out
    }
}

/// A running controller with a SCSI target of `luns` LUNs on in-memory disks, a connected client and guest.
public final class Fixture {
    public static let counter = Atomic<Int>(0)
    public let path: String
    public let table: SCSITarget
    public let commands: TestCommandTarget
    public let disks: [Int: MemoryDisk]
    public let channels: ChannelRegistry
    public let controller: PVSCSIController<TestCommandTarget, MemoryChannel>
    public let logLines: TestLog
    public var client: VfioUserTestClient!
    public var guest: TestGuest!

    public init(luns: [Int] = [0], blocks: UInt64 = 2048, connect: Bool = true, startup: Bool = true, useMSIX: Bool = true,
         useCore: Bool = false, options: PVSCSIOptions = PVSCSIOptions(),
         statistics: [Int: LUNIOStatistics] = [:], withoutFD: Bool = false) throws {
        let n = Self.counter.add(1, ordering: .relaxed).newValue
        path = "/tmp/scsigate-pvscsi-test-\(getpid())-\(n).sock"
        table = SCSITarget(name: "t\(n)")
        var d: [Int: MemoryDisk] = [:]
        for l in luns {
            d[l] = MemoryDisk(blocks: blocks)
            try table.add(makeUnit(l, blocks: blocks, backendID: l))
        }
        disks = d
        commands = TestCommandTarget(table: table, useCore: useCore)
        let registry = ChannelRegistry(disks: d)
        channels = registry
        let sink = TestLog()
        logLines = sink
        controller = try PVSCSIController(socketPath: path, target: commands, options: options,
                                          channelFactory: { id in registry.channel(id) },
                                          statistics: { id in statistics[id]?.counters(queue: 0) },
                                          log: sink.logger)
        try controller.start()
        if connect {
            client = try VfioUserTestClient(path: path)
            guest = TestGuest(client: client)
            if startup {
                try guest.connect(useMSIX: useMSIX, withoutFD: withoutFD)
                try guest.linuxStartup(expectConfig: !withoutFD)
            }
        }
    }

    public var ringsReady: Bool {
        let device = controller.device
        return controller.sync { device.ringsReady }
    }
    public var messageRingReady: Bool {
        let device = controller.device
        return controller.sync { device.messageRingReady }
    }
    public var requestsInFlight: Int {
        let device = controller.device
        return controller.sync { device.requestsInFlight }
    }
    public var deviceStats: PVSCSIStats {
        let device = controller.device
        return controller.sync { device.stats }
    }
    public var clientConnected: Bool {
        let server = controller.server
        return controller.sync { server.clientFD >= 0 }
    }
    public var dmaWindowCount: Int {
        let server = controller.server
        return controller.sync { server.memory.regions.count }
    }
    /// The server's statistics, read on the loop while the test client keeps serving DMA requests: with guest
    /// memory that has no fd the server may still be reading a ring by message after the last completion the
    /// test waited for, and a plain `controller.sync` would hold the loop (and the query) until that read timed
    /// out, counting a DMA failure the test itself caused.
    public var serverStats: VfioUserStats {
        let server = controller.server
        let answer = StatsAnswer()
        controller.loop.execute { answer.set(server.stats) }
        while true {
            if let stats = answer.value { return stats }
            if let c = guest?.client ?? client, c.fd >= 0 { try? c.pump(milliseconds: 5) } else { usleep(1000) }
        }
    }
    /// Runs `body` on the loop thread.
    public func onLoop(_ body: @escaping @Sendable () -> Void) {
        _ = controller.sync { body(); return 0 }
    }

    /// Adds a LUN at run time (hotplug).
    public func addLUN(_ l: Int, blocks: UInt64 = 2048) throws {
        channels.addDisk(l, MemoryDisk(blocks: blocks))
        try table.add(makeUnit(l, blocks: blocks, backendID: l))
    }

    deinit {
        guest = nil
        client = nil
        controller.stop()
    }
}

/// Creates channels for back-end ids (on the loop thread) and keeps them for the test to inspect.
public final class ChannelRegistry: @unchecked Sendable {
    private var disks: [Int: MemoryDisk]
    private var made: [Int: MemoryChannel] = [:]
    private let lock = NSLockLike()
    public init(disks: [Int: MemoryDisk]) { self.disks = disks }
    public func addDisk(_ id: Int, _ disk: MemoryDisk) { lock.locked { disks[id] = disk } }
    public func disk(_ id: Int) -> MemoryDisk? { lock.locked { disks[id] } }
    public func channel(_ id: Int) -> MemoryChannel? {
        lock.locked {
            guard let disk = disks[id] else { return nil }
            let c = MemoryChannel(disk: disk)
            made[id] = c
            return c
        }
    }
    public func made(_ id: Int) -> MemoryChannel? { lock.locked { made[id] } }
}

/// The loop's answer to `Fixture.serverStats`.
public final class StatsAnswer: @unchecked Sendable {
    private var stats: VfioUserStats?
    private let lock = NSLockLike()
    public func set(_ s: VfioUserStats) { lock.locked { stats = s } }
    public var value: VfioUserStats? { lock.locked { stats } }
}

/// A pthread mutex wrapper for test bookkeeping.
public final class NSLockLike: @unchecked Sendable {
    private var m = pthread_mutex_t()
    public init() { pthread_mutex_init(&m, nil) }
    deinit { pthread_mutex_destroy(&m) }
    public func locked<T>(_ body: () -> T) -> T {
        pthread_mutex_lock(&m)
        defer { pthread_mutex_unlock(&m) }
        return body()
    }
}


import Synchronization
