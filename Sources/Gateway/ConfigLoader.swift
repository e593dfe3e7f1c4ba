import Foundation
import TOMLKit

/// Reads, parses and validates a gateway configuration.
///
/// Parsing uses TOMLKit; validation is a pass of its own over the TOML tree so that every problem
/// (unknown key, wrong type, missing key, bad value, duplicate) is reported with its file, line and
/// key path. All problems are collected, not just the first.
public enum ConfigLoader {
    /// The name used in messages for the embedded default configuration.
    public static let embeddedSourceName = "<embedded>"

    /// Reads and validates the file at `path`.
    public static func load(file path: String) throws(ConfigErrors) -> GatewayConfig {
        let text: String
        do {
            text = try String(contentsOfFile: path, encoding: .utf8)
        } catch {
            let reason = FileManager.default.fileExists(atPath: path) ? "cannot be read as UTF-8 text" : "no such file"
            throw ConfigErrors([ConfigError(file: path, line: 0, keyPath: nil, message: reason)])
        }
        return try parse(text, source: path)
    }

    /// Validates the embedded default configuration.
    public static func loadDefault() throws(ConfigErrors) -> GatewayConfig {
        try parse(DefaultConfiguration.text, source: embeddedSourceName)
    }

    /// Parses and validates `text`; `source` names it in messages.
    public static func parse(_ text: String, source: String) throws(ConfigErrors) -> GatewayConfig {
        // toml++ (inside TOMLKit) asserts, or with NDEBUG assumes, that a key starts with a key character. Two
        // inputs broke that and aborted `check-config` and `serve` (both found by fuzzing): a non-ASCII character
        // outside strings and comments (`[[\u{FFFD}]]`), and a table header whose first key starts with anything
        // else (`[@]`, `[[=]]`, `[.]`). Refuse both before parsing.
        if let (line, problem) = textProblemBeforeParsing(text) {
            throw ConfigErrors([ConfigError(file: source, line: line, keyPath: nil, message: "TOML syntax error: \(problem)")])
        }
        let root: TOMLTable
        do {
            root = try TOMLTable(string: text)
        } catch let error as TOMLParseError {
            throw ConfigErrors([ConfigError(file: source, line: max(1, error.source.begin.line), keyPath: nil,
                                            message: "TOML syntax error: \(error.description)")])
        } catch {
            throw ConfigErrors([ConfigError(file: source, line: 1, keyPath: nil, message: "TOML syntax error: \(error)")])
        }
        let validation = Validation(source: source, index: ConfigLineIndex(text: text))
        let config = ConfigValidator(validation: validation).validate(root)
        if !validation.errors.isEmpty { throw ConfigErrors(validation.errors) }
        return config
    }
}

