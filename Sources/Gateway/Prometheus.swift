import BlockIO
import Foundation
import Glibc
import SystemErrors

/// Renders gateway statistics in the Prometheus text exposition format (version 0.0.4).
public enum PrometheusText {
    /// The content type of the format.
    public static let contentType = "text/plain; version=0.0.4; charset=utf-8"

    /// The metrics text for `statistics` and the LUN map of `statuses`.
    public static func render(_ statistics: GatewayStatistics, version: String = ScsiGateVersion.string) -> String {
        var out = ""
        func family(_ name: String, _ type: String, _ help: String) {
            out += "# HELP \(name) \(help)\n# TYPE \(name) \(type)\n"
        }
        func sample(_ name: String, _ labels: [(String, String)], _ value: UInt64) {
            out += name
            if !labels.isEmpty {
                out += "{" + labels.map { "\($0.0)=\"\(escape($0.1))\"" }.joined(separator: ",") + "}"
            }
            out += " \(value)\n"
        }
        func lunLabels(_ row: LUNStatisticsRow) -> [(String, String)] {
            [("controller", row.controller), ("target", "\(row.target)"), ("lun", "\(row.lun)")]
        }

        family("scsigate_build_info", "gauge", "ScsiGate version.")
        sample("scsigate_build_info", [("version", version)], 1)

        family("scsigate_lun_capacity_bytes", "gauge", "LUN capacity in bytes.")
        for row in statistics.luns { sample("scsigate_lun_capacity_bytes", lunLabels(row), row.capacityBytes) }

        family("scsigate_lun_commands_total", "counter", "Completed commands per LUN and class.")
        for row in statistics.luns {
            for kind in IOCommandClass.allCases {
                sample("scsigate_lun_commands_total", lunLabels(row) + [("op", kind.name)], row.counters.commands(kind))
            }
        }
        family("scsigate_lun_read_bytes_total", "counter", "Bytes read per LUN.")
        for row in statistics.luns { sample("scsigate_lun_read_bytes_total", lunLabels(row), row.counters.readBytes) }
        family("scsigate_lun_written_bytes_total", "counter", "Bytes written per LUN.")
        for row in statistics.luns { sample("scsigate_lun_written_bytes_total", lunLabels(row), row.counters.writeBytes) }
        family("scsigate_lun_in_flight", "gauge", "Commands in flight per LUN.")
        for row in statistics.luns { sample("scsigate_lun_in_flight", lunLabels(row), UInt64(row.counters.inFlight)) }

        family("scsigate_lun_check_conditions_total", "counter", "CHECK CONDITION completions per LUN and sense key.")
        for row in statistics.luns {
            for key in 0..<16 where row.counters.errors(senseKey: key) > 0 {
                sample("scsigate_lun_check_conditions_total",
                       lunLabels(row) + [("sense_key", SenseKeyName.name(key))], row.counters.errors(senseKey: key))
            }
        }
        family("scsigate_lun_status_total", "counter", "Completions with a non-GOOD status other than CHECK CONDITION.")
        for row in statistics.luns {
            let c = row.counters
            for (status, value) in [("busy", c.busy), ("reservation_conflict", c.reservationConflicts),
                                    ("task_set_full", c.taskSetFull), ("task_aborted", c.taskAborted),
                                    ("other", c.otherStatus)] {
                sample("scsigate_lun_status_total", lunLabels(row) + [("status", status)], value)
            }
        }

        family("scsigate_lun_latency_seconds", "histogram", "Command latency from arrival to completion per LUN.")
        for row in statistics.luns {
            var cumulative: UInt64 = 0
            for i in 0..<LatencyHistogram.bucketCount {
                cumulative &+= row.counters.latencyBucket(i)
                let le = LatencyHistogram.upperBoundNanos(i).map { seconds($0) } ?? "+Inf"
                sample("scsigate_lun_latency_seconds_bucket", lunLabels(row) + [("le", le)], cumulative)
            }
            out += "scsigate_lun_latency_seconds_sum{" + lunLabels(row).map { "\($0.0)=\"\(escape($0.1))\"" }.joined(separator: ",")
                + "} \(seconds(row.counters.latencySumNanos))\n"
            sample("scsigate_lun_latency_seconds_count", lunLabels(row), cumulative)
        }

        family("scsigate_lun_throttled_total", "counter", "Requests that waited for the LUN's QoS limit.")
        for row in statistics.luns { sample("scsigate_lun_throttled_total", lunLabels(row), row.policy.throttledRequests) }
        family("scsigate_lun_throttled_seconds_total", "counter", "Time requests waited for the LUN's QoS limit.")
        for row in statistics.luns {
            out += "scsigate_lun_throttled_seconds_total{" + lunLabels(row).map { "\($0.0)=\"\(escape($0.1))\"" }.joined(separator: ",")
                + "} \(seconds(row.policy.throttledNanoseconds))\n"
        }
        family("scsigate_lun_space_held_writes_total", "counter", "Writes held because the back-end was out of space, by outcome.")
        for row in statistics.luns {
            for (outcome, value) in [("held", row.policy.spaceHeldWrites), ("resumed", row.policy.spaceResumedWrites),
                                     ("failed", row.policy.spaceFailedWrites)] {
                sample("scsigate_lun_space_held_writes_total", lunLabels(row) + [("outcome", outcome)], value)
            }
        }

        family("scsigate_queue_commands_total", "counter", "Completed commands per controller queue.")
        for row in statistics.queues {
            sample("scsigate_queue_commands_total", [("controller", row.controller), ("queue", "\(row.queue)")], row.counters.commands)
        }
        family("scsigate_queue_read_bytes_total", "counter", "Bytes read per controller queue.")
        for row in statistics.queues {
            sample("scsigate_queue_read_bytes_total", [("controller", row.controller), ("queue", "\(row.queue)")], row.counters.readBytes)
        }
        family("scsigate_queue_written_bytes_total", "counter", "Bytes written per controller queue.")
        for row in statistics.queues {
            sample("scsigate_queue_written_bytes_total", [("controller", row.controller), ("queue", "\(row.queue)")], row.counters.writeBytes)
        }
        family("scsigate_queue_errors_total", "counter", "Non-GOOD completions per controller queue.")
        for row in statistics.queues {
            sample("scsigate_queue_errors_total", [("controller", row.controller), ("queue", "\(row.queue)")], row.counters.errors)
        }
        return out
    }

