import Backends
import BlockIO
import Foundation
import Logging
import SCSI
import Synchronization
import Testing
@testable import Gateway

/// A front-end that records what the gateway handed it (the seam the real front-ends plug into).
final class RecordingFrontEnd: FrontEnd {
    let runtime: ControllerRuntime
    let log: RecordingFactory.Log
    init(runtime: ControllerRuntime, log: RecordingFactory.Log) {
        self.runtime = runtime
        self.log = log
    }
    func start() throws(FrontEndError) { log.events.withLock { $0.append("start \(runtime.config.name)") } }
    func stop() { log.events.withLock { $0.append("stop \(runtime.config.name)") } }
}

struct RecordingFactory: FrontEndFactory {
    let transport: TransportKind
    let log: Log
    final class Log: Sendable {
        let events = Mutex<[String]>([])
        let runtimes = Mutex<[ControllerRuntime]>([])
    }
    func makeFrontEnd(for controller: ControllerRuntime) throws(FrontEndError) -> any FrontEnd {
        log.runtimes.withLock { $0.append(controller) }
        return RecordingFrontEnd(runtime: controller, log: log)
    }
}

struct FailingFactory: FrontEndFactory {
    let transport: TransportKind
    func makeFrontEnd(for controller: ControllerRuntime) throws(FrontEndError) -> any FrontEnd {
        throw FrontEndError("cannot bind \(controller.config.socket)")
    }
}

/// A scratch directory removed at the end of the test.
final class ScratchDirectory {
    let path: String
    init() {
        path = NSTemporaryDirectory() + "scsigate-test-" + UUID().uuidString
        try? FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }
    deinit { try? FileManager.default.removeItem(atPath: path) }
}

let quietLogger: Logger = {
    var logger = Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() })
    logger.logLevel = .critical
    return logger
}()

@Suite("Gateway start, stop and the front-end seam")
struct GatewayTests {
    func config(_ dir: String, extra: String = "") throws -> GatewayConfig {
        try ConfigLoader.parse("""
            [gateway]
            state_dir = "\(dir)/state"
            control_socket = "\(dir)/run/control.sock"
            [[controller]]
            name = "scsi0"
            transport = "vhost-user-scsi"
            socket = "scsi0.sock"
            [[controller.lun]]
            lun = 0
            backend = "file"
            path = "disk0.img"
            size = "4M"
            create = true
            serial = "DISK0"
            [[controller.lun]]
            lun = 7
            backend = "null"
            size = "1G"
            block_size = 4096
            read_only = true
            [[controller]]
            name = "pv0"
            transport = "pvscsi"
            socket = "pv0.sock"
            [[controller.lun]]
            target = 3
            backend = "null"
            size = "2M"
            [[controller]]
            name = "blk0"
            transport = "vhost-user-blk"
            socket = "blk0.sock"
            [[controller.lun]]
            backend = "null"
            size = "8M"
            \(extra)
            """, source: "gw.toml")
    }

