/// Why a single config value was rejected (the caller adds file, line and key).
public struct ConfigValueError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The reason, phrased for an operator.
    public var message: String
    /// Creates an error.
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// Byte sizes as written in the config: an integer number of bytes, or a string with a unit.
///
/// `K M G T P` and `KiB MiB GiB TiB PiB` are powers of 1024; `KB MB GB TB PB` are powers of 1000;
/// `B` or no unit means bytes. Fractions are allowed when the result is a whole number of bytes
/// (`"1.5G"`). Unit letters are case-insensitive, but bytes are written `B` (a lone `b` reads as bits
/// and is refused).
public enum ByteSize {
    /// Parses a size string such as `"1G"`, `"512M"`, `"10GiB"`, `"4096"`.
    public static func parse(_ text: String) -> Result<UInt64, ConfigValueError> {
        let trimmed = text.trimmingSpaces()
        guard !trimmed.isEmpty else { return .failure(ConfigValueError("empty size")) }
        var numberEnd = trimmed.startIndex
        while numberEnd < trimmed.endIndex, trimmed[numberEnd].isASCII,
              trimmed[numberEnd].isNumber || trimmed[numberEnd] == "." {
            numberEnd = trimmed.index(after: numberEnd)
        }
        let number = String(trimmed[..<numberEnd])
        let unit = String(trimmed[numberEnd...]).trimmingSpaces()
        let syntax = ConfigValueError(
            "'\(text)' is not a size: write bytes as an integer, or a number with a unit (K, M, G, T, KiB, MiB, GiB, TiB, KB, MB, GB, TB), e.g. \"10GiB\"")
        guard !number.isEmpty, number.filter({ $0 == "." }).count <= 1, !number.hasPrefix("."), !number.hasSuffix(".")
        else { return .failure(syntax) }
        guard let multiplier = multiplier(for: unit) else { return .failure(syntax) }
        let parts = number.split(separator: ".", omittingEmptySubsequences: false)
        let tooLarge = ConfigValueError("'\(text)' is too large")
        guard let whole = UInt64(parts[0]) else { return .failure(tooLarge) }
        var (total, overflow) = whole.multipliedReportingOverflow(by: multiplier)
        if overflow { return .failure(tooLarge) }
        if parts.count == 2 {
            let fractionDigits = parts[1]
            guard fractionDigits.count <= 18, let fraction = UInt64(fractionDigits) else { return .failure(syntax) }
            var scale: UInt64 = 1
            for _ in 0..<fractionDigits.count { scale *= 10 }
            let (product, productOverflow) = fraction.multipliedReportingOverflow(by: multiplier)
            if productOverflow { return .failure(tooLarge) }
            guard product % scale == 0 else {
                return .failure(ConfigValueError("'\(text)' is not a whole number of bytes"))
            }
            (total, overflow) = total.addingReportingOverflow(product / scale)
            if overflow { return .failure(tooLarge) }
        }
        return .success(total)
    }

    private static func multiplier(for unit: String) -> UInt64? {
        if unit.isEmpty || unit == "B" { return 1 }
        let lower = unit.lowercased()
        let letters: [Character: Int] = ["k": 1, "m": 2, "g": 3, "t": 4, "p": 5]
        guard let first = lower.first, let power = letters[first] else { return nil }
        let rest = lower.dropFirst()
        let base: UInt64
        switch rest {
        case "", "ib": base = 1024
        case "b": base = 1000
        default: return nil
        }
        var value: UInt64 = 1
        for _ in 0..<power { value *= base }
        return value
    }

    /// A short human form (`1 GiB`, `512 MiB`, `1000 B`) for logs: exact binary units only.
    public static func format(_ bytes: UInt64) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
        var value = bytes
        var index = 0
        while index < units.count - 1, value >= 1024, value % 1024 == 0 {
            value /= 1024
            index += 1
        }
        return "\(value) \(units[index])"
    }
}

/// An iSCSI LUN address: `iscsi://host[:port]/target-name/lun`.
public struct ISCSIAddress: Sendable, Equatable, CustomStringConvertible {
    /// Host name, IPv4 address or IPv6 address (without brackets).
    public var host: String
    /// TCP port (default 3260).
    public var port: UInt16
    /// Target name (`iqn.…`, `eui.…` or `naa.…`).
    public var targetName: String
    /// LUN on the remote target.
    public var lun: Int

    /// Creates a URL.
    public init(host: String, port: UInt16 = 3260, targetName: String, lun: Int) {
        self.host = host
        self.port = port
        self.targetName = targetName
        self.lun = lun
    }

