import Foundation
import Glibc
import Logging
import SystemErrors

/// Newline-delimited JSON-RPC framing on a stream: one request per line, one response line per
/// request (none for notifications), requests larger than `maximumRequestBytes` refused and the
/// connection closed.
struct JSONLineHandler: StreamConnectionHandler {
    let dispatcher: JSONRPCDispatcher
    let maximumRequestBytes: Int

    var maximumBufferedBytes: Int { maximumRequestBytes }
    var idleTimeoutSeconds: Int { 300 }

    var overflowResponse: [UInt8] {
        Array((JSONRPCDispatcher.errorResponse(id: .null, RPCError(
            code: ControlErrorCode.invalidRequest,
            message: "invalid request: larger than \(maximumRequestBytes) bytes")).serialized + "\n").utf8)
    }

    func consume(_ input: inout [UInt8], peer: ControlPeer) -> (output: [UInt8], close: Bool) {
        var output: [UInt8] = []
        var start = 0
        while let newline = input[start...].firstIndex(of: UInt8(ascii: "\n")) {
            var line = input[start..<newline]
            start = newline + 1
            if line.last == UInt8(ascii: "\r") { line = line.dropLast() }
            if line.allSatisfy({ $0 == 0x20 || $0 == 0x09 }) { continue }
            if line.count > maximumRequestBytes {
                input.removeAll()
                return (output + overflowResponse, true)
            }
            if let response = dispatcher.respond(to: line, peer: peer) {
                output += Array(response.utf8)
                output.append(UInt8(ascii: "\n"))
            }
        }
        input.removeFirst(start)
        return (output, false)
    }
}

/// The JSON-RPC 2.0 control socket of a running gateway: a UNIX stream socket (mode 0600) served by
/// one thread, newline-delimited requests, methods from `AdminService`.
public final class ControlServer: @unchecked Sendable {
    /// The socket path.
    public let path: String
    /// Largest accepted request line.
    public static let maximumRequestBytes = 256 * 1024
    private let server: PollingSocketServer
    /// The socket file this server created (nil for a socket handed over by systemd, never unlinked).
    private let identity: (dev: UInt64, ino: UInt64)?

    /// Binds `path` (replacing a stale socket file left by a dead gateway, refusing when a gateway
    /// still answers there or the path is not a socket) and starts serving `service`. With
    /// `listeningFD` (handed over by systemd socket activation) it serves that socket instead.
    public init(path: String, service: AdminService, listeningFD: Int32? = nil) throws(SocketServerError) {
        self.path = path
        let fd: Int32
        if let listeningFD {
            fd = listeningFD
            identity = nil
        } else {
            fd = try Self.bindListening(path: path)
            var st = stat()
            guard stat(path, &st) == 0 else {
                close(fd)
                throw .systemCall(.current("stat", context: "control socket \(path)"))
            }
            identity = (UInt64(st.st_dev), UInt64(st.st_ino))
        }
        let handler = JSONLineHandler(dispatcher: service.dispatcher, maximumRequestBytes: Self.maximumRequestBytes)
        do throws(SocketServerError) {
            server = try PollingSocketServer(listenFD: fd, handler: handler, name: "scsigate-control")
        } catch {
            close(fd)
            if identity != nil { unlink(path) }
            throw error
        }
        server.start()
    }

    /// Stops serving and removes the socket file (only if it is still ours).
    public func stop() {
        server.stop()
        var st = stat()
        if let identity, stat(path, &st) == 0, UInt64(st.st_dev) == identity.dev, UInt64(st.st_ino) == identity.ino {
            unlink(path)
        }
    }

    /// Creates, binds (mode 0600) and listens; returns the fd.
    static func bindListening(path: String) throws(SocketServerError) -> Int32 {
        let what = "control socket \(path)"
        var existing = stat()
        if lstat(path, &existing) == 0 {
            guard existing.st_mode & S_IFMT == S_IFSOCK else {
                throw SocketServerError("\(what): the path exists and is not a socket; refusing to replace it")
            }
            if isAnswering(path) {
                throw SocketServerError("\(what): another gateway is listening there (stop it, or set [gateway] control_socket)")
            }
        }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw .systemCall(.current("socket", context: what)) }
        // The socket inode's mode is what bind gives the file on Linux; chmod below makes sure.
        _ = fchmod(fd, 0o600)
        // Bind under a temporary name, set the mode, then rename over the final path: the final path
        // never has another mode, and a stale file is replaced atomically.
        let temporary = ConfigValidator.directory(of: path) + "/.sgctl.\(getpid()).tmp"
        var bindPath = temporary
        if withUnixAddress(temporary, { _, _ in () }) == nil {
            bindPath = path
            unlink(path)  // stale (checked above)
        } else {
            unlink(temporary)
        }
        let bound = withUnixAddress(bindPath) { address, length in bind(fd, address, length) }
        guard let bound else {
            close(fd)
            throw SocketServerError("\(what): path longer than \(MemoryLayout.size(ofValue: sockaddr_un().sun_path) - 1) bytes")
        }
        guard bound == 0 else {
            let e = errno
            close(fd)
            throw .systemCall(SystemCallError("bind", errno: e, context: what))
        }
        guard chmod(bindPath, 0o600) == 0, listen(fd, 16) == 0 else {
            let e = errno
            close(fd)
            unlink(bindPath)
            throw .systemCall(SystemCallError("chmod/listen", errno: e, context: what))
        }
        if bindPath != path {
            guard rename(bindPath, path) == 0 else {
                let e = errno
                close(fd)
                unlink(bindPath)
                throw .systemCall(SystemCallError("rename", errno: e, context: what))
            }
        }
        return fd
    }

    /// Whether something accepts connections at `path`.
    static func isAnswering(_ path: String) -> Bool {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        return withUnixAddress(path) { address, length in connect(fd, address, length) == 0 } ?? false
    }
}

/// The admin plane of a running gateway: the control socket and, when `[gateway] stats_listen` is
/// set, the Prometheus endpoint. Started after `Gateway.start`, stopped before `Gateway.stop`.
public final class AdminPlane: Sendable {
    /// The control socket server.
    public let control: ControlServer
    /// The metrics endpoint, when configured.
    public let metrics: MetricsServer?

    /// Starts both servers for `gateway`; on failure nothing is left running.
    public init(gateway: Gateway, logger: Logger) throws(SocketServerError) {
        let service = AdminService(gateway: gateway, logger: logger)
        let path = gateway.config.settings.controlSocket
        let activated = gateway.takeActivatedSocket(name: SocketActivation.controlSocketName, path: path)
        control = try ControlServer(path: path, service: service, listeningFD: activated)
        let how = activated.map { "fd \($0) from systemd" } ?? "mode 0600"
        logger.info("control socket \(control.path) (\(how))")
        if let address = gateway.config.settings.statsListen {
            do throws(SocketServerError) {
                metrics = try MetricsServer(address: address, gateway: gateway)
            } catch {
                control.stop()
                throw error
            }
            logger.info("Prometheus metrics on http://\(address)/metrics")
        } else {
            metrics = nil
        }
    }

    /// Stops both servers.
    public func stop() {
        metrics?.stop()
        control.stop()
    }
}
