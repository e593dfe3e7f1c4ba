import Backends
import BlockIO
import Foundation
import Glibc
import Logging
import SCSI
import Synchronization
import Testing
@testable import Gateway

@Suite("Control socket: JSON-RPC methods on a real socket against a running gateway")
struct ControlServerTests {
    @Test("version, controller.list and lun.list describe the running gateway")
    func queries() throws {
        let f = try AdminFixture()
        let version = try f.call("gateway.version")
        #expect(version["version"] == .string(ScsiGateVersion.string))
        #expect(version["pid"] == .number(Int(getpid())))
        #expect(version["save_path"] == .string(f.configPath))

        let controllers = try #require(try f.call("controller.list").arrayValue)
        #expect(controllers.map { $0["name"] } == ["scsi0", "pv0"])
        #expect(controllers[0]["transport"] == "vhost-user-scsi")
        #expect(controllers[0]["luns"] == 2)
        #expect(controllers[0]["queues"] == 2)
        #expect(controllers[1]["max_targets"] == 16)

        let luns = try #require(try f.call("lun.list").arrayValue)
        #expect(luns.count == 3)
        #expect(luns[0]["controller"] == "scsi0" && luns[0]["lun"] == 0 && luns[0]["backend"] == "file")
        #expect(luns[0]["size"] == .int(4 << 20))
        #expect(luns[0]["path"] == .string(f.dir + "/state/disk0.img"))
        #expect(luns[1]["lun"] == 7 && luns[1]["block_size"] == 4096 && luns[1]["size"] == .int(1 << 30))
        #expect(luns[2]["controller"] == "pv0" && luns[2]["target"] == 3)
        #expect(try f.call("lun.list", ["controller": "pv0"]).arrayValue?.count == 1)
        #expect(f.refusal("lun.list", ["controller": "nope"])?.code == ControlErrorCode.noSuchController)
    }

    @Test("add, resize, set read-only and remove reach the SCSI target and the back-end")
    func lifecycle() throws {
        let f = try AdminFixture()
        let path = f.dir + "/state/hot/disk1.img"
        let added = try f.call("lun.add", ["controller": "scsi0", "lun": 1, "backend": "file", "path": .string(path),
                                           "size": "8M", "create": true, "serial": "HOT1"])
        #expect(added["lun"] == 1 && added["size"] == .int(8 << 20) && added["serial"] == "HOT1")
        let target = try #require(f.gateway.controller(named: "scsi0")).target
        let unit = try #require(target.logicalUnit(LogicalUnitNumber(1)!))
        #expect(unit.blockCount == (8 << 20) / 512)
        #expect(unit.identity.serial == "HOT1")
        #expect(FileManager.default.fileExists(atPath: path))

        let resized = try f.call("lun.resize", ["controller": "scsi0", "lun": 1, "size": "16M"])
        #expect(resized == .object(["old_size": .int(8 << 20), "size": .int(16 << 20)]))
        #expect(unit.blockCount == (16 << 20) / 512)
        let attributes = try FileManager.default.attributesOfItem(atPath: path)
        #expect((attributes[.size] as? NSNumber)?.intValue == 16 << 20)

        let shrunk = try f.call("lun.resize", ["controller": "scsi0", "lun": 1, "size": .int(4 << 20), "force": true])
        #expect(shrunk["size"] == .int(4 << 20))
        #expect(unit.blockCount == (4 << 20) / 512)

        let readOnly = try f.call("lun.set_readonly", ["controller": "scsi0", "lun": 1, "read_only": true])
        #expect(readOnly["read_only"] == true)
        #expect(unit.isReadOnly)
        _ = try f.call("lun.set_readonly", ["controller": "scsi0", "lun": 1, "read_only": false])
        #expect(!unit.isReadOnly)

        let removed = try f.call("lun.remove", ["controller": "scsi0", "lun": 1, "wait_ms": 100])
        #expect(removed["drained"] == true && removed["in_flight"] == 0)
        #expect(removed["removed"]?["serial"] == "HOT1")
        #expect(target.logicalUnit(LogicalUnitNumber(1)!) == nil)
        #expect(try f.call("lun.list", ["controller": "scsi0"]).arrayValue?.count == 2)
        #expect(FileManager.default.fileExists(atPath: path), "remove never deletes the backing file")

        // PVSCSI addresses by target; a null LUN cannot be resized.
        _ = try f.call("lun.add", ["controller": "pv0", "target": 5, "backend": "null", "size": "1M"])
        let pv = try #require(f.gateway.controller(named: "pv0")).target
        #expect(pv.logicalUnit(LogicalUnitNumber(5)!) != nil)
        #expect(f.refusal("lun.resize", ["controller": "pv0", "target": 5, "size": "2M"])?.code == ControlErrorCode.unsupported)
        _ = try f.call("lun.remove", ["controller": "pv0", "target": 5])
        #expect(pv.logicalUnit(LogicalUnitNumber(5)!) == nil)
    }