/// The line and description of the first problem toml++ would not report itself (see `ConfigLoader.parse`): a
/// non-ASCII character outside strings and comments, or a table header whose first key starts with a character
/// that cannot start a key.
func textProblemBeforeParsing(_ text: String) -> (Int, String)? {
    enum State { case normal, comment, basic, literal, multiBasic, multiLiteral }
    let scalars = Array(text.unicodeScalars)
    var state = State.normal
    var line = 1
    var i = 0
    var lineStart = true  // only spaces and tabs so far on this line (normal state)
    var nesting = 0       // arrays and inline tables open in a value (a `[` there is no table header)
    func starts(_ s: String, at k: Int) -> Bool {
        var j = k
        for c in s.unicodeScalars {
            guard j < scalars.count, scalars[j] == c else { return false }
            j += 1
        }
        return true
    }
    while i < scalars.count {
        let c = scalars[i]
        if c == "\n" { line += 1 }
        switch state {
        case .normal:
            if c == "\n" { lineStart = true; break }
            if lineStart && nesting == 0 && c == "[" {
                lineStart = false
                var j = i + 1
                if j < scalars.count && scalars[j] == "[" { j += 1 }
                while j < scalars.count && (scalars[j] == " " || scalars[j] == "\t") { j += 1 }
                if j < scalars.count {
                    let k = scalars[j]
                    let keyStart = k.isASCII && (k.properties.isAlphabetic || ("0"..."9").contains(k) || "_-\"']".unicodeScalars.contains(k))
                    if k.isASCII && !keyStart {
                        return (line, "a table header must start with a key (a letter, digit, '_', '-' or a quote), found U+\(String(k.value, radix: 16, uppercase: true))")
                    }
                }
                i = j
                continue
            }
            if c != " " && c != "\t" { lineStart = false }
            if c == "[" || c == "{" { nesting += 1 } else if (c == "]" || c == "}") && nesting > 0 { nesting -= 1 }
            if c == "#" { state = .comment }
            else if starts("\"\"\"", at: i) { state = .multiBasic; i += 2 }
            else if c == "\"" { state = .basic }
            else if starts("'''", at: i) { state = .multiLiteral; i += 2 }
            else if c == "'" { state = .literal }
            else if !c.isASCII {
                let code = String(c.value, radix: 16, uppercase: true)
                return (line, "character U+\(code) outside a string or comment (TOML allows non-ASCII text only in strings and comments)")
            }
        case .comment:
            if c == "\n" { state = .normal; lineStart = true }
        case .basic:
            if c == "\\" && i + 1 < scalars.count && scalars[i + 1] != "\n" { i += 1 }
            else if c == "\"" || c == "\n" { state = .normal; lineStart = c == "\n" }
        case .literal:
            if c == "'" || c == "\n" { state = .normal; lineStart = c == "\n" }
        case .multiBasic, .multiLiteral:
            let quote: Unicode.Scalar = state == .multiBasic ? "\"" : "'"
            if state == .multiBasic && c == "\\" && i + 1 < scalars.count {
                i += 1
                if scalars[i] == "\n" { line += 1 }
            } else if c == quote && starts(String(repeating: Character(quote), count: 3), at: i) {
                i += 2
                // Up to two more quotes right before the delimiter belong to the string.
                while i + 1 < scalars.count && scalars[i + 1] == quote { i += 1 }
                state = .normal
            }
        }
        i += 1
    }
    return nil
}

/// Collects errors while validating one document.
final class Validation {
    let source: String
    let index: ConfigLineIndex
    var errors: [ConfigError] = []

    init(source: String, index: ConfigLineIndex) {
        self.source = source
        self.index = index
    }

    func fail(_ path: ConfigKeyPath, _ message: String) {
        errors.append(ConfigError(file: source, line: index.line(for: path), keyPath: path.description, message: message))
    }

    func line(_ path: ConfigKeyPath) -> Int { index.line(for: path) }
}

/// Typed access to one TOML table, reporting problems against its key path.
struct TableReader {
    let table: ConfigSourceTable
    let path: ConfigKeyPath
    let validation: Validation

    func keyPath(_ key: String) -> ConfigKeyPath { path.appending(key) }

    func has(_ key: String) -> Bool { table.contains(key: key) }

    /// Reports every key not in `allowed` (with a suggestion when one is close).
    func rejectUnknownKeys(allowed: [String], hints: [String: String] = [:]) {
        for key in table.keys where !allowed.contains(key) {
            var message = "unknown key"
            if let hint = hints[key] {
                message += "; \(hint)"
            } else if let suggestion = allowed.min(by: { editDistance($0, key) < editDistance($1, key) }),
                      editDistance(suggestion, key) <= 2 {
                message += " (did you mean '\(suggestion)'?)"
            } else {
                message += "; allowed keys here: \(allowed.joined(separator: ", "))"
            }
            validation.fail(keyPath(key), message)
        }
    }

    /// Reports `key` as not applicable when present.
    func rejectIfPresent(_ key: String, _ reason: String) {
        if has(key) { validation.fail(keyPath(key), reason) }
    }

    func value(_ key: String, required: Bool) -> ConfigSourceValue? {
        guard let value = table[key] else {
            if required { validation.fail(keyPath(key), "required key is missing") }
            return nil
        }
        return value
    }

    private func wrongType(_ key: String, expected: String, found value: ConfigSourceValue) {
        validation.fail(keyPath(key), "expected \(expected), found \(value.typeName)")
    }

    static func typeName(_ type: TOMLType) -> String {
        switch type {
        case .table: return "a table"
        case .array: return "an array"
        case .string: return "a string"
        case .int: return "an integer"
        case .double: return "a floating-point number"
        case .bool: return "a boolean"
        case .date: return "a date"
        case .time: return "a time"
        case .dateTime: return "a date-time"
        }
    }

