import CSystem
import Glibc
import Logging
import Synchronization
import SystemErrors

/// systemd service notifications (the sd_notify protocol, without libsystemd): one datagram per
/// notification to the AF_UNIX socket in `$NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace).
/// With no `NOTIFY_SOCKET` every call does nothing.
///
/// `serve` sends `READY=1` once every controller socket and the control socket listen, `RELOADING=1`
/// (with `MONOTONIC_USEC`, as `Type=notify-reload` wants since systemd 253) before a reload and
/// `READY=1` after it, `STOPPING=1` at shutdown, and `WATCHDOG=1` at half of `$WATCHDOG_USEC`.
public struct ServiceNotifier: Sendable {
    /// `$NOTIFY_SOCKET`, or nil when not run by systemd with `Type=notify`.
    public let socketPath: String?
    /// `$WATCHDOG_USEC` in microseconds, when systemd watches this process (`WatchdogSec=`, and
    /// `$WATCHDOG_PID`, when set, is this process).
    public let watchdogMicroseconds: UInt64?

    /// A notifier that sends nothing.
    public static let disabled = ServiceNotifier(socketPath: nil, watchdogMicroseconds: nil)

    /// Creates a notifier for `socketPath` (nil: disabled).
    public init(socketPath: String?, watchdogMicroseconds: UInt64?) {
        self.socketPath = socketPath.flatMap { $0.isEmpty ? nil : $0 }
        self.watchdogMicroseconds = watchdogMicroseconds.flatMap { $0 == 0 ? nil : $0 }
    }

    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` from the environment of this process.
    public static func fromEnvironment(_ environment: [String: String], pid: Int32 = getpid()) -> ServiceNotifier {
        var watchdog = environment["WATCHDOG_USEC"].flatMap { UInt64($0) }
        if let owner = environment["WATCHDOG_PID"], Int32(owner) != pid { watchdog = nil }
        return ServiceNotifier(socketPath: environment["NOTIFY_SOCKET"], watchdogMicroseconds: watchdog)
    }

    /// Whether notifications go anywhere.
    public var isEnabled: Bool { socketPath != nil }

    /// How often `serve` sends `WATCHDOG=1` (half of `WATCHDOG_USEC`), in milliseconds.
    public var watchdogPingMilliseconds: Int? { watchdogMicroseconds.map { max(1, Int($0 / 2_000)) } }

    /// Sends `fields` (`KEY=value`, newline-separated) as one datagram; returns 0 or -errno (and 0
    /// when disabled).
    @discardableResult
    public func notify(_ fields: [String]) -> Int32 {
        guard let socketPath else { return 0 }
        let message = fields.joined(separator: "\n")
        return Int32(csys_notify_send(socketPath, message, message.utf8.count))
    }

    /// `READY=1` with a status line.
    public func ready(status: String) { notify(["READY=1", "STATUS=" + status]) }

    /// `RELOADING=1` with `MONOTONIC_USEC` (CLOCK_MONOTONIC now), sent before a reload.
    public func reloading() {
        notify(["RELOADING=1", "MONOTONIC_USEC=\(Self.monotonicMicroseconds())", "STATUS=reloading the configuration"])
    }

    /// `STOPPING=1`.
    public func stopping() { notify(["STOPPING=1", "STATUS=stopping: draining in-flight I/O"]) }

    /// `WATCHDOG=1`.
    public func watchdogPing() { notify(["WATCHDOG=1"]) }

    /// CLOCK_MONOTONIC in microseconds.
    static func monotonicMicroseconds() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000 + UInt64(ts.tv_nsec) / 1_000
    }
}

/// Listening sockets handed over by systemd (socket activation: `LISTEN_PID`, `LISTEN_FDS` and
/// `LISTEN_FDNAMES`, fds 3...). A controller takes the socket named like the controller
/// (`FileDescriptorName=` in the socket unit), the control socket the one named `control`; an fd with
/// another name is matched by the path it is bound to. The gateway never unlinks a socket it was handed,
/// so QEMU keeps reconnecting to the same socket across gateway restarts.
public final class SocketActivation: Sendable {
    /// One inherited socket.
    public struct Socket: Sendable, Equatable {
        /// The fd (3 and up).
        public var fd: Int32
        /// Its `LISTEN_FDNAMES` name ("" when none was given).
        public var name: String
        /// The path it is bound to ("" when unnamed or abstract).
        public var path: String
    }

    /// The name `FileDescriptorName=` gives the control socket.
    public static let controlSocketName = "control"
    /// The first inherited fd (SD_LISTEN_FDS_START).
    public static let firstFD: Int32 = 3

    private let unclaimed: Mutex<[Socket]>

    /// No inherited sockets.
    public static var none: SocketActivation { SocketActivation(sockets: []) }

    /// Adopts `sockets` (already checked to be listening UNIX stream sockets).
    public init(sockets: [Socket]) { unclaimed = Mutex(sockets) }

    /// The sockets not yet taken.
    public var remaining: [Socket] { unclaimed.withLock { $0 } }

    /// Reads the sockets this process was handed: nothing unless `LISTEN_PID` is this process. Every fd
    /// must be a listening AF_UNIX stream socket. Unsets the variables (children must not take them) and
    /// marks the fds close-on-exec.
    public static func fromEnvironment(_ environment: [String: String], pid: Int32 = getpid(),
                                       unsetEnvironment: Bool = true) throws(GatewayError) -> SocketActivation {
        guard let listenPID = environment["LISTEN_PID"], Int32(listenPID) == pid,
              let countText = environment["LISTEN_FDS"] else { return .none }
        if unsetEnvironment {
            for key in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] { unsetenv(key) }
        }
        guard let count = Int(countText), (0...1024).contains(count) else {
            throw GatewayError(["socket activation: LISTEN_FDS='\(countText)' is not a count of file descriptors"])
        }
        let names = environment["LISTEN_FDNAMES"].map { $0.split(separator: ":", omittingEmptySubsequences: false).map(String.init) } ?? []
        var sockets: [Socket] = []
        var problems: [String] = []
        for index in 0..<count {
            let fd = firstFD + Int32(index)
            _ = fcntl(fd, F_SETFD, fcntl(fd, F_GETFD) | FD_CLOEXEC)
            let name = index < names.count ? names[index] : ""
            var listening: Int32 = 0
            var path = [CChar](repeating: 0, count: 128)
            let rc = csys_unix_socket_info(fd, &path, path.count, &listening)
            let label = "socket activation: fd \(fd)" + (name.isEmpty ? "" : " ('\(name)')")
            if rc < 0 {
                problems.append("\(label) is not a UNIX stream socket (\(SystemCallError.text(errno: -rc))); the socket unit must use ListenStream= with a path")
            } else if listening == 0 {
                problems.append("\(label) is not listening")
            } else {
                sockets.append(Socket(fd: fd, name: name, path: String(decoding: path.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)))
            }
        }
        if !problems.isEmpty {
            for socket in sockets { close(socket.fd) }
            throw GatewayError(problems)
        }
        return SocketActivation(sockets: sockets)
    }

    /// Takes the socket for `name` (a controller name, or `control`): the one with that name, else an
    /// unclaimed one bound to `path`. Nil when none matches (the gateway then binds `path` itself).
    public func take(name: String, path: String) -> Socket? {
        unclaimed.withLock { list in
            let index = list.firstIndex { $0.name == name }
                ?? list.firstIndex { !$0.path.isEmpty && $0.path == path }
            guard let index else { return nil }
            return list.remove(at: index)
        }
    }

    /// Closes the sockets nobody took, logging each (a socket unit with a stream nothing serves).
    public func closeUnclaimed(logger: Logger) {
        let left = unclaimed.withLock { list in
            let left = list
            list.removeAll()
            return left
        }
        for socket in left {
            logger.warning("socket activation: fd \(socket.fd) (name '\(socket.name)', path '\(socket.path)') matches no controller and not the control socket; closing it")
            close(socket.fd)
        }
    }
}
