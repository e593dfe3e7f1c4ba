import BlockIO
import Foundation
@testable import ISCSIBackend
import Synchronization

/// Page-aligned buffers exposed as an iovec list (split into several elements to exercise scatter/gather).
final class TestBuffers {
    let storage: UnsafeMutableRawPointer
    let length: Int
    let iovecs: IOVectorStorage

    init(length: Int, pieces: Int = 3, fill: UInt8? = nil) {
        self.length = length
        storage = .allocate(byteCount: length, alignment: 4096)
        storage.initializeMemory(as: UInt8.self, repeating: fill ?? 0, count: length)
        iovecs = IOVectorStorage(capacity: max(pieces, 1))
        // Uneven split on 512-byte boundaries.
        let blocks = length / 512
        var start = 0
        for i in 0..<pieces {
            let remaining = blocks - start / 512
            let take = i == pieces - 1 ? remaining : max(1, remaining / (pieces - i) + (i % 2 == 0 ? 1 : -1))
            let len = min(take, remaining) * 512
            iovecs.elements[i] = iovec(iov_base: storage + start, iov_len: len)
            start += len
        }
    }

    deinit { storage.deallocate() }

    var list: IOVectorList { iovecs.view(count: iovecs.capacity) }

    var bytes: [UInt8] {
        get { Array(UnsafeRawBufferPointer(start: storage, count: length)) }
        set { newValue.withUnsafeBytes { storage.copyMemory(from: $0.baseAddress!, byteCount: min(length, $0.count)) } }
    }

    static func pattern(_ length: Int, seed: UInt8) -> [UInt8] {
        (0..<length).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ Int(seed) &+ ($0 >> 9)) }
    }
}

/// Runs a channel with poll(2) until `done` or the deadline, collecting completions.
final class ChannelDriver {
    let channel: ISCSIChannel
    var results: [UInt64: (BlockResult, ISCSIRemoteSense)] = [:]

    init(_ channel: ISCSIChannel) { self.channel = channel }

    func pump(seconds: Double, until done: () -> Bool) {
        let deadline = Date().addingTimeInterval(seconds)
        channel.commit()
        while !done() && Date() < deadline {
            channel.runOnce(timeoutMilliseconds: 20)
            _ = channel.reapDetailed { token, result, sense in self.results[token] = (result, sense) }
        }
        _ = channel.reapDetailed { token, result, sense in self.results[token] = (result, sense) }
    }

    /// Submits and waits for one request; nil when it did not complete in time.
    func perform(_ request: BlockRequest, token: UInt64, seconds: Double = 10) -> BlockResult? {
        let rc = channel.submit(request, token: token)
        if rc != 0 { return BlockResult.failure(rc) }
        pump(seconds: seconds) { results[token] != nil }
        return results.removeValue(forKey: token)?.0
    }

    func waitOnline(seconds: Double) -> Bool {
        pump(seconds: seconds) { channel.isOnline }
        return channel.isOnline
    }
}


