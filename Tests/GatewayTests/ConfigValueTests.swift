import Testing
@testable import Gateway

@Suite("Config values: sizes, URLs, listen addresses, WWNs")
struct ConfigValueTests {
    static let sizeCases: [(String, UInt64)] = [
        ("4096", 4096), ("512B", 512), ("1K", 1024), ("1k", 1024), ("1KiB", 1024), ("1KB", 1000),
        ("512M", 536_870_912), ("512MiB", 536_870_912), ("1G", 1_073_741_824), ("10GiB", 10_737_418_240),
        ("10 GiB", 10_737_418_240), ("2GB", 2_000_000_000), ("1T", 1_099_511_627_776), ("1TiB", 1_099_511_627_776),
        ("1P", 1_125_899_906_842_624), ("1.5G", 1_610_612_736), ("0.5K", 512),
    ]

    @Test("sizes with and without units", arguments: sizeCases)
    func sizes(text: String, bytes: UInt64) {
        #expect(ByteSize.parse(text) == .success(bytes))
    }

    @Test("sizes that are not sizes", arguments: ["", "G", "1X", "1 b", "1.", ".5G", "1.2.3M", "-1G", "1Gi", "0.1B", "1e9"])
    func badSizes(text: String) {
        guard case .failure = ByteSize.parse(text) else {
            Issue.record("'\(text)' parsed as a size")
            return
        }
    }

    @Test("fractions must give whole bytes, huge values overflow")
    func sizeEdges() {
        #expect(ByteSize.parse("0.1B") == .failure(ConfigValueError("'0.1B' is not a whole number of bytes")))
        #expect(ByteSize.parse("16384P") == .failure(ConfigValueError("'16384P' is too large")))
        #expect(ByteSize.parse("18446744073709551615") == .success(UInt64.max))
        #expect(ByteSize.parse("18446744073709551616") == .failure(ConfigValueError("'18446744073709551616' is too large")))
    }

    @Test("size formatting for logs")
    func sizeFormat() {
        #expect(ByteSize.format(1 << 30) == "1 GiB")
        #expect(ByteSize.format(512 << 20) == "512 MiB")
        #expect(ByteSize.format(1000) == "1000 B")
        #expect(ByteSize.format(1536) == "1536 B")
    }

    @Test("iSCSI URLs")
    func iscsiURLs() throws {
        #expect(ISCSIAddress.parse("iscsi://10.0.0.1/iqn.2026-01.com.example:disk/3")
                == .success(ISCSIAddress(host: "10.0.0.1", port: 3260, targetName: "iqn.2026-01.com.example:disk", lun: 3)))
        #expect(ISCSIAddress.parse("iscsi://[fe80::1]:3261/eui.0123456789abcdef/0")
                == .success(ISCSIAddress(host: "fe80::1", port: 3261, targetName: "eui.0123456789abcdef", lun: 0)))
        #expect(ISCSIAddress(host: "fe80::1", port: 3261, targetName: "eui.0123456789abcdef", lun: 0).description
                == "iscsi://[fe80::1]:3261/eui.0123456789abcdef/0")
        #expect(ISCSIAddress.parse("iscsi://h/naa.6001405abcdef0123456789abcdef012/1").map(\.lun) == .success(1))
    }

    @Test("listen addresses")
    func listenAddresses() {
        #expect(ListenAddress.parse("127.0.0.1:9100") == .success(ListenAddress(host: "127.0.0.1", port: 9100)))
        #expect(ListenAddress.parse(":9100") == .success(ListenAddress(host: "", port: 9100)))
        #expect(ListenAddress.parse("[::1]:9100") == .success(ListenAddress(host: "::1", port: 9100)))
        #expect(ListenAddress.parse("::1:9100")
                == .failure(ConfigValueError("put IPv6 addresses in brackets, e.g. \"[::1]:9100\"")))
        #expect(ListenAddress.parse("localhost:0")
                == .failure(ConfigValueError("port '0' must be a number between 1 and 65535")))
    }

    @Test("WWN spellings")
    func wwns() {
        #expect(ConfigValidator.parseWWN("5002538c40000001") == .success(0x5002538c40000001))
        #expect(ConfigValidator.parseWWN("0x5002538C40000001") == .success(0x5002538c40000001))
        #expect(ConfigValidator.parseWWN("naa.5002538c40000001") == .success(0x5002538c40000001))
        #expect(ConfigValidator.parseWWN("50:02:53:8c:40:00:00:01") == .success(0x5002538c40000001))
        #expect(ConfigValidator.parseWWN("2000000000000001") == .success(0x2000000000000001))
    }

    @Test("socket modes as integer or octal string")
    func socketModes() throws {
        for (value, expected) in [("0o660", UInt32(0o660)), ("\"0640\"", 0o640), ("\"0o600\"", 0o600), ("\"777\"", 0o777)] {
            let config = try ConfigLoader.parse("""
                [[controller]]
                name = "c"
                transport = "vhost-user-scsi"
                socket = "/c"
                socket_mode = \(value)
                """, source: "m.toml")
            #expect(config.controllers[0].socketMode == expected)
        }
    }
}

