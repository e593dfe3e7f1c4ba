import Foundation
import Testing
@testable import Gateway

@Suite("lun.add parameters go through the config file's LUN rules")
struct AdminValidationTests {
    /// (the LUN table body in a config file, the same LUN as lun.add params).
    static let cases: [(String, [String: JSONValue])] = [
        ("lun = 20000\nbackend = \"null\"\nsize = \"1M\"", ["lun": 20000, "backend": "null", "size": "1M"]),
        ("lun = 1\nbackend = \"null\"\nsize = \"1M\"\nblock_size = 1000", ["lun": 1, "backend": "null", "size": "1M", "block_size": 1000]),
        ("lun = 1\nbackend = \"null\"\nsize = \"10 parsecs\"", ["lun": 1, "backend": "null", "size": "10 parsecs"]),
        ("lun = 1\nbackend = \"tape\"", ["lun": 1, "backend": "tape"]),
        ("lun = 1\nbackend = \"null\"\nsize = \"1M\"\nread_only = \"yes\"", ["lun": 1, "backend": "null", "size": "1M", "read_only": "yes"]),
        ("lun = 1\nbackend = \"null\"\nsize = 1.5", ["lun": 1, "backend": "null", "size": 1.5]),
        ("lun = 1\nbackend = \"file\"\npath = \"/x.img\"\ncache = \"fast\"", ["lun": 1, "backend": "file", "path": "/x.img", "cache": "fast"]),
        ("lun = 1\nbackend = \"null\"\nsise = \"1M\"\nsize = \"1M\"", ["lun": 1, "backend": "null", "sise": "1M", "size": "1M"]),
        ("lun = 1\nbackend = \"null\"\nsize = \"1M\"\nreadonly = true", ["lun": 1, "backend": "null", "size": "1M", "readonly": true]),
        ("target = 1\nlun = 1\nbackend = \"null\"\nsize = \"1M\"", ["target": 1, "lun": 1, "backend": "null", "size": "1M"]),
        ("lun = 1\nbackend = \"null\"", ["lun": 1, "backend": "null"]),
        ("lun = 1\nbackend = \"file\"\npath = \"/x.img\"\ncreate = true", ["lun": 1, "backend": "file", "path": "/x.img", "create": true]),
        ("lun = 1\nbackend = \"block\"\npath = \"/dev/x\"\nsize = \"1M\"", ["lun": 1, "backend": "block", "path": "/dev/x", "size": "1M"]),
        ("lun = 1\nbackend = \"null\"\nsize = \"1M\"\nserial = \"\(String(repeating: "s", count: 65))\"",
         ["lun": 1, "backend": "null", "size": "1M", "serial": .string(String(repeating: "s", count: 65))]),
        ("lun = 1\nbackend = \"null\"\nsize = \"1M\"\nwwn = \"xyz\"", ["lun": 1, "backend": "null", "size": "1M", "wwn": "xyz"]),
        ("lun = 1\nbackend = \"null\"\nsize = \"1M\"\nvendor = \"123456789\"", ["lun": 1, "backend": "null", "size": "1M", "vendor": "123456789"]),
        ("lun = 1\nbackend = \"file\"\npath = \"/x.img\"\nurl = \"iscsi://h/iqn.2026-01.org.x:t/0\"",
         ["lun": 1, "backend": "file", "path": "/x.img", "url": "iscsi://h/iqn.2026-01.org.x:t/0"]),
        ("lun = 1\nbackend = \"iscsi\"\nurl = \"http://h/x/0\"", ["lun": 1, "backend": "iscsi", "url": "http://h/x/0"]),
        ("lun = 1\nbackend = \"iscsi\"\nurl = \"iscsi://h/iqn.2026-01.org.x:t/0\"\nchap_user = \"u\"",
         ["lun": 1, "backend": "iscsi", "url": "iscsi://h/iqn.2026-01.org.x:t/0", "chap_user": "u"]),
        ("lun = 1\nbackend = \"null\"\nsize = \"1M\"\nlun_size = {}", ["lun": 1, "backend": "null", "size": "1M", "lun_size": [:]]),
        ("lun = \"one\"\nbackend = \"null\"\nsize = \"1M\"", ["lun": "one", "backend": "null", "size": "1M"]),
    ]

    @Test("each bad entry gives the config file's message for the same key", arguments: 0..<cases.count)
    func parity(index: Int) throws {
        let (body, params) = Self.cases[index]
        let fileErrors = configErrors(oneLUN(body))
        try #require(fileErrors.count == 1, "case \(index): \(fileErrors)")
        let fileError = fileErrors[0]
        let key = try #require(fileError.keyPath).replacingOccurrences(of: "controller[0].lun[0].", with: "")

        let f = try AdminFixture()
        var rpcParams = params
        rpcParams["controller"] = "scsi0"
        let refusal = try #require(f.refusal("lun.add", rpcParams))
        #expect(refusal.code == ControlErrorCode.invalidParams)
        #expect(refusal.message == "invalid params: '\(key)': \(fileError.message)")
        #expect(refusal.data?["field"] == .string(key))
    }
}