    @Test("each refusal has its code, names the field, and changes nothing")
    func refusals() throws {
        let f = try AdminFixture()
        let before = try f.call("lun.list")
        let disk0 = f.dir + "/state/disk0.img"
        let cases: [(String, [String: JSONValue], Int, String)] = [
            ("lun.add", ["controller": "nope", "lun": 1, "backend": "null", "size": "1M"],
             ControlErrorCode.noSuchController, "no such controller 'nope'; controllers: scsi0, pv0"),
            ("lun.add", ["controller": "scsi0", "lun": 0, "backend": "null", "size": "1M"],
             ControlErrorCode.lunExists, "controller scsi0 already has a LUN at target 0 lun 0"),
            ("lun.add", ["controller": "scsi0", "lun": 2, "backend": "file", "path": .string(f.dir + "/none.img")],
             ControlErrorCode.fileMissing, "'\(f.dir)/none.img' does not exist"),
            ("lun.add", ["controller": "scsi0", "lun": 2, "backend": "file", "path": .string(disk0)],
             ControlErrorCode.lockHeld, "already backs controller scsi0 target 0 lun 0 (lock held)"),
            ("lun.add", ["controller": "scsi0", "lun": 2, "backend": "null", "size": 1000],
             ControlErrorCode.invalidParams, "invalid params: 'size': 1000 bytes is not a multiple of block_size 512"),
            ("lun.add", ["controller": "scsi0", "lun": 2, "backend": "null", "sise": "1M"],
             ControlErrorCode.invalidParams, "invalid params: 'sise': unknown key (did you mean 'size'?)"),
            ("lun.add", ["controller": "scsi0", "lun": 20000, "backend": "null", "size": "1M"],
             ControlErrorCode.invalidParams, "invalid params: 'lun': must be between 0 and 16383, found 20000"),
            ("lun.add", ["controller": "scsi0", "lun": 2, "backend": "tape", "size": "1M"],
             ControlErrorCode.invalidParams, "invalid params: 'backend': 'tape' is not valid"),
            ("lun.add", ["controller": "scsi0", "lun": 2, "backend": "null", "size": "1M", "read_only": "yes"],
             ControlErrorCode.invalidParams, "invalid params: 'read_only': expected a boolean (true or false), found a string"),
            ("lun.add", ["controller": "scsi0", "lun": 2, "backend": "null", "size": 1.5],
             ControlErrorCode.invalidParams, "invalid params: 'size'"),
            ("lun.add", ["controller": "pv0", "target": 99, "backend": "null", "size": "1M"],
             ControlErrorCode.invalidParams, "invalid params: 'target': must be between 0 and 15, found 99"),
            ("lun.add", ["controller": "scsi0", "lun": 2, "backend": "null", "size": "1M", "serial": "scsi0-0-0"],
             ControlErrorCode.invalidParams, "invalid params: 'serial': serial 'scsi0-0-0' is already used by controller scsi0 target 0 lun 0"),
            ("lun.add", ["lun": 2, "backend": "null", "size": "1M"],
             ControlErrorCode.invalidParams, "invalid params: 'controller': required parameter is missing"),
            ("lun.resize", ["controller": "scsi0", "lun": 0, "size": "2M"],
             ControlErrorCode.shrinkNeedsForce, "below the current 4194304 bytes (4 MiB); shrinking loses data; pass force (--force) to shrink"),
            ("lun.resize", ["controller": "scsi0", "lun": 0, "size": 1000],
             ControlErrorCode.invalidParams, "invalid params: 'size': 1000 bytes is not a multiple of block_size 512"),
            ("lun.resize", ["controller": "scsi0", "lun": 3, "size": "8M"],
             ControlErrorCode.noSuchLUN, "controller scsi0 has no LUN at target 0 lun 3"),
            ("lun.remove", ["controller": "scsi0", "lun": 3],
             ControlErrorCode.noSuchLUN, "controller scsi0 has no LUN at target 0 lun 3"),
            ("lun.remove", ["controller": "scsi0", "target": 1, "lun": 0],
             ControlErrorCode.invalidParams, "invalid params: 'target': must be 0"),
            ("lun.remove", ["controller": "scsi0", "lun": 0, "wait_ms": -1],
             ControlErrorCode.invalidParams, "invalid params: 'wait_ms': must be between 0 and 600000, found -1"),
            ("lun.remove", ["controller": "scsi0", "lun": 0, "bogus": 1],
             ControlErrorCode.invalidParams, "invalid params: 'bogus': unknown parameter"),
            ("lun.set_readonly", ["controller": "scsi0", "lun": 0],
             ControlErrorCode.invalidParams, "invalid params: 'read_only': required parameter is missing"),
            ("config.save", ["path": "relative.toml"],
             ControlErrorCode.invalidParams, "invalid params: 'path': must be an absolute path"),
            ("config.save", ["path": .string(f.dir + "/no/such/dir/x.toml")],
             ControlErrorCode.saveFailed, "cannot save \(f.dir)/no/such/dir/x.toml"),
            ("lun.frobnicate", [:], ControlErrorCode.methodNotFound, "method not found: 'lun.frobnicate'"),
        ]
        for (method, params, code, message) in cases {
            let error = f.refusal(method, params)
            #expect(error?.code == code, "\(method) \(params)")
            #expect(error?.message.contains(message) == true, "\(error?.message ?? "") should contain \(message)")
            #expect(error?.message.contains("\n") == false)
        }
        // invalid params name the field in data too.
        #expect(f.refusal("lun.add", ["controller": "scsi0", "lun": 2, "backend": "null", "size": 1000])?.data?["field"] == "size")
        #expect(try f.call("lun.list") == before, "refused calls changed nothing")
        #expect(!FileManager.default.fileExists(atPath: f.dir + "/none.img"))
    }

