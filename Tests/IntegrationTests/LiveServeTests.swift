import TestSupport
import VirtioTestSupport
import BlockIO
import CSystem
import SCSI
import Synchronization
import Testing
import VhostUser
import VirtioDevices
import Virtio
#if canImport(Glibc)
import Glibc
#endif

/// A synchronous file back-end for the live test: preadv/pwritev straight from guest memory iovecs,
/// completions signalled through an eventfd on commit.
final class FileChannel: BlockChannel, @unchecked Sendable {
    let fd: Int32
    let completionFD: Int32
    private var ready: [(UInt64, BlockResult)] = []
    private var queued = 0

    init(fd: Int32) {
        self.fd = fd
        completionFD = csys_eventfd(0, 1)
        ready.reserveCapacity(1024)
    }

    deinit { Glibc.close(completionFD) }

    func submit(_ request: BlockRequest, token: UInt64) -> Int32 {
        var result: BlockResult
        switch request.operation {
        case .read, .write:
            var done: UInt64 = 0
            var err: Int32 = 0
            var list = request.buffers
            while done < request.length, list.count > 0 {
                let n = request.operation == .read
                    ? preadv(fd, list.base, Int32(min(list.count, 1024)), off_t(request.offset + done))
                    : pwritev(fd, list.base, Int32(min(list.count, 1024)), off_t(request.offset + done))
                if n < 0 { if errno == EINTR { continue }; err = errno; break }
                if n == 0 { break }
                done += UInt64(n)
                guard let rest = list.droppingPrefix(n) else { break }
                list = rest
            }
            if err == 0 && request.forceUnitAccess && request.operation == .write && fdatasync(fd) != 0 { err = errno }
            result = err != 0 ? .failure(err) : .success(done)
        case .flush:
            result = fdatasync(fd) == 0 ? .success(0) : .failure(errno)
        case .discard:
            let rc = csys_punch_hole(fd, request.offset, request.length)
            result = rc == 0 ? .success(request.length) : .failure(-rc)
        case .writeZeroes:
            let rc = request.mayUnmap ? csys_punch_hole(fd, request.offset, request.length)
                : csys_zero_range(fd, request.offset, request.length, 1)
            result = rc == 0 ? .success(request.length) : .failure(-rc)
        }
        ready.append((token, result))
        queued += 1
        return 0
    }

    func commit() {
        if queued > 0 {
            queued = 0
            _ = csys_eventfd_signal(completionFD, 1)
        }
    }

    /// Optional artificial latency before completions are delivered (SCSIGATE_VHOST_SLOW_US), to keep
    /// requests in flight for back-end crash tests.
    static let delay: UInt32 = getenv("SCSIGATE_VHOST_SLOW_US").flatMap { UInt32(String(cString: $0)) } ?? 0

    func reap(_ handler: (UInt64, BlockResult) -> Void) -> Int {
        var v: UInt64 = 0
        _ = csys_eventfd_drain(completionFD, &v)
        if Self.delay > 0 && !ready.isEmpty { usleep(Self.delay) }
        // Handlers may submit follow-up requests: hand out a snapshot and keep what they add.
        let items = ready
        ready.removeAll(keepingCapacity: true)
        for (t, r) in items { handler(t, r) }
        return items.count
    }

    var inFlight: Int { ready.count }

    /// The descriptors stay with the test (closed in deinit).
    func close() {}
}

/// A channel that completes every request at once without touching data (transport benchmarks).
final class InstantChannel: BlockChannel, @unchecked Sendable {
    let completionFD = csys_eventfd(0, 1)
    private var ready: [(UInt64, BlockResult)] = []
    init() { ready.reserveCapacity(4096) }
    deinit { Glibc.close(completionFD) }
    func submit(_ request: BlockRequest, token: UInt64) -> Int32 {
        ready.append((token, .success(request.length)))
        return 0
    }
    func commit() { if !ready.isEmpty { _ = csys_eventfd_signal(completionFD, 1) } }
    var inFlight: Int { ready.count }
    func close() {}
    func abort(token: UInt64) -> Bool { false }
    func resetLogicalUnit() -> Bool { false }
    func reap(_ handler: (UInt64, BlockResult) -> Void) -> Int {
        var v: UInt64 = 0
        _ = csys_eventfd_drain(completionFD, &v)
        var i = 0
        let n = ready.count
        while i < n {
            handler(ready[i].0, ready[i].1)
            i += 1
        }
        ready.removeFirst(n)
        return n
    }
}

/// Serves a virtio-scsi and a virtio-blk controller for a real QEMU guest (Tests/RealClients/run-guest.sh).
/// Runs only when SCSIGATE_VHOST_SERVE_DIR is set: sockets scsi.sock and blk.sock and the backing
/// files scsi.img and blk.img are created there; the test ends when DIR/stop appears.
@Suite struct LiveServeTests {
    static let directory: String? = getenv("SCSIGATE_VHOST_SERVE_DIR").map { String(cString: $0) }

