/// The built-in default configuration, served by `scsigate serve` (and checked by `check-config`) when no
/// --config is given. Its one source is Config/scsigate.toml, which documents every key:
/// `Sources/Gateway/DefaultConfig/scsigate.toml` is a symbolic link to it, and SwiftPM embeds that file in the
/// binary (`resources: [.embedInCode(...)]` in Package.swift), so there is no copy to keep in step.
public enum DefaultConfiguration {
    /// The TOML text, byte for byte the file.
    public static let text = String(decoding: PackageResources.scsigate_toml, as: UTF8.self)
}
