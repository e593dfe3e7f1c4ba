/// A parsed `iscsi://[user@]host[:port]/target-iqn/lun` address of one remote LUN.
///
/// Passwords in the URL (`user%password@`) are refused: CHAP secrets come from a file or an
/// environment variable named in the config so that they never appear in config dumps or logs.
public struct ISCSIURL: Sendable, Equatable, CustomStringConvertible {
    /// Host name, IPv4 address, or IPv6 address (without brackets).
    public var host: String
    /// TCP port (3260 when the URL has none).
    public var port: UInt16
    /// Target name (iqn.…, eui.… or naa.…).
    public var targetName: String
    /// Logical unit number on the target.
    public var lun: Int32
    /// CHAP user name given in the URL, if any.
    public var user: String?

    /// The default iSCSI port.
    public static let defaultPort: UInt16 = 3260

    /// Creates a URL from its parts (no validation; use `parse` for text).
    public init(host: String, port: UInt16 = ISCSIURL.defaultPort, targetName: String, lun: Int32, user: String? = nil) {
        self.host = host
        self.port = port
        self.targetName = targetName
        self.lun = lun
        self.user = user
    }

    /// `host:port` as libiscsi expects it (IPv6 in brackets).
    public var portal: String {
        host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
    }

    /// The URL without secrets (safe to log).
    public var description: String {
        let userPart = user.map { "\($0)@" } ?? ""
        return "iscsi://\(userPart)\(portal)/\(targetName)/\(lun)"
    }

    /// Parses and validates `text`. Errors name what is wrong and show the expected syntax.
    public static func parse(_ text: String) throws(ISCSIConfigError) -> ISCSIURL {
        let syntax = "expected iscsi://[user@]host[:port]/target-iqn/lun"
        func fail(_ why: String) -> ISCSIConfigError {
            ISCSIConfigError(key: "url", message: "\(why) (\(syntax))")
        }
        let scheme = "iscsi://"
        guard text.hasPrefix(scheme) else {
            throw fail("URL must start with \"iscsi://\"")
        }
        var rest = Substring(text.dropFirst(scheme.count))
        guard !rest.contains(where: { $0 == " " || $0 == "\t" || $0 == "\n" }) else {
            throw fail("URL contains white space")
        }
        // Authority and path.
        guard let slash = rest.firstIndex(of: "/") else {
            throw fail("URL has no target name and LUN")
        }
        var authority = rest[rest.startIndex..<slash]
        rest = rest[rest.index(after: slash)...]

        var user: String?
        if let at = authority.lastIndex(of: "@") {
            let userInfo = authority[authority.startIndex..<at]
            authority = authority[authority.index(after: at)...]
            if userInfo.contains("%") || userInfo.contains(":") {
                throw ISCSIConfigError(key: "url",
                    message: "a password in the URL is not allowed; put the CHAP secret in chap_secret_file or chap_secret_env")
            }
            guard !userInfo.isEmpty else { throw fail("empty user name before \"@\"") }
            user = String(userInfo)
        }

        var host: Substring
        var portText: Substring?
        if authority.hasPrefix("[") {
            guard let close = authority.firstIndex(of: "]") else { throw fail("unterminated IPv6 address \"[\"") }
            host = authority[authority.index(after: authority.startIndex)..<close]
            let after = authority[authority.index(after: close)...]
            if !after.isEmpty {
                guard after.hasPrefix(":") else { throw fail("unexpected text after IPv6 address") }
                portText = after.dropFirst()
            }
        } else if let colon = authority.firstIndex(of: ":") {
            host = authority[authority.startIndex..<colon]
            portText = authority[authority.index(after: colon)...]
        } else {
            host = authority
        }
        guard !host.isEmpty else { throw fail("URL has no host") }
        for c in host.unicodeScalars {
            let ok = (c >= "a" && c <= "z") || (c >= "A" && c <= "Z") || (c >= "0" && c <= "9")
                || c == "." || c == "-" || c == ":" || c == "_"
            guard ok else { throw fail("invalid character \"\(c)\" in host \"\(host)\"") }
        }
        var port = defaultPort
        if let portText {
            guard let p = UInt16(portText), p > 0 else {
                throw fail("invalid port \"\(portText)\" (1...65535)")
            }
            port = p
        }

        // Path: target-iqn/lun
        guard let lunSlash = rest.lastIndex(of: "/") else {
            throw fail("URL has no LUN after the target name")
        }
        let target = rest[rest.startIndex..<lunSlash]
        let lunText = rest[rest.index(after: lunSlash)...]
        guard !target.isEmpty else { throw fail("URL has an empty target name") }
        guard !target.contains("/") else { throw fail("target name \"\(target)\" contains \"/\"") }
        try validateISCSIName(String(target), key: "url", what: "target name")
        guard let lun = Int32(lunText), lun >= 0, lun <= 16383 else {
            throw fail("invalid LUN \"\(lunText)\" (0...16383)")
        }
        return ISCSIURL(host: String(host), port: port, targetName: String(target), lun: lun, user: user)
    }
}

/// Checks the iSCSI name syntax (RFC 3720 3.2.6): `iqn.yyyy-mm.reversed.domain[:anything]`,
/// `eui.` + 16 hex digits, or `naa.` + 16 or 32 hex digits; at most 223 bytes.
func validateISCSIName(_ name: String, key: String, what: String) throws(ISCSIConfigError) {
    let lower = name.lowercased()
    guard name.utf8.count <= 223 else {
        throw ISCSIConfigError(key: key, message: "\(what) \"\(name)\" is longer than 223 bytes")
    }
    for c in lower.unicodeScalars {
        let ok = (c >= "a" && c <= "z") || (c >= "0" && c <= "9") || c == "." || c == "-" || c == ":"
        guard ok else {
            throw ISCSIConfigError(key: key, message: "\(what) \"\(name)\" contains \"\(c)\" (allowed: a-z 0-9 . - :)")
        }
    }
    func isHex(_ s: Substring) -> Bool { s.allSatisfy { $0.isHexDigit } }
    if lower.hasPrefix("iqn.") {
        // iqn.YYYY-MM.<reversed domain>...
        let body = lower.dropFirst(4)
        let parts = body.split(separator: ".", maxSplits: 1, omittingEmptySubsequences: false)
        let date = parts.first ?? ""
        let dateOK = date.count == 7 && date.dropFirst(4).first == "-"
            && date.prefix(4).allSatisfy(\.isNumber) && date.suffix(2).allSatisfy(\.isNumber)
        guard dateOK, parts.count == 2, !(parts[1].isEmpty) else {
            throw ISCSIConfigError(key: key,
                message: "\(what) \"\(name)\" is not a valid iqn name (iqn.YYYY-MM.reversed.domain[:id])")
        }
        return
    }
    if lower.hasPrefix("eui.") {
        let hex = lower.dropFirst(4)
        guard hex.count == 16, isHex(hex) else {
            throw ISCSIConfigError(key: key, message: "\(what) \"\(name)\" is not a valid eui name (eui. + 16 hex digits)")
        }
        return
    }
    if lower.hasPrefix("naa.") {
        let hex = lower.dropFirst(4)
        guard hex.count == 16 || hex.count == 32, isHex(hex) else {
            throw ISCSIConfigError(key: key, message: "\(what) \"\(name)\" is not a valid naa name (naa. + 16 or 32 hex digits)")
        }
        return
    }
    throw ISCSIConfigError(key: key, message: "\(what) \"\(name)\" must start with iqn., eui. or naa.")
}
