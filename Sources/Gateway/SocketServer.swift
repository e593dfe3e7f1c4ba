import Foundation
import Glibc
import Synchronization
import SystemErrors

/// Why a listening socket could not be set up; names the path or address.
public struct SocketServerError: ReasonedError, Sendable {
    /// Why it failed: a failed system call (its context names the path or address) or another reason (path taken, too long, name not resolved).
    public var reason: FailureReason
    public init(reason: FailureReason) { self.reason = reason }
}

/// Protocol logic of a `PollingSocketServer`: turns bytes received on one connection into bytes to send.
protocol StreamConnectionHandler: Sendable {
    /// Consumes what it can from `input` (removing consumed bytes) and returns the bytes to send and
    /// whether to close the connection once they are sent.
    func consume(_ input: inout [UInt8], peer: ControlPeer) -> (output: [UInt8], close: Bool)
    /// Largest number of buffered, unconsumed input bytes allowed; above it `overflowResponse` is sent and
    /// the connection closed.
    var maximumBufferedBytes: Int { get }
    /// What to send before closing a connection whose request is too large.
    var overflowResponse: [UInt8] { get }
    /// Seconds a connection may stay idle before it is closed.
    var idleTimeoutSeconds: Int { get }
}

/// A small single-threaded server: one poll(2) loop on its own thread over a listening socket and its
/// connections (non-blocking, buffered output, bounded input, idle timeout, at most 64 connections).
/// Used by the control socket and the metrics endpoint; never by the data path.
final class PollingSocketServer: @unchecked Sendable {
    private let listenFD: Int32
    private let handler: any StreamConnectionHandler
    private let name: String
    private var wakePipe: [Int32] = [-1, -1]
    private var thread: Thread?
    private let finished = DispatchSemaphore(value: 0)
    private let running = Atomic<Bool>(false)
    static let maximumConnections = 64

    private struct Connection {
        var fd: Int32
        var input: [UInt8] = []
        var output: [UInt8] = []
        var closeAfterOutput = false
        var lastActivity: Int
        var peer: ControlPeer
    }

    /// Serves `listenFD` (already listening, owned from now on) with `handler`.
    init(listenFD: Int32, handler: any StreamConnectionHandler, name: String) throws(SocketServerError) {
        self.listenFD = listenFD
        self.handler = handler
        self.name = name
        var fds: [Int32] = [-1, -1]
        guard pipe(&fds) == 0 else {
            throw .systemCall(.current("pipe", context: name))
        }
        for fd in fds { Self.setCloseOnExecNonBlocking(fd) }
        wakePipe = fds
        _ = fcntl(listenFD, F_SETFL, fcntl(listenFD, F_GETFL) | O_NONBLOCK)
    }

    deinit {
        if wakePipe[0] >= 0 { close(wakePipe[0]); close(wakePipe[1]) }
    }

    /// Starts the loop thread.
    func start() {
        running.store(true, ordering: .sequentiallyConsistent)
        let thread = Thread { [self] in
            self.loop()
            self.finished.signal()
        }
        thread.name = name
        thread.start()
        self.thread = thread
    }

    /// Stops the loop, closes every connection and the listening socket; returns when the thread is done.
    func stop() {
        guard running.exchange(false, ordering: .sequentiallyConsistent) else { return }
        var byte: UInt8 = 1
        _ = write(wakePipe[1], &byte, 1)
        finished.wait()
        thread = nil
    }

    /// FD_CLOEXEC and O_NONBLOCK (Glibc does not export pipe2/accept4 to Swift).
    static func setCloseOnExecNonBlocking(_ fd: Int32) {
        _ = fcntl(fd, F_SETFD, fcntl(fd, F_GETFD) | FD_CLOEXEC)
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
    }

    private static func monotonicSeconds() -> Int {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Int(ts.tv_sec)
    }

