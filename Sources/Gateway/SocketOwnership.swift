import Glibc

/// Permission bits and group of the sockets a VMM connects to (`socket_mode`, `socket_group`), so QEMU
/// running as another user (libvirt's `libvirt-qemu`) can connect without root.
enum SocketOwnership {
    /// The id of the group named `name`, or nil when this machine has no such group.
    static func groupID(named name: String) -> gid_t? {
        var group = group()
        var result: UnsafeMutablePointer<group>? = nil
        var buffer = [CChar](repeating: 0, count: 16384)
        let rc = getgrnam_r(name, &group, &buffer, buffer.count, &result)
        guard rc == 0, let result else { return nil }
        return result.pointee.gr_gid
    }

    /// Gives the socket file at `path` its group (when set) and mode; the error names the path and step.
    static func apply(path: String, mode: UInt32, group: String?) throws(FrontEndError) {
        if let group {
            guard let gid = groupID(named: group) else {
                throw FrontEndError("socket \(path): group '\(group)' does not exist")
            }
            guard chown(path, uid_t.max, gid) == 0 else {
                throw .systemCall(.current("chown", context: "socket \(path): cannot give it group '\(group)'"))
            }
        }
        guard chmod(path, mode_t(mode)) == 0 else {
            throw .systemCall(.current("chmod", context: "socket \(path): cannot set mode 0\(String(mode, radix: 8))"))
        }
    }
}
