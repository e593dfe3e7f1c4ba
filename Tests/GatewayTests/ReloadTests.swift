import Backends
import SCSI
import Foundation
import Testing
@testable import Gateway

/// `config.reload` / `scsigate config reload` / SIGHUP: the file is read again and its difference
/// applied as the admin commands would, or refused as a whole.
@Suite("Configuration reload", .serialized)
struct ReloadTests {
    /// The admin fixture's file with `replacements` applied (each must match once).
    func edited(_ fixture: AdminFixture, _ replacements: [(String, String)],
                sourceLocation: SourceLocation = #_sourceLocation) throws -> String {
        var text = adminConfigText(fixture.dir)
        for (old, new) in replacements {
            #expect(text.contains(old), "fixture text has no '\(old)'", sourceLocation: sourceLocation)
            text = text.replacingOccurrences(of: old, with: new)
        }
        return text
    }

    func luns(_ fixture: AdminFixture) throws -> [String: JSONValue] {
        var out: [String: JSONValue] = [:]
        for lun in try fixture.call("lun.list").arrayValue ?? [] {
            out["\(lun["controller"]?.stringValue ?? "")/\(lun["target"]?.intValue ?? -1)/\(lun["lun"]?.intValue ?? -1)"] = lun
        }
        return out
    }

    @Test("a valid file: LUN added, removed, grown and made read-only, as the admin commands would")
    func validDiffApplied() throws {
        let fixture = try AdminFixture()
        defer { fixture.stop() }
        let text = try edited(fixture, [
            ("size = \"4M\"\ncreate = true", "size = \"8M\"\ncreate = true\nread_only = true"),
            ("lun = 7\nbackend = \"null\"\nsize = \"1G\"\nblock_size = 4096",
             "lun = 2\nbackend = \"null\"\nsize = \"1M\""),
        ])
        try text.write(toFile: fixture.configPath, atomically: true, encoding: .utf8)
        let result = try fixture.call("config.reload")
        #expect(result["path"]?.stringValue == fixture.configPath)
        let changes = (result["changes"]?.arrayValue ?? []).compactMap(\.stringValue)
        #expect(changes.count == 4, "\(changes)")
        #expect(changes.contains { $0.hasPrefix("added controller scsi0 target 0 lun 2: null") })
        #expect(changes.contains { $0.hasPrefix("removed controller scsi0 target 0 lun 7") })
        #expect(changes.contains("resized controller scsi0 target 0 lun 0: 4 MiB -> 8 MiB"))
        #expect(changes.contains("controller scsi0 target 0 lun 0: read-only on"))
        let after = try luns(fixture)
        #expect(after.keys.sorted() == ["pv0/3/0", "scsi0/0/0", "scsi0/0/2"])
        #expect(after["scsi0/0/0"]?["size"]?.uint64Value == 8 << 20)
        #expect(after["scsi0/0/0"]?["read_only"]?.boolValue == true)
        #expect(after["scsi0/0/2"]?["size"]?.uint64Value == 1 << 20)
        let attributes = try FileManager.default.attributesOfItem(atPath: fixture.dir + "/state/disk0.img")
        #expect((attributes[.size] as? NSNumber)?.uint64Value == 8 << 20)

        // The same file again: nothing to do.
        let again = try fixture.call("config.reload")
        #expect(again["changes"]?.arrayValue?.isEmpty == true)
        // config save after the reload writes the reloaded map.
        let saved = try fixture.call("config.save", ["path": .string(fixture.dir + "/saved.toml")])
        #expect(saved["luns"]?.intValue == 3)
    }

    @Test("QoS limits and the out-of-space policy change live: the running LUN's policy object takes them, config.save keeps them")
    func policyChangedLive() throws {
        let fixture = try AdminFixture()
        defer { fixture.stop() }
        let unit = try #require(fixture.gateway.controller(named: "scsi0")?.target.logicalUnit(LogicalUnitNumber(0)!))
        let entry = try #require(fixture.gateway.backends.backend(unit.backendID))
        #expect(entry.policy.flags == 0)
        let limited = try edited(fixture, [
            ("size = \"4M\"\ncreate = true",
             "size = \"4M\"\ncreate = true\niops_limit = 2000\nwrite_bandwidth_limit = \"50MiB\"\nout_of_space = \"hold\"\nout_of_space_hold = 5"),
        ])
        try limited.write(toFile: fixture.configPath, atomically: true, encoding: .utf8)
        let changes = (try fixture.call("config.reload")["changes"]?.arrayValue ?? []).compactMap(\.stringValue)
        #expect(changes == ["controller scsi0 target 0 lun 0: policy iops_limit = 2000, write_bandwidth_limit = 52428800, out_of_space = \"hold\", out_of_space_hold = 5"])
        #expect(entry.policy.limits == QoSLimits(iops: 2000, writeBandwidth: 50 << 20))
        #expect(entry.policy.flags == LUNPolicy.throttling | LUNPolicy.holdingOnENOSPC)
        #expect(entry.policy.outOfSpace.holdSeconds == 5)
        #expect(try luns(fixture)["scsi0/0/0"]?["policy"]?["iops_limit"] == .int(2000))
        let saved = fixture.dir + "/saved.toml"
        _ = try fixture.call("config.save", ["path": .string(saved)])
        #expect(try ConfigLoader.load(file: saved).controllers[0].luns[0].policy.limits.iops == 2000)
        // Only the limit changes: the same file with another number.
        try limited.replacingOccurrences(of: "iops_limit = 2000", with: "iops_limit = 500")
            .write(toFile: fixture.configPath, atomically: true, encoding: .utf8)
        #expect(try fixture.call("config.reload")["changes"]?.arrayValue?.count == 1)
        #expect(entry.policy.limits.iops == 500)
        // Back to the original file: no limit, report at once.
        try adminConfigText(fixture.dir).write(toFile: fixture.configPath, atomically: true, encoding: .utf8)
        let cleared = (try fixture.call("config.reload")["changes"]?.arrayValue ?? []).compactMap(\.stringValue)
        #expect(cleared == ["controller scsi0 target 0 lun 0: policy none (no limit, out_of_space report)"])
        #expect(entry.policy.flags == 0)
        #expect(entry.policy.limits == .unlimited)
        // An invalid limit is a file error: nothing changes.
        try limited.replacingOccurrences(of: "iops_limit = 2000", with: "iops_limit = -3")
            .write(toFile: fixture.configPath, atomically: true, encoding: .utf8)
        let refusal = try #require(fixture.refusal("config.reload"))
        #expect(refusal.message.contains("iops_limit"))
        #expect(entry.policy.flags == 0)
    }

