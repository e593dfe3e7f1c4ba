import Foundation
@testable import ISCSIBackend
import Testing

@Suite struct ISCSIURLTests {
    @Test func parsesFullURL() throws {
        let u = try ISCSIURL.parse("iscsi://alice@10.0.0.5:3261/iqn.2026-11.com.example:disk1/3")
        #expect(u.host == "10.0.0.5")
        #expect(u.port == 3261)
        #expect(u.targetName == "iqn.2026-11.com.example:disk1")
        #expect(u.lun == 3)
        #expect(u.user == "alice")
        #expect(u.portal == "10.0.0.5:3261")
    }

    @Test func defaultsPortAndHandlesIPv6() throws {
        let u = try ISCSIURL.parse("iscsi://[fd00::1]/iqn.2001-04.com.example:storage/0")
        #expect(u.host == "fd00::1")
        #expect(u.port == 3260)
        #expect(u.portal == "[fd00::1]:3260")
        #expect(u.description == "iscsi://[fd00::1]:3260/iqn.2001-04.com.example:storage/0")
    }

    func rejection(_ url: String) -> ISCSIConfigError? {
        do {
            _ = try ISCSIURL.parse(url)
            return nil
        } catch {
            return error
        }
    }

    @Test(arguments: [
        ("http://host/iqn.2026-11.a.b/0", "must start with \"iscsi://\""),
        ("iscsi://host", "no target name and LUN"),
        ("iscsi://host/iqn.2026-11.a.b", "no LUN"),
        ("iscsi://host:0/iqn.2026-11.a.b/0", "invalid port \"0\""),
        ("iscsi://host:99999/iqn.2026-11.a.b/0", "invalid port \"99999\""),
        ("iscsi://host/iqn.2026-11.a.b/x", "invalid LUN \"x\""),
        ("iscsi://host/iqn.2026-11.a.b/16384", "invalid LUN \"16384\""),
        ("iscsi:///iqn.2026-11.a.b/0", "no host"),
        ("iscsi://host/iqn.bad/0", "not a valid iqn name"),
        ("iscsi://host/target/0", "must start with iqn., eui. or naa."),
        ("iscsi://host//0", "empty target name"),
        ("iscsi://user%secret@host/iqn.2026-11.a.b/0", "password in the URL is not allowed"),
        ("iscsi://ho st/iqn.2026-11.a.b/0", "white space"),
        ("iscsi://[fd00::1/iqn.2026-11.a.b/0", "unterminated IPv6"),
        ("iscsi://host/eui.123/0", "not a valid eui name"),
    ])
    func rejectsBadURL(url: String, expected: String) {
        let error = rejection(url)
        #expect(error?.key == "url")
        #expect(error?.message.contains(expected) == true, "\(url): \(String(describing: error))")
    }

    @Test func passwordNeverEchoed() {
        let error = rejection("iscsi://bob%topsecret@host/iqn.2026-11.a.b/0")
        #expect(error != nil)
        #expect(error?.description.contains("topsecret") == false)
    }
}

@Suite struct ISCSIBackendConfigTests {
    let url = "iscsi://127.0.0.1/iqn.2026-11.test.scsigate:t/1"
    let initiator = "iqn.2026-11.test.scsigate:initiator"

    func error(_ make: () throws(ISCSIConfigError) -> ISCSIBackendConfig) -> ISCSIConfigError? {
        do {
            _ = try make()
            return nil
        } catch {
            return error
        }
    }

    @Test func defaults() throws {
        let c = try ISCSIBackendConfig(url: url, initiatorName: initiator)
        #expect(c.timeoutSeconds == 30)
        #expect(c.headerDigest == .none)
        #expect(c.chapUser == nil)
        #expect(c.reconnectBackoff.delay(afterFailures: 0) == 100)
        #expect(c.reconnectBackoff.delay(afterFailures: 3) == 800)
        #expect(c.reconnectBackoff.delay(afterFailures: 30) == 2000)
    }

