import CSystem
import Foundation
import Glibc
import ISCSIBackend
import Logging
import Testing
@testable import Gateway

/// A datagram socket standing in for systemd's notification socket (`NOTIFY_SOCKET`): a path, or an
/// abstract name when `path` starts with '@'.
final class NotifyListener {
    let path: String
    let fd: Int32
    private(set) var received: [String] = []

    init(path: String) throws {
        self.path = path
        fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        let abstract = path.hasPrefix("@")
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
            if abstract { raw[0] = 0 }
        }
        let length = socklen_t(MemoryLayout<sockaddr_un>.offset(of: \sockaddr_un.sun_path)! + bytes.count + (abstract ? 0 : 1))
        if !abstract { unlink(path) }
        let rc = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) } }
        guard rc == 0 else {
            close(fd)
            throw SocketServerError.systemCall(.current("bind", context: path))
        }
    }

    deinit { close(fd) }

    /// The next datagram, or nil after `timeout` seconds.
    func next(timeout: Double) -> String? {
        guard csys_wait_readable(fd, Int32(timeout * 1000)) == 1 else { return nil }
        var buffer = [UInt8](repeating: 0, count: 4096)
        let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
        guard n >= 0 else { return nil }
        let text = String(decoding: buffer[0..<n], as: UTF8.self)
        received.append(text)
        return text
    }

    /// Reads datagrams until one contains `field` (returned) or `timeout` seconds pass.
    func waitFor(_ field: String, timeout: Double = 20) -> String? {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if let message = next(timeout: deadline.timeIntervalSinceNow), message.split(separator: "\n").contains(Substring(field)) {
                return message
            }
        }
        return nil
    }
}

/// Sends one vhost-user GET_FEATURES on a new connection to `path` and returns the features, or nil.
func vhostUserFeatures(at path: String) -> UInt64? {
    let fd = csys_unix_connect(path)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    _ = csys_set_recv_timeout(fd, 5000)
    var request: [UInt32] = [1, 1, 0]  // VHOST_USER_GET_FEATURES, version 1, no payload
    let sent = request.withUnsafeMutableBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
    guard sent == 12 else { return nil }
    var reply = [UInt8](repeating: 0, count: 20)
    var got = 0
    while got < reply.count {
        let n = reply.withUnsafeMutableBytes { recv(fd, $0.baseAddress! + got, $0.count - got, 0) }
        if n <= 0 { return nil }
        got += n
    }
    let header = reply.withUnsafeBytes { ($0.load(as: UInt32.self), $0.load(fromByteOffset: 4, as: UInt32.self), $0.load(fromByteOffset: 8, as: UInt32.self)) }
    guard header.0 == 1, header.1 & 0x4 != 0, header.2 == 8 else { return nil }
    return reply.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: 12, as: UInt64.self) }
}

@Suite("systemd: socket group, notifications, socket activation", .serialized)
struct SystemdTests {
    // MARK: socket_mode / socket_group

