import Foundation
import Glibc
import SystemErrors

/// Why a control call failed.
public enum ControlClientError: Error, Sendable, CustomStringConvertible {
    /// Nothing answers at the socket path (no gateway, wrong path, no permission).
    case unreachable(path: String, reason: String)
    /// The gateway answered with a JSON-RPC error.
    case refused(RPCError)
    /// The connection broke or the answer was not a JSON-RPC response.
    case protocolFailure(path: String, reason: String)

    public var description: String {
        switch self {
        case let .unreachable(path, reason): return "cannot reach the gateway at \(path): \(reason)"
        case let .refused(error): return error.message
        case let .protocolFailure(path, reason): return "bad answer from the gateway at \(path): \(reason)"
        }
    }
}

/// A blocking JSON-RPC client of the control socket (one request per call, one connection per call),
/// used by the `scsigate` admin commands and the tests.
public struct ControlClient: Sendable {
    /// The control socket path.
    public var path: String
    /// How long to wait for an answer, in milliseconds.
    public var timeoutMilliseconds: Int

    /// Creates a client of `path`.
    public init(path: String, timeoutMilliseconds: Int = 30_000) {
        self.path = path
        self.timeoutMilliseconds = timeoutMilliseconds
    }

    /// Calls `method` with named `params`; returns the result.
    public func call(_ method: String, _ params: [String: JSONValue] = [:]) throws(ControlClientError) -> JSONValue {
        let request = JSONValue.object(["jsonrpc": .string("2.0"), "id": .int(1), "method": .string(method),
                                        "params": .object(params)])
        let line = try exchange(Array((request.serialized + "\n").utf8))
        guard let response = JSONValue.parse(line) else {
            throw .protocolFailure(path: path, reason: "the answer is not JSON")
        }
        if let error = response["error"] {
            let code = error["code"]?.intValue.map(Int.init) ?? ControlErrorCode.internalError
            throw .refused(RPCError(code: code, message: error["message"]?.stringValue ?? "error \(code)", data: error["data"]))
        }
        guard let result = response["result"] else { throw .protocolFailure(path: path, reason: "no result in the answer") }
        return result
    }

    /// Sends raw bytes and returns the first answer line (without newline); for tests of the framing.
    public func exchange(_ bytes: [UInt8]) throws(ControlClientError) -> [UInt8] {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw .unreachable(path: path, reason: SystemCallError.text(errno: errno)) }
        defer { close(fd) }
        guard let rc = withUnixAddress(path, { address, length in connect(fd, address, length) }) else {
            throw .unreachable(path: path, reason: "the path is too long for a UNIX socket")
        }
        if rc != 0 { throw .unreachable(path: path, reason: SystemCallError.text(errno: errno)) }
        var offset = 0
        while offset < bytes.count {
            let n = bytes.withUnsafeBytes { send(fd, $0.baseAddress! + offset, $0.count - offset, Int32(MSG_NOSIGNAL)) }
            if n < 0 {
                if errno == EINTR { continue }
                // The server may have answered (and closed) before reading everything: read that answer.
                break
            }
            offset += n
        }
        var answer: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        let deadline = Date().addingTimeInterval(Double(timeoutMilliseconds) / 1000)
        while true {
            if let newline = answer.firstIndex(of: UInt8(ascii: "\n")) { return Array(answer[..<newline]) }
            let remaining = Int(deadline.timeIntervalSinceNow * 1000)
            if remaining <= 0 { throw .protocolFailure(path: path, reason: "no answer within \(timeoutMilliseconds) ms") }
            var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let ready = poll(&pfd, 1, Int32(min(remaining, Int(Int32.max))))
            if ready < 0 {
                if errno == EINTR { continue }
                throw .protocolFailure(path: path, reason: SystemCallError.text(errno: errno))
            }
            if ready == 0 { continue }
            let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n < 0 {
                if errno == EINTR { continue }
                throw .protocolFailure(path: path, reason: SystemCallError.text(errno: errno))
            }
            if n == 0 {
                if answer.isEmpty { throw .protocolFailure(path: path, reason: "the gateway closed the connection") }
                return answer
            }
            answer += chunk[0..<n]
        }
    }
}