    @Test(.enabled(if: directory != nil)) func serveForRealGuest() throws {
        let dir = try #require(Self.directory)
        func open(_ name: String, bytes: Int) -> Int32 {
            let fd = Glibc.open("\(dir)/\(name)", O_RDWR | O_CREAT, 0o644)
            _ = ftruncate(fd, off_t(bytes))
            return fd
        }
        let scsiFD = open("scsi.img", bytes: 256 << 20)
        let blkFD = open("blk.img", bytes: 256 << 20)
        defer { close(scsiFD); close(blkFD) }
        let logFD = Glibc.open("\(dir)/serve.log", O_WRONLY | O_CREAT | O_APPEND, 0o644)
        defer { close(logFD) }
        let log = TestLog.logger { level, text in
            let line = "\(level): \(text)\n"
            _ = line.withCString { write(logFD, $0, strlen($0)) }
        }
        let target = SCSITarget(name: "live")
        try target.add(LogicalUnit(number: LogicalUnitNumber(0)!,
                                   identity: LogicalUnitIdentity(vendor: "SCSIGATE", product: "VHOST-SCSI", serial: "SGLIVE0001", naa: 0x5000_1234_5678_0001),
                                   geometry: BlockGeometry(logicalBlockSize: 512, physicalBlockSize: 4096, blockCount: (256 << 20) / 512), backendID: 0))
        let queues = Int(getenv("SCSIGATE_VHOST_QUEUES").map { String(cString: $0) } ?? "1") ?? 1
        let scsi = VhostUserSCSIController(socketPath: "\(dir)/scsi.sock", device: try VirtioSCSIDevice(target: target,
                                               options: VirtioSCSIOptions(requestQueues: queues, threads: queues),
                                               channelFactory: { _ in FileChannel(fd: scsiFD) }, log: log), log: log)
        if getenv("SCSIGATE_VHOST_NULL") != nil {
            let null = VhostUserBlkController(socketPath: "\(dir)/null.sock", device: try VirtioBlkDevice(geometry: BlockGeometry(logicalBlockSize: 512, physicalBlockSize: 4096, blockCount: (256 << 20) / 512),
                                                  options: VirtioBlkOptions(queues: 1, serial: "SGNULL"), channelFactory: { InstantChannel() }, log: log), log: log)
            try null.start()
            while access("\(dir)/stop", F_OK) != 0 { usleep(100_000) }
            null.stop()
            return
        }
        let blk = VhostUserBlkController(socketPath: "\(dir)/blk.sock", device: try VirtioBlkDevice(geometry: BlockGeometry(logicalBlockSize: 512, physicalBlockSize: 4096, blockCount: (256 << 20) / 512),
                                             options: VirtioBlkOptions(queues: queues, serial: "SGBLK0001", threads: queues),
                                             channelFactory: { FileChannel(fd: blkFD) }, log: log), log: log)
        try scsi.start()
        try blk.start()
        log.info("attach with: -chardev socket,id=c0,path=\(dir)/scsi.sock -device vhost-user-scsi-pci,chardev=c0 -chardev socket,id=c1,path=\(dir)/blk.sock -device vhost-user-blk-pci,chardev=c1 (guest RAM: memory-backend-memfd,share=on)")
        let deadline = clockSeconds() + 1800
        // Operator actions for hotplug checks: touch DIR/add-lun1, DIR/remove-lun1 or DIR/grow-lun0.
        while access("\(dir)/stop", F_OK) != 0 && clockSeconds() < deadline {
            if unlink("\(dir)/add-lun1") == 0 {
                do {
                    try target.add(LogicalUnit(number: LogicalUnitNumber(1)!,
                                               identity: LogicalUnitIdentity(vendor: "SCSIGATE", product: "HOTPLUG", serial: "SGLIVE0002",
                                                                             naa: 0x5000_1234_5678_0002),
                                               geometry: BlockGeometry(logicalBlockSize: 512, physicalBlockSize: 4096, blockCount: 65536),
                                               backendID: 0))
                    log.info("added LUN 1")
                } catch { log.error("add LUN 1: \(error)") }
            }
            if unlink("\(dir)/remove-lun1") == 0 {
                do { try target.remove(LogicalUnitNumber(1)!); log.info("removed LUN 1") } catch { log.error("remove LUN 1: \(error)") }
            }
            if unlink("\(dir)/grow-lun0") == 0 {
                do {
                    try target.resize(LogicalUnitNumber(0)!, blockCount: (384 << 20) / 512, allowShrink: false)
                    _ = ftruncate(scsiFD, 384 << 20)
                    log.info("grew LUN 0")
                } catch { log.error("grow LUN 0: \(error)") }
            }
            usleep(100_000)
        }
        scsi.stop()
        blk.stop()
        #expect(scsi.server.connectionCount >= 1 || blk.server.connectionCount >= 1)
    }
}

