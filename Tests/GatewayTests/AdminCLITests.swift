import Foundation
import Glibc
import Testing
@testable import Gateway

/// `scsigate serve --config FILE` running as a child process, logging to a file.
final class ServeProcess {
    let process = Process()
    let logPath: String
    let socket: String

    init(config: String, socket: String, log: String) throws {
        let executable = try #require(scsigateExecutable(), "build the scsigate product first (swift build)")
        logPath = log
        self.socket = socket
        _ = FileManager.default.createFile(atPath: log, contents: nil)
        process.executableURL = executable
        process.arguments = ["serve", "--config", config]
        process.standardError = try FileHandle(forWritingTo: URL(fileURLWithPath: log))
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        let deadline = Date().addingTimeInterval(20)
        while Date() < deadline {
            if (try? ControlClient(path: socket, timeoutMilliseconds: 1000).call("gateway.version")) != nil { return }
            if !process.isRunning { break }
            usleep(50_000)
        }
        stop()
        Issue.record("serve did not answer on \(socket): \((try? String(contentsOfFile: log, encoding: .utf8)) ?? "")")
        throw CancellationError()
    }

    var pid: Int32 { process.processIdentifier }

    /// SIGTERM and wait; returns the exit status.
    @discardableResult
    func stop() -> Int32 {
        if process.isRunning {
            kill(process.processIdentifier, SIGTERM)
            process.waitUntilExit()
        }
        return process.terminationStatus
    }

    deinit { stop() }
}

@Suite("The admin CLI against a running `scsigate serve`", .serialized)
struct AdminCLITests {
    /// A served config in a scratch directory.
    struct Served {
        let scratch = ScratchDirectory()
        var config: String { scratch.path + "/gateway.toml" }
        var socket: String { scratch.path + "/run/control.sock" }

        init() throws {
            try adminConfigText(scratch.path).write(toFile: config, atomically: true, encoding: .utf8)
        }

        func serve() throws -> ServeProcess {
            try ServeProcess(config: config, socket: socket, log: scratch.path + "/serve.log")
        }
    }