    @Test func rejectsBadValuesNamingTheKey() {
        #expect(error { () throws(ISCSIConfigError) in try ISCSIBackendConfig(url: url, initiatorName: "initiator") }?.key == "initiator_name")
        #expect(error { () throws(ISCSIConfigError) in try ISCSIBackendConfig(url: url, initiatorName: initiator, headerDigest: "md5") }?.key == "header_digest")
        #expect(error { () throws(ISCSIConfigError) in try ISCSIBackendConfig(url: url, initiatorName: initiator, timeoutSeconds: 0) }?.key == "timeout")
        #expect(error { () throws(ISCSIConfigError) in
            try ISCSIBackendConfig(url: url, initiatorName: initiator,
                                   reconnectBackoff: ISCSIReconnectBackoff(initialMilliseconds: 500, maximumMilliseconds: 100))
        }?.key == "reconnect_max_ms")
        let noSecret = error { () throws(ISCSIConfigError) in try ISCSIBackendConfig(url: url, initiatorName: initiator, chapUser: "alice") }
        #expect(noSecret?.key == "chap_secret_file")
        #expect(noSecret?.message.contains("neither chap_secret_file nor chap_secret_env") == true)
        let noUser = error { () throws(ISCSIConfigError) in
            try ISCSIBackendConfig(url: url, initiatorName: initiator, chapSecretSource: .environment("HOME"))
        }
        #expect(noUser?.key == "chap_secret_env")
        let unset = error { () throws(ISCSIConfigError) in
            try ISCSIBackendConfig(url: url, initiatorName: initiator, chapUser: "alice",
                                   chapSecretSource: .environment("SCSIGATE_TEST_SURELY_UNSET_VARIABLE"))
        }
        #expect(unset?.message.contains("SCSIGATE_TEST_SURELY_UNSET_VARIABLE is not set") == true)
        let missingFile = error { () throws(ISCSIConfigError) in
            try ISCSIBackendConfig(url: url, initiatorName: initiator, chapUser: "alice", chapSecretSource: .file("/nonexistent/secret"))
        }
        #expect(missingFile?.key == "chap_secret_file")
        #expect(missingFile?.message.contains("cannot open /nonexistent/secret") == true)
    }

    @Test func readsSecretFromFileWithoutTrailingNewline() throws {
        let path = NSTemporaryDirectory() + "scsigate-chap-\(getpid())"
        try "s3cret-value-12\n".write(toFile: path, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: path) }
        let c = try ISCSIBackendConfig(url: "iscsi://alice@127.0.0.1/iqn.2026-11.test.scsigate:t/1",
                                       initiatorName: initiator, chapSecretSource: .file(path))
        #expect(c.chapUser == "alice")
        #expect(c.chapSecret?.value == "s3cret-value-12")
        #expect(c.url.description.contains("s3cret") == false)
        // Printing or dumping the whole config never reveals the secret.
        var dumped = ""
        dump(c, to: &dumped)
        #expect(!"\(c)".contains("s3cret"))
        #expect(!String(reflecting: c).contains("s3cret"))
        #expect(!dumped.contains("s3cret"))
        #expect("\(c)".contains("<redacted>"))
    }
}

@Suite struct ISCSIRemoteSenseTests {
    @Test func mapsSenseToErrno() {
        #expect(ISCSIRemoteSense(status: 2, key: 0x03, asc: 0x11, ascq: 0).errno == EIO)
        #expect(ISCSIRemoteSense(status: 2, key: 0x05, asc: 0x21, ascq: 0).errno == EINVAL)
        #expect(ISCSIRemoteSense(status: 2, key: 0x05, asc: 0x20, ascq: 0).errno == EOPNOTSUPP)
        #expect(ISCSIRemoteSense(status: 2, key: 0x07, asc: 0x27, ascq: 0).errno == EROFS)
        #expect(ISCSIRemoteSense(status: 2, key: 0x07, asc: 0x27, ascq: 7).errno == ENOSPC)
        #expect(ISCSIRemoteSense(status: 2, key: 0x02, asc: 0x04, ascq: 1).errno == EAGAIN)
        #expect(ISCSIRemoteSense(status: 0x18).errno == EBADE)
        #expect(ISCSIRemoteSense(status: 0x08).errno == EBUSY)
        #expect(ISCSIRemoteSense(status: 2, key: 0x0e, asc: 0x1d, ascq: 0).errno == EILSEQ)
    }
}
