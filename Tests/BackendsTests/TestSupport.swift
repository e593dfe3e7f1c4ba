import BlockIO
import CSystem
import Foundation
import Glibc
@testable import Backends
import TestSupport

/// Reads a file's bytes with plain buffered I/O (independent of the back-end under test).
func fileBytes(_ path: String, offset: Int, count: Int) -> [UInt8] {
    let fd = open(path, O_RDONLY)
    precondition(fd >= 0)
    defer { close(fd) }
    var bytes = [UInt8](repeating: 0, count: count)
    let n = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress, count, off_t(offset)) }
    return Array(bytes.prefix(max(n, 0)))
}

/// stat(2) of a path.
func statOf(_ path: String) -> stat {
    var st = stat()
    precondition(stat(path, &st) == 0)
    return st
}

/// Opens a file back-end, recording the error text on failure.
func openFile(_ spec: BackendSpec) -> Result<FileBackend, BackendOpenError> {
    do { return .success(try FileBackend(spec: spec)) } catch { return .failure(error) }
}

/// Retries `condition` for up to 10 s. Used where a lock was just released: other tests spawn processes
/// concurrently, and a child holds copies of this process's descriptors (and so its flock) from fork
/// until exec closes them, which can briefly delay the release.
func eventually(_ condition: () -> Bool) -> Bool {
    for _ in 0..<1000 {
        if condition() { return true }
        usleep(10_000)
    }
    return condition()
}

/// Opens a file back-end whose lock was just released (see `eventually`).
func openEventually(_ spec: BackendSpec) throws(BackendOpenError) -> FileBackend {
    var last = BackendOpenError.lockConflict(path: spec.path)
    for _ in 0..<1000 {
        switch openFile(spec) {
        case .success(let backend): return backend
        case .failure(let error):
            guard error == .lockConflict(path: spec.path) else { throw error }
            last = error
            usleep(10_000)
        }
    }
    throw last
}