    @Test("socket_group must name a group of this machine: FILE:LINE: key error, reported by check-config")
    func unknownGroup() {
        let text = """
            [gateway]
            state_dir = "/srv/sg"
            socket_group = "sg-no-such-group"
            [[controller]]
            name = "c0"
            transport = "vhost-user-scsi"
            socket = "/run/sg/c0.sock"
            socket_group = "sg-no-such-group-2"
            """
        #expect(configMessages(text) == [
            "test.toml:3: key 'gateway.socket_group': group 'sg-no-such-group' does not exist on this machine",
            "test.toml:8: key 'controller[0].socket_group': group 'sg-no-such-group-2' does not exist on this machine",
        ])
    }

    @Test("[gateway] socket_mode / socket_group are the controllers' defaults; a controller overrides them; save writes them")
    func gatewayDefaults() throws {
        let text = """
            [gateway]
            state_dir = "/srv/sg"
            socket_mode = "0660"
            socket_group = "nogroup"
            [[controller]]
            name = "c0"
            transport = "vhost-user-scsi"
            socket = "/run/sg/c0.sock"
            [[controller]]
            name = "c1"
            transport = "vhost-user-scsi"
            socket = "/run/sg/c1.sock"
            socket_mode = 0o600
            socket_group = "daemon"
            """
        let config = try ConfigLoader.parse(text, source: "t.toml")
        #expect(config.settings.socketMode == 0o660 && config.settings.socketGroup == "nogroup")
        #expect(config.controllers[0].socketMode == 0o660 && config.controllers[0].socketGroup == "nogroup")
        #expect(config.controllers[1].socketMode == 0o600 && config.controllers[1].socketGroup == "daemon")
        let rendered = ConfigWriter.render(config)
        #expect(rendered.contains("socket_group = \"nogroup\""))
        #expect(try ConfigLoader.parse(rendered, source: "t.toml") == config)
        #expect(ConfigSummary.lines(for: config).contains { $0.contains("(mode 0660, group nogroup)") })
    }

    @Test("a controller socket gets its group and mode")
    func ownershipApplied() throws {
        let scratch = ScratchDirectory()
        let path = scratch.path + "/s.sock"
        let fd = csys_unix_listen(path, 1)
        #expect(fd >= 0)
        defer { close(fd) }
        try SocketOwnership.apply(path: path, mode: 0o660, group: "nogroup")
        var st = stat()
        #expect(stat(path, &st) == 0)
        #expect(st.st_mode & 0o777 == 0o660)
        #expect(st.st_gid == SocketOwnership.groupID(named: "nogroup"))
        #expect(throws: FrontEndError.self) { try SocketOwnership.apply(path: scratch.path + "/missing.sock", mode: 0o600, group: nil) }
    }

    // MARK: sd_notify

    @Test("notifications reach a path and an abstract NOTIFY_SOCKET as one datagram each", arguments: [false, true])
    func notifyDatagrams(abstract: Bool) throws {
        let scratch = ScratchDirectory()
        let path = abstract ? "@scsigate-test-\(getpid())-\(UInt32.random(in: 0...UInt32.max))" : scratch.path + "/notify.sock"
        let listener = try NotifyListener(path: path)
        let notifier = ServiceNotifier.fromEnvironment(["NOTIFY_SOCKET": path, "WATCHDOG_USEC": "3000000"])
        #expect(notifier.watchdogPingMilliseconds == 1500)
        notifier.ready(status: "serving")
        #expect(listener.next(timeout: 2) == "READY=1\nSTATUS=serving")
        let before = ServiceNotifier.monotonicMicroseconds()
        notifier.reloading()
        let reloading = try #require(listener.next(timeout: 2))
        #expect(reloading.hasPrefix("RELOADING=1\nMONOTONIC_USEC="))
        let usec = reloading.split(separator: "\n").first { $0.hasPrefix("MONOTONIC_USEC=") }.flatMap { UInt64($0.dropFirst(15)) }
        #expect(usec.map { $0 >= before && $0 <= ServiceNotifier.monotonicMicroseconds() } == true)
        notifier.watchdogPing()
        #expect(listener.next(timeout: 2) == "WATCHDOG=1")
        notifier.stopping()
        #expect(listener.next(timeout: 2)?.hasPrefix("STOPPING=1") == true)
    }

    @Test("without NOTIFY_SOCKET nothing is sent; WATCHDOG_PID of another process disables the watchdog")
    func notifyEnvironment() {
        #expect(!ServiceNotifier.fromEnvironment([:]).isEnabled)
        #expect(ServiceNotifier.fromEnvironment([:]).notify(["READY=1"]) == 0)
        #expect(ServiceNotifier.fromEnvironment(["NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"], pid: 2)
                    .watchdogMicroseconds == nil)
        #expect(ServiceNotifier.fromEnvironment(["NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "2"], pid: 2)
                    .watchdogMicroseconds == 1_000_000)
        #expect(ServiceNotifier.fromEnvironment(["NOTIFY_SOCKET": "/nonexistent/notify"]).notify(["READY=1"]) < 0)
    }

    // MARK: socket activation

    @Test("activated sockets match controllers by FileDescriptorName, then unnamed ones by path; LISTEN_PID of another process is ignored")
    func activationMatching() throws {
        let activation = SocketActivation(sockets: [
            .init(fd: 3, name: "scsi0", path: "/run/a.sock"),
            .init(fd: 4, name: "scsigate.socket", path: "/run/blk0.sock"),
            .init(fd: 5, name: "control", path: "/run/ctl.sock"),
        ])
        #expect(activation.take(name: "blk0", path: "/run/blk0.sock")?.fd == 4)
        #expect(activation.take(name: "scsi0", path: "/run/other.sock")?.fd == 3)
        #expect(activation.take(name: "pv0", path: "/run/pv0.sock") == nil)
        #expect(activation.take(name: SocketActivation.controlSocketName, path: "/x")?.fd == 5)
        #expect(activation.remaining.isEmpty)
        #expect(try SocketActivation.fromEnvironment(["LISTEN_PID": "1", "LISTEN_FDS": "2"], pid: 2, unsetEnvironment: false)
                    .remaining.isEmpty)
        #expect(throws: GatewayError.self) {
            try SocketActivation.fromEnvironment(["LISTEN_PID": "2", "LISTEN_FDS": "x"], pid: 2, unsetEnvironment: false)
        }
    }

    // MARK: one log format

    @Test("the iSCSI back-end logs through the gateway's logger (its level, the LUN's metadata)")
    func iscsiLinesUseTheGatewayLogger() throws {
        let store = RecordingLogHandler.Store()
        var logger = Logger(label: "scsigate", factory: { _ in RecordingLogHandler(store: store) })
        logger[metadataKey: "controller"] = "scsi0"
        // Nothing listens on port 1: the back-end starts offline and says so once, as a warning.
        let config = try ISCSIBackendConfig(url: "iscsi://127.0.0.1:1/iqn.2026-12.test:none/0",
                                            initiatorName: "iqn.2026-12.test:gateway", log: logger)
        let backend = try ISCSIBackend.open(config: config, waitMilliseconds: 2000, allowOffline: true)
        #expect(backend.status != .online)
        let records = store.records.withLock { $0 }
        let offline = records.filter { $0.message.contains("OFFLINE at start-up") }
        #expect(offline.count == 1, "\(records.map(\.message))")
        #expect(offline.first?.level == .warning)
        #expect(offline.first?.metadata["controller"] == "scsi0")
    }

    // MARK: the executable under systemd

    func writeConfig(_ scratch: ScratchDirectory, luns: Int = 1, group: Bool = false) throws -> String {
        let path = scratch.path + "/sd.toml"
        var text = """
            [gateway]
            state_dir = "\(scratch.path)/state"
            control_socket = "\(scratch.path)/run/control.sock"
            \(group ? "socket_mode = \"0660\"\nsocket_group = \"nogroup\"" : "")
            [[controller]]
            name = "scsi0"
            transport = "vhost-user-scsi"
            socket = "scsi0.sock"
            """
        for lun in 0..<luns {
            text += "\n[[controller.lun]]\nlun = \(lun)\nbackend = \"null\"\nsize = \"1M\"\n"
        }
        try text.write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }

    @Test("serve as Type=notify: READY=1 once the sockets listen, WATCHDOG=1, RELOADING=1/READY=1 around SIGHUP, STOPPING=1")
    func notifyLifecycle() throws {
        let executable = try #require(scsigateExecutable(), "build the scsigate product first (swift build)")
        let scratch = ScratchDirectory()
        let config = try writeConfig(scratch, group: true)
        let listener = try NotifyListener(path: scratch.path + "/notify.sock")
        let process = Process()
        process.executableURL = executable
        process.arguments = ["serve", "--config", config]
        process.environment = ["NOTIFY_SOCKET": listener.path, "WATCHDOG_USEC": "400000"]
        let err = Pipe()
        process.standardError = err
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        defer { if process.isRunning { kill(process.processIdentifier, SIGKILL) } }

        let ready = try #require(listener.waitFor("READY=1"), "no READY=1")
        #expect(ready.contains("STATUS=serving 1 controller(s), 1 LUN(s)"))
        // READY=1 means every socket listens: both answer at once.
        #expect(vhostUserFeatures(at: scratch.path + "/run/scsi0.sock") != nil)
        #expect(try ControlClient(path: scratch.path + "/run/control.sock", timeoutMilliseconds: 5000).call("lun.list").arrayValue?.count == 1)
        var st = stat()
        #expect(stat(scratch.path + "/run/scsi0.sock", &st) == 0 && st.st_mode & 0o777 == 0o660)
        #expect(st.st_gid == SocketOwnership.groupID(named: "nogroup"))
        // Pings every 200 ms.
        let pingsBefore = listener.received.filter { $0 == "WATCHDOG=1" }.count
        let pingDeadline = Date().addingTimeInterval(1.2)
        while Date() < pingDeadline { _ = listener.next(timeout: pingDeadline.timeIntervalSinceNow) }
        #expect(listener.received.filter { $0 == "WATCHDOG=1" }.count - pingsBefore >= 3)

        // SIGHUP: RELOADING=1 (with MONOTONIC_USEC), the new LUN, then READY=1.
        _ = try writeConfig(scratch, luns: 2, group: true)
        kill(process.processIdentifier, SIGHUP)
        let reloading = try #require(listener.waitFor("RELOADING=1"))
        #expect(reloading.contains("MONOTONIC_USEC="))
        let readyAgain = try #require(listener.waitFor("READY=1"))
        #expect(readyAgain.contains("2 LUN(s)"))
        #expect(try ControlClient(path: scratch.path + "/run/control.sock", timeoutMilliseconds: 5000).call("lun.list").arrayValue?.count == 2)

        kill(process.processIdentifier, SIGTERM)
        #expect(listener.waitFor("STOPPING=1") != nil)
        let log = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        #expect(process.terminationStatus == 0, "\(log)")
        #expect(log.contains("received SIGHUP; reloading the configuration"))
        #expect(log.contains("added controller scsi0 target 0 lun 1: null"))
        // Not activated: the gateway created the socket and removes it.
        #expect(!FileManager.default.fileExists(atPath: scratch.path + "/run/scsi0.sock"))
    }

    @Test("socket activation under systemd-socket-activate: controller and control sockets by --fdname, served, never unlinked")
    func socketActivation() throws {
        let executable = try #require(scsigateExecutable(), "build the scsigate product first (swift build)")
        let activate = try #require(["/usr/bin/systemd-socket-activate", "/bin/systemd-socket-activate"]
            .first { FileManager.default.isExecutableFile(atPath: $0) },
            "systemd-socket-activate is missing: apt-get install systemd")
        let scratch = ScratchDirectory()
        let config = try writeConfig(scratch)
        try FileManager.default.createDirectory(atPath: scratch.path + "/run", withIntermediateDirectories: true)
        let controllerSocket = scratch.path + "/run/scsi0.sock"
        let controlSocket = scratch.path + "/run/control.sock"
        let listener = try NotifyListener(path: scratch.path + "/notify.sock")

        func launch() throws -> (Process, Pipe) {
            let process = Process()
            process.executableURL = URL(fileURLWithPath: activate)
            process.arguments = ["-l", controlSocket, "-l", controllerSocket, "--fdname=control:scsi0",
                                 "-E", "NOTIFY_SOCKET=\(listener.path)", executable.path, "serve", "--config", config]
            let err = Pipe()
            process.standardError = err
            process.standardOutput = FileHandle.nullDevice
            try process.run()
            return (process, err)
        }

        // Twice: a restarted gateway serves the (new) sockets the same way.
        for round in 1...2 {
            let (process, err) = try launch()
            defer { if process.isRunning { kill(process.processIdentifier, SIGKILL) } }
            // systemd-socket-activate binds, then starts the gateway at the first connection.
            let deadline = Date().addingTimeInterval(10)
            while !FileManager.default.fileExists(atPath: controlSocket) && Date() < deadline { usleep(20_000) }
            let version = try ControlClient(path: controlSocket, timeoutMilliseconds: 20_000).call("gateway.version")
            #expect(version["pid"]?.intValue == Int64(process.processIdentifier), "the gateway runs in the activated process")
            #expect(listener.waitFor("READY=1") != nil, "round \(round)")
            #expect(vhostUserFeatures(at: controllerSocket) != nil, "round \(round)")
            kill(process.processIdentifier, SIGTERM)
            #expect(listener.waitFor("STOPPING=1") != nil)
            let log = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            process.waitUntilExit()
            #expect(process.terminationStatus == 0, "\(log)")
            #expect(log.contains("listening on \(controllerSocket) (socket fd 4 from systemd)"), "\(log)")
            #expect(log.contains("control socket \(controlSocket) (fd 3 from systemd)"), "\(log)")
            // The gateway never unlinks a socket it was handed: QEMU reconnects to the same file.
            #expect(FileManager.default.fileExists(atPath: controllerSocket))
            #expect(FileManager.default.fileExists(atPath: controlSocket))
            unlink(controllerSocket)
            unlink(controlSocket)
        }
    }
}
