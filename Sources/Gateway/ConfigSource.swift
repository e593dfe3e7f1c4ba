import TOMLKit

/// One value the config validator reads: from a TOML document (the config file) or from JSON (the
/// parameters of `lun.add` on the control socket), so that both go through the same rules and give the
/// same messages. The JSON side never touches TOMLKit (whose tables are never freed).
enum ConfigSourceValue {
    case toml(TOMLValueConvertible)
    case json(JSONValue)

    var int: Int? {
        switch self {
        case let .toml(v): return v.int
        case let .json(v): return v.intValue.flatMap { Int(exactly: $0) }
        }
    }

    var string: String? {
        switch self {
        case let .toml(v): return v.string
        case let .json(v): return v.stringValue
        }
    }

    var bool: Bool? {
        switch self {
        case let .toml(v): return v.bool
        case let .json(v): return v.boolValue
        }
    }

    /// A sub-table (TOML only).
    var table: TOMLTable? {
        if case let .toml(v) = self { return v.table }
        return nil
    }

    /// An array (TOML only).
    var array: TOMLArray? {
        if case let .toml(v) = self { return v.array }
        return nil
    }

    /// "a string", "an integer"... as in wrong-type messages.
    var typeName: String {
        switch self {
        case let .toml(v): return TableReader.typeName(v.type)
        case let .json(v):
            switch v {
            case .object: return "a table"
            case .array: return "an array"
            case .string: return "a string"
            case .int: return "an integer"
            case .double: return "a floating-point number"
            case .bool: return "a boolean"
            case .null: return "null"
            }
        }
    }
}

/// The table a `TableReader` reads: a TOML table or a JSON object.
enum ConfigSourceTable {
    case toml(TOMLTable)
    case json([String: JSONValue])

    subscript(key: String) -> ConfigSourceValue? {
        switch self {
        case let .toml(table): return table[key].map { .toml($0) }
        case let .json(members): return members[key].map { .json($0) }
        }
    }

    var keys: [String] {
        switch self {
        case let .toml(table): return table.keys
        case let .json(members): return members.keys.sorted()
        }
    }

    func contains(key: String) -> Bool {
        switch self {
        case let .toml(table): return table.contains(key: key)
        case let .json(members): return members[key] != nil
        }
    }
}

extension TableReader {
    /// A reader of a TOML table.
    init(table: TOMLTable, path: ConfigKeyPath, validation: Validation) {
        self.init(table: .toml(table), path: path, validation: validation)
    }
}
