import BlockIO
import Foundation
import Glibc

/// A fresh directory under /tmp (ext4 on this machine), removed on deinit.
public final class TemporaryDirectory {
    public let path: String

    public init() {
        var template = Array("/tmp/scsigate-backends-XXXXXX".utf8CString)
        let result = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        precondition(result != nil, "mkdtemp failed")
        path = String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    public func file(_ name: String) -> String { path + "/" + name }

    deinit { try? FileManager.default.removeItem(atPath: path) }
}

/// Page-aligned memory carved into iovec segments, optionally misaligned by `misalign` bytes.
public final class TestBuffers {
    public let memory: UnsafeMutableRawPointer
    public let totalBytes: Int
    public let storage: IOVectorStorage
    public let segments: [Int]
    public let start: UnsafeMutableRawPointer

    public init(segments: [Int], misalign: Int = 0) {
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

    public var list: IOVectorList { storage.view(count: segments.count) }

    /// Fills the buffers with a pattern derived from `seed`.
    public func fill(seed: UInt8) {
        for i in 0..<totalBytes { start.storeBytes(of: Self.patternByte(i, seed: seed), toByteOffset: i, as: UInt8.self) }
    }

    public func clear(_ value: UInt8 = 0xEE) { start.initializeMemory(as: UInt8.self, repeating: value, count: totalBytes) }

    public var bytes: [UInt8] { Array(UnsafeRawBufferPointer(start: start, count: totalBytes)) }

    public static func patternByte(_ i: Int, seed: UInt8) -> UInt8 { UInt8(truncatingIfNeeded: i &* 31 &+ i >> 9) &+ seed }

    public static func pattern(count: Int, seed: UInt8) -> [UInt8] { (0..<count).map { patternByte($0, seed: seed) } }
}

/// Results of `waitForCompletions`, keyed by token.
public typealias Completions = [UInt64: BlockResult]

/// Waits on the channel's completion eventfd with poll(2) and reaps until `count` completions arrived
/// (or `timeoutSeconds` passed).
public func waitForCompletions<C: BlockChannel>(_ channel: C, count: Int, timeoutSeconds: Double = 20) -> Completions {
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
public func run<C: BlockChannel>(_ channel: C, _ request: BlockRequest, token: UInt64 = 1) -> BlockResult? {
    let queued = channel.submit(request, token: token)
    guard queued == 0 else { return .failure(queued) }
    channel.commit()
    return waitForCompletions(channel, count: 1)[token]
}

/// Creates a file of `size` bytes filled with `byte` (not sparse).
public func makeFilledFile(_ path: String, size: Int, byte: UInt8) {
    let data = Data(repeating: byte, count: size)
    precondition(FileManager.default.createFile(atPath: path, contents: data))
}

/// Runs a program; returns its exit status and standard output.
@discardableResult
public func runProgram(_ executable: String, _ arguments: [String]) -> (status: Int32, output: String) {
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