    @Test("start opens back-ends, creates the sparse file, builds targets and LUNs, starts front-ends in order")
    func startAndStop() throws {
        let scratch = ScratchDirectory()
        let log = RecordingFactory.Log()
        let registry = FrontEndRegistry([RecordingFactory(transport: .vhostUserSCSI, log: log),
                                         RecordingFactory(transport: .vhostUserBlk, log: log)])
        let gateway = Gateway(config: try config(scratch.path), logger: quietLogger, frontEnds: registry)
        try gateway.start()

        var info = stat()
        #expect(stat(scratch.path + "/state/disk0.img", &info) == 0)
        #expect(info.st_size == 4 << 20)
        #expect(info.st_blocks == 0, "the created file is sparse")
        #expect(FileManager.default.fileExists(atPath: scratch.path + "/run"))

        let scsi = try #require(gateway.controller(named: "scsi0"))
        #expect(scsi.target.lunNumbers == [LogicalUnitNumber(0)!, LogicalUnitNumber(7)!])
        let disk = try #require(scsi.target.logicalUnit(LogicalUnitNumber(0)!))
        #expect(disk.blockCount == 8192 && disk.blockSize == 512 && !disk.isReadOnly)
        #expect(disk.identity.serial == "DISK0")
        #expect(disk.identity.naa == DerivedIdentity.naa(controller: "scsi0", target: 0, lun: 0))
        let null = try #require(scsi.target.logicalUnit(LogicalUnitNumber(7)!))
        #expect(null.blockCount == 262_144 && null.blockSize == 4096 && null.isReadOnly)
        #expect(null.identity.serial == "scsi0-0-7")

        // PVSCSI target n is LUN n of the controller's SCSI target.
        let pv = try #require(gateway.controller(named: "pv0"))
        #expect(pv.target.lunNumbers == [LogicalUnitNumber(3)!])
        #expect(pv.target.logicalUnit(LogicalUnitNumber(3)!)?.identity.serial == "pv0-3-0")

        // Front-ends resolve back-ends through the registry by backendID and can open channels.
        let entry = try #require(scsi.backend(of: disk))
        #expect(entry.config.path == scratch.path + "/state/disk0.img")
        #expect(entry.controller == "scsi0")
        let channel = try entry.backend.makeChannel()
        channel.close()
        let viaRuntime = try scsi.makeChannel(backendID: disk.backendID)
        viaRuntime.close()
        #expect(throws: BlockBackendError.self) { try scsi.makeChannel(backendID: 9999) }

        let blk = try #require(gateway.controller(named: "blk0"))
        #expect(blk.target.lunNumbers == [LogicalUnitNumber(0)!])
        #expect(log.runtimes.withLock { $0.map(\.config.name) } == ["scsi0", "blk0"], "pv0 has no factory here")
        #expect(log.events.withLock { $0 } == ["start scsi0", "start blk0"])
        #expect(gateway.backends.ids.count == 4)

        gateway.stop()
        #expect(log.events.withLock { $0 } == ["start scsi0", "start blk0", "stop blk0", "stop scsi0"])
        #expect(gateway.backends.ids.isEmpty)
        #expect(gateway.controllers.isEmpty)
        gateway.stop()  // idempotent
    }

    @Test("LUNs added and removed at run time reach the target and its subscribers")
    func hotplug() throws {
        let scratch = ScratchDirectory()
        let gateway = Gateway(config: try config(scratch.path), logger: quietLogger, frontEnds: FrontEndRegistry())
        try gateway.start()
        defer { gateway.stop() }
        let scsi = try #require(gateway.controller(named: "scsi0"))
        let events = Mutex<[LUNEvent]>([])
        scsi.target.subscribe { event in events.withLock { $0.append(event) } }

        try gateway.addLUN(LUNConfig(lun: 9, backend: .file, path: scratch.path + "/state/hot.img", size: 1 << 20, create: true),
                           to: "scsi0")
        #expect(scsi.target.lunNumbers.map(\.value) == [0, 7, 9])
        #expect(gateway.backends.ids.count == 5)
        #expect(throws: BackendOpeningError.self) {
            try gateway.addLUN(LUNConfig(lun: 9, backend: .null, size: 4096), to: "scsi0")
        }
        #expect(gateway.backends.ids.count == 5, "a refused add leaves no back-end open")
        #expect(throws: BackendOpeningError.self) { try gateway.addLUN(LUNConfig(lun: 1, backend: .null, size: 4096), to: "nope") }

