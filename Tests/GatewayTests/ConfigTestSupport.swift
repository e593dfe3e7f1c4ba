import Foundation
@testable import Gateway

/// The repository root, found from this file's path.
let repositoryRoot: URL = URL(fileURLWithPath: #filePath)
    .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

/// Parses `text` expecting failure; returns the errors (empty if it unexpectedly validated).
func configErrors(_ text: String, source: String = "test.toml") -> [ConfigError] {
    do {
        _ = try ConfigLoader.parse(text, source: source)
        return []
    } catch {
        return error.errors
    }
}

/// The printed form of every error.
func configMessages(_ text: String) -> [String] {
    configErrors(text).map(\.description)
}

/// A valid single-controller config with `lunBody` as its one LUN table (appended after the header).
func oneLUN(_ lunBody: String, transport: String = "vhost-user-scsi") -> String {
    """
    [gateway]
    state_dir = "/srv/sg"

    [[controller]]
    name = "c0"
    transport = "\(transport)"
    socket = "/run/sg/c0.sock"

    [[controller.lun]]
    \(lunBody)
    """
}
