#if canImport(Glibc)
import Glibc
#endif
import Logging

/// A configuration error naming the offending key (`url`, `initiator_name`, `chap_secret_file`, ...).
public struct ISCSIConfigError: Error, CustomStringConvertible, Sendable, Equatable {
    /// The config key at fault.
    public var key: String
    /// What is wrong, without any secret.
    public var message: String

    /// Creates an error.
    public init(key: String, message: String) {
        self.key = key
        self.message = message
    }

    public var description: String { "\(key): \(message)" }
}

/// A secret that never shows up in `print`, string interpolation, `dump` or debugger output.
struct RedactedSecret: Sendable, Equatable, CustomStringConvertible, CustomDebugStringConvertible, CustomReflectable {
    let value: String
    init(_ value: String) { self.value = value }
    var description: String { "<redacted>" }
    var debugDescription: String { "<redacted>" }
    var customMirror: Mirror { Mirror(self, children: [:]) }
}

/// Where the CHAP secret is read from. The secret itself never appears in the config text or logs.
public enum CHAPSecretSource: Sendable, Equatable, CustomStringConvertible {
    /// A file whose content (trailing newline stripped) is the secret (`chap_secret_file`).
    case file(String)
    /// An environment variable holding the secret (`chap_secret_env`).
    case environment(String)

    /// The config key this source came from.
    public var key: String {
        switch self {
        case .file: return "chap_secret_file"
        case .environment: return "chap_secret_env"
        }
    }

    public var description: String {
        switch self {
        case .file(let path): return "file \(path)"
        case .environment(let name): return "environment variable \(name)"
        }
    }

    /// Reads the secret (control path; blocking file read).
    public func resolve() throws(ISCSIConfigError) -> String {
        var secret: String
        switch self {
        case .environment(let name):
            guard !name.isEmpty else { throw ISCSIConfigError(key: key, message: "empty environment variable name") }
            guard let value = getenv(name) else {
                throw ISCSIConfigError(key: key, message: "environment variable \(name) is not set")
            }
            secret = String(cString: value)
        case .file(let path):
            let fd = open(path, O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else {
                throw ISCSIConfigError(key: key, message: "cannot open \(path): \(String(cString: strerror(errno)))")
            }
            defer { close(fd) }
            var bytes: [UInt8] = []
            var chunk = [UInt8](repeating: 0, count: 512)
            while true {
                let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                if n < 0 {
                    if errno == EINTR { continue }
                    throw ISCSIConfigError(key: key, message: "cannot read \(path): \(String(cString: strerror(errno)))")
                }
                if n == 0 { break }
                bytes.append(contentsOf: chunk[0..<n])
                guard bytes.count <= 4096 else {
                    throw ISCSIConfigError(key: key, message: "\(path) is larger than 4096 bytes; it must hold only the CHAP secret")
                }
            }
            secret = String(decoding: bytes, as: UTF8.self)
        }
        while let last = secret.last, last == "\n" || last == "\r" { secret.removeLast() }
        guard !secret.isEmpty else { throw ISCSIConfigError(key: key, message: "the CHAP secret from \(self) is empty") }
        // RFC 3720: CHAP secrets of at least 12 bytes are recommended; libiscsi limits them to 255.
        guard secret.utf8.count <= 255 else {
            throw ISCSIConfigError(key: key, message: "the CHAP secret from \(self) is longer than 255 bytes")
        }
        return secret
    }
}

/// iSCSI header digest negotiated at login.
public enum ISCSIHeaderDigest: String, Sendable, Equatable {
    /// No header digest.
    case none
    /// CRC32C header digest.
    case crc32c

    /// Parses the config value (`header_digest = "none" | "crc32c"`).
    public static func parse(_ text: String) throws(ISCSIConfigError) -> ISCSIHeaderDigest {
        guard let value = ISCSIHeaderDigest(rawValue: text.lowercased()) else {
            throw ISCSIConfigError(key: "header_digest", message: "\"\(text)\" is not one of none, crc32c")
        }
        return value
    }
}

/// Bounds of the exponential reconnect backoff, in milliseconds.
public struct ISCSIReconnectBackoff: Sendable, Equatable {
    /// Delay before the first reconnect attempt after a loss.
    public var initialMilliseconds: UInt32
    /// Largest delay between attempts.
    public var maximumMilliseconds: UInt32

    /// Creates bounds; `initial` must be at least 10 ms and at most `maximum`.
    public init(initialMilliseconds: UInt32 = 100, maximumMilliseconds: UInt32 = 2000) {
        self.initialMilliseconds = initialMilliseconds
        self.maximumMilliseconds = maximumMilliseconds
    }

