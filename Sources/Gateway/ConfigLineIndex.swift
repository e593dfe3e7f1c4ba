/// Where keys and table headers sit in a TOML text.
///
/// TOMLKit does not expose source positions of parsed values, so this light scanner walks the
/// text once: it follows `[table]` and `[[array.of.tables]]` headers (counting array elements per
/// parent, so `controller[1].lun[0]` is the first `[[controller.lun]]` after the second
/// `[[controller]]`), and records the line of every `key = value`. Multi-line strings and arrays are
/// skipped. Values inside inline tables are not indexed; lookups fall back to the nearest indexed
/// ancestor (the inline table's key, or the enclosing table header).
public struct ConfigLineIndex: Sendable {
    private var lines: [String: Int] = [:]

    /// Indexes `text`.
    public init(text: String) {
        var arrayCounts: [String: Int] = [:]
        var prefix = ConfigKeyPath.root
        var multilineDelimiter: String? = nil
        var bracketDepth = 0
        var lineNumber = 0
        for rawLine in text.split(separator: "\n", omittingEmptySubsequences: false) {
            lineNumber += 1
            let line = String(rawLine)
            if let delimiter = multilineDelimiter {
                if line.contains(delimiter) { multilineDelimiter = nil }
                continue
            }
            if bracketDepth > 0 {
                bracketDepth += Self.bracketBalance(line)
                if bracketDepth < 0 { bracketDepth = 0 }
                continue
            }
            let trimmed = Self.stripComment(line).trimmingSpaces()
            if trimmed.isEmpty { continue }
            if trimmed.hasPrefix("[[") {
                guard let close = trimmed.range(of: "]]") else { continue }
                let name = String(trimmed[trimmed.index(trimmed.startIndex, offsetBy: 2)..<close.lowerBound])
                let parts = Self.splitKey(name)
                guard !parts.isEmpty else { continue }
                var path = Self.resolve(parts.dropLast(), arrayCounts: arrayCounts)
                path = path.appending(parts.last!)
                let key = path.description
                let index = arrayCounts[key, default: 0]
                arrayCounts[key] = index + 1
                if lines[key] == nil { lines[key] = lineNumber }
                path = path.appending(index: index)
                lines[path.description] = lineNumber
                prefix = path
            } else if trimmed.hasPrefix("[") {
                guard let close = trimmed.firstIndex(of: "]") else { continue }
                let name = String(trimmed[trimmed.index(after: trimmed.startIndex)..<close])
                let parts = Self.splitKey(name)
                guard !parts.isEmpty else { continue }
                let path = Self.resolve(parts[...], arrayCounts: arrayCounts)
                if lines[path.description] == nil { lines[path.description] = lineNumber }
                prefix = path
            } else if let eq = Self.assignmentIndex(trimmed) {
                let keyText = String(trimmed[..<eq])
                var path = prefix
                for part in Self.splitKey(keyText) { path = path.appending(part) }
                if lines[path.description] == nil { lines[path.description] = lineNumber }
                let value = String(trimmed[trimmed.index(after: eq)...]).trimmingSpaces()
                for delimiter in ["\"\"\"", "'''"] where value.hasPrefix(delimiter) {
                    let rest = value.dropFirst(3)
                    if !rest.contains(delimiter) { multilineDelimiter = delimiter }
                }
                if multilineDelimiter == nil {
                    bracketDepth = max(0, Self.bracketBalance(value))
                }
            }
        }
    }

    /// The line of `path`, or of its nearest indexed ancestor; 1 when nothing is known.
    public func line(for path: ConfigKeyPath) -> Int {
        var candidate = path
        while true {
            if let line = lines[candidate.description] { return line }
            if candidate.components.isEmpty { return 1 }
            candidate = candidate.parent
        }
    }

    /// The line of exactly `path`, if indexed.
    public func exactLine(for path: ConfigKeyPath) -> Int? { lines[path.description] }

    // MARK: - Scanning helpers

    /// Resolves dotted header parts against array-of-tables seen so far (`controller` -> `controller[k]`).
    private static func resolve(_ parts: ArraySlice<String>, arrayCounts: [String: Int]) -> ConfigKeyPath {
        var path = ConfigKeyPath.root
        for part in parts {
            path = path.appending(part)
            if let count = arrayCounts[path.description], count > 0 {
                path = path.appending(index: count - 1)
            }
        }
        return path
    }

    /// Splits a dotted key (`a.b`, `"a.b".c`) into parts, unquoting quoted parts.
    static func splitKey(_ text: String) -> [String] {
        var parts: [String] = []
        var current = ""
        var quote: Character? = nil
        for ch in text {
            if let q = quote {
                if ch == q { quote = nil } else { current.append(ch) }
            } else if ch == "\"" || ch == "'" {
                quote = ch
            } else if ch == "." {
                parts.append(current.trimmingSpaces())
                current = ""
            } else {
                current.append(ch)
            }
        }
        parts.append(current.trimmingSpaces())
        return parts.filter { !$0.isEmpty }
    }

    /// Index of the `=` of a `key = value` line (outside quoted keys), if any.
    private static func assignmentIndex(_ line: String) -> String.Index? {
        var quote: Character? = nil
        var index = line.startIndex
        while index < line.endIndex {
            let ch = line[index]
            if let q = quote {
                if ch == q { quote = nil }
            } else if ch == "\"" || ch == "'" {
                quote = ch
            } else if ch == "=" {
                return index
            }
            index = line.index(after: index)
        }
        return nil
    }

    /// The line without a trailing `# comment` (a `#` inside a string is kept).
    static func stripComment(_ line: String) -> String {
        var quote: Character? = nil
        var escaped = false
        var out = ""
        for ch in line {
            if let q = quote {
                if escaped { escaped = false } else if ch == "\\" && q == "\"" { escaped = true } else if ch == q { quote = nil }
            } else if ch == "\"" || ch == "'" {
                quote = ch
            } else if ch == "#" {
                break
            }
            out.append(ch)
        }
        return out
    }

    /// Net count of `[`/`{` minus `]`/`}` outside strings and comments.
    private static func bracketBalance(_ line: String) -> Int {
        var balance = 0
        var quote: Character? = nil
        var escaped = false
        for ch in stripComment(line) {
            if let q = quote {
                if escaped { escaped = false } else if ch == "\\" && q == "\"" { escaped = true } else if ch == q { quote = nil }
                continue
            }
            switch ch {
            case "\"", "'": quote = ch
            case "[", "{": balance += 1
            case "]", "}": balance -= 1
            default: break
            }
        }
        return balance
    }
}

extension String {
    /// The string without leading and trailing spaces and tabs (and a trailing carriage return).
    func trimmingSpaces() -> String {
        let isSpace: (Character) -> Bool = { $0 == " " || $0 == "\t" || $0 == "\r" }
        guard let first = firstIndex(where: { !isSpace($0) }) else { return "" }
        let last = lastIndex(where: { !isSpace($0) })!
        return String(self[first...last])
    }
}