    /// Nanoseconds as decimal seconds without floating-point noise (`0.000001024`).
    static func seconds(_ nanos: UInt64) -> String {
        let whole = nanos / 1_000_000_000
        let fraction = nanos % 1_000_000_000
        if fraction == 0 { return "\(whole)" }
        var digits = String(fraction)
        digits = String(repeating: "0", count: 9 - digits.count) + digits
        while digits.hasSuffix("0") { digits.removeLast() }
        return "\(whole).\(digits)"
    }

    /// Label value escaping: backslash, double quote, newline.
    static func escape(_ value: String) -> String {
        var out = ""
        for ch in value {
            switch ch {
            case "\\": out += "\\\\"
            case "\"": out += "\\\""
            case "\n": out += "\\n"
            default: out.append(ch)
            }
        }
        return out
    }
}

/// A minimal HTTP/1.1 responder: `GET /metrics` answers the Prometheus text, anything else 404/405;
/// one request per connection, request head limited to 8 KiB.
struct MetricsHTTPHandler: StreamConnectionHandler {
    let render: @Sendable () -> String
    var maximumBufferedBytes: Int { 8192 }
    var idleTimeoutSeconds: Int { 10 }
    var overflowResponse: [UInt8] { Self.response(431, "Request Header Fields Too Large", "request too large\n") }