    func string(_ key: String, required: Bool = false) -> String? {
        guard let value = value(key, required: required) else { return nil }
        guard let string = value.string else { wrongType(key, expected: "a string", found: value); return nil }
        return string
    }

    /// A non-empty string.
    func nonEmptyString(_ key: String, required: Bool = false) -> String? {
        guard let string = string(key, required: required) else { return nil }
        if string.isEmpty { validation.fail(keyPath(key), "must not be empty"); return nil }
        return string
    }

    func int(_ key: String, required: Bool = false, range: ClosedRange<Int>? = nil) -> Int? {
        guard let value = value(key, required: required) else { return nil }
        guard let int = value.int else { wrongType(key, expected: "an integer", found: value); return nil }
        if let range, !range.contains(int) {
            validation.fail(keyPath(key), "must be between \(range.lowerBound) and \(range.upperBound), found \(int)")
            return nil
        }
        return int
    }

    func bool(_ key: String) -> Bool? {
        guard let value = value(key, required: false) else { return nil }
        guard let bool = value.bool else { wrongType(key, expected: "a boolean (true or false)", found: value); return nil }
        return bool
    }

    /// A string that must be one of `choices` (by raw value).
    func choice<E: RawRepresentable & CaseIterable>(_ key: String, _ type: E.Type, required: Bool = false) -> E?
    where E.RawValue == String {
        guard let string = string(key, required: required) else { return nil }
        guard let value = E(rawValue: string) else {
            let names = E.allCases.map { "'\($0.rawValue)'" }
            validation.fail(keyPath(key), "'\(string)' is not valid; expected \(Self.alternatives(names))")
            return nil
        }
        return value
    }

    static func alternatives(_ items: [String]) -> String {
        if items.count <= 1 { return items.joined() }
        return items.dropLast().joined(separator: ", ") + " or " + items.last!
    }

    /// A size: integer bytes or a string with a unit.
    func size(_ key: String) -> UInt64? {
        guard let value = value(key, required: false) else { return nil }
        if let int = value.int {
            guard int > 0 else { validation.fail(keyPath(key), "must be greater than 0, found \(int)"); return nil }
            return UInt64(int)
        }
        guard let string = value.string else {
            wrongType(key, expected: "a size (integer bytes or a string such as \"10GiB\")", found: value)
            return nil
        }
        switch ByteSize.parse(string) {
        case let .success(bytes):
            guard bytes > 0 else { validation.fail(keyPath(key), "must be greater than 0"); return nil }
            return bytes
        case let .failure(error):
            validation.fail(keyPath(key), error.message)
            return nil
        }
    }

    /// A sub-table (`[gateway]`).
    func subtable(_ key: String) -> TOMLTable? {
        guard let value = value(key, required: false) else { return nil }
        guard let table = value.table else { wrongType(key, expected: "a table", found: value); return nil }
        return table
    }

    /// An array of tables (`[[controller]]`); nil elements where an element is not a table.
    func tables(_ key: String) -> [(Int, TOMLTable)] {
        guard let value = value(key, required: false) else { return [] }
        guard let array = value.array else {
            wrongType(key, expected: "an array of tables ([[\(path.appending(key).description.replacingIndexes())]])", found: value)
            return []
        }
        var result: [(Int, TOMLTable)] = []
        for index in 0..<array.count {
            if let table = array[index].table {
                result.append((index, table))
            } else {
                validation.fail(keyPath(key).appending(index: index),
                                "expected a table, found \(Self.typeName(array[index].type))")
            }
        }
        return result
    }
}

extension String {
    /// `controller[0].lun` -> `controller.lun` (for naming table headers in messages).
    func replacingIndexes() -> String {
        var out = ""
        var skipping = false
        for ch in self {
            if ch == "[" { skipping = true; continue }
            if ch == "]" { skipping = false; continue }
            if !skipping { out.append(ch) }
        }
        return out
    }
}

/// Levenshtein distance, for "did you mean" hints on short key names.
func editDistance(_ a: String, _ b: String) -> Int {
    let a = Array(a), b = Array(b)
    if a.isEmpty { return b.count }
    if b.isEmpty { return a.count }
    var previous = Array(0...b.count)
    var current = Array(repeating: 0, count: b.count + 1)
    for i in 1...a.count {
        current[0] = i
        for j in 1...b.count {
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1))
        }
        swap(&previous, &current)
    }
    return previous[b.count]
}