        let removed = try gateway.removeLUN(target: 0, lun: 9, from: "scsi0")
        #expect(removed.path == scratch.path + "/state/hot.img")
        #expect(scsi.target.lunNumbers.map(\.value) == [0, 7])
        #expect(gateway.backends.ids.count == 4)
        #expect(events.withLock { $0 } == [.added(LogicalUnitNumber(9)!), .removed(LogicalUnitNumber(9)!)])
        do {
            try gateway.removeLUN(target: 0, lun: 9, from: "scsi0")
            Issue.record("removed a LUN twice")
        } catch {
            #expect(error.description == "controller scsi0 target 0 lun 9: LUN 9 does not exist")
        }
        // The file lock was released with the back-end: the same file can be added again.
        try gateway.addLUN(LUNConfig(lun: 9, backend: .file, path: scratch.path + "/state/hot.img"), to: "scsi0")
        #expect(scsi.target.lunNumbers.map(\.value) == [0, 7, 9])
    }

    @Test("a controller without a front-end factory is served without being attached")
    func missingFactory() throws {
        let scratch = ScratchDirectory()
        let gateway = Gateway(config: try config(scratch.path), logger: quietLogger, frontEnds: FrontEndRegistry())
        try gateway.start()
        #expect(gateway.controllers.count == 3)
        gateway.stop()
    }

    @Test("a front-end that cannot start stops the gateway with the controller named")
    func failingFrontEnd() throws {
        let scratch = ScratchDirectory()
        let gateway = Gateway(config: try config(scratch.path), logger: quietLogger,
                              frontEnds: FrontEndRegistry([FailingFactory(transport: .vhostUserBlk)]))
        #expect(throws: GatewayError.self) { try gateway.start() }
        do {
            let again = Gateway(config: try config(scratch.path), logger: quietLogger,
                                frontEnds: FrontEndRegistry([FailingFactory(transport: .vhostUserBlk)]))
            try again.start()
        } catch let error as GatewayError {
            #expect(error.problems == ["controller blk0: cannot bind \(scratch.path)/run/blk0.sock"])
        }
        #expect(gateway.backends.ids.isEmpty)
    }

    @Test("a missing backing file without create refuses to start and names the LUN")
    func missingBackingFile() throws {
        let scratch = ScratchDirectory()
        let config = try ConfigLoader.parse("""
            [gateway]
            state_dir = "\(scratch.path)"
            control_socket = "\(scratch.path)/c.sock"
            [[controller]]
            name = "c"
            transport = "vhost-user-scsi"
            socket = "s.sock"
            [[controller.lun]]
            lun = 4
            backend = "file"
            path = "absent.img"
            [[controller.lun]]
            lun = 5
            backend = "null"
            size = 4096
            """, source: "m.toml")
        let gateway = Gateway(config: config, logger: quietLogger, frontEnds: FrontEndRegistry())
        do {
            try gateway.start()
            Issue.record("started without its backing file")
        } catch {
            #expect(error.problems.count == 1)
            #expect(error.problems.first?.hasPrefix("controller c target 0 lun 4: \(scratch.path)/absent.img: ") == true,
                    "\(error.problems)")
        }
        #expect(gateway.backends.ids.isEmpty, "back-ends opened before the failure are closed")
    }

    @Test("two LUNs on one file are refused by the back-end lock even when written differently")
    func lockConflict() throws {
        let scratch = ScratchDirectory()
        let config = try ConfigLoader.parse("""
            [gateway]
            state_dir = "\(scratch.path)"
            control_socket = "\(scratch.path)/c.sock"
            [[controller]]
            name = "c"
            transport = "vhost-user-scsi"
            socket = "s.sock"
            [[controller.lun]]
            lun = 0
            backend = "file"
            path = "d.img"
            size = 65536
            create = true
            [[controller.lun]]
            lun = 1
            backend = "file"
            path = "./sub/../d.img"
            """, source: "l.toml")
        try FileManager.default.createDirectory(atPath: scratch.path + "/sub", withIntermediateDirectories: true)
        let gateway = Gateway(config: config, logger: quietLogger, frontEnds: FrontEndRegistry())
        do {
            try gateway.start()
            gateway.stop()
            Issue.record("the same file was opened twice")
        } catch {
            #expect(error.problems.count == 1)
            #expect(error.problems.first?.contains("lun 1") == true, "\(error.problems)")
        }
    }

    @Test("an iSCSI LUN that cannot be opened leaves the gateway running without it")
    func iscsiOffline() throws {
        let scratch = ScratchDirectory()
        let config = try ConfigLoader.parse("""
            [gateway]
            state_dir = "\(scratch.path)"
            control_socket = "\(scratch.path)/c.sock"
            [[controller]]
            name = "c"
            transport = "vhost-user-scsi"
            socket = "s.sock"
            [[controller.lun]]
            lun = 0
            backend = "iscsi"
            url = "iscsi://127.0.0.1:1/iqn.2026-11.org.example:none/0"
            [[controller.lun]]
            lun = 1
            backend = "null"
            size = 4096
            """, source: "i.toml")
        struct NoISCSI: BackendOpener {
            func open(_ lun: LUNConfig, on controller: ControllerConfig) throws(BackendOpeningError) -> OpenedBackend {
                if lun.backend == .iscsi { throw BackendOpeningError(lun: "x", reason: "unreachable", mayStartWithout: true) }
                return try StandardBackendOpener().open(lun, on: controller)
            }
        }
        let gateway = Gateway(config: config, logger: quietLogger, backendOpener: NoISCSI(), frontEnds: FrontEndRegistry())
        try gateway.start()
        #expect(gateway.controller(named: "c")?.target.lunNumbers == [LogicalUnitNumber(1)!])
        gateway.stop()
    }

    @Test("back-end specs follow the LUN entry")
    func backendSpecs() throws {
        let controller = ControllerConfig(name: "c", transport: .vhostUserSCSI, socket: "/s", queueSize: 256)
        let lun = LUNConfig(lun: 0, backend: .file, path: "/d.img", size: 1 << 20, blockSize: 4096, readOnly: true,
                            cache: .writeback, create: true)
        #expect(StandardBackendOpener.spec(for: lun, on: controller)
                == BackendSpec(kind: .file, path: "/d.img", size: 1 << 20, logicalBlockSize: 4096, readOnly: true,
                               cache: .writeback, create: true, queueDepth: 256, workerThreads: 2))
        let pv = ControllerConfig(name: "p", transport: .pvscsi, socket: "/p")
        #expect(StandardBackendOpener.spec(for: LUNConfig(lun: 0, backend: .block, path: "/dev/x"), on: pv)?.queueDepth == 1024)
        #expect(StandardBackendOpener.spec(for: LUNConfig(lun: 0, backend: .iscsi), on: pv) == nil)
    }
}

