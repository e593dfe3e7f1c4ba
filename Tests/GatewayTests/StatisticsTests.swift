import BlockIO
import Foundation
import Glibc
import SCSI
import Testing
@testable import Gateway

/// The counters themselves (buckets, record, concurrent owners and readers) are tested in BlockIOTests.
@Suite("I/O statistics: SCSI tasks counted, Prometheus text and endpoint")
struct StatisticsTests {
    @Test("a completed SCSI task is counted from its CDB, data lengths, status and sense")
    func scsiTask() {
        let stats = LUNIOStatistics(queues: 1)
        let counters = stats.counters(queue: 0)
        let nexus = ITNexus(initiator: 1, targetPort: 1)
        var read = SCSITask(nexus: nexus, lun: LogicalUnitNumber(0), tag: 1, cdb: CDB([0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0]))
        read.dataInLength = 4096
        counters.record(task: read, latencyNanos: 2000)
        var failed = SCSITask(nexus: nexus, lun: LogicalUnitNumber(0), tag: 2, cdb: CDB([0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0]))
        failed.status = .checkCondition
        failed.sense[0] = 0x70; failed.sense[2] = 0x03; failed.sense[7] = 10; failed.sense.length = 18
        failed.dataOutLength = 512
        counters.record(task: failed, latencyNanos: 3000)
        var described = SCSITask(nexus: nexus, lun: LogicalUnitNumber(0), tag: 3, cdb: CDB([0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0]))
        described.status = .checkCondition
        described.sense[0] = 0x72; described.sense[1] = 0x05; described.sense.length = 8
        counters.record(task: described, latencyNanos: 100)
        let s = stats.snapshot()
        #expect(s.commands(.read) == 1 && s.readBytes == 4096)
        #expect(s.commands(.write) == 1 && s.writeBytes == 512 && s.errors(senseKey: 3) == 1)
        #expect(s.commands(.flush) == 1 && s.errors(senseKey: 5) == 1)
        #expect(IOCommandClass(scsiOpcode: 0x42) == .discard && IOCommandClass(scsiOpcode: 0x12) == .other)
    }

