import BlockIO
import Foundation
import Glibc
import TestSupport
import Testing
@testable import Backends

/// A random mix of reads, writes (aligned and not, FUA or not), discards, write-zeroes and flushes
/// with up to 32 requests in flight, checked against an in-memory shadow copy of the disk.
@Suite struct FileChannelStressTests {
    struct Generator {
        var state: UInt64
        mutating func next() -> UInt64 {
            state &+= 0x9E37_79B9_7F4A_7C15
            var z = state
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return z ^ (z >> 31)
        }
        mutating func below(_ n: Int) -> Int { Int(next() % UInt64(n)) }
    }

    struct Pending {
        var operation: BlockIO.BlockOperation
        var region: Int
        var offset: Int
        var length: Int
        var buffers: TestBuffers?
    }

    @Test(arguments: [BackendSpec.CacheMode.none, .writeback])
    func randomMixedWorkloadMatchesShadow(cache: BackendSpec.CacheMode) throws {
        let dir = TemporaryDirectory()
        let path = dir.file("stress.img")
        let regionBytes = 16 << 10
        let regions = 256
        let diskBytes = regionBytes * regions
        let backend = try FileBackend(spec: BackendSpec(kind: .file, path: path, size: UInt64(diskBytes), cache: cache,
                                                        create: true, queueDepth: 64, workerThreads: 3))
        let channel = try backend.makeChannel()
        defer { channel.close(); backend.close() }

        var shadow = [UInt8](repeating: 0, count: diskBytes)
        var random = Generator(state: cache == .none ? 1 : 2)
        var pending = [UInt64: Pending]()
        var busy = Set<Int>()
        var nextToken: UInt64 = 1
        var completed = 0
        var mismatches = 0
        var failures = 0
        let total = 3000

        func handle(_ token: UInt64, _ result: BlockResult) {
            guard let op = pending.removeValue(forKey: token) else { failures += 1; return }
            if op.operation != .flush { busy.remove(op.region) }
            completed += 1
            let expectedBytes = op.operation == .flush ? 0 : op.length
            if result != .success(UInt64(expectedBytes)) { failures += 1; return }
            switch op.operation {
            case .write:
                let bytes = op.buffers!.bytes
                shadow.replaceSubrange(op.offset..<(op.offset + op.length), with: bytes.prefix(op.length))
            case .read:
                if Array(op.buffers!.bytes.prefix(op.length)) != Array(shadow[op.offset..<(op.offset + op.length)]) {
                    mismatches += 1
                }
            case .discard, .writeZeroes:
                shadow.replaceSubrange(op.offset..<(op.offset + op.length), with: repeatElement(0, count: op.length))
            case .flush:
                break
            }
        }

        var submitted = 0
        while completed < total {
            // Submit a random batch onto idle regions.
            let batch = 1 + random.below(12)
            var queued = 0
            while queued < batch && submitted < total && pending.count < 32 {
                let region = random.below(regions)
                if busy.contains(region) { continue }
                let blocks = 1 + random.below(regionBytes / 512)
                let start = random.below(regionBytes / 512 - blocks + 1)
                let offset = region * regionBytes + start * 512
                let length = blocks * 512
                let kind = random.below(100)
                var op = Pending(operation: .read, region: region, offset: offset, length: length, buffers: nil)
                var fua = false
                var mayUnmap = false
                switch kind {
                case 0..<40:
                    op.operation = .write
                    let split = length > 512 && random.below(2) == 0
                    let first = split ? 1 + random.below(length - 1) : length
                    let buffers = TestBuffers(segments: split ? [first, length - first] : [length],
                                              misalign: random.below(3) == 0 ? 1 + random.below(63) : 0)
                    buffers.fill(seed: UInt8(truncatingIfNeeded: random.next()))
                    op.buffers = buffers
                    fua = random.below(8) == 0
                case 40..<85:
                    op.operation = .read
                    op.buffers = TestBuffers(segments: [length], misalign: random.below(3) == 0 ? 8 : 0)
                case 85..<92:
                    op.operation = .discard
                case 92..<98:
                    op.operation = .writeZeroes
                    mayUnmap = random.below(2) == 0
                default:
                    op.operation = .flush
                    op.length = 0
                }
                let request = BlockRequest(operation: op.operation, offset: op.operation == .flush ? 0 : UInt64(offset),
                                           length: UInt64(op.length), buffers: op.buffers?.list ?? .empty,
                                           forceUnitAccess: fua, mayUnmap: mayUnmap)
                let token = nextToken
                nextToken += 1
                let r = channel.submit(request, token: token)
                #expect(r == 0)
                if r != 0 { failures += 1; completed += 1; submitted += 1; continue }
                pending[token] = op
                if op.operation != .flush { busy.insert(region) }
                queued += 1
                submitted += 1
            }
            channel.commit()
            var descriptor = pollfd(fd: channel.completionFD, events: Int16(POLLIN), revents: 0)
            let ready = poll(&descriptor, 1, 5000)
            #expect(ready >= 0)
            if ready == 0 && pending.count > 0 { Issue.record("no completion within 5 s"); break }
            _ = channel.reap(handle)
        }
        #expect(failures == 0)
        #expect(mismatches == 0)
        #expect(completed == total)
        #expect(channel.inFlight == 0)
        // The file itself equals the shadow copy.
        #expect(fileBytes(path, offset: 0, count: diskBytes) == shadow)
    }
}
