import Foundation
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// A private tgtd instance on 127.0.0.1 driven by Tests/RealClients/tgt/tgtd.sh: the one tgtd fixture of the
/// test targets (iSCSI back-end, virtio-scsi and PVSCSI task management over iSCSI). Its portal is a port the
/// kernel picks (never two suites on one port), its control socket unique per process and instance.
public final class TgtTarget: @unchecked Sendable {
    public static let script: String = {
        var dir = URL(fileURLWithPath: #filePath)
        for _ in 0..<3 { dir.deleteLastPathComponent() }
        return dir.appendingPathComponent("Tests/RealClients/tgt/tgtd.sh").path
    }()

    private static let counter = Mutex(0)
    /// A TCP port nothing listens on now (the kernel's choice for an ephemeral bind on 127.0.0.1), so
    /// that concurrent test processes and suites never pick the same portal; the control "port" only
    /// names tgtd's unix socket and just has to be unique.
    public static func nextPorts() -> (port: Int, control: Int) {
        let n = counter.withLock { c -> Int in c += 1; return c }
        // tgtd takes control ports up to 32767 (-C above is refused: every tgtd suite was skipped for ~30% of pids).
        let control = 5000 + Int(getpid() % 270) * 100 + n % 100
        var port = 20000 + Int(getpid() % 2000) * 10 + n
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        if fd >= 0 {
            defer { close(fd) }
            var addr = sockaddr_in()
            addr.sin_family = sa_family_t(AF_INET)
            addr.sin_addr.s_addr = inet_addr("127.0.0.1")
            addr.sin_port = 0
            var length = socklen_t(MemoryLayout<sockaddr_in>.size)
            let bound = withUnsafeMutablePointer(to: &addr) { p in
                p.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) == 0 && getsockname(fd, $0, &length) == 0 }
            }
            if bound { port = Int(UInt16(bigEndian: addr.sin_port)) }
        }
        return (port, control)
    }

    /// Whether tgtd can be started here at all (checked once, loudly reported when not).
    public static let availability: (ok: Bool, reason: String) = {
        do {
            let t = try TgtTarget(sizeMiB: 4)
            t.stop()
            return (true, "")
        } catch {
            let reason = "SKIPPING ISCSI TARGET TESTS: tgtd cannot be started here: \(error)"
            FileHandle.standardError.write(Data("\n*** \(reason) ***\n\n".utf8))
            return (false, reason)
        }
    }()

    public let dir: String
    public let port: Int
    public let controlPort: Int
    public let iqn: String
    public let backingFile: String
    public let chap: (user: String, secret: String)?

    public struct Failure: Error, CustomStringConvertible { public var description: String }

    public init(sizeMiB: Int, chap: (user: String, secret: String)? = nil) throws {
        let ports = Self.nextPorts()
        port = ports.port
        controlPort = ports.control
        dir = NSTemporaryDirectory() + "scsigate-iscsi-\(getpid())-\(port)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        iqn = "iqn.2026-11.test.scsigate:backend-\(port)"
        backingFile = dir + "/disk.img"
        _ = FileManager.default.createFile(atPath: backingFile, contents: nil)
        let fh = try FileHandle(forWritingTo: URL(fileURLWithPath: backingFile))
        try fh.truncate(atOffset: UInt64(sizeMiB) << 20)
        try fh.close()
        self.chap = chap
        try start()
    }

    public var url: String { "iscsi://127.0.0.1:\(port)/\(iqn)/1" }

    /// Runs the script with posix_spawn + waitpid (Foundation's Process can hang in waitUntilExit
    /// when the child leaves a daemon behind); output goes to a log file in the test directory.
    @discardableResult
    public static func run(_ args: [String]) throws -> String {
        let logPath = NSTemporaryDirectory() + "scsigate-tgt-script-\(getpid()).log"
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, logPath, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        let argv = ["/bin/bash", script] + args
        var cargs: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) } + [nil]
        defer { for p in cargs { free(p) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, "/bin/bash", &actions, nil, &cargs, environ)
        guard rc == 0 else { throw Failure(description: "posix_spawn /bin/bash failed: \(rc)") }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        let text = (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? ""
        let exited = (status & 0x7f) == 0
        let code = (status >> 8) & 0xff
        guard exited && code == 0 else {
            throw Failure(description: "\(args.first ?? "") failed (status \(status)): \(text)")
        }
        return text
    }

    public func start() throws {
        try Self.run(["start", dir, "\(port)", "\(controlPort)"])
        var args = ["target", "\(controlPort)", "1", iqn, backingFile]
        if let chap { args += [chap.user, chap.secret] }
        try Self.run(args)
    }

    /// Kills tgtd (SIGKILL when `hard`).
    public func stop(hard: Bool = false) {
        _ = try? Self.run(["stop", dir] + (hard ? ["KILL"] : []))
    }

    /// Sends `sig` to the running tgtd.
    public func signal(_ sig: Int32) -> Bool {
        guard let text = try? String(contentsOfFile: dir + "/tgtd.pid", encoding: .utf8),
              let pid = pid_t(text.trimmingCharacters(in: .whitespacesAndNewlines)) else { return false }
        return kill(pid, sig) == 0
    }

    deinit {
        _ = signal(SIGCONT)  // a test may have frozen it (SIGSTOP) to keep commands in flight
        stop()
        try? FileManager.default.removeItem(atPath: dir)
    }

    /// Reads `count` bytes of the backing file at `offset` from the host.
    public func readBacking(offset: Int, count: Int) -> [UInt8] {
        let fd = open(backingFile, O_RDONLY)
        defer { close(fd) }
        var buf = [UInt8](repeating: 0xEE, count: count)
        let n = buf.withUnsafeMutableBytes { pread(fd, $0.baseAddress, count, off_t(offset)) }
        return n == count ? buf : []
    }

    /// Writes bytes into the backing file from the host.
    public func writeBacking(offset: Int, bytes: [UInt8]) {
        let fd = open(backingFile, O_WRONLY)
        defer { close(fd) }
        _ = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, bytes.count, off_t(offset)) }
        fsync(fd)
    }
}