    func consume(_ input: inout [UInt8], peer: ControlPeer) -> (output: [UInt8], close: Bool) {
        let end: [UInt8] = Array("\r\n\r\n".utf8)
        guard let headEnd = input.firstRange(of: end) ?? input.firstRange(of: Array("\n\n".utf8)) else { return ([], false) }
        var lineBytes = input[..<(input[..<headEnd.lowerBound].firstIndex(of: UInt8(ascii: "\n")) ?? headEnd.lowerBound)]
        if lineBytes.last == UInt8(ascii: "\r") { lineBytes = lineBytes.dropLast() }
        let requestLine = String(decoding: lineBytes, as: UTF8.self)
        input.removeAll()
        let parts = requestLine.split(separator: " ", omittingEmptySubsequences: false)
        guard parts.count == 3, parts[2].hasPrefix("HTTP/1.") else {
            return (Self.response(400, "Bad Request", "bad request\n"), true)
        }
        let method = parts[0]
        let target = parts[1].split(separator: "?", maxSplits: 1).first.map(String.init) ?? ""
        guard method == "GET" || method == "HEAD" else {
            return (Self.response(405, "Method Not Allowed", "only GET\n", extra: "Allow: GET, HEAD\r\n"), true)
        }
        guard target == "/metrics" else { return (Self.response(404, "Not Found", "try /metrics\n"), true) }
        var response = Self.response(200, "OK", render(), contentType: PrometheusText.contentType)
        if method == "HEAD", let split = response.firstRange(of: end) { response.removeSubrange(split.upperBound...) }
        return (response, true)
    }

    static func response(_ code: Int, _ reason: String, _ body: String, contentType: String = "text/plain; charset=utf-8",
                         extra: String = "") -> [UInt8] {
        let bodyBytes = Array(body.utf8)
        let head = "HTTP/1.1 \(code) \(reason)\r\nContent-Type: \(contentType)\r\nContent-Length: \(bodyBytes.count)\r\n"
            + extra + "Connection: close\r\n\r\n"
        return Array(head.utf8) + bodyBytes
    }
}

/// The optional Prometheus endpoint (`[gateway] stats_listen`): a TCP listener on its own thread.
public final class MetricsServer: @unchecked Sendable {
    /// The bound port (useful when the address asked for port 0).
    public let port: UInt16
    private let server: PollingSocketServer

    /// Listens on `address` and serves `gateway`'s statistics.
    public init(address: ListenAddress, gateway: Gateway) throws(SocketServerError) {
        let what = "stats_listen \(address)"
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV
        var list: UnsafeMutablePointer<addrinfo>? = nil
        let host: String? = address.host.isEmpty ? nil : address.host
        let rc = getaddrinfo(host, String(address.port), &hints, &list)
        guard rc == 0, let first = list else {
            throw SocketServerError("\(what): cannot resolve: \(String(cString: gai_strerror(rc)))")
        }
        defer { freeaddrinfo(list) }
        // Prefer IPv6 for an empty host (dual stack), else the first result.
        var chosen = first
        if host == nil {
            var cursor: UnsafeMutablePointer<addrinfo>? = first
            while let c = cursor { if c.pointee.ai_family == AF_INET6 { chosen = c; break }; cursor = c.pointee.ai_next }
        }
        let fd = socket(chosen.pointee.ai_family, chosen.pointee.ai_socktype | Int32(SOCK_CLOEXEC.rawValue), chosen.pointee.ai_protocol)
        guard fd >= 0 else { throw .systemCall(.current("socket", context: what)) }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        if chosen.pointee.ai_family == AF_INET6 {
            var zero: Int32 = 0
            setsockopt(fd, Int32(IPPROTO_IPV6), IPV6_V6ONLY, &zero, socklen_t(MemoryLayout<Int32>.size))
        }
        guard bind(fd, chosen.pointee.ai_addr, chosen.pointee.ai_addrlen) == 0, listen(fd, 16) == 0 else {
            let e = errno
            close(fd)
            throw .systemCall(SystemCallError("bind/listen", errno: e, context: what))
        }
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        _ = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        let family = storage.ss_family
        let boundPort: UInt16 = withUnsafePointer(to: &storage) { pointer in
            if family == sa_family_t(AF_INET6) {
                return pointer.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { UInt16(bigEndian: $0.pointee.sin6_port) }
            }
            return pointer.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { UInt16(bigEndian: $0.pointee.sin_port) }
        }
        port = boundPort
        let handler = MetricsHTTPHandler(render: { [weak gateway] in
            guard let gateway else { return "" }
            return PrometheusText.render(GatewayStatistics.collect(gateway))
        })
        do {
            server = try PollingSocketServer(listenFD: fd, handler: handler, name: "scsigate-metrics")
        } catch {
            close(fd)
            throw error
        }
        server.start()
    }

    /// Stops the endpoint.
    public func stop() { server.stop() }
}