    /// The canonical URL text (as libiscsi's `iscsi_parse_full_url` accepts it).
    public var description: String {
        let hostText = host.contains(":") ? "[\(host)]" : host
        return "iscsi://\(hostText):\(port)/\(targetName)/\(lun)"
    }

    /// Parses and checks a URL; the error says what part is wrong.
    public static func parse(_ text: String) -> Result<ISCSIAddress, ConfigValueError> {
        let form = "expected iscsi://host[:port]/iqn.yyyy-mm.domain:name/lun"
        guard text.hasPrefix("iscsi://") else {
            return .failure(ConfigValueError("'\(text)' does not start with iscsi:// (\(form))"))
        }
        let rest = text.dropFirst("iscsi://".count)
        let segments = rest.split(separator: "/", omittingEmptySubsequences: false)
        guard segments.count == 3 else {
            return .failure(ConfigValueError("'\(text)' must have a host, a target name and a LUN (\(form))"))
        }
        let authority = segments[0]
        if authority.contains("@") {
            return .failure(ConfigValueError(
                "credentials do not belong in the URL; use chap_user with chap_secret_file or chap_secret_env"))
        }
        var host: Substring
        var portText: Substring? = nil
        if authority.hasPrefix("[") {
            guard let close = authority.firstIndex(of: "]") else {
                return .failure(ConfigValueError("missing ']' after the IPv6 address in '\(text)'"))
            }
            host = authority[authority.index(after: authority.startIndex)..<close]
            let after = authority[authority.index(after: close)...]
            if !after.isEmpty {
                guard after.hasPrefix(":") else { return .failure(ConfigValueError("unexpected '\(after)' after ']' in '\(text)'")) }
                portText = after.dropFirst()
            }
        } else {
            host = authority
            if let colon = authority.firstIndex(of: ":") {
                host = authority[..<colon]
                portText = authority[authority.index(after: colon)...]
            }
            let valid = host.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "-" || $0 == ".") }
            guard valid else { return .failure(ConfigValueError("host '\(host)' is not a host name or address (\(form))")) }
        }
        guard !host.isEmpty else { return .failure(ConfigValueError("missing host in '\(text)' (\(form))")) }
        var port: UInt16 = 3260
        if let portText {
            guard let value = UInt16(portText), value > 0 else {
                return .failure(ConfigValueError("port '\(portText)' must be a number between 1 and 65535"))
            }
            port = value
        }
        let target = String(segments[1])
        if case let .failure(error) = checkISCSIName(target, what: "target name") { return .failure(error) }
        let lunText = segments[2]
        guard let lun = Int(lunText), lun >= 0, lun <= 16383 else {
            return .failure(ConfigValueError("LUN '\(lunText)' must be a number between 0 and 16383"))
        }
        return .success(ISCSIAddress(host: String(host), port: port, targetName: target, lun: lun))
    }

    /// Checks an iSCSI name (RFC 7143 §4.2.7: `iqn.yyyy-mm.reversed.domain[:id]`, `eui.` + 16 hex, `naa.` + 16 or 32 hex).
    public static func checkISCSIName(_ name: String, what: String) -> Result<Void, ConfigValueError> {
        let lower = name.lowercased()
        let hex = { (s: Substring) in !s.isEmpty && s.allSatisfy { $0.isHexDigit } }
        if lower.hasPrefix("iqn.") {
            let body = Array(lower.dropFirst(4))
            let dateOK = body.count > 8 && body[0..<4].allSatisfy { $0.isASCII && $0.isNumber } && body[4] == "-"
                && body[5..<7].allSatisfy { $0.isASCII && $0.isNumber } && body[7] == "."
            let charsOK = body.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || "-.:".contains($0)) }
            if dateOK && charsOK && name.utf8.count <= 223 { return .success(()) }
            return .failure(ConfigValueError(
                "\(what) '\(name)' is not an iSCSI name: expected iqn.yyyy-mm.reversed.domain[:identifier]"))
        }
        if lower.hasPrefix("eui."), lower.count == 20, hex(lower.dropFirst(4)) { return .success(()) }
        if lower.hasPrefix("naa."), lower.count == 20 || lower.count == 36, hex(lower.dropFirst(4)) { return .success(()) }
        return .failure(ConfigValueError(
            "\(what) '\(name)' is not an iSCSI name: expected iqn.yyyy-mm.reversed.domain[:identifier], eui.<16 hex> or naa.<hex>"))
    }
}