    private func loop() {
        var connections: [Connection] = []
        defer {
            for c in connections { close(c.fd) }
            close(listenFD)
        }
        while running.load(ordering: .sequentiallyConsistent) {
            var fds = [pollfd(fd: wakePipe[0], events: Int16(POLLIN), revents: 0),
                       pollfd(fd: listenFD, events: Int16(POLLIN), revents: 0)]
            for c in connections {
                var events = Int16(POLLIN)
                if !c.output.isEmpty { events |= Int16(POLLOUT) }
                fds.append(pollfd(fd: c.fd, events: events, revents: 0))
            }
            let ready = poll(&fds, nfds_t(fds.count), 1000)
            if ready < 0 && errno != EINTR { break }
            if fds[0].revents != 0 { break }
            let now = Self.monotonicSeconds()
            var keep: [Connection] = []
            for (index, var c) in connections.enumerated() {
                let revents = fds[index + 2].revents
                var alive = true
                if revents & Int16(POLLIN | POLLHUP | POLLERR) != 0 {
                    alive = receive(&c, now: now)
                }
                if alive && !c.output.isEmpty && revents & Int16(POLLOUT | POLLIN) != 0 {
                    alive = flush(&c)
                }
                if alive && c.output.isEmpty && c.closeAfterOutput { alive = false }
                if alive && now - c.lastActivity > handler.idleTimeoutSeconds { alive = false }
                if alive { keep.append(c) } else { close(c.fd) }
            }
            connections = keep
            if fds[1].revents & Int16(POLLIN) != 0 {
                acceptAll(into: &connections, now: now)
            }
        }
    }

    private func acceptAll(into connections: inout [Connection], now: Int) {
        while true {
            let fd = accept(listenFD, nil, nil)
            if fd < 0 { return }
            Self.setCloseOnExecNonBlocking(fd)
            if connections.count >= Self.maximumConnections {
                close(fd)
                continue
            }
            var credentials = PeerCredentials()
            var length = socklen_t(MemoryLayout<PeerCredentials>.size)
            var peer = ControlPeer()
            if getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &credentials, &length) == 0 {
                peer = ControlPeer(pid: credentials.pid, uid: credentials.uid)
            }
            connections.append(Connection(fd: fd, lastActivity: now, peer: peer))
        }
    }

    /// Reads what is available and runs the handler; false when the connection is finished.
    private func receive(_ c: inout Connection, now: Int) -> Bool {
        var chunk = [UInt8](repeating: 0, count: 16384)
        while true {
            let n = chunk.withUnsafeMutableBytes { recv(c.fd, $0.baseAddress, $0.count, 0) }
            if n == 0 {
                // Peer closed its side: answer what is complete, then close.
                let (output, _) = handler.consume(&c.input, peer: c.peer)
                c.output += output
                c.closeAfterOutput = true
                return flush(&c)
            }
            if n < 0 {
                if errno == EINTR { continue }
                if errno == EAGAIN || errno == EWOULDBLOCK { break }
                return false
            }
            c.lastActivity = now
            c.input += chunk[0..<n]
            let (output, close) = handler.consume(&c.input, peer: c.peer)
            c.output += output
            if close { c.closeAfterOutput = true; c.input.removeAll(); break }
            if c.input.count > handler.maximumBufferedBytes {
                c.output += handler.overflowResponse
                c.closeAfterOutput = true
                c.input.removeAll()
                break
            }
        }
        return flush(&c)
    }

    /// Sends buffered output; false on a send error.
    private func flush(_ c: inout Connection) -> Bool {
        while !c.output.isEmpty {
            let n = c.output.withUnsafeBytes { send(c.fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n < 0 {
                if errno == EINTR { continue }
                return errno == EAGAIN || errno == EWOULDBLOCK
            }
            c.output.removeFirst(n)
        }
        return true
    }
}

/// `struct ucred` (SO_PEERCRED), which Glibc only declares with _GNU_SOURCE.
struct PeerCredentials {
    var pid: Int32 = 0
    var uid: UInt32 = 0
    var gid: UInt32 = 0
}

/// Calls `body` with a `sockaddr_un` for `path`; nil when the path does not fit.
func withUnixAddress<R>(_ path: String, _ body: (UnsafePointer<sockaddr>, socklen_t) -> R) -> R? {
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    let bytes = Array(path.utf8)
    let capacity = MemoryLayout.size(ofValue: address.sun_path)
    guard !bytes.isEmpty, bytes.count < capacity else { return nil }
    withUnsafeMutableBytes(of: &address.sun_path) { raw in
        raw.copyBytes(from: bytes)
        raw[bytes.count] = 0
    }
    let length = socklen_t(MemoryLayout<sockaddr_un>.offset(of: \sockaddr_un.sun_path)! + bytes.count + 1)
    return withUnsafePointer(to: &address) { pointer in
        pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, length) }
    }
}