    /// The delay after `failures` consecutive failed attempts (doubling, capped).
    public func delay(afterFailures failures: Int) -> UInt64 {
        var d = UInt64(initialMilliseconds)
        var i = 0
        while i < failures && d < UInt64(maximumMilliseconds) {
            d &*= 2
            i += 1
        }
        return min(d, UInt64(maximumMilliseconds))
    }
}

/// Everything needed to reach one remote LUN: the gateway maps `backend = "iscsi"`, `url`,
/// `initiator_name`, `chap_user`, `chap_secret_file`/`chap_secret_env`, `header_digest`, `timeout`,
/// `reconnect_min_ms`/`reconnect_max_ms` onto `init(url:initiatorName:...)`.
public struct ISCSIBackendConfig: Sendable {
    /// The remote LUN.
    public var url: ISCSIURL
    /// Our initiator name (iqn.…).
    public var initiatorName: String
    /// CHAP user (from `chap_user` or the URL); nil means no CHAP.
    public var chapUser: String?
    /// Where the CHAP secret comes from (required when `chapUser` is set).
    public var chapSecretSource: CHAPSecretSource?
    /// Header digest to negotiate.
    public var headerDigest: ISCSIHeaderDigest
    /// Outage tolerance: a request not completed within this many seconds (remote unreachable or
    /// unresponsive) completes with ETIMEDOUT. Default 30.
    public var timeoutSeconds: UInt32
    /// Reconnect backoff bounds.
    public var reconnectBackoff: ISCSIReconnectBackoff
    /// Slots (commands in flight or waiting) per channel.
    public var queueDepth: Int
    /// Where the back-end logs (the gateway's logger with the controller and LUN as metadata; by default
    /// `scsigate.iscsi` through the process's `LoggingSystem`). Lines never contain secrets.
    public var log: Logger

    /// The secret, resolved once at validation; prints and reflects as "<redacted>".
    var chapSecret: RedactedSecret?

    /// Validates the config values and resolves the CHAP secret. Each error names its key.
    public init(url: String, initiatorName: String, chapUser: String? = nil, chapSecretSource: CHAPSecretSource? = nil,
                headerDigest: String = "none", timeoutSeconds: Int = 30,
                reconnectBackoff: ISCSIReconnectBackoff = ISCSIReconnectBackoff(), queueDepth: Int = 128,
                log: Logger? = nil) throws(ISCSIConfigError) {
        let parsed = try ISCSIURL.parse(url)
        try validateISCSIName(initiatorName, key: "initiator_name", what: "initiator name")
        guard timeoutSeconds >= 1 && timeoutSeconds <= 3600 else {
            throw ISCSIConfigError(key: "timeout", message: "\(timeoutSeconds) is out of range (1...3600 seconds)")
        }
        guard reconnectBackoff.initialMilliseconds >= 10 else {
            throw ISCSIConfigError(key: "reconnect_min_ms", message: "\(reconnectBackoff.initialMilliseconds) is below 10 ms")
        }
        guard reconnectBackoff.maximumMilliseconds >= reconnectBackoff.initialMilliseconds,
              reconnectBackoff.maximumMilliseconds <= 600_000 else {
            throw ISCSIConfigError(key: "reconnect_max_ms",
                message: "\(reconnectBackoff.maximumMilliseconds) must be between reconnect_min_ms and 600000")
        }
        guard queueDepth >= 1 && queueDepth <= 1024 else {
            throw ISCSIConfigError(key: "queue_depth", message: "\(queueDepth) is out of range (1...1024)")
        }
        let user = chapUser ?? parsed.user
        if let chapUser, let urlUser = parsed.user, chapUser != urlUser {
            throw ISCSIConfigError(key: "chap_user", message: "\"\(chapUser)\" differs from the user in url (\"\(urlUser)\")")
        }
        var secret: String?
        if let user {
            guard !user.isEmpty, user.utf8.count <= 255 else {
                throw ISCSIConfigError(key: "chap_user", message: "the CHAP user must be 1...255 bytes")
            }
            guard let chapSecretSource else {
                throw ISCSIConfigError(key: "chap_secret_file",
                    message: "CHAP user \"\(user)\" is set but neither chap_secret_file nor chap_secret_env is")
            }
            secret = try chapSecretSource.resolve()
        } else if let chapSecretSource {
            throw ISCSIConfigError(key: chapSecretSource.key, message: "a CHAP secret is set but no chap_user (or user@ in url)")
        }
        self.url = parsed
        self.initiatorName = initiatorName
        self.chapUser = user
        self.chapSecretSource = chapSecretSource
        self.chapSecret = secret.map(RedactedSecret.init)
        self.headerDigest = try ISCSIHeaderDigest.parse(headerDigest)
        self.timeoutSeconds = UInt32(timeoutSeconds)
        self.reconnectBackoff = reconnectBackoff
        self.queueDepth = queueDepth
        self.log = log ?? Logger(label: "scsigate.iscsi")
    }

    /// Emits one log line.
    func emit(_ level: Logger.Level, _ message: String) { log.log(level: level, "\(message)") }
}
