import Testing
@testable import Gateway

@Suite("Config errors: file, line, key and message")
struct ConfigErrorTests {
    @Test("a TOML syntax error carries its line")
    func syntaxError() {
        let errors = configErrors("""
            [gateway]
            state_dir = "/x"
            log_level = = "info"
            """)
        #expect(errors.count == 1)
        #expect(errors.first?.line == 3)
        #expect(errors.first?.keyPath == nil)
        #expect(errors.first?.description.hasPrefix("test.toml:3: TOML syntax error: ") == true)
    }

    @Test("an unknown key names its path and suggests the close one")
    func unknownKeySuggestion() {
        #expect(configMessages(oneLUN("lun = 0\nbackend = \"null\"\nsize = 4096\nblock_sise = 512")) == [
            "test.toml:13: key 'controller[0].lun[0].block_sise': unknown key (did you mean 'block_size'?)",
        ])
    }

    @Test("an unknown key far from every allowed key lists the allowed ones")
    func unknownKeyList() {
        #expect(configMessages("""
            [gateway]
            colour = "blue"
            [[controller]]
            name = "c"
            transport = "vhost-user-scsi"
            socket = "/s"
            """) == [
            "test.toml:2: key 'gateway.colour': unknown key; allowed keys here: state_dir, control_socket, log_level, stats_listen, socket_mode, socket_group",
        ])
    }

    @Test("a CHAP secret written in the config is refused with a pointer to the safe keys")
    func chapSecretInline() {
        let messages = configMessages(oneLUN("""
            lun = 0
            backend = "iscsi"
            url = "iscsi://h/iqn.2026-01.com.example:t/0"
            chap_user = "u"
            chap_secret = "hunter2"
            """))
        #expect(messages.contains(
            "test.toml:14: key 'controller[0].lun[0].chap_secret': unknown key; the secret never goes in the config: use chap_secret_file or chap_secret_env"))
    }

    @Test("wrong types are named", arguments: [
        ("queues = \"2\"", "key 'controller[0].queues': expected an integer, found a string"),
        ("queues = 2.5", "key 'controller[0].queues': expected an integer, found a floating-point number"),
        ("hotplug = \"yes\"", "key 'controller[0].hotplug': expected a boolean (true or false), found a string"),
        ("socket_mode = true", "key 'controller[0].socket_mode': expected a string, found a boolean"),
    ])
    func wrongType(line: String, message: String) {
        let text = """
            [[controller]]
            name = "c"
            transport = "vhost-user-scsi"
            socket = "/s"
            \(line)
            """
        #expect(configMessages(text) == ["test.toml:5: \(message)"])
    }

    @Test("a LUN size that is neither integer nor string")
    func sizeWrongType() {
        #expect(configMessages(oneLUN("lun = 0\nbackend = \"null\"\nsize = [1]")) == [
            "test.toml:12: key 'controller[0].lun[0].size': expected a size (integer bytes or a string such as \"10GiB\"), found an array",
        ])
    }

    @Test("[gateway] must be a table and controller an array of tables")
    func structuralTypes() {
        #expect(configMessages("gateway = 1\ncontroller = 2") == [
            "test.toml:1: key 'gateway': expected a table, found an integer",
            "test.toml:2: key 'controller': expected an array of tables ([[controller]]), found an integer",
        ])
    }

    @Test("missing required keys are reported at their table's header")
    func missingRequired() {
        let messages = configMessages("""
            [gateway]
            state_dir = "/x"

            [[controller]]
            queues = 1

            [[controller.lun]]
            size = "1G"
            """)
        #expect(messages == [
            "test.toml:4: key 'controller[0].name': required key is missing",
            "test.toml:4: key 'controller[0].transport': required key is missing",
            "test.toml:4: key 'controller[0].socket': required key is missing",
            "test.toml:7: key 'controller[0].lun[0].lun': required key is missing",
            "test.toml:7: key 'controller[0].lun[0].backend': required key is missing",
        ])
    }

    @Test("backend-specific required keys", arguments: [
        ("backend = \"file\"", "key 'controller[0].lun[0].path': required key is missing"),
        ("backend = \"block\"", "key 'controller[0].lun[0].path': required key is missing"),
        ("backend = \"iscsi\"", "key 'controller[0].lun[0].url': required key is missing"),
        ("backend = \"null\"", "key 'controller[0].lun[0].size': required for backend 'null'"),
        ("backend = \"file\"\npath = \"a\"\ncreate = true", "key 'controller[0].lun[0].size': required when create = true (the size of the new file)"),
    ])
    func backendRequired(body: String, message: String) {
        #expect(configMessages(oneLUN("lun = 0\n" + body)) == ["test.toml:9: \(message)"])
    }

    @Test("no controller at all")
    func noController() {
        #expect(configMessages("[gateway]\nlog_level = \"debug\"") == [
            "test.toml:1: key 'controller': at least one [[controller]] is required",
        ])
    }

    @Test("block_size must be 512 or 4096")
    func blockSize() {
        #expect(configMessages(oneLUN("lun = 0\nbackend = \"null\"\nsize = \"1M\"\nblock_size = 1024")) == [
            "test.toml:13: key 'controller[0].lun[0].block_size': must be 512 or 4096, found 1024",
        ])
    }

    @Test("physical_block_size must be a power of two from block_size up to 65536, and not for iscsi")
    func physicalBlockSize() {
        #expect(configMessages(oneLUN("lun = 0\nbackend = \"null\"\nsize = \"1M\"\nblock_size = 4096\nphysical_block_size = 512")) == [
            "test.toml:14: key 'controller[0].lun[0].physical_block_size': must be a power of two from block_size (4096) up to 65536, found 512",
        ])
        #expect(configMessages(oneLUN("lun = 0\nbackend = \"null\"\nsize = \"1M\"\nphysical_block_size = 3072")) == [
            "test.toml:13: key 'controller[0].lun[0].physical_block_size': must be a power of two from block_size (512) up to 65536, found 3072",
        ])
        #expect(configMessages(oneLUN("lun = 0\nbackend = \"null\"\nsize = \"1M\"\nphysical_block_size = 4096")) == [])
    }

    @Test("the exact message of the brief for the second LUN of a controller")
    func blockSizeSecondLUN() {
        let text = oneLUN("lun = 0\nbackend = \"null\"\nsize = 4096") + "\n\n[[controller.lun]]\nlun = 1\nbackend = \"null\"\nsize = 4096\nblock_size = 520"
        let errors = configErrors(text)
        #expect(errors.map(\.description) == [
            "test.toml:18: key 'controller[0].lun[1].block_size': must be 512 or 4096, found 520",
        ])
        #expect(errors.first?.keyPath == "controller[0].lun[1].block_size")
        #expect(errors.first?.file == "test.toml")
    }

    @Test("size not a multiple of the block size")
    func sizeMultiple() {
        #expect(configMessages(oneLUN("lun = 0\nbackend = \"null\"\nsize = \"1000001\"")) == [
            "test.toml:12: key 'controller[0].lun[0].size': 1000001 bytes is not a multiple of block_size 512",
        ])
        #expect(configMessages(oneLUN("lun = 0\nbackend = \"null\"\nsize = \"6K\"\nblock_size = 4096")) == [
            "test.toml:12: key 'controller[0].lun[0].size': 6144 bytes is not a multiple of block_size 4096",
        ])
    }

    @Test("bad size strings")
    func badSizes() {
        #expect(configMessages(oneLUN("lun = 0\nbackend = \"null\"\nsize = \"ten gigs\"")) == [
            "test.toml:12: key 'controller[0].lun[0].size': 'ten gigs' is not a size: write bytes as an integer, or a number with a unit (K, M, G, T, KiB, MiB, GiB, TiB, KB, MB, GB, TB), e.g. \"10GiB\"",
        ])
        #expect(configMessages(oneLUN("lun = 0\nbackend = \"null\"\nsize = 0")) == [
            "test.toml:12: key 'controller[0].lun[0].size': must be greater than 0, found 0",
        ])
        #expect(configMessages(oneLUN("lun = 0\nbackend = \"null\"\nsize = \"99999999P\"")) == [
            "test.toml:12: key 'controller[0].lun[0].size': '99999999P' is too large",
        ])
    }

    @Test("LUN and target addresses per transport", arguments: [
        ("vhost-user-scsi", "lun = 16384", "key 'controller[0].lun[0].lun': must be between 0 and 16383, found 16384"),
        ("vhost-user-scsi", "lun = -1", "key 'controller[0].lun[0].lun': must be between 0 and 16383, found -1"),
        ("vhost-user-scsi", "target = 1\nlun = 0", "key 'controller[0].lun[0].target': must be 0: the virtio-scsi front-end serves target 0; give each disk its own lun, found 1"),
        ("pvscsi", "target = 16", "key 'controller[0].lun[0].target': must be between 0 and 15, found 16"),
        ("pvscsi", "lun = 0", "key 'controller[0].lun[0].target': required key is missing"),
        ("pvscsi", "target = 0\nlun = 1", "key 'controller[0].lun[0].lun': must be 0: guests address LUN 0 of each PVSCSI target; give each disk its own target, found 1"),
        ("vhost-user-blk", "lun = 1", "key 'controller[0].lun[0].lun': must be 0: a vhost-user-blk controller is one disk, found 1"),
        ("vhost-user-blk", "target = 2\nlun = 0", "key 'controller[0].lun[0].target': must be 0: a vhost-user-blk controller is one disk, found 2"),
        ("vfio-user-virtio-scsi", "lun = 16384", "key 'controller[0].lun[0].lun': must be between 0 and 16383, found 16384"),
        ("vfio-user-virtio-scsi", "target = 1\nlun = 0", "key 'controller[0].lun[0].target': must be 0: the virtio-scsi front-end serves target 0; give each disk its own lun, found 1"),
        ("vfio-user-virtio-blk", "lun = 1", "key 'controller[0].lun[0].lun': must be 0: a vfio-user-virtio-blk controller is one disk, found 1"),
    ])
    func ranges(transport: String, address: String, message: String) {
        let messages = configMessages(oneLUN(address + "\nbackend = \"null\"\nsize = 4096", transport: transport))
        #expect(messages.count == 1)
        #expect(messages.first?.hasSuffix(message) == true, "\(messages)")
        // The key's own line, or the [[controller.lun]] header (line 9) when the key is missing.
        let errors = configErrors(oneLUN(address + "\nbackend = \"null\"\nsize = 4096", transport: transport))
        let key = String(message.dropFirst("key 'controller[0].lun[0].".count).prefix { $0 != "'" })
        let keyLine = address.split(separator: "\n").firstIndex { $0.hasPrefix(key + " ") }.map { 10 + $0 } ?? 9
        #expect(errors.first?.line == keyLine)
    }

    @Test("bad transport and backend names list the valid ones")
    func badNames() {
        #expect(configMessages(oneLUN("lun = 0\nbackend = \"nbd\"", transport: "virtio-scsi")) == [
            "test.toml:6: key 'controller[0].transport': 'virtio-scsi' is not valid; expected 'vhost-user-scsi', 'vhost-user-blk', 'pvscsi', 'vfio-user-virtio-scsi' or 'vfio-user-virtio-blk'",
            "test.toml:11: key 'controller[0].lun[0].backend': 'nbd' is not valid; expected 'file', 'block', 'iscsi' or 'null'",
        ])
        #expect(configMessages(oneLUN("lun = 0\nbackend = \"null\"\nsize = 512\ncache = \"unsafe\"")).isEmpty == false)
    }

    @Test("a vhost-user-blk controller needs exactly one LUN")
    func blkLUNCount() {
        let two = oneLUN("backend = \"null\"\nsize = 4096", transport: "vhost-user-blk")
            + "\n[[controller.lun]]\nbackend = \"null\"\nsize = 8192"
        #expect(configMessages(two) == [
            "test.toml:9: key 'controller[0].lun': a vhost-user-blk controller serves exactly one LUN, found 2",
            "test.toml:12: key 'controller[0].lun[1].lun': duplicate target 0 LUN 0 in this controller (first at line 9)",
        ])
        let none = """
            [[controller]]
            name = "b"
            transport = "vhost-user-blk"
            socket = "/b"
            """
        #expect(configMessages(none) == [
            "test.toml:1: key 'controller[0].lun': a vhost-user-blk controller serves exactly one LUN, found 0",
        ])
    }

    @Test("duplicates: controller names, sockets, addresses, backing paths")
    func duplicates() {
        let text = """
            [[controller]]
            name = "a"
            transport = "vhost-user-scsi"
            socket = "/run/sg/a.sock"
            [[controller.lun]]
            lun = 0
            backend = "file"
            path = "/d/x.img"
            [[controller.lun]]
            target = 0
            lun = 0
            backend = "file"
            path = "/d/y.img"

            [[controller]]
            name = "a"
            transport = "pvscsi"
            socket = "/run/sg/a.sock"
            [[controller.lun]]
            target = 0
            backend = "block"
            path = "/d/x.img"
            """
        #expect(configMessages(text) == [
            "test.toml:11: key 'controller[0].lun[1].lun': duplicate target 0 LUN 0 in this controller (first at line 5)",
            "test.toml:16: key 'controller[1].name': duplicate controller name 'a' (first at line 2)",
            "test.toml:18: key 'controller[1].socket': socket path '/run/sg/a.sock' is already used (line 4)",
            "test.toml:22: key 'controller[1].lun[0].path': '/d/x.img' already backs another LUN (line 8)",
        ])
    }

    @Test("a controller socket may not be the control socket")
    func socketClashesWithControl() {
        #expect(configMessages("""
            [gateway]
            control_socket = "/run/scsigate/x.sock"
            [[controller]]
            name = "c"
            transport = "vhost-user-scsi"
            socket = "x.sock"
            """) == ["test.toml:6: key 'controller[0].socket': socket path '/run/scsigate/x.sock' is already used (line 2)"])
    }

    @Test("socket paths longer than sun_path allows")
    func longSocket() {
        let long = "/" + String(repeating: "s", count: 107)
        #expect(configMessages("""
            [[controller]]
            name = "c"
            transport = "vhost-user-scsi"
            socket = "\(long)"
            """) == ["test.toml:4: key 'controller[0].socket': socket path is 108 bytes; UNIX sockets allow at most 107"])
    }

    @Test("transport-specific keys on the wrong transport")
    func transportSpecific() {
        #expect(configMessages("""
            [[controller]]
            name = "p"
            transport = "pvscsi"
            socket = "/p"
            queues = 2
            queue_size = 64
            discard = false
            """) == [
            "test.toml:5: key 'controller[0].queues': not used by transport pvscsi (the guest driver sizes its one request ring)",
            "test.toml:6: key 'controller[0].queue_size': not used by transport pvscsi (the guest driver sizes its rings)",
            "test.toml:7: key 'controller[0].discard': only for transports vhost-user-blk and vfio-user-virtio-blk (SCSI guests use UNMAP)",
        ])
        #expect(configMessages("""
            [[controller]]
            name = "v"
            transport = "vhost-user-scsi"
            socket = "/v"
            queue_size = 100
            queues = 65
            """) == [
            "test.toml:5: key 'controller[0].queue_size': must be a power of two, found 100",
            "test.toml:6: key 'controller[0].queues': must be between 1 and 64, found 65",
        ])
        #expect(configMessages("""
            [[controller]]
            name = "v"
            transport = "vhost-user-blk"
            socket = "/v"
            queues = 2
            io_threads = 3
            max_targets = 8
            [[controller.lun]]
            backend = "null"
            size = 512
            """) == [
            "test.toml:6: key 'controller[0].io_threads': must not exceed queues (2), found 3",
            "test.toml:7: key 'controller[0].max_targets': only for transport pvscsi",
        ])
        #expect(configMessages("""
            [[controller]]
            name = "p"
            transport = "pvscsi"
            socket = "/p"
            io_threads = 2
            max_targets = 65
            """) == [
            "test.toml:5: key 'controller[0].io_threads': not used by transport pvscsi (one event-loop thread per adapter)",
            "test.toml:6: key 'controller[0].max_targets': must be between 1 and 64, found 65",
        ])
    }

    @Test("virtio over vfio-user: the keys and rules of the vhost-user transport of the same device")
    func vfioUserVirtioKeys() throws {
        #expect(configMessages("""
            [[controller]]
            name = "vs"
            transport = "vfio-user-virtio-scsi"
            socket = "/vs"
            queues = 2
            io_threads = 3
            max_targets = 8
            discard = false
            write_zeroes = true
            """) == [
            "test.toml:6: key 'controller[0].io_threads': must not exceed queues (2), found 3",
            "test.toml:7: key 'controller[0].max_targets': only for transport pvscsi",
            "test.toml:8: key 'controller[0].discard': only for transports vhost-user-blk and vfio-user-virtio-blk (SCSI guests use UNMAP)",
            "test.toml:9: key 'controller[0].write_zeroes': only for transports vhost-user-blk and vfio-user-virtio-blk (SCSI guests use WRITE SAME)",
        ])
        let two = """
            [[controller]]
            name = "vb"
            transport = "vfio-user-virtio-blk"
            socket = "/vb"
            hotplug = true
            queue_size = 100
            [[controller.lun]]
            backend = "null"
            size = 4096
            serial = "123456789012345678901"
            [[controller.lun]]
            backend = "null"
            size = 4096
            """
        #expect(configMessages(two) == [
            "test.toml:5: key 'controller[0].hotplug': not used by transport vfio-user-virtio-blk (one fixed disk; resize still reaches the guest)",
            "test.toml:6: key 'controller[0].queue_size': must be a power of two, found 100",
            "test.toml:7: key 'controller[0].lun': a vfio-user-virtio-blk controller serves exactly one LUN, found 2",
            "test.toml:10: key 'controller[0].lun[0].serial': at most 20 characters for vfio-user-virtio-blk (virtio-blk GET_ID), found 21",
            "test.toml:11: key 'controller[0].lun[1].lun': duplicate target 0 LUN 0 in this controller (first at line 7)",
        ])
        // Valid: every virtio key, socket ownership; the values reach the model.
        let config = try ConfigLoader.parse("""
            [[controller]]
            name = "vs"
            transport = "vfio-user-virtio-scsi"
            socket = "/run/sg/vs.sock"
            socket_mode = "0660"
            queues = 4
            queue_size = 256
            seg_max = 64
            io_threads = 2
            poll_us = 0
            hotplug = false
            [[controller.lun]]
            lun = 2
            backend = "null"
            size = 4096
            [[controller]]
            name = "vb"
            transport = "vfio-user-virtio-blk"
            socket = "/run/sg/vb.sock"
            discard = false
            [[controller.lun]]
            backend = "null"
            size = 4096
            serial = "SGVB"
            """, source: "test.toml")
        let vs = try #require(config.controllers.first)
        #expect(vs.transport == .vfioUserVirtioSCSI && vs.socketMode == 0o660 && vs.queues == 4 && vs.queueSize == 256
                && vs.segmentMax == 64 && vs.ioThreads == 2 && vs.pollMicroseconds == 0 && !vs.hotplug && vs.luns.first?.lun == 2)
        let vb = try #require(config.controllers.last)
        #expect(vb.transport == .vfioUserVirtioBlk && !vb.discard && vb.writeZeroes && vb.luns.first?.serial == "SGVB")
        #expect(vb.transport.coreLUN(target: 0, lun: 0) == 0 && vs.transport.coreLUN(target: 0, lun: 2) == 2)
    }

    @Test("backend-specific keys on the wrong backend")
    func backendSpecific() {
        #expect(configMessages(oneLUN("lun = 0\nbackend = \"block\"\npath = \"/dev/sdz\"\ncreate = true\nsize = 4096")) == [
            "test.toml:13: key 'controller[0].lun[0].create': a block device cannot be created; remove 'create'",
            "test.toml:14: key 'controller[0].lun[0].size': a block device's size comes from the device; remove 'size'",
        ])
        #expect(configMessages(oneLUN("""
            lun = 0
            backend = "iscsi"
            url = "iscsi://h/iqn.2026-01.com.example:t/0"
            block_size = 4096
            path = "/x"
            """)) == [
            "test.toml:13: key 'controller[0].lun[0].block_size': not used by backend 'iscsi' (the remote LUN decides)",
            "test.toml:14: key 'controller[0].lun[0].path': not used by backend 'iscsi' (the remote LUN decides)",
        ])
        #expect(configMessages(oneLUN("lun = 0\nbackend = \"file\"\npath = \"/x\"\ntimeout = 5")) == [
            "test.toml:13: key 'controller[0].lun[0].timeout': only for backend 'iscsi'",
        ])
    }

    @Test("bad iSCSI URLs are rejected with the reason", arguments: [
        ("http://h/iqn.2026-01.com.example:t/0", "'http://h/iqn.2026-01.com.example:t/0' does not start with iscsi:// (expected iscsi://host[:port]/iqn.yyyy-mm.domain:name/lun)"),
        ("iscsi://h/iqn.2026-01.com.example:t", "'iscsi://h/iqn.2026-01.com.example:t' must have a host, a target name and a LUN (expected iscsi://host[:port]/iqn.yyyy-mm.domain:name/lun)"),
        ("iscsi://h:99999/iqn.2026-01.com.example:t/0", "port '99999' must be a number between 1 and 65535"),
        ("iscsi://h/iqn.2026-01.com.example:t/x", "LUN 'x' must be a number between 0 and 16383"),
        ("iscsi://h/target1/0", "target name 'target1' is not an iSCSI name: expected iqn.yyyy-mm.reversed.domain[:identifier], eui.<16 hex> or naa.<hex>"),
        ("iscsi://h/iqn.20xx-01.com.example:t/0", "target name 'iqn.20xx-01.com.example:t' is not an iSCSI name: expected iqn.yyyy-mm.reversed.domain[:identifier]"),
        ("iscsi://user%pw@h/iqn.2026-01.com.example:t/0", "credentials do not belong in the URL; use chap_user with chap_secret_file or chap_secret_env"),
        ("iscsi:///iqn.2026-01.com.example:t/0", "missing host in 'iscsi:///iqn.2026-01.com.example:t/0' (expected iscsi://host[:port]/iqn.yyyy-mm.domain:name/lun)"),
        ("iscsi://[::1/iqn.2026-01.com.example:t/0", "missing ']' after the IPv6 address in 'iscsi://[::1/iqn.2026-01.com.example:t/0'"),
    ])
    func badURL(url: String, message: String) {
        #expect(configMessages(oneLUN("lun = 0\nbackend = \"iscsi\"\nurl = \"\(url)\"")) == [
            "test.toml:12: key 'controller[0].lun[0].url': \(message)",
        ])
    }

    @Test("CHAP settings must come as a user with exactly one secret source")
    func chapRules() {
        let base = "lun = 0\nbackend = \"iscsi\"\nurl = \"iscsi://h/iqn.2026-01.com.example:t/0\"\n"
        #expect(configMessages(oneLUN(base + "chap_user = \"u\"")) == [
            "test.toml:13: key 'controller[0].lun[0].chap_user': chap_user needs chap_secret_file or chap_secret_env",
        ])
        #expect(configMessages(oneLUN(base + "chap_secret_env = \"S\"")) == [
            "test.toml:13: key 'controller[0].lun[0].chap_secret_env': a CHAP secret needs chap_user",
        ])
        #expect(configMessages(oneLUN(base + "chap_user = \"u\"\nchap_secret_file = \"/s\"\nchap_secret_env = \"S\"")) == [
            "test.toml:15: key 'controller[0].lun[0].chap_secret_env': give either chap_secret_file or chap_secret_env, not both",
        ])
        #expect(configMessages(oneLUN(base + "chap_user = \"u\"\nchap_secret_env = \"1BAD\"")) == [
            "test.toml:14: key 'controller[0].lun[0].chap_secret_env': '1BAD' is not an environment variable name (letters, digits, '_', not starting with a digit)",
        ])
        #expect(configMessages(oneLUN(base + "header_digest = \"md5\"\ntimeout = 0\ndata_digest = \"crc32c\"")) == [
            "test.toml:13: key 'controller[0].lun[0].header_digest': 'md5' is not valid; expected 'none' or 'crc32c'",
            "test.toml:14: key 'controller[0].lun[0].timeout': must be between 1 and 3600, found 0",
            "test.toml:15: key 'controller[0].lun[0].data_digest': 'crc32c' is not supported: libiscsi negotiates no data digest, only 'none'",
        ])
        #expect(configMessages(oneLUN(base + "reconnect_min_ms = 500\nreconnect_max_ms = 100")) == [
            "test.toml:14: key 'controller[0].lun[0].reconnect_max_ms': must not be below reconnect_min_ms (500), found 100",
        ])
        #expect(configMessages(oneLUN(base + "initiator_name = \"me\"")) == [
            "test.toml:13: key 'controller[0].lun[0].initiator_name': initiator name 'me' is not an iSCSI name: expected iqn.yyyy-mm.reversed.domain[:identifier], eui.<16 hex> or naa.<hex>",
        ])
    }

    @Test("identity strings: serial, wwn, vendor, product")
    func identityFields() {
        let base = "lun = 0\nbackend = \"null\"\nsize = 4096\n"
        #expect(configMessages(oneLUN(base + "wwn = \"6001405abcdef012\"")) == [
            "test.toml:13: key 'controller[0].lun[0].wwn': '6001405abcdef012' has NAA type 6; 8-byte identifiers use NAA 2, 3 or 5",
        ])
        #expect(configMessages(oneLUN(base + "wwn = \"5001405\"")) == [
            "test.toml:13: key 'controller[0].lun[0].wwn': '5001405' must be 16 hex digits of an 8-byte NAA identifier, e.g. \"5002538c40000001\"",
        ])
        #expect(configMessages(oneLUN(base + "vendor = \"TOO-LONG-VENDOR\"\nproduct = \"é\"")) == [
            "test.toml:13: key 'controller[0].lun[0].vendor': at most 8 characters (INQUIRY field), found 15",
            "test.toml:14: key 'controller[0].lun[0].product': must be printable ASCII",
        ])
        #expect(configMessages(oneLUN("backend = \"null\"\nsize = 4096\nserial = \"123456789012345678901\"",
                                      transport: "vhost-user-blk")) == [
            "test.toml:12: key 'controller[0].lun[0].serial': at most 20 characters for vhost-user-blk (virtio-blk GET_ID), found 21",
        ])
    }

    @Test("duplicate serials and WWNs across controllers")
    func duplicateIdentity() {
        let text = """
            [[controller]]
            name = "a"
            transport = "vhost-user-scsi"
            socket = "/a"
            [[controller.lun]]
            lun = 0
            backend = "null"
            size = 4096
            serial = "S1"
            wwn = "0x5000000000000001"
            [[controller]]
            name = "b"
            transport = "vhost-user-scsi"
            socket = "/b"
            [[controller.lun]]
            lun = 0
            backend = "null"
            size = 4096
            serial = "S1"
            wwn = "naa.5000000000000001"
            """
        #expect(configMessages(text) == [
            "test.toml:19: key 'controller[1].lun[0].serial': serial 'S1' is already used (line 9)",
            "test.toml:20: key 'controller[1].lun[0].wwn': wwn is already used (line 10)",
        ])
    }

    @Test("gateway settings are checked")
    func gatewaySettings() {
        #expect(configMessages("""
            [gateway]
            state_dir = "relative/dir"
            log_level = "verbose"
            stats_listen = "9100"
            [[controller]]
            name = "bad name"
            transport = "vhost-user-scsi"
            socket = "/a"
            socket_mode = "0999"
            """) == [
            "test.toml:2: key 'gateway.state_dir': must be an absolute path, found 'relative/dir'",
            "test.toml:3: key 'gateway.log_level': 'verbose' is not valid; expected 'trace', 'debug', 'info', 'notice', 'warning', 'error' or 'critical'",
            "test.toml:4: key 'gateway.stats_listen': expected host:port, e.g. \"127.0.0.1:9100\"",
            "test.toml:6: key 'controller[0].name': 'bad name' must be 1 to 32 letters, digits, '-', '_' or '.'",
            "test.toml:9: key 'controller[0].socket_mode': must be permission bits such as 0o660 (integer) or \"0660\" (octal string), found '0999'",
        ])
    }

    @Test("a top-level [[lun]] is pointed to [[controller.lun]]")
    func topLevelLUN() {
        let messages = configMessages("""
            [[controller]]
            name = "c"
            transport = "vhost-user-scsi"
            socket = "/a"
            [[lun]]
            lun = 0
            """)
        #expect(messages == ["test.toml:5: key 'lun': unknown key; LUNs go in [[controller.lun]] tables after their [[controller]]"])
    }

    @Test("every error of a file is reported, in line order")
    func manyErrors() {
        let errors = configErrors("""
            [[controller]]
            name = "c"
            transport = "vhost-user-scsi"
            socket = "/a"
            [[controller.lun]]
            lun = 99999
            backend = "null"
            size = 4096
            block_size = 1
            [[controller.lun]]
            lun = 1
            backend = "file"
            """)
        #expect(errors.map(\.line) == [6, 9, 10])
        #expect(errors.map(\.keyPath) == ["controller[0].lun[0].lun", "controller[0].lun[0].block_size", "controller[0].lun[1].path"])
    }

    @Test("an unreadable file is named without a line")
    func missingFile() {
        do {
            _ = try ConfigLoader.load(file: "/nonexistent/scsigate.toml")
            Issue.record("loading a missing file succeeded")
        } catch {
            #expect(error.description == "/nonexistent/scsigate.toml: no such file")
        }
    }
}