    @Test("hotplug through the control socket reaches front-ends as LUN events and guests as unit attentions")
    func eventsAndUnitAttentions() throws {
        let f = try AdminFixture()
        let runtime = try #require(f.gateway.controller(named: "scsi0"))
        final class Events: Sendable { let list = Mutex<[LUNEvent]>([]) }
        let events = Events()
        runtime.target.subscribe { event in events.list.withLock { $0.append(event) } }
        let nexus = ITNexus(initiator: 0x42)
        let lun0 = try #require(runtime.target.logicalUnit(LogicalUnitNumber(0)!))
        lun0.unitAttentions.clear(for: nexus)

        _ = try f.call("lun.add", ["controller": "scsi0", "lun": 3, "backend": "null", "size": "1M"])
        #expect(lun0.unitAttentions.pending(for: nexus) == [.reportedLUNsDataHasChanged])
        let lun3 = try #require(runtime.target.logicalUnit(LogicalUnitNumber(3)!))
        #expect(lun3.unitAttentions.pendingForNewNexuses.contains(.powerOnResetOrBusDeviceReset))
        lun0.unitAttentions.clear(for: nexus)

        _ = try f.call("lun.resize", ["controller": "scsi0", "lun": 0, "size": "8M"])
        #expect(lun0.unitAttentions.pending(for: nexus) == [.capacityDataHasChanged])
        lun0.unitAttentions.clear(for: nexus)
        _ = try f.call("lun.set_readonly", ["controller": "scsi0", "lun": 0, "read_only": true])
        _ = try f.call("lun.remove", ["controller": "scsi0", "lun": 3])
        #expect(lun0.unitAttentions.pending(for: nexus).contains(.reportedLUNsDataHasChanged))

        let lun = { (n: Int) in LogicalUnitNumber(n)! }
        #expect(events.list.withLock { $0 } == [.added(lun(3)), .capacityChanged(lun(0), blockCount: (8 << 20) / 512),
                                                .parametersChanged(lun(0)), .removed(lun(3))])
    }

    @Test("a backing file locked by another ScsiGate is refused with the lock-held code")
    func lockHeldElsewhere() throws {
        let f = try AdminFixture()
        let path = f.dir + "/state/shared.img"
        let other = try AnyBlockBackend.open(BackendSpec(kind: .file, path: path, size: 1 << 20, create: true))
        defer { other.close() }
        let error = f.refusal("lun.add", ["controller": "scsi0", "lun": 4, "backend": "file", "path": .string(path)])
        #expect(error?.code == ControlErrorCode.lockHeld)
        #expect(error?.message == "controller scsi0 target 0 lun 4: \(path): already in use by another ScsiGate or LUN (lock held)")
        #expect(try f.call("lun.list", ["controller": "scsi0"]).arrayValue?.count == 2)
    }

    @Test("lun.remove waits for in-flight commands up to wait_ms")
    func removeWaitsForInFlight() throws {
        let f = try AdminFixture()
        _ = try f.call("lun.add", ["controller": "scsi0", "lun": 3, "backend": "null", "size": "1M"])
        _ = try f.call("lun.add", ["controller": "scsi0", "lun": 4, "backend": "null", "size": "1M"])
        let runtime = try #require(f.gateway.controller(named: "scsi0"))
        func counters(_ lun: Int) throws -> IOCounters {
            let unit = try #require(runtime.target.logicalUnit(LogicalUnitNumber(lun)!))
            return try #require(runtime.statistics(backendID: unit.backendID)).counters(queue: 1)
        }
        // LUN 3: a command that never completes: the remove gives up after wait_ms and says so.
        let stuck = try counters(3)
        stuck.begin()
        let timedOut = try f.call("lun.remove", ["controller": "scsi0", "lun": 3, "wait_ms": 150])
        #expect(timedOut["drained"] == false)
        #expect(timedOut["in_flight"] == 1)
        #expect((timedOut["waited_ms"]?.intValue ?? 0) >= 150)

        // LUN 4: the command completes 50 ms into the wait.
        let busy = try counters(4)
        busy.begin()
        let completer = Thread {
            usleep(50_000)
            busy.record(command: .write, bytes: 4096, latencyNanos: 50_000_000)
        }
        completer.start()
        let drained = try f.call("lun.remove", ["controller": "scsi0", "lun": 4, "wait_ms": 5000])
        #expect(drained["drained"] == true)
        #expect(drained["in_flight"] == 0)
        let waited = drained["waited_ms"]?.intValue ?? 0
        #expect(waited >= 40 && waited < 5000)
    }

    @Test("stats.get reports per-LUN and per-queue counters, including removed LUNs in queue totals")
    func stats() throws {
        let f = try AdminFixture()
        let runtime = try #require(f.gateway.controller(named: "scsi0"))
        let unit0 = try #require(runtime.target.logicalUnit(LogicalUnitNumber(0)!))
        let stats0 = try #require(runtime.statistics(backendID: unit0.backendID))
        #expect(stats0.queueCount == 2)
        stats0.counters(queue: 0).record(command: .read, bytes: 4096, latencyNanos: 3000)
        stats0.counters(queue: 1).record(command: .write, bytes: 8192, latencyNanos: 5000, status: 0x02, senseKey: 0x03)
        _ = try f.call("lun.add", ["controller": "scsi0", "lun": 9, "backend": "null", "size": "1M"])
        let unit9 = try #require(runtime.target.logicalUnit(LogicalUnitNumber(9)!))
        try #require(runtime.statistics(backendID: unit9.backendID)).counters(queue: 1)
            .record(command: .read, bytes: 512, latencyNanos: 1000)
        _ = try f.call("lun.remove", ["controller": "scsi0", "lun": 9])

        let result = try f.call("stats.get", ["controller": "scsi0"])
        let luns = try #require(result["luns"]?.arrayValue)
        #expect(luns.count == 2)
        let lun0 = luns[0]
        #expect(lun0["lun"] == 0 && lun0["commands"] == 2 && lun0["reads"] == 1 && lun0["writes"] == 1)
        #expect(lun0["read_bytes"] == 4096 && lun0["write_bytes"] == 8192 && lun0["errors"] == 1)
        #expect(lun0["errors_by_sense_key"] == ["MEDIUM ERROR": 1])
        #expect(lun0["latency"]?["sum_ns"] == 8000)
        #expect(lun0["latency"]?["p99_ns"] == 8192)
        let queues = try #require(result["queues"]?.arrayValue)
        #expect(queues.count == 2)
        #expect(queues[0]["commands"] == 1 && queues[0]["read_bytes"] == 4096)
        #expect(queues[1]["commands"] == 2, "the removed LUN 9's command stays in the queue total")
        #expect(queues[1]["read_bytes"] == 512 && queues[1]["write_bytes"] == 8192)
    }

    @Test("framing: malformed JSON, bad requests, notifications, batches and oversized requests")
    func framing() throws {
        let f = try AdminFixture()
        func exchange(_ text: String) throws -> JSONValue? {
            JSONValue.parse(try f.client.exchange(Array(text.utf8)))
        }
        let parseError = try #require(try exchange("{\"jsonrpc\": \"2.0\", \"method\": \n"))
        #expect(parseError["error"]?["code"] == .number(ControlErrorCode.parseError))
        #expect(parseError["id"] == .null)

        let wrongVersion = try exchange("{\"jsonrpc\":\"1.0\",\"id\":7,\"method\":\"gateway.version\"}\n")
        #expect(wrongVersion?["error"]?["code"] == .number(ControlErrorCode.invalidRequest))
        #expect(wrongVersion?["id"] == 7)
        #expect(try exchange("42\n")?["error"]?["code"] == .number(ControlErrorCode.invalidRequest))
        #expect(try exchange("[]\n")?["error"]?["code"] == .number(ControlErrorCode.invalidRequest))
        #expect(try exchange("{\"jsonrpc\":\"2.0\",\"id\":{},\"method\":\"x\"}\n")?["error"]?["code"]
                == .number(ControlErrorCode.invalidRequest))
        #expect(try exchange("{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"lun.list\",\"params\":[1]}\n")?["error"]?["code"]
                == .number(ControlErrorCode.invalidParams))

        // A notification gets no answer: the first line back answers the request after it (id "b").
        let answer = try exchange("""
            {"jsonrpc":"2.0","method":"gateway.version"}
            {"jsonrpc":"2.0","id":"b","method":"gateway.version"}

            """)
        #expect(answer?["id"] == "b")
        #expect(answer?["result"]?["version"] == .string(ScsiGateVersion.string))

        // A batch gets an array of answers (none for its notification).
        let batch = try #require(try exchange("""
            [{"jsonrpc":"2.0","id":1,"method":"gateway.version"},{"jsonrpc":"2.0","method":"lun.list"},{"jsonrpc":"2.0","id":2,"method":"nope"}]

            """)?.arrayValue)
        #expect(batch.count == 2)
        #expect(batch[0]["id"] == 1 && batch[0]["result"] != nil)
        #expect(batch[1]["id"] == 2 && batch[1]["error"]?["code"] == .number(ControlErrorCode.methodNotFound))

        // Deep nesting is a parse error, not a crash of the gateway.
        let deep = String(repeating: "[", count: 100_000) + String(repeating: "]", count: 100_000) + "\n"
        #expect(try exchange(deep)?["error"]?["code"] == .number(ControlErrorCode.parseError))
        let deepParams = "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"lun.list\",\"params\":"
            + String(repeating: "{\"a\":", count: 20_000) + "1" + String(repeating: "}", count: 20_000) + "}\n"
        #expect(try exchange(deepParams)?["error"] != nil)

        // Oversized: refused, connection closed; the server keeps serving others.
        let huge = "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"lun.list\",\"params\":{\"controller\":\""
            + String(repeating: "x", count: ControlServer.maximumRequestBytes + 10) + "\"}}\n"
        let refused = try exchange(huge)
        #expect(refused?["error"]?["code"] == .number(ControlErrorCode.invalidRequest))
        #expect(refused?["error"]?["message"]?.stringValue?.contains("larger than 262144 bytes") == true)
        let endless = String(repeating: "y", count: ControlServer.maximumRequestBytes + 10)  // no newline at all
        #expect(try exchange(endless)?["error"]?["code"] == .number(ControlErrorCode.invalidRequest))
        #expect(try f.call("gateway.version")["version"] == .string(ScsiGateVersion.string))

        // Several requests pipelined on one connection are answered in order.
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        let connected = withUnixAddress(f.plane.control.path) { connect(fd, $0, $1) }
        #expect(connected == 0)
        let three = (1...3).map { "{\"jsonrpc\":\"2.0\",\"id\":\($0),\"method\":\"gateway.version\"}\n" }.joined()
        _ = three.withCString { send(fd, $0, strlen($0), 0) }
        var received: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while received.filter({ $0 == 10 }).count < 3 {
            let n = recv(fd, &buffer, buffer.count, 0)
            if n <= 0 { break }
            received += buffer[0..<n]
        }
        let ids = received.split(separator: 10).compactMap { JSONValue.parse($0)?["id"] }
        #expect(ids == [1, 2, 3])
    }

    @Test("the socket is mode 0600; a stale socket file is replaced; a live one or a non-socket is refused")
    func socketFile() throws {
        let f = try AdminFixture()
        let path = f.plane.control.path
        var st = stat()
        #expect(stat(path, &st) == 0)
        #expect(st.st_mode & S_IFMT == S_IFSOCK)
        #expect(st.st_mode & 0o777 == 0o600)
        // A second server on the same path is refused while the first answers.
        let service = AdminService(gateway: f.gateway, logger: quietLogger)
        #expect(throws: SocketServerError.self) { try ControlServer(path: path, service: service) }
        #expect(try f.call("gateway.version")["version"] != nil)

        // Stale: a socket file nobody listens on.
        let stale = f.dir + "/run/stale.sock"
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        _ = withUnixAddress(stale) { bind(fd, $0, $1) }
        close(fd)
        #expect(FileManager.default.fileExists(atPath: stale))
        let server = try ControlServer(path: stale, service: service)
        #expect(try ControlClient(path: stale).call("gateway.version")["version"] != nil)
        #expect(stat(stale, &st) == 0 && st.st_mode & 0o777 == 0o600)
        server.stop()
        #expect(!FileManager.default.fileExists(atPath: stale), "stop removes its socket file")
        #expect(try FileManager.default.contentsOfDirectory(atPath: f.dir + "/run").filter { $0.hasPrefix(".sgctl") }.isEmpty)

        // A regular file is never replaced.
        let regular = f.dir + "/run/regular"
        try "keep".write(toFile: regular, atomically: true, encoding: .utf8)
        #expect(throws: SocketServerError.self) { try ControlServer(path: regular, service: service) }
        #expect(try String(contentsOfFile: regular, encoding: .utf8) == "keep")
    }

    @Test("config.save writes atomically; the saved file loads to the running map and serves it again")
    func saveAndReload() throws {
        let f = try AdminFixture()
        _ = try f.call("lun.add", ["controller": "scsi0", "lun": 2, "backend": "file", "path": "disk2.img",
                                   "size": "2M", "create": true, "wwn": "5002538c40000001"])
        _ = try f.call("lun.resize", ["controller": "scsi0", "lun": 0, "size": "6M"])
        _ = try f.call("lun.set_readonly", ["controller": "scsi0", "lun": 7, "read_only": true])
        _ = try f.call("lun.remove", ["controller": "pv0", "target": 3])
        _ = try f.call("lun.add", ["controller": "pv0", "target": 1, "backend": "null", "size": "3M", "serial": "PV-ONE"])

        let saved = f.dir + "/saved/scsigate.toml"
        try FileManager.default.createDirectory(atPath: f.dir + "/saved", withIntermediateDirectories: true)
        try "old contents".write(toFile: saved, atomically: false, encoding: .utf8)
        let result = try f.call("config.save", ["path": .string(saved)])
        #expect(result == ["path": .string(saved), "luns": 4])
        #expect(try FileManager.default.contentsOfDirectory(atPath: f.dir + "/saved") == ["scsigate.toml"],
                "no temporary file is left behind")

        let running = f.gateway.runningConfig()
        var reloaded = try ConfigLoader.load(file: saved)
        reloaded.source = running.source
        #expect(reloaded == running)
        let scsi0 = try #require(reloaded.controllers.first)
        #expect(scsi0.luns.map(\.lun) == [0, 2, 7])
        #expect(scsi0.luns[0].size == 6 << 20)
        #expect(scsi0.luns[1].wwn == 0x5002538c40000001)
        #expect(scsi0.luns[2].readOnly)
        #expect(reloaded.controllers[1].luns.map(\.target) == [1])

        // Default path: the file serve was started from.
        #expect(try f.call("config.save")["path"] == .string(f.configPath))
        #expect(try ConfigLoader.load(file: f.configPath).controllers == running.controllers)

        // A gateway started from the saved file serves the same LUN map.
        let before = f.gateway.lunStatuses().map(Self.summary)
        f.stop()
        let again = Gateway(config: try ConfigLoader.load(file: saved), logger: quietLogger, frontEnds: FrontEndRegistry([]))
        try again.start()
        defer { again.stop() }
        #expect(again.lunStatuses().map(Self.summary) == before)
    }

    @Test("an offline iSCSI LUN is listed, kept by config.save, and forgotten by lun.remove")
    func offlineLUN() throws {
        let scratch = ScratchDirectory()
        let text = adminConfigText(scratch.path) + """

            [[controller.lun]]
            target = 4
            backend = "iscsi"
            url = "iscsi://192.0.2.1/iqn.2026-01.org.example:t/0"
            """
        let f = try AdminFixture(configText: text)
        let pv = try #require(try f.call("lun.list", ["controller": "pv0"]).arrayValue)
        #expect(pv.count == 2)
        #expect(pv[1]["target"] == 4 && pv[1]["online"] == false && pv[1]["url"] == "iscsi://192.0.2.1:3260/iqn.2026-01.org.example:t/0")
        #expect(f.refusal("lun.add", ["controller": "pv0", "target": 4, "backend": "null", "size": "1M"])?.code
                == ControlErrorCode.lunExists)
        let saved = f.dir + "/saved.toml"
        _ = try f.call("config.save", ["path": .string(saved)])
        #expect(try ConfigLoader.load(file: saved).controllers[1].luns.map(\.target) == [3, 4])
        _ = try f.call("lun.remove", ["controller": "pv0", "target": 4])
        #expect(try f.call("lun.list", ["controller": "pv0"]).arrayValue?.count == 1)
        #expect(f.gateway.runningConfig().controllers[1].luns.map(\.target) == [3])
    }

    @Test("config.save defaults to state_dir/scsigate.toml when serving the built-in default")
    func defaultSavePathForEmbedded() throws {
        var config = try ConfigLoader.loadDefault()
        #expect(config.source == ConfigLoader.embeddedSourceName)
        #expect(Gateway(config: config, logger: quietLogger).defaultSavePath == "/var/lib/scsigate/scsigate.toml")
        config.source = "relative.toml"
        #expect(Gateway(config: config, logger: quietLogger).defaultSavePath
                == FileManager.default.currentDirectoryPath + "/relative.toml")
    }

    @Test("every admin change is one structured log line naming the LUN and the client; refusals are logged too")
    func auditLog() throws {
        let store = RecordingLogHandler.Store()
        let logger = Logger(label: "scsigate", factory: { _ in RecordingLogHandler(store: store) })
        let f = try AdminFixture(logger: logger)
        _ = try f.call("lun.add", ["controller": "scsi0", "lun": 5, "backend": "null", "size": "1M"])
        _ = try f.call("lun.resize", ["controller": "scsi0", "lun": 0, "size": "8M"])
        _ = try f.call("lun.set_readonly", ["controller": "scsi0", "lun": 5, "read_only": true])
        _ = try f.call("lun.remove", ["controller": "scsi0", "lun": 5])
        _ = try f.call("config.save", ["path": .string(f.dir + "/s.toml")])
        _ = f.refusal("lun.add", ["controller": "scsi0", "lun": 0, "backend": "null", "size": "1M"])
        let records = store.records.withLock { $0 }.filter {
            $0.metadata["event"] != nil || $0.message.hasPrefix("admin request refused")
        }
        let events = records.compactMap { $0.metadata["event"] }
        #expect(events == ["lun added", "lun resized", "lun read-only changed", "lun removed", "config saved"])
        for record in records.prefix(4) {
            #expect(record.metadata["controller"] == "scsi0")
            #expect(record.metadata["client_pid"] == "\(getpid())")
            #expect(record.metadata["client_uid"] == "\(getuid())")
            #expect(record.metadata["lun"] != nil && record.metadata["target"] == "0" && record.metadata["backend"] != nil)
        }
        #expect(records[1].metadata["old_size"] == "4194304" && records[1].metadata["size"] == "8388608")
        let refused = try #require(records.last)
        #expect(refused.level == .warning)
        #expect(refused.message.hasPrefix("admin request refused: controller scsi0 already has a LUN at target 0 lun 0"))
        #expect(refused.metadata["method"] == "lun.add" && refused.metadata["code"] == "\(ControlErrorCode.lunExists)")
    }

    static func summary(_ s: LUNStatus) -> String {
        "\(s.controller) \(s.config.target):\(s.config.lun) \(s.config.backend) \(s.capacityBytes) \(s.blockSize) ro=\(s.readOnly) \(s.serial) \(String(s.naa, radix: 16))"
    }
}