@Suite("Derived identities, QEMU lines, check-config")
struct IdentityAndCheckTests {
    @Test("derived NAA identifiers are NAA 5 with the ScsiGate company id and stable per address")
    func naa() {
        let a = DerivedIdentity.naa(controller: "scsi0", target: 0, lun: 0)
        #expect(a >> 60 == 5)
        #expect((a >> 36) & 0xFF_FFFF == 0x02_53_47)
        #expect(a == DerivedIdentity.naa(controller: "scsi0", target: 0, lun: 0))
        #expect(a == 0x5025347538bf3211, "the derivation must not change between releases")
        var seen = Set<UInt64>()
        for controller in ["scsi0", "scsi1", "blk0"] {
            for target in 0..<4 { for lun in 0..<64 { seen.insert(DerivedIdentity.naa(controller: controller, target: target, lun: lun)) } }
        }
        #expect(seen.count == 3 * 4 * 64)
    }

    @Test("derived serials are readable when short, hashed when long")
    func serials() {
        #expect(DerivedIdentity.serial(controller: "scsi0", target: 1, lun: 2) == "scsi0-1-2")
        let long = DerivedIdentity.serial(controller: "a-very-long-controller", target: 0, lun: 16383)
        #expect(long.count == 18 && long.hasPrefix("SG"))
        #expect(long == DerivedIdentity.serial(controller: "a-very-long-controller", target: 0, lun: 16383))
        #expect(long != DerivedIdentity.serial(controller: "a-very-long-controller", target: 0, lun: 16382))
    }

    @Test("configured identity fields win over derived ones")
    func configuredIdentity() {
        let controller = ControllerConfig(name: "c", transport: .vhostUserSCSI, socket: "/s")
        let identity = DerivedIdentity.identity(
            for: LUNConfig(lun: 3, backend: .null, size: 512, serial: "S", wwn: 0x5000000000000001, vendor: "ACME",
                           product: "P", revision: "9"), controller: controller)
        #expect(identity == LogicalUnitIdentity(vendor: "ACME", product: "P", revision: "9", serial: "S", naa: 0x5000000000000001))
        let defaults = DerivedIdentity.identity(for: LUNConfig(lun: 3, backend: .null, size: 512), controller: controller)
        #expect(defaults.vendor == "SCSIGATE" && defaults.product == "VIRTUAL-DISK" && defaults.serial == "c-0-3")
    }

