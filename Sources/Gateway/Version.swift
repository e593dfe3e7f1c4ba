/// The ScsiGate release.
public enum ScsiGateVersion {
    /// Semantic version of this build.
    public static let string = "0.1.0"
}