@Suite("Config line index")
struct ConfigLineIndexTests {
    @Test("array-of-tables indexes follow their parent element")
    func arrayTables() {
        let index = ConfigLineIndex(text: """
            [gateway]
            state_dir = "/x"   # comment with = sign
            [[controller]]
            name = "a"
            [[controller.lun]]
            lun = 0
            [[controller.lun]]
            lun = 1
            [[controller]]
            name = "b"
            [[controller.lun]]
              block_size = 4096
            """)
        #expect(index.line(for: path("gateway.state_dir")) == 2)
        #expect(index.line(for: path("controller[0].name")) == 4)
        #expect(index.line(for: path("controller[0].lun[1].lun")) == 8)
        #expect(index.line(for: path("controller[1].lun[0].block_size")) == 12)
        #expect(index.line(for: path("controller[1].lun[0].size")) == 11)
        #expect(index.line(for: path("controller[1].socket")) == 9)
    }

    @Test("multi-line strings and arrays are skipped, inline tables fall back to their key")
    func multiline() {
        let index = ConfigLineIndex(text: """
            [[controller]]
            name = \"\"\"
            lun = 5
            \"\"\"
            socket = "/s"
            extra = [
              "lun = 7",
              { queues = 3 },
            ]
            lun = [ { lun = 0, backend = "null" },
                    { lun = 1 } ]
            queues = 2
            "quoted.key" = 1
            """)
        #expect(index.exactLine(for: path("controller[0].lun")) == 10)
        #expect(index.line(for: path("controller[0].lun[1].lun")) == 10)
        #expect(index.line(for: path("controller[0].socket")) == 5)
        #expect(index.line(for: path("controller[0].queues")) == 12)
        #expect(index.exactLine(for: ConfigKeyPath(components: [.key("controller"), .index(0), .key("quoted.key")])) == 13)
    }

    @Test("errors inside inline LUN tables still get a line")
    func inlineLUNError() {
        let messages = configMessages("""
            [[controller]]
            name = "c"
            transport = "vhost-user-scsi"
            socket = "/s"
            lun = [ { lun = 0, backend = "null", size = 4096 },
                    { lun = 1, backend = "null", size = 4096, block_size = 3 } ]
            """)
        #expect(messages == ["test.toml:5: key 'controller[0].lun[1].block_size': must be 512 or 4096, found 3"])
    }

    private func path(_ text: String) -> ConfigKeyPath {
        var components: [ConfigKeyPath.Component] = []
        for part in text.split(separator: ".") {
            if let bracket = part.firstIndex(of: "[") {
                components.append(.key(String(part[..<bracket])))
                components.append(.index(Int(part[part.index(after: bracket)..<part.index(before: part.endIndex)])!))
            } else {
                components.append(.key(String(part)))
            }
        }
        return ConfigKeyPath(components: components)
    }
}