    @Test("QEMU attachment arguments per transport")
    func qemuLines() {
        #expect(QEMUCommandLine.deviceArguments(for: ControllerConfig(name: "s", transport: .vhostUserSCSI, socket: "/r/s.sock",
                                                                      queues: 2, queueSize: 256))
                == ["-chardev", "socket,id=sg-s,path=/r/s.sock",
                    "-device", "vhost-user-scsi-pci,chardev=sg-s,num_queues=2,virtqueue_size=256"])
        #expect(QEMUCommandLine.deviceArguments(for: ControllerConfig(name: "s", transport: .vhostUserSCSI, socket: "/s", hotplug: false)).last
                == "vhost-user-scsi-pci,chardev=sg-s,num_queues=1,virtqueue_size=128,hotplug=off")
        #expect(QEMUCommandLine.deviceArguments(for: ControllerConfig(name: "b", transport: .vhostUserBlk, socket: "/r/b.sock"))
                == ["-chardev", "socket,id=sg-b,path=/r/b.sock", "-device", "vhost-user-blk-pci,chardev=sg-b,num-queues=1,queue-size=128"])
        #expect(QEMUCommandLine.deviceArguments(for: ControllerConfig(name: "p", transport: .pvscsi, socket: "/r/p.sock"))
                == ["-device", "{\"driver\":\"vfio-user-pci\",\"socket\":{\"path\":\"/r/p.sock\",\"type\":\"unix\"}}"])
        for transport in [TransportKind.vfioUserVirtioSCSI, .vfioUserVirtioBlk] {
            #expect(QEMUCommandLine.deviceArguments(for: ControllerConfig(name: "v", transport: transport, socket: "/r/v.sock", queues: 4))
                    == ["-device", "{\"driver\":\"vfio-user-pci\",\"socket\":{\"path\":\"/r/v.sock\",\"type\":\"unix\"}}"])
        }
        #expect(QEMUCommandLine.deviceLine(for: ControllerConfig(name: "p", transport: .pvscsi, socket: "/r/p.sock"))
                == "-device '{\"driver\":\"vfio-user-pci\",\"socket\":{\"path\":\"/r/p.sock\",\"type\":\"unix\"}}'")
        // Awkward socket paths: JSON-escaped for vfio-user-pci, commas doubled in -chardev, shell-quoted in the line.
        #expect(QEMUCommandLine.deviceArguments(for: ControllerConfig(name: "p", transport: .pvscsi, socket: "/r/a\"b\\c.sock")).last
                == "{\"driver\":\"vfio-user-pci\",\"socket\":{\"path\":\"/r/a\\\"b\\\\c.sock\",\"type\":\"unix\"}}")
        #expect(QEMUCommandLine.deviceLine(for: ControllerConfig(name: "b", transport: .vhostUserBlk, socket: "/r/it's,here.sock"))
                == "-chardev 'socket,id=sg-b,path=/r/it'\\''s,,here.sock' -device vhost-user-blk-pci,chardev=sg-b,num-queues=1,queue-size=128")
        #expect(QEMUCommandLine.sharedMemoryArguments(size: "2G")
                == ["-object", "memory-backend-memfd,id=mem0,size=2G,share=on", "-numa", "node,memdev=mem0"])
    }

    @Test("check-config report: summary and exit 0 when valid")
    func checkValid() {
        let report = ConfigCheckReport.check(path: nil)
        #expect(report.exitCode == 0 && report.errors.isEmpty)
        #expect(report.output.first == "<embedded>: OK: 1 controller, 1 LUN")
        #expect(report.output.contains(
            "  target 0 lun 0: file /var/lib/scsigate/disk0.img, 1 GiB (created if missing), 512-byte blocks, cache none, serial scsi0-0-0, naa 5025347538bf3211"))
    }

    @Test("check-config report: every error and exit 1 when invalid")
    func checkInvalid() throws {
        let scratch = ScratchDirectory()
        let path = scratch.path + "/bad.toml"
        try """
            [[controller]]
            name = "c"
            transport = "vhost-user-blk"
            socket = "/s"
            [[controller.lun]]
            backend = "null"
            size = 1000
            block_size = 4096
            """.write(toFile: path, atomically: true, encoding: .utf8)
        let report = ConfigCheckReport.check(path: path)
        #expect(report.exitCode == 1 && report.output.isEmpty)
        #expect(report.errors == [
            "\(path):7: key 'controller[0].lun[0].size': 1000 bytes is not a multiple of block_size 4096",
            "\(path): 1 error, not valid",
        ])
    }
}
