import BlockIO
import CSystem
import Foundation
import Glibc
@testable import Backends

/// A fresh directory under /tmp (ext4 on this machine), removed on deinit.
final class TemporaryDirectory {
    let path: String

    init() {
        var template = Array("/tmp/scsigate-backends-XXXXXX".utf8CString)
        let result = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        precondition(result != nil, "mkdtemp failed")
        path = String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    func file(_ name: String) -> String { path + "/" + name }

    deinit { try? FileManager.default.removeItem(atPath: path) }
}

/// Page-aligned memory carved into iovec segments, optionally misaligned by `misalign` bytes.
final class TestBuffers {
    let memory: UnsafeMutableRawPointer
    let totalBytes: Int
    let storage: IOVectorStorage
    let segments: [Int]
    let start: UnsafeMutableRawPointer

    init(segments: [Int], misalign: Int = 0) {
        self.segments = segments
        totalBytes = segments.reduce(0, +)
        var pointer: UnsafeMutableRawPointer?
        precondition(posix_memalign(&pointer, 4096, totalBytes + misalign + 4096) == 0)
        memory = pointer!
        memory.initializeMemory(as: UInt8.self, repeating: 0xEE, count: totalBytes + misalign + 4096)
        start = memory + misalign
        storage = IOVectorStorage(capacity: max(segments.count, 1))
        var offset = 0
        for (i, length) in segments.enumerated() {
            storage.elements[i] = iovec(iov_base: start + offset, iov_len: length)
            offset += length
        }
    }

    deinit { free(memory) }

    var list: IOVectorList { storage.view(count: segments.count) }

    /// Fills the buffers with a pattern derived from `seed`.
    func fill(seed: UInt8) {
        for i in 0..<totalBytes { start.storeBytes(of: Self.patternByte(i, seed: seed), toByteOffset: i, as: UInt8.self) }
    }

    func clear(_ value: UInt8 = 0xEE) { start.initializeMemory(as: UInt8.self, repeating: value, count: totalBytes) }

    var bytes: [UInt8] { Array(UnsafeRawBufferPointer(start: start, count: totalBytes)) }

    static func patternByte(_ i: Int, seed: UInt8) -> UInt8 { UInt8(truncatingIfNeeded: i &* 31 &+ i >> 9) &+ seed }

    static func pattern(count: Int, seed: UInt8) -> [UInt8] { (0..<count).map { patternByte($0, seed: seed) } }
}

/// Results of `waitForCompletions`, keyed by token.
typealias Completions = [UInt64: BlockResult]

/// Waits on the channel's completion eventfd with poll(2) and reaps until `count` completions arrived
/// (or `timeoutSeconds` passed).
func waitForCompletions<C: BlockChannel>(_ channel: C, count: Int, timeoutSeconds: Double = 20) -> Completions {
    var results = Completions()
    let deadline = Date().addingTimeInterval(timeoutSeconds)
    while results.count < count && Date() < deadline {
        if channel.completionFD >= 0 {  // synchronous channels (no fd) are ready after commit
            var descriptor = pollfd(fd: channel.completionFD, events: Int16(POLLIN), revents: 0)
            _ = poll(&descriptor, 1, 200)
        }
        _ = channel.reap { token, result in results[token] = result }
    }
    return results
}

/// Same for the dispatch enum.
func waitForCompletions(_ channel: AnyBlockChannel, count: Int, timeoutSeconds: Double = 20) -> Completions {
    var results = Completions()
    let deadline = Date().addingTimeInterval(timeoutSeconds)
    while results.count < count && Date() < deadline {
        if channel.completionFD >= 0 {  // synchronous channels (no fd) are ready after commit
            var descriptor = pollfd(fd: channel.completionFD, events: Int16(POLLIN), revents: 0)
            _ = poll(&descriptor, 1, 200)
        }
        _ = channel.reap { token, result in results[token] = result }
    }
    return results
}

/// Submits one request, commits, and waits for its completion.
func run<C: BlockChannel>(_ channel: C, _ request: BlockRequest, token: UInt64 = 1) -> BlockResult? {
    let queued = channel.submit(request, token: token)
    guard queued == 0 else { return .failure(queued) }
    channel.commit()
    return waitForCompletions(channel, count: 1)[token]
}

/// Reads a file's bytes with plain buffered I/O (independent of the back-end under test).
func fileBytes(_ path: String, offset: Int, count: Int) -> [UInt8] {
    let fd = open(path, O_RDONLY)
    precondition(fd >= 0)
    defer { close(fd) }
    var bytes = [UInt8](repeating: 0, count: count)
    let n = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress, count, off_t(offset)) }
    return Array(bytes.prefix(max(n, 0)))
}

/// Creates a file of `size` bytes filled with `byte` (not sparse).
func makeFilledFile(_ path: String, size: Int, byte: UInt8) {
    let data = Data(repeating: byte, count: size)
    precondition(FileManager.default.createFile(atPath: path, contents: data))
}

/// stat(2) of a path.
func statOf(_ path: String) -> stat {
    var st = stat()
    precondition(stat(path, &st) == 0)
    return st
}

/// Runs a program; returns its exit status and standard output.
@discardableResult
func runProgram(_ executable: String, _ arguments: [String]) -> (status: Int32, output: String) {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: executable)
    process.arguments = arguments
    let pipe = Pipe()
    process.standardOutput = pipe
    process.standardError = pipe
    do { try process.run() } catch { return (-1, "\(error)") }
    let data = pipe.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    return (process.terminationStatus, String(decoding: data, as: UTF8.self))
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
