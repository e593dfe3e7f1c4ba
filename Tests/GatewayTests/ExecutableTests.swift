import Foundation
import Testing

/// The built `scsigate` next to the test bundle (swift build/test build every product into one directory).
func scsigateExecutable() -> URL? {
    let candidates = [
        URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent("scsigate"),
        repositoryRoot.appendingPathComponent(".build/debug/scsigate"),
    ]
    return candidates.first { FileManager.default.isExecutableFile(atPath: $0.path) }
}

/// Runs the executable; returns (status, stdout, stderr).
func runScsigate(_ arguments: [String], until signal: Int32? = nil, after seconds: Double = 0) throws -> (Int32, String, String) {
    let executable = try #require(scsigateExecutable(), "build the scsigate product first (swift build)")
    let process = Process()
    process.executableURL = executable
    process.arguments = arguments
    let out = Pipe(), err = Pipe()
    process.standardOutput = out
    process.standardError = err
    try process.run()
    if let signal {
        Thread.sleep(forTimeInterval: seconds)
        kill(process.processIdentifier, signal)
    }
    let outData = out.fileHandleForReading.readDataToEndOfFile()
    let errData = err.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    return (process.terminationStatus, String(decoding: outData, as: UTF8.self), String(decoding: errData, as: UTF8.self))
}

@Suite("The scsigate executable", .serialized)
struct ExecutableTests {
    @Test("check-config exits 0 with a summary on a valid file")
    func checkValid() throws {
        let (status, out, err) = try runScsigate(["check-config", repositoryRoot.appendingPathComponent("Config/examples/pvscsi.toml").path])
        #expect(status == 0)
        #expect(out.contains(": OK: 1 controller, 2 LUNs"))
        #expect(err.isEmpty)
    }

    @Test("check-config exits 1 and prints FILE:LINE: key errors on stderr")
    func checkInvalid() throws {
        let scratch = ScratchDirectory()
        let path = scratch.path + "/bad.toml"
        try "[[controller]]\nname = \"c\"\ntransport = \"vhost-user-scsi\"\nsocket = \"/s\"\nqueues = 0\n"
            .write(toFile: path, atomically: true, encoding: .utf8)
        let (status, out, err) = try runScsigate(["check-config", path])
        #expect(status == 1)
        #expect(out.isEmpty)
        #expect(err == "\(path):5: key 'controller[0].queues': must be between 1 and 64, found 0\n\(path): 1 error, not valid\n")
    }

    @Test("check-config on a missing file exits 1 naming it")
    func checkMissing() throws {
        let (status, _, err) = try runScsigate(["check-config", "/nonexistent/x.toml"])
        #expect(status == 1)
        #expect(err.hasPrefix("/nonexistent/x.toml: no such file\n"))
    }

    @Test("unknown subcommands and options fail with a usage error")
    func usageErrors() throws {
        let (status, _, err) = try runScsigate(["serve", "--bogus"])
        #expect(status == 64)
        #expect(err.contains("Unknown option '--bogus'"))
    }

    @Test("version prints the version")
    func version() throws {
        let (status, out, _) = try runScsigate(["version"])
        #expect(status == 0)
        #expect(out == "scsigate 0.1.0\n")
    }

    @Test("serve refuses an invalid config with exit 1")
    func serveInvalid() throws {
        let scratch = ScratchDirectory()
        let path = scratch.path + "/bad.toml"
        try "[gateway]\nlog_level = \"loud\"\n".write(toFile: path, atomically: true, encoding: .utf8)
        let (status, _, err) = try runScsigate(["serve", "--config", path])
        #expect(status == 1)
        #expect(err.contains("\(path):2: key 'gateway.log_level': 'loud' is not valid"))
        #expect(err.contains("configuration is not valid; not starting"))
    }

    @Test("serve starts, logs what it serves with the QEMU line, and stops cleanly on SIGTERM")
    func serveAndTerminate() throws {
        let scratch = ScratchDirectory()
        let path = scratch.path + "/ok.toml"
        try """
            [gateway]
            state_dir = "\(scratch.path)/state"
            control_socket = "\(scratch.path)/run/control.sock"
            [[controller]]
            name = "scsi0"
            transport = "vhost-user-scsi"
            socket = "scsi0.sock"
            [[controller.lun]]
            lun = 0
            backend = "file"
            path = "disk0.img"
            size = "16M"
            create = true
            """.write(toFile: path, atomically: true, encoding: .utf8)
        let (status, _, err) = try runScsigate(["serve", "--config", path, "--log-level", "debug"], until: SIGTERM, after: 1.5)
        #expect(status == 0, "\(err)")
        #expect(err.contains("target 0 lun 0: file \(scratch.path)/state/disk0.img, 16 MiB, 512-byte blocks"))
        #expect(err.contains("attach with: -chardev socket,id=sg-scsi0,path=\(scratch.path)/run/scsi0.sock -device vhost-user-scsi-pci"))
        #expect(err.contains("received SIGTERM; shutting down"))
        #expect(err.hasSuffix("info stopped\n"))
        #expect(FileManager.default.fileExists(atPath: scratch.path + "/state/disk0.img"))
    }
}
