/// A key path into the TOML document: keys and array indexes, printed as `controller[0].lun[1].size`.
public struct ConfigKeyPath: Hashable, Sendable, CustomStringConvertible {
    /// One step of a key path.
    public enum Component: Hashable, Sendable {
        case key(String)
        case index(Int)
    }

    /// The steps from the document root.
    public var components: [Component]

    /// The document root.
    public static let root = ConfigKeyPath(components: [])

    /// Creates a path.
    public init(components: [Component]) { self.components = components }

    /// This path extended by a key.
    public func appending(_ key: String) -> ConfigKeyPath {
        ConfigKeyPath(components: components + [.key(key)])
    }

    /// This path extended by an array index.
    public func appending(index: Int) -> ConfigKeyPath {
        ConfigKeyPath(components: components + [.index(index)])
    }

    /// The path without its last step (the root stays the root).
    public var parent: ConfigKeyPath {
        ConfigKeyPath(components: Array(components.dropLast()))
    }

    /// The last key of the path, if it ends in a key.
    public var lastKey: String? {
        if case let .key(k)? = components.last { return k }
        return nil
    }

    public var description: String {
        var out = ""
        for component in components {
            switch component {
            case let .key(k):
                if !out.isEmpty { out += "." }
                out += k
            case let .index(i):
                out += "[\(i)]"
            }
        }
        return out
    }
}
