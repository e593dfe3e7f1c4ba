import Foundation
import Gateway
import Logging

/// The TOML config through the loader and validator `scsigate serve` and `check-config` use.
/// Input: the file text. Checks: every error names a line inside the file (or none) and a key.
public enum ConfigFuzz {
    static func run(_ data: UnsafeRawBufferPointer) {
        let text = String(decoding: data, as: UTF8.self)
        do {
            _ = try ConfigLoader.parse(text, source: "fuzz.toml")
        } catch {
            let lines = text.split(separator: "\n", omittingEmptySubsequences: false).count
            for e in error.errors {
                precondition(e.line >= 1 && e.line <= lines + 1, "error line \(e.line) outside the file (\(lines) lines): \(e)")
                _ = e.description
            }
        }
    }

    static func seeds() -> [(String, [UInt8])] {
        let scsi = """
        [gateway]
        state_dir = "/tmp/scsigate-fuzz-state"
        control_socket = "/tmp/scsigate-fuzz-state/control.sock"
        log_level = "info"

        [[controller]]
        name = "scsi0"
        transport = "vhost-user-scsi"
        socket = "scsi0.sock"
        queues = 2
        queue_size = 256
        [[controller.lun]]
        lun = 0
        backend = "file"
        path = "disk0.img"
        size = "1G"
        create = true
        block_size = 4096
        [[controller.lun]]
        lun = 300
        backend = "null"
        size = "64M"
        read_only = true
        serial = "NULL300"
        """
        let blk = """
        [[controller]]
        name = "blk0"
        transport = "vhost-user-blk"
        socket = "/run/scsigate/blk0.sock"
        [[controller.lun]]
        backend = "block"
        path = "/dev/loop0"
        cache = "writeback"
        """
        let pv = """
        [[controller]]
        name = "pv0"
        transport = "pvscsi"
        socket = "pv0.sock"
        max_targets = 16
        [[controller.lun]]
        target = 3
        backend = "iscsi"
        url = "iscsi://127.0.0.1:3260/iqn.2001-04.com.example:disk/1"
        header_digest = "crc32c"
        """
        let bad = """
        [[controller]]
        name = "x"
        transport = "vhost-user-scsi"
        [[controller.lun]]
        lun = 99999
        block_size = 1000
        size = "-1"
        [[controller]]
        name = "x"
        """
        return [("scsi", Array(scsi.utf8)), ("blk", Array(blk.utf8)), ("pvscsi", Array(pv.utf8)), ("errors", Array(bad.utf8))]
    }

    public static let target = FuzzTarget(name: "config", summary: "TOML config: loader and validator (file:line: key errors)",
                                          run: run, seeds: seeds)
}

/// JSON-RPC control requests through the dispatcher and the admin methods of a started gateway (null LUNs,
/// no front-ends), as the control socket hands each request line to them.
///
/// Requests that would touch the host outside the scratch directory are not sent on: a `path`, `output`,
/// `url` or `chap_secret_file` member anywhere, or a back-end other than `null` (the parser still sees them).
public enum JSONRPCFuzz {
    final class State: @unchecked Sendable {
        let gateway: Gateway
        let dispatcher: JSONRPCDispatcher
        init() {
            let dir = scratchDirectory("jsonrpc")
            let text = """
            [gateway]
            state_dir = "\(dir)/state"
            control_socket = "\(dir)/control.sock"
            [[controller]]
            name = "scsi0"
            transport = "vhost-user-scsi"
            socket = "scsi0.sock"
            [[controller.lun]]
            lun = 0
            backend = "null"
            size = "1G"
            [[controller]]
            name = "pv0"
            transport = "pvscsi"
            socket = "pv0.sock"
            [[controller.lun]]
            target = 3
            backend = "null"
            size = "2M"
            [[controller]]
            name = "blk0"
            transport = "vhost-user-blk"
            socket = "blk0.sock"
            [[controller.lun]]
            backend = "null"
            size = "1M"
            """
            let logger = Logger(label: "fuzz", factory: { _ in SwiftLogNoOpLogHandler() })
            // config.save writes next to the source: keep it in the scratch directory.
            let config = try! ConfigLoader.parse(text, source: dir + "/gateway.toml")
            gateway = Gateway(config: config, logger: logger, frontEnds: FrontEndRegistry([]))
            try! gateway.start()
            dispatcher = AdminService(gateway: gateway, logger: logger).dispatcher
        }
    }

    nonisolated(unsafe) static var state: State?

    static let hostKeys: Set<String> = ["path", "output", "url", "chap_secret_file", "chap_secret_env"]

    static func touchesHost(_ v: JSONValue) -> Bool {
        switch v {
        case let .object(members):
            for (k, value) in members {
                if hostKeys.contains(k) { return true }
                if k == "backend", value != .string("null") { return true }
                if touchesHost(value) { return true }
            }
            return false
        case let .array(items): return items.contains(where: touchesHost)
        default: return false
        }
    }

    static func run(_ data: UnsafeRawBufferPointer) {
        if state == nil { state = State() }
        guard let parsed = JSONValue.parse(data) else {
            _ = state!.dispatcher.respond(to: data, peer: ControlPeer())
            return
        }
        _ = parsed.serialized
        if touchesHost(parsed) { return }
        if let response = state!.dispatcher.respond(to: data, peer: ControlPeer(pid: 1, uid: 0)) {
            precondition(JSONValue.parse(Array(response.utf8)) != nil, "response is not valid JSON: \(response)")
        }
    }

    static func seeds() -> [(String, [UInt8])] {
        let requests = [
            ("version", #"{"jsonrpc":"2.0","id":1,"method":"gateway.version"}"#),
            ("controllers", #"{"jsonrpc":"2.0","id":2,"method":"controller.list","params":{}}"#),
            ("luns", #"{"jsonrpc":"2.0","id":"a","method":"lun.list","params":{"controller":"scsi0"}}"#),
            ("add", #"{"jsonrpc":"2.0","id":3,"method":"lun.add","params":{"controller":"scsi0","lun":5,"backend":"null","size":"16M","block_size":4096,"serial":"S5"}}"#),
            ("add-pv", #"{"jsonrpc":"2.0","id":3,"method":"lun.add","params":{"controller":"pv0","target":7,"backend":"null","size":1048576}}"#),
            ("remove", #"{"jsonrpc":"2.0","id":4,"method":"lun.remove","params":{"controller":"scsi0","lun":5,"wait_ms":10}}"#),
            ("resize", #"{"jsonrpc":"2.0","id":5,"method":"lun.resize","params":{"controller":"scsi0","lun":0,"size":"2G"}}"#),
            ("readonly", #"{"jsonrpc":"2.0","id":6,"method":"lun.set_readonly","params":{"controller":"pv0","target":3,"read_only":true}}"#),
            ("stats", #"{"jsonrpc":"2.0","id":7,"method":"stats.get","params":{"controller":"blk0"}}"#),
            ("save", #"{"jsonrpc":"2.0","id":8,"method":"config.save"}"#),
            ("batch", #"[{"jsonrpc":"2.0","id":1,"method":"lun.list"},{"jsonrpc":"2.0","method":"stats.get"},{"bad":true},[]]"#),
            ("unicode", #"{"jsonrpc":"2.0","id":9e99,"method":"lun.\u006cist","params":{"controller":"\ud83d\ude00"}}"#),
        ]
        return requests.map { ($0.0, Array($0.1.utf8)) }
    }

    public static let target = FuzzTarget(name: "jsonrpc", summary: "JSON-RPC control requests: parser, dispatcher, admin methods",
                                          run: run, seeds: seeds)
}
