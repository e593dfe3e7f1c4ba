import SCSI

/// Default INQUIRY identity of a LUN whose config leaves serial or wwn out.
///
/// Both are derived deterministically from the controller name, target and LUN, so a LUN keeps its
/// identity across restarts and `config save` round trips (guests key multipath and udev names on it).
public enum DerivedIdentity {
    /// IEEE company id used in derived NAA 5 identifiers: 02-53-47 ("SG" with the locally
    /// administered bit set, so it cannot collide with a registered OUI).
    public static let companyID: UInt64 = 0x02_53_47

    /// FNV-1a 64 of `controller`, target and LUN.
    static func hash(controller: String, target: Int, lun: Int) -> UInt64 {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in Array(controller.utf8) + [0] + Array(String(target).utf8) + [0] + Array(String(lun).utf8) {
            hash ^= UInt64(byte)
            hash = hash &* 0x0000_0100_0000_01b3
        }
        return hash
    }

    /// NAA 5 identifier: 4-bit NAA, 24-bit company id, 36 bits from the hash.
    public static func naa(controller: String, target: Int, lun: Int) -> UInt64 {
        (5 << 60) | (companyID << 36) | (hash(controller: controller, target: target, lun: lun) & 0xF_FFFF_FFFF)
    }

    /// `<controller>-<target>-<lun>` when it fits `maximumLength`, else `SG` and 16 hex digits of the hash.
    public static func serial(controller: String, target: Int, lun: Int, maximumLength: Int = 20) -> String {
        let readable = "\(controller)-\(target)-\(lun)"
        if readable.utf8.count <= maximumLength { return readable }
        let hex = String(hash(controller: controller, target: target, lun: lun), radix: 16, uppercase: true)
        let padded = String(repeating: "0", count: 16 - hex.count) + hex
        return String(("SG" + padded).prefix(maximumLength))
    }

    /// The identity a LUN presents: configured fields where given, derived or default ones otherwise.
    public static func identity(for lun: LUNConfig, controller: ControllerConfig) -> LogicalUnitIdentity {
        let defaults = LogicalUnitIdentity(serial: "", naa: 0)
        return LogicalUnitIdentity(
            vendor: lun.vendor ?? defaults.vendor,
            product: lun.product ?? defaults.product,
            revision: lun.revision ?? defaults.revision,
            serial: lun.serial ?? serial(controller: controller.name, target: lun.target, lun: lun.lun),
            naa: lun.wwn ?? naa(controller: controller.name, target: lun.target, lun: lun.lun))
    }
}