    @Test("an invalid file changes nothing and the refusal lists FILE:LINE: key errors")
    func invalidFileChangesNothing() throws {
        let fixture = try AdminFixture()
        defer { fixture.stop() }
        let before = try luns(fixture)
        let text = try edited(fixture, [
            ("size = \"4M\"", "size = \"8M\""),
            ("lun = 7\nbackend = \"null\"\nsize = \"1G\"\nblock_size = 4096",
             "lun = 7\nbackend = \"null\"\nsize = \"1G\"\nblock_size = 1000"),
        ])
        try text.write(toFile: fixture.configPath, atomically: true, encoding: .utf8)
        let refusal = try #require(fixture.refusal("config.reload"))
        #expect(refusal.code == ControlErrorCode.reloadRefused)
        #expect(refusal.message.contains("is not valid, nothing changed"))
        #expect(refusal.message.contains("\(fixture.configPath):"))
        #expect(refusal.message.contains("key 'controller[0].lun[1].block_size': must be 512 or 4096, found 1000"))
        let after = try luns(fixture)
        #expect(after.keys.sorted() == before.keys.sorted())
        #expect(after["scsi0/0/0"]?["size"]?.uint64Value == 4 << 20)
    }

    @Test("a change that cannot be made live is refused naming controller, LUN and key; nothing is applied")
    func liveUnchangeableRefused() throws {
        let fixture = try AdminFixture()
        defer { fixture.stop() }
        let before = try luns(fixture)
        let text = try edited(fixture, [
            ("queues = 2", "queues = 4"),
            ("size = \"1G\"\nblock_size = 4096", "size = \"1G\"\nblock_size = 512"),
            ("size = \"4M\"", "size = \"2M\""),
            ("[[controller]]\nname = \"pv0\"",
             "[[controller.lun]]\nlun = 9\nbackend = \"null\"\nsize = \"1M\"\n[[controller]]\nname = \"pv0\""),
        ])
        try text.write(toFile: fixture.configPath, atomically: true, encoding: .utf8)
        let refusal = try #require(fixture.refusal("config.reload"))
        #expect(refusal.code == ControlErrorCode.reloadRefused)
        #expect(refusal.message.hasPrefix("config reload refused, nothing changed: "))
        #expect(refusal.message.contains("controller scsi0: key 'queues' cannot change while the gateway runs"))
        #expect(refusal.message.contains("controller scsi0 target 0 lun 7: key 'block_size' cannot change while the LUN is served"))
        #expect(refusal.message.contains("controller scsi0 target 0 lun 0: key 'size': 2 MiB is below the current 4 MiB"))
        let after = try luns(fixture)
        #expect(after.keys.sorted() == before.keys.sorted(), "the valid LUN 9 was not added")
        #expect(after["scsi0/0/0"]?["size"]?.uint64Value == 4 << 20)

        // A controller removed, a socket moved and a [gateway] key are refused too.
        let moved = adminConfigText(fixture.dir)
            .replacingOccurrences(of: "socket = \"scsi0.sock\"", with: "socket = \"other.sock\"")
            .replacingOccurrences(of: "[gateway]\n", with: "[gateway]\nlog_level = \"debug\"\n")
        try moved.write(toFile: fixture.configPath, atomically: true, encoding: .utf8)
        let second = try #require(fixture.refusal("config.reload"))
        #expect(second.message.contains("controller scsi0: key 'socket' cannot change"))
        #expect(second.message.contains("[gateway] key 'log_level' cannot change"))
    }

    @Test("a gateway on the built-in default has no file to reload")
    func builtInDefaultRefused() throws {
        let gateway = Gateway(config: try ConfigLoader.loadDefault(), logger: quietLogger, frontEnds: FrontEndRegistry([]))
        #expect(gateway.reloadPath == nil)
        #expect(throws: AdminError.self) { try gateway.reload() }
        do {
            _ = try gateway.reload()
        } catch {
            #expect(error.kind == .reloadRefused)
            #expect(error.message.contains("built-in default configuration"))
        }
    }
}
