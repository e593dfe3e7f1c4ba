/// One problem found in a configuration file, located by file, line and key path.
///
/// Printed as `FILE:LINE: key 'controller[0].lun[1].block_size': must be 512 or 4096`
/// (or `FILE:LINE: message` when the problem is not about one key, such as a TOML syntax error).
public struct ConfigError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The file the configuration came from (a path, or `<embedded>` for the built-in default).
    public var file: String
    /// 1-based line number of the offending key or table header; 0 when the file could not be read.
    public var line: Int
    /// Dotted key path with array indexes, e.g. `controller[0].lun[1].size`; nil for syntax errors.
    public var keyPath: String?
    /// What is wrong, phrased for an operator.
    public var message: String

    /// Creates an error.
    public init(file: String, line: Int, keyPath: String?, message: String) {
        self.file = file
        self.line = line
        self.keyPath = keyPath
        self.message = message
    }

    public var description: String {
        let location = line > 0 ? "\(file):\(line)" : file
        if let keyPath { return "\(location): key '\(keyPath)': \(message)" }
        return "\(location): \(message)"
    }
}

/// Every problem found in one configuration file, in line order.
public struct ConfigErrors: Error, Sendable, Equatable, CustomStringConvertible {
    /// The problems, sorted by line.
    public var errors: [ConfigError]

    /// Creates the list (sorted by line, stable for equal lines).
    public init(_ errors: [ConfigError]) {
        self.errors = errors.enumerated().sorted { a, b in
            a.element.line != b.element.line ? a.element.line < b.element.line : a.offset < b.offset
        }.map(\.element)
    }

    /// One line per error.
    public var description: String { errors.map(\.description).joined(separator: "\n") }
}