    @Test("Prometheus text: HELP/TYPE per family, valid sample lines, cumulative histogram ending in +Inf = count")
    func prometheusFormat() throws {
        let f = try AdminFixture()
        let runtime = try #require(f.gateway.controller(named: "scsi0"))
        let unit = try #require(runtime.target.logicalUnit(LogicalUnitNumber(0)!))
        let counters = try #require(runtime.statistics(backendID: unit.backendID)).counters(queue: 1)
        counters.record(command: .read, bytes: 65536, latencyNanos: 1500)
        counters.record(command: .read, bytes: 65536, latencyNanos: 3_000_000)
        counters.record(command: .write, bytes: 4096, latencyNanos: 700, status: 0x02, senseKey: 0x04)
        let text = PrometheusText.render(GatewayStatistics.collect(f.gateway))
        #expect(text.hasSuffix("\n"))
        var declared: Set<String> = []
        let sample = try Regex(#"^([a-z_]+)(\{([a-z_]+="[^"\\]*",?)*\})? [0-9]+(\.[0-9]+)?$"#)
        for line in text.split(separator: "\n") {
            if line.hasPrefix("# TYPE ") {
                declared.insert(String(line.split(separator: " ")[2]))
                continue
            }
            if line.hasPrefix("# HELP ") { continue }
            #expect(line.wholeMatch(of: sample) != nil, "bad sample line: \(line)")
            let name = String(line.prefix { $0 != "{" && $0 != " " })
            let family = ["_bucket", "_sum", "_count"].reduce(name) { n, suffix in
                n.hasSuffix(suffix) && declared.contains(String(n.dropLast(suffix.count))) ? String(n.dropLast(suffix.count)) : n
            }
            #expect(declared.contains(family), "\(name) has no TYPE line before it")
        }
        let labels = "controller=\"scsi0\",target=\"0\",lun=\"0\""
        #expect(text.contains("scsigate_lun_commands_total{\(labels),op=\"read\"} 2\n"))
        #expect(text.contains("scsigate_lun_read_bytes_total{\(labels)} 131072\n"))
        #expect(text.contains("scsigate_lun_check_conditions_total{\(labels),sense_key=\"HARDWARE ERROR\"} 1\n"))
        #expect(text.contains("scsigate_lun_latency_seconds_bucket{\(labels),le=\"0.000001024\"} 1\n"))
        #expect(text.contains("scsigate_lun_latency_seconds_bucket{\(labels),le=\"0.000002048\"} 2\n"))
        #expect(text.contains("scsigate_lun_latency_seconds_bucket{\(labels),le=\"+Inf\"} 3\n"))
        #expect(text.contains("scsigate_lun_latency_seconds_sum{\(labels)} 0.0030022\n"))
        #expect(text.contains("scsigate_lun_latency_seconds_count{\(labels)} 3\n"))
        #expect(text.contains("scsigate_queue_commands_total{controller=\"scsi0\",queue=\"1\"} 3\n"))
        #expect(text.contains("scsigate_queue_commands_total{controller=\"pv0\",queue=\"0\"} 0\n"))
        // Buckets are cumulative (never decrease).
        var last: UInt64 = 0
        for line in text.split(separator: "\n") where line.hasPrefix("scsigate_lun_latency_seconds_bucket{\(labels)") {
            let value = UInt64(line.split(separator: " ").last!)!
            #expect(value >= last)
            last = value
        }
        #expect(PrometheusText.seconds(1_500_000_000) == "1.5" && PrometheusText.seconds(2_000_000_000) == "2")
        #expect(PrometheusText.escape("a\"b\\c\nd") == "a\\\"b\\\\c\\nd")
    }

    @Test("the metrics endpoint answers GET /metrics over loopback TCP, and 404/405/431 otherwise")
    func metricsEndpoint() throws {
        let f = try AdminFixture()
        let server = try MetricsServer(address: ListenAddress(host: "127.0.0.1", port: 0), gateway: f.gateway)
        defer { server.stop() }
        #expect(server.port > 0)
        func http(_ request: String) throws -> String {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            defer { close(fd) }
            var address = sockaddr_in()
            address.sin_family = sa_family_t(AF_INET)
            address.sin_port = server.port.bigEndian
            address.sin_addr.s_addr = UInt32(0x7F00_0001).bigEndian
            let rc = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
            }
            try #require(rc == 0)
            _ = request.withCString { send(fd, $0, strlen($0), Int32(MSG_NOSIGNAL)) }
            var out: [UInt8] = []
            var buffer = [UInt8](repeating: 0, count: 65536)
            while true {
                let n = recv(fd, &buffer, buffer.count, 0)
                if n <= 0 { break }
                out += buffer[0..<n]
            }
            return String(decoding: out, as: UTF8.self)
        }
        let ok = try http("GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n")
        #expect(ok.hasPrefix("HTTP/1.1 200 OK\r\n"))
        #expect(ok.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"))
        let parts = ok.components(separatedBy: "\r\n\r\n")
        let length = ok.split(separator: "\r\n").first { $0.hasPrefix("Content-Length: ") }.map { Int($0.dropFirst(16))! }
        #expect(length == parts.dropFirst().joined(separator: "\r\n\r\n").utf8.count)
        #expect(ok.contains("scsigate_lun_commands_total{controller=\"scsi0\",target=\"0\",lun=\"7\",op=\"read\"} 0"))
        #expect(try http("GET /other HTTP/1.1\r\n\r\n").hasPrefix("HTTP/1.1 404 "))
        #expect(try http("POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").hasPrefix("HTTP/1.1 405 "))
        #expect(try http("garbage\r\n\r\n").hasPrefix("HTTP/1.1 400 "))
        let big = "GET /metrics HTTP/1.1\r\n" + String(repeating: "X-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n", count: 400)
        #expect(try http(big).hasPrefix("HTTP/1.1 431 "))
        #expect(try http("HEAD /metrics HTTP/1.1\r\n\r\n").hasSuffix("\r\n\r\n"))
    }
}
