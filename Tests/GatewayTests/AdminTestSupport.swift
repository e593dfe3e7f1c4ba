import Foundation
import Logging
import Synchronization
import Testing
@testable import Gateway

/// The config text the admin tests serve: a virtio-scsi controller with a file LUN 0 and a null LUN 7,
/// a PVSCSI controller with a null disk at target 3.
func adminConfigText(_ dir: String, statsListen: String? = nil) -> String {
    """
    [gateway]
    state_dir = "\(dir)/state"
    control_socket = "\(dir)/run/control.sock"
    \(statsListen.map { "stats_listen = \"\($0)\"" } ?? "")
    [[controller]]
    name = "scsi0"
    transport = "vhost-user-scsi"
    socket = "scsi0.sock"
    queues = 2
    [[controller.lun]]
    lun = 0
    backend = "file"
    path = "disk0.img"
    size = "4M"
    create = true
    [[controller.lun]]
    lun = 7
    backend = "null"
    size = "1G"
    block_size = 4096
    [[controller]]
    name = "pv0"
    transport = "pvscsi"
    socket = "pv0.sock"
    [[controller.lun]]
    target = 3
    backend = "null"
    size = "2M"
    """
}

/// A started gateway (no front-ends) with its control socket, in a scratch directory.
final class AdminFixture {
    let scratch = ScratchDirectory()
    let configPath: String
    let gateway: Gateway
    let plane: AdminPlane
    var client: ControlClient { ControlClient(path: plane.control.path, timeoutMilliseconds: 10_000) }
    var dir: String { scratch.path }

    init(configText: String? = nil, logger: Logger = quietLogger) throws {
        configPath = scratch.path + "/gateway.toml"
        try (configText ?? adminConfigText(scratch.path)).write(toFile: configPath, atomically: true, encoding: .utf8)
        let config = try ConfigLoader.load(file: configPath)
        gateway = Gateway(config: config, logger: logger, frontEnds: FrontEndRegistry([]))
        try gateway.start()
        do {
            plane = try AdminPlane(gateway: gateway, logger: logger)
        } catch {
            gateway.stop()
            throw error
        }
    }

    /// Calls a method, expecting success.
    func call(_ method: String, _ params: [String: JSONValue] = [:]) throws -> JSONValue {
        try client.call(method, params)
    }

    /// Calls a method, expecting a JSON-RPC error; returns it.
    func refusal(_ method: String, _ params: [String: JSONValue] = [:],
                 sourceLocation: SourceLocation = #_sourceLocation) -> RPCError? {
        do throws(ControlClientError) {
            let result = try client.call(method, params)
            Issue.record("expected \(method) to be refused, got \(result.serialized)", sourceLocation: sourceLocation)
            return nil
        } catch {
            guard case let .refused(rpc) = error else {
                Issue.record("expected a JSON-RPC error, got \(error)", sourceLocation: sourceLocation)
                return nil
            }
            return rpc
        }
    }

    func stop() {
        plane.stop()
        gateway.stop()
    }

    deinit { stop() }
}

/// Entries of /proc/self/fd (or /proc/PID/fd).
func openFileDescriptorCount(pid: Int32? = nil) -> Int {
    let path = pid.map { "/proc/\($0)/fd" } ?? "/proc/self/fd"
    return ((try? FileManager.default.contentsOfDirectory(atPath: path)) ?? []).count
}

/// Resident set size in bytes from /proc/PID/statm.
func residentBytes(pid: Int32? = nil) -> Int {
    let path = pid.map { "/proc/\($0)/statm" } ?? "/proc/self/statm"
    guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return 0 }
    let fields = text.split(separator: " ")
    guard fields.count > 1, let pages = Int(fields[1]) else { return 0 }
    return pages * Int(sysconf(Int32(_SC_PAGESIZE)))
}

/// A log handler that keeps every record (level, message, metadata) for assertions.
struct RecordingLogHandler: LogHandler {
    struct Record: Sendable {
        var level: Logger.Level
        var message: String
        var metadata: [String: String]
    }
    final class Store: Sendable {
        let records = Mutex<[Record]>([])
    }
    let store: Store
    var logLevel: Logger.Level = .trace
    var metadata: Logger.Metadata = [:]

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        var merged = metadata
        if let extra = event.metadata { merged.merge(extra) { $1 } }
        let record = Record(level: event.level, message: event.message.description,
                            metadata: merged.mapValues { "\($0)" })
        store.records.withLock { $0.append(record) }
    }
}
