import Backends
import SCSI
import Foundation
import Testing
@testable import Gateway

@Suite("LUN policies: QoS and out-of-space keys, lun.set_limits, config save")
struct LUNPolicyConfigTests {
    @Test("the keys parse into the LUN's policy; left out they mean no limit and report")
    func keysParse() throws {
        let config = try ConfigLoader.parse(oneLUN("""
            lun = 0
            backend = "file"
            path = "d.img"
            iops_limit = 2000
            write_iops_limit = 500
            bandwidth_limit = "200MiB"
            read_bandwidth_limit = 1048576
            burst_seconds = 3
            out_of_space = "hold"
            out_of_space_hold = 30
            """), source: "test.toml")
        let policy = try #require(config.controllers.first?.luns.first?.policy)
        #expect(policy.limits == QoSLimits(iops: 2000, writeIOPS: 500, bandwidth: 200 << 20, readBandwidth: 1 << 20,
                                           burstMilliseconds: 3000))
        #expect(policy.outOfSpace == .hold && policy.holdSeconds == 30)
        let plain = try ConfigLoader.parse(oneLUN("lun = 0\nbackend = \"null\"\nsize = 4096"), source: "test.toml")
        #expect(plain.controllers[0].luns[0].policy == LUNPolicyConfig())
    }

    @Test("bad values name the key and line")
    func errors() {
        #expect(configMessages(oneLUN("""
            lun = 0
            backend = "null"
            size = 4096
            iops_limit = -1
            bandwidth_limit = 100
            burst_seconds = 7200
            out_of_space = "stop"
            out_of_space_hold = 0
            """)) == [
            "test.toml:13: key 'controller[0].lun[0].iops_limit': must be between 0 and 100000000, found -1",
            "test.toml:14: key 'controller[0].lun[0].bandwidth_limit': must be 0 (no limit) or at least 4096 bytes per second, found 100",
            "test.toml:15: key 'controller[0].lun[0].burst_seconds': must be between 0 and 3600, found 7200",
            "test.toml:16: key 'controller[0].lun[0].out_of_space': 'stop' is not valid; expected 'report' or 'hold'",
            "test.toml:17: key 'controller[0].lun[0].out_of_space_hold': must be between 1 and 3600, found 0",
        ])
        #expect(configMessages(oneLUN("lun = 0\nbackend = \"null\"\nsize = 4096\nout_of_space = \"hold\"")) == [
            "test.toml:13: key 'controller[0].lun[0].out_of_space': 'hold' is only for backend 'file' or 'block' (the back-ends that run out of space), not 'null'",
        ])
        #expect(configMessages(oneLUN("lun = 0\nbackend = \"file\"\npath = \"d\"\nout_of_space_hold = 10")) == [
            "test.toml:13: key 'controller[0].lun[0].out_of_space_hold': only used with out_of_space = \"hold\"",
        ])
    }

    @Test("lun.set_limits changes the running LUN's limits, keeps the keys left out, and config.save keeps them")
    func setLimitsAtRunTime() throws {
        let f = try AdminFixture()
        let result = try f.call("lun.set_limits", ["controller": "scsi0", "lun": 0, "iops_limit": 2000,
                                                   "write_bandwidth_limit": "50MiB"])
        #expect(result["policy"]?["iops_limit"] == .int(2000))
        let unit = try #require(f.gateway.controller(named: "scsi0")?.target.logicalUnit(LogicalUnitNumber(0)!))
        let entry = try #require(f.gateway.backends.backend(unit.backendID))
        #expect(entry.policy.limits == QoSLimits(iops: 2000, writeBandwidth: 50 << 20))
        #expect(entry.policy.flags == LUNPolicy.throttling)
        _ = try f.call("lun.set_limits", ["controller": "scsi0", "lun": 0, "read_iops_limit": 100])
        #expect(entry.policy.limits == QoSLimits(iops: 2000, readIOPS: 100, writeBandwidth: 50 << 20))

        // The config file's rules and messages; nothing changes on a refusal.
        let refusal = f.refusal("lun.set_limits", ["controller": "scsi0", "lun": 0, "iops_limit": 10, "bandwidth_limit": 12])
        #expect(refusal?.code == ControlErrorCode.invalidParams)
        #expect(refusal?.message == "invalid params: 'bandwidth_limit': must be 0 (no limit) or at least 4096 bytes per second, found 12")
        #expect(entry.policy.limits.iops == 2000)
        #expect(f.refusal("lun.set_limits", ["controller": "scsi0", "lun": 0, "out_of_space": "hold"])?.code
                == ControlErrorCode.invalidParams)

        let saved = f.dir + "/saved.toml"
        _ = try f.call("config.save", ["path": .string(saved)])
        let reloaded = try ConfigLoader.load(file: saved)
        #expect(reloaded.controllers[0].luns[0].policy.limits == QoSLimits(iops: 2000, readIOPS: 100, writeBandwidth: 50 << 20))

        _ = try f.call("lun.set_limits", ["controller": "scsi0", "lun": 0, "iops_limit": 0, "read_iops_limit": 0,
                                          "write_bandwidth_limit": 0])
        #expect(entry.policy.flags == 0)

        // What config reload calls: the whole policy at once.
        try f.gateway.setLUNPolicy(controller: "scsi0", target: 0, lun: 0,
                                   policy: LUNPolicyConfig(limits: QoSLimits(iops: 50), outOfSpace: .hold, holdSeconds: 5))
        #expect(entry.policy.flags == LUNPolicy.throttling | LUNPolicy.holdingOnENOSPC)
        #expect(entry.policy.outOfSpace.holdSeconds == 5)
        #expect(f.gateway.lunStatuses(controller: "scsi0").first?.config.policy.outOfSpace == .hold)
        #expect(try f.call("stats.get")["luns"]?.arrayValue?.first?["throttled_ns"] != nil)
    }
}
