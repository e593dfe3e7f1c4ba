import Foundation
import Testing
@testable import Gateway

@Suite("Default configuration and examples")
struct ConfigDefaultsTests {
    @Test("the embedded default validates and serves one vhost-user-scsi controller with a created 1 GiB file")
    func embeddedDefault() throws {
        let config = try ConfigLoader.loadDefault()
        #expect(config.source == "<embedded>")
        #expect(config.settings == GatewaySettings(stateDirectory: "/var/lib/scsigate",
                                                   controlSocket: "/run/scsigate/control.sock", logLevel: .info))
        #expect(config.controllers.count == 1)
        let controller = try #require(config.controllers.first)
        #expect(controller.name == "scsi0")
        #expect(controller.transport == .vhostUserSCSI)
        #expect(controller.socket == "/run/scsigate/scsi0.sock")
        #expect(controller.queues == 1 && controller.queueSize == 128 && controller.segmentMax == 126)
        #expect(controller.luns == [LUNConfig(target: 0, lun: 0, backend: .file, path: "/var/lib/scsigate/disk0.img",
                                              size: 1 << 30, blockSize: 512, cache: .none, create: true)])
    }

    @Test("the default embedded in the binary is Config/scsigate.toml, byte for byte")
    func embeddedDefaultIsTheFile() throws {
        let file = try String(contentsOf: repositoryRoot.appendingPathComponent("Config/scsigate.toml"), encoding: .utf8)
        #expect(DefaultConfiguration.text == file)
        // The embedded resource is a link to that file, not a copy that could drift.
        let resource = repositoryRoot.appendingPathComponent("Sources/Gateway/DefaultConfig/scsigate.toml").path
        let target = try FileManager.default.destinationOfSymbolicLink(atPath: resource)
        #expect(target == "../../../Config/scsigate.toml")
    }

    @Test("every example under Config/examples validates", arguments: ["iscsi", "multi-lun", "pvscsi", "vhost-user-blk"])
    func exampleValidates(name: String) throws {
        let path = repositoryRoot.appendingPathComponent("Config/examples/\(name).toml").path
        let config = try ConfigLoader.load(file: path)
        #expect(config.lunCount > 0)
    }

    @Test("Config/examples holds exactly the examples tested here")
    func examplesListed() throws {
        let names = try FileManager.default.contentsOfDirectory(atPath: repositoryRoot.appendingPathComponent("Config/examples").path)
        #expect(names.sorted() == ["iscsi.toml", "multi-lun.toml", "pvscsi.toml", "vhost-user-blk.toml"])
    }

    @Test("examples parse to the documented values")
    func exampleValues() throws {
        let iscsi = try ConfigLoader.load(file: repositoryRoot.appendingPathComponent("Config/examples/iscsi.toml").path)
        let luns = iscsi.controllers[0].luns
        #expect(luns[0].iscsi == ISCSIConfig(url: ISCSIAddress(host: "192.0.2.10", port: 3260,
                                                           targetName: "iqn.2026-11.com.example:storage.disk1", lun: 0),
                                             initiatorName: "iqn.2026-11.org.scsigate:host1"))
        #expect(luns[1].iscsi?.chapSecret == .file("/etc/scsigate/chap-disk2.secret"))
        #expect(luns[1].iscsi?.headerDigest == .crc32c)
        #expect(luns[1].iscsi?.timeoutSeconds == 60)
        #expect(luns[1].iscsi?.reconnectMinMilliseconds == 200 && luns[1].iscsi?.reconnectMaxMilliseconds == 5000)
        #expect(luns[0].iscsi?.reconnectMinMilliseconds == 100 && luns[0].iscsi?.reconnectMaxMilliseconds == 2000)
        #expect(luns[1].readOnly)
        #expect(luns[2].iscsi?.url.host == "2001:db8::10")
        #expect(luns[2].iscsi?.chapSecret == .environment("SCSIGATE_CHAP_DISK3"))

        let multi = try ConfigLoader.load(file: repositoryRoot.appendingPathComponent("Config/examples/multi-lun.toml").path)
        #expect(multi.settings.statsListen == ListenAddress(host: "127.0.0.1", port: 9100))
        let c = multi.controllers[0]
        #expect(c.socketMode == 0o660 && c.queues == 2 && c.queueSize == 256 && c.ioThreads == 2)
        #expect(c.luns.map { "\($0.target):\($0.lun)" } == ["0:0", "0:1", "0:2", "0:3"])
        #expect(c.luns[1].blockSize == 4096 && c.luns[1].cache == .writeback && c.luns[1].wwn == 0x5002538c40000001)
        #expect(c.luns[2].backend == .block && c.luns[2].readOnly && c.luns[2].size == nil)
        #expect(c.luns[3].size == 100 << 30)

        let blk = try ConfigLoader.load(file: repositoryRoot.appendingPathComponent("Config/examples/vhost-user-blk.toml").path)
        #expect(blk.controllers[0].luns[0].path == "/var/lib/scsigate/blk0.img")
        #expect(blk.controllers[0].transport == .vhostUserBlk && blk.controllers[0].queues == 4)

        let pv = try ConfigLoader.load(file: repositoryRoot.appendingPathComponent("Config/examples/pvscsi.toml").path)
        #expect(pv.controllers[0].maxTargets == 16)
        #expect(pv.controllers[0].luns.map { "\($0.target):\($0.lun)" } == ["0:0", "1:0"])
    }

    @Test("optional keys take their documented defaults")
    func defaults() throws {
        let config = try ConfigLoader.parse("""
            [[controller]]
            name = "c"
            transport = "vhost-user-scsi"
            socket = "c.sock"
            [[controller.lun]]
            lun = 3
            backend = "null"
            size = 4096
            """, source: "d.toml")
        #expect(config.settings == GatewaySettings())
        let c = config.controllers[0]
        #expect(c.socket == "/run/scsigate/c.sock")
        #expect(c.socketMode == 0o600 && c.queues == 1 && c.queueSize == 128 && c.pollMicroseconds == 50)
        #expect(c.hotplug && c.discard && c.writeZeroes && c.ioThreads == 1 && c.maxTargets == 16)
        #expect(c.luns == [LUNConfig(target: 0, lun: 3, backend: .null, size: 4096)])
        #expect(c.luns[0].blockSize == 512 && !c.luns[0].readOnly && c.luns[0].cache == .none && !c.luns[0].create)
    }

    @Test("relative paths resolve against state_dir, relative sockets against the control socket's directory")
    func relativePaths() throws {
        let config = try ConfigLoader.parse("""
            [gateway]
            state_dir = "/srv/sg/"
            control_socket = "/tmp/x/ctl.sock"
            [[controller]]
            name = "c"
            transport = "vhost-user-blk"
            socket = "./c.sock"
            [[controller.lun]]
            backend = "file"
            path = "disks//a.img"
            """, source: "r.toml")
        #expect(config.settings.stateDirectory == "/srv/sg")
        #expect(config.controllers[0].socket == "/tmp/x/c.sock")
        #expect(config.controllers[0].luns[0].path == "/srv/sg/disks/a.img")
    }
}
