import Foundation
import Testing
@testable import Gateway

@Suite("Config writer round trips")
struct ConfigWriterTests {
    @Test("the default and every example render to TOML that loads to the same configuration",
          arguments: ["scsigate.toml", "examples/iscsi.toml", "examples/multi-lun.toml", "examples/pvscsi.toml",
                      "examples/vhost-user-blk.toml"])
    func roundTrip(file: String) throws {
        let original = try ConfigLoader.load(file: repositoryRoot.appendingPathComponent("Config/" + file).path)
        let text = ConfigWriter.render(original, header: ["saved by a test"])
        #expect(text.hasPrefix("# saved by a test\n\n[gateway]\n"))
        let reloaded = try ConfigLoader.parse(text, source: "saved.toml")
        #expect(reloaded.settings == original.settings)
        #expect(reloaded.controllers == original.controllers)
    }

    @Test("strings are escaped")
    func quoting() throws {
        #expect(ConfigWriter.quote("a\"b\\c\nd\u{1}") == "\"a\\\"b\\\\c\\nd\\u0001\"")
        let config = GatewayConfig(
            settings: GatewaySettings(stateDirectory: "/srv/with \"quote\"", statsListen: ListenAddress(host: "::1", port: 9)),
            controllers: [ControllerConfig(name: "c", transport: .vhostUserSCSI, socket: "/s#1",
                                           luns: [LUNConfig(lun: 1, backend: .null, size: 4096, serial: "a#b \"x\"",
                                                            wwn: 0x2000000000000001)])],
            source: "x")
        let reloaded = try ConfigLoader.parse(ConfigWriter.render(config), source: "w.toml")
        #expect(reloaded.settings == config.settings)
        #expect(reloaded.controllers == config.controllers)
    }
}
