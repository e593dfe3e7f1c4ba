import Glibc

/// This process's open file descriptors, counted by what they point at (the /proc/self/fd link): a test
/// counts only the descriptors it owns (its LUN's backing file, the server's named memfds), never the
/// process's total, because the other suites of the same test process open and close descriptors in
/// parallel.
public enum OpenDescriptors {
    /// Descriptors whose link target satisfies `matches` ("/path/of/file", "/memfd:NAME (deleted)",
    /// "socket:[INODE]", "anon_inode:[eventfd]", ...).
    public static func count(where matches: (String) -> Bool) -> Int {
        guard let dir = opendir("/proc/self/fd") else { return -1 }
        defer { closedir(dir) }
        let own = dirfd(dir)
        var n = 0
        var buffer = [CChar](repeating: 0, count: 4096)
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            guard let fd = Int32(name), fd != own else { continue }
            let length = readlink("/proc/self/fd/" + name, &buffer, buffer.count - 1)
            guard length > 0 else { continue }
            let target = buffer.prefix(length).withUnsafeBufferPointer { String(decoding: UnsafeRawBufferPointer($0), as: UTF8.self) }
            if matches(target) { n += 1 }
        }
        return n
    }

    /// Descriptors open on the file at `path`.
    public static func count(on path: String) -> Int { count { $0 == path } }
}