    /// Runs the CLI; expects `status`, an empty stdout and exactly one stderr line containing `message`.
    func expectRefusal(_ arguments: [String], status: Int32, message: String,
                       sourceLocation: SourceLocation = #_sourceLocation) throws {
        let (code, out, err) = try runScsigate(arguments)
        #expect(code == status, "\(arguments): \(err)", sourceLocation: sourceLocation)
        #expect(out.isEmpty, sourceLocation: sourceLocation)
        #expect(err.hasSuffix("\n") && err.dropLast().split(separator: "\n", omittingEmptySubsequences: false).count == 1,
                "one line expected: \(err)", sourceLocation: sourceLocation)
        #expect(err.hasPrefix("scsigate: ") && err.contains(message), "\(err)", sourceLocation: sourceLocation)
    }

    @Test("errors: unknown controller, duplicate LUN, missing file, shrink without --force, bad argument, no gateway")
    func errors() throws {
        let served = try Served()
        let gateway = try served.serve()
        let s = ["--socket", served.socket]
        try expectRefusal(["lun", "add", "nope", "--lun", "1", "--backend", "null", "--size", "1M"] + s, status: 1,
                          message: "no such controller 'nope'; controllers: scsi0, pv0")
        try expectRefusal(["lun", "add", "scsi0", "--lun", "7", "--backend", "null", "--size", "1M"] + s, status: 1,
                          message: "controller scsi0 already has a LUN at target 0 lun 7 (null)")
        try expectRefusal(["lun", "add", "scsi0", "--lun", "2", "--backend", "file", "--path", served.scratch.path + "/missing.img"] + s,
                          status: 1, message: "'\(served.scratch.path)/missing.img' does not exist")
        try expectRefusal(["lun", "resize", "scsi0", "--lun", "0", "--size", "1M"] + s, status: 1,
                          message: "is below the current 4194304 bytes (4 MiB); shrinking loses data; pass force (--force) to shrink")
        try expectRefusal(["lun", "add", "scsi0", "--lun", "2", "--backend", "null", "--size", "100"] + s, status: 64,
                          message: "invalid params: 'size': 100 bytes is not a multiple of block_size 512")
        try expectRefusal(["lun", "remove", "scsi0", "--lun", "5"] + s, status: 1,
                          message: "controller scsi0 has no LUN at target 0 lun 5")
        let usage = try runScsigate(["lun", "set-readonly", "scsi0", "--lun", "0", "maybe"] + s)
        #expect(usage.0 == 64)
        // --config picks the socket from the file.
        let viaConfig = try runScsigate(["controller", "list", "--config", served.config])
        #expect(viaConfig.0 == 0)
        #expect(viaConfig.1.hasPrefix("NAME   TRANSPORT        LUNS  QUEUES  SOCKET\nscsi0  vhost-user-scsi     2       2  "))
        #expect(gateway.stop() == 0)
        try expectRefusal(["lun", "list"] + s, status: 3,
                          message: "cannot reach the gateway at \(served.socket): No such file or directory")
        try expectRefusal(["stats", "--socket", served.scratch.path + "/nothing.sock"], status: 3,
                          message: "cannot reach the gateway at \(served.scratch.path)/nothing.sock: ")
    }

    @Test("add, list, resize, set-readonly, stats, save; serve --config SAVED has the same LUN map")
    func workflow() throws {
        let served = try Served()
        var gateway: ServeProcess? = try served.serve()
        let s = ["--socket", served.socket]
        let add = try runScsigate(["lun", "add", "scsi0", "--lun", "3", "--backend", "file", "--path", "hot.img",
                                   "--size", "8M", "--create", "--serial", "HOT3"] + s)
        #expect(add.0 == 0, "\(add.2)")
        #expect(add.1 == "added controller scsi0 target 0 lun 3: file \(served.scratch.path)/state/hot.img, 8 MiB, 512-byte blocks, serial HOT3\n")
        let resize = try runScsigate(["lun", "resize", "scsi0", "--lun", "3", "--size", "12M"] + s)
        #expect(resize.1 == "resized controller scsi0 target 0 lun 3: 8 MiB -> 12 MiB\n")
        #expect(try runScsigate(["lun", "set-readonly", "scsi0", "--lun", "3", "on"] + s).0 == 0)
        let pvAdd = try runScsigate(["lun", "add", "pv0", "--target", "9", "--backend", "null", "--size", "1M", "--json"] + s)
        #expect(pvAdd.0 == 0 && JSONValue.parse(Array(pvAdd.1.utf8))?["target"] == 9)
        #expect(try runScsigate(["lun", "remove", "pv0", "--target", "3"] + s).1.hasPrefix("removed controller pv0 target 3 lun 0: null"))

        let table = try runScsigate(["lun", "list", "scsi0"] + s)
        #expect(table.0 == 0)
        let lines = table.1.split(separator: "\n")
        #expect(lines.first?.hasPrefix("CONTROLLER  TARGET  LUN  BACKEND  SIZE") == true)
        #expect(lines.count == 4)
        #expect(lines[2].contains("file     12 MiB    512  yes  HOT3"))
        let stats = try runScsigate(["stats"] + s)
        #expect(stats.0 == 0 && stats.1.contains("CONTROLLER  TARGET  LUN  COMMANDS") && stats.1.contains("CONTROLLER  QUEUE"))
        #expect(try runScsigate(["stats", "--json"] + s).1.contains("\"queues\""))

        let before = try runScsigate(["lun", "list", "--json"] + s).1
        let savedPath = served.scratch.path + "/saved.toml"
        let save = try runScsigate(["config", "save", "--output", savedPath] + s)
        #expect(save.1 == "saved 4 LUN(s) to \(savedPath)\n")
        #expect(try runScsigate(["check-config", savedPath]).0 == 0)
        #expect(gateway?.stop() == 0)
        gateway = nil

        let again = try ServeProcess(config: savedPath, socket: served.socket, log: served.scratch.path + "/serve2.log")
        let after = try runScsigate(["lun", "list", "--json"] + s).1
        #expect(JSONValue.parse(Array(after.utf8)) == JSONValue.parse(Array(before.utf8)))
        #expect(after.contains("\"serial\": \"HOT3\"") && after.contains("\"size\": 12582912"))
        #expect(again.stop() == 0)
    }

    @Test("100 add/remove cycles: the gateway's fd count and memory return to their start")
    func hundredCycles() throws {
        let served = try Served()
        let gateway = try served.serve()
        let client = ControlClient(path: served.socket)
        func cycle(_ i: Int) throws {
            _ = try client.call("lun.add", ["controller": "scsi0", "lun": 11, "backend": "file",
                                            "path": .string("cycle\(i % 4).img"), "size": "4M", "create": true])
            _ = try client.call("lun.add", ["controller": "pv0", "target": 6, "backend": "null", "size": "1M"])
            _ = try client.call("lun.remove", ["controller": "scsi0", "lun": 11, "wait_ms": 1000])
            _ = try client.call("lun.remove", ["controller": "pv0", "target": 6])
        }
        for i in 0..<5 { try cycle(i) }  // warm-up: allocator arenas, lazily created state
        usleep(100_000)
        let fdsBefore = openFileDescriptorCount(pid: gateway.pid)
        let rssBefore = residentBytes(pid: gateway.pid)
        for i in 0..<100 { try cycle(i) }
        usleep(100_000)
        let fdsAfter = openFileDescriptorCount(pid: gateway.pid)
        let rssAfter = residentBytes(pid: gateway.pid)
        let report = "fds \(fdsBefore) -> \(fdsAfter), RSS \(rssBefore / 1024) KiB -> \(rssAfter / 1024) KiB"
        print("100 add/remove cycles: \(report)")
        try "\(report)\n".write(toFile: NSTemporaryDirectory() + "scsigate-100-cycles.txt", atomically: true, encoding: .utf8)
        #expect(fdsBefore > 0)
        #expect(fdsAfter == fdsBefore, "\(report)")
        #expect(rssAfter <= rssBefore + 256 * 1024, "\(report)")
        #expect(try client.call("lun.list").arrayValue?.count == 3)
        #expect(gateway.stop() == 0)
    }
}
