import BlockIO
import Glibc
@testable import ISCSIBackend
import Testing

/// The channel's decisions without a session: geometry discovery, command choice, transfer splitting.
/// No tgtd needed.
@Suite struct ISCSIGeometryDiscoveryTests {
    static let capacity4K = ISCSIGeometryDiscovery.Capacity(blockLength: 4096, returnedLBA: 999, logicalPerPhysicalExponent: 0,
                                                          lbpme: true, lbprz: false)

    @Test func walksEveryStepAndPublishesTheGeometryAndLimits() {
        var d = ISCSIGeometryDiscovery()
        d.start(from: BlockGeometry(logicalBlockSize: 512, physicalBlockSize: 512, blockCount: 0))
        #expect(d.step == .readCapacity)
        #expect(d.readCapacity(.init(blockLength: 512, returnedLBA: 2047, logicalPerPhysicalExponent: 3,
                                     lbpme: true, lbprz: false)) == .next(.blockLimits))
        #expect(d.geometry.blockCount == 2048)
        #expect(d.geometry.physicalBlockSize == 4096)
        #expect(d.blockLimits(.init(maximumTransferLength: 128, optimalUnmapGranularity: 8, maximumUnmapLBACount: 0xFFFF_FFFF,
                                    maximumWriteSameLength: 1 << 40)) == .next(.provisioning))
        #expect(d.provisioning(.init(lbpu: true, lbpws: true, lbprz: true)) == .next(.caching))
        // Mode parameter header(10) with WP clear, no block descriptors, then the caching page (08h) with WCE.
        let mode: [UInt8] = [0, 18, 0, 0x00, 0, 0, 0, 0, 0x08, 18, 0x04, 0]
        let afterCaching = mode.withUnsafeBytes { d.caching(modeSense10: $0) }
        #expect(afterCaching == .next(.persistentReservations))
        #expect(d.persistentReservations(supported: true) == .next(.compareAndWrite))
        let rsoc: [UInt8] = [0, 0x03]
        #expect(rsoc.withUnsafeBytes { d.compareAndWrite(reportedOperationCode: $0) } == .finished)
        let (g, limits) = d.finish()
        #expect(d.step == .idle)
        #expect(g.logicalBlockSize == 512 && g.blockCount == 2048)
        #expect(g.supportsDiscard && g.supportsWriteZeroes && g.discardReadsZeroes)
        #expect(g.volatileWriteCache && !g.readOnly)
        #expect(g.remotePersistentReservations && g.remoteCompareAndWrite && g.supportsPassThrough)
        #expect(g.discardGranularity == 4096)
        #expect(limits.remoteMaxTransferBytes == 65536)
        // 0xFFFFFFFF unmap blocks means "no limit": the default; WRITE SAME capped at 32 bits.
        #expect(limits.maxUnmapBlocks == ISCSIGeometryDiscovery.defaultBlocksPerCommand)
        #expect(limits.maxWriteSameBlocks == 0xFFFF_FFFF)
    }

    @Test func withoutLBPMESkipsProvisioningAndOffersNoDiscard() {
        var d = ISCSIGeometryDiscovery()
        d.start(from: BlockGeometry(logicalBlockSize: 512, physicalBlockSize: 512, blockCount: 0))
        var c = Self.capacity4K
        c.lbpme = false
        c.lbprz = true
        #expect(d.readCapacity(c) == .next(.blockLimits))
        #expect(d.blockLimits(nil) == .next(.caching))
        // Write-protected, no caching page returned (WCE stays as assumed: on).
        let header: [UInt8] = [0, 6, 0, 0x80, 0, 0, 0, 0]
        #expect(header.withUnsafeBytes { d.caching(modeSense10: $0) } == .next(.persistentReservations))
        #expect(d.persistentReservations(supported: false) == .next(.compareAndWrite))
        #expect(d.compareAndWrite(reportedOperationCode: nil) == .finished)
        let (g, limits) = d.finish()
        #expect(g.readOnly && g.volatileWriteCache)
        #expect(!g.supportsDiscard && !g.discardReadsZeroes && g.supportsWriteZeroes)
        #expect(!g.remotePersistentReservations && !g.remoteCompareAndWrite)
        #expect(limits == ISCSITransferLimits())
    }

    @Test func refusesBlockSizesTheCoreCannotServe() {
        for bs: UInt32 in [0, 256, 1000, 131_072] {
            var d = ISCSIGeometryDiscovery()
            d.start(from: BlockGeometry(logicalBlockSize: 512, physicalBlockSize: 512, blockCount: 0))
            var c = Self.capacity4K
            c.blockLength = bs
            #expect(d.readCapacity(c) == .failed("remote block size \(bs) is not supported"))
            #expect(d.step == .idle)
        }
    }

    @Test func compareAndWriteSupportField() {
        for (support, listed) in [(UInt8(0), false), (1, false), (3, true), (5, true), (0x83, true)] {
            var d = ISCSIGeometryDiscovery()
            let data: [UInt8] = [0, support]
            _ = data.withUnsafeBytes { d.compareAndWrite(reportedOperationCode: $0) }
            #expect(d.finish().geometry.remoteCompareAndWrite == listed)
        }
    }

    @Test func maximumTransferIsCappedToWholeBlocksIn32Bits() {
        var d = ISCSIGeometryDiscovery()
        _ = d.readCapacity(Self.capacity4K)
        _ = d.blockLimits(.init(maximumTransferLength: 0x00FF_FFFF, optimalUnmapGranularity: 0, maximumUnmapLBACount: 16,
                                maximumWriteSameLength: 0))
        let limits = d.finish().limits
        #expect(limits.remoteMaxTransferBytes == UInt64(UInt32.max) & ~4095)
        #expect(limits.maxUnmapBlocks == 16)
        #expect(limits.maxWriteSameBlocks == ISCSIGeometryDiscovery.defaultBlocksPerCommand)
    }
}

@Suite struct ISCSICommandTests {
    static let limits = ISCSITransferLimits(remoteMaxTransferBytes: 65536, maxUnmapBlocks: 256, maxWriteSameBlocks: 100)

    @Test func maxIOBytesFollowsTheRemoteAndTheOverride() {
        #expect(ISCSITransferLimits.maxIOBytes(blockSize: 4096, remoteMaxTransferBytes: 0, override: 0) == UInt64(UInt32.max) & ~4095)
        #expect(ISCSITransferLimits.maxIOBytes(blockSize: 512, remoteMaxTransferBytes: 65536, override: 0) == 65536)
        #expect(ISCSITransferLimits.maxIOBytes(blockSize: 512, remoteMaxTransferBytes: 65536, override: 16384) == 16384)
        #expect(ISCSITransferLimits.maxIOBytes(blockSize: 512, remoteMaxTransferBytes: 8192, override: 16384) == 8192)
    }

    @Test func readsAndWritesWithinTheLimitGoAsOneCommand() {
        let read = BlockRequest(operation: .read, offset: 8192, length: 65536)
        #expect(ISCSICommand.next(for: read, done: 0, blockSize: 512, maxIOBytes: 65536, limits: Self.limits)
                == .read16(lba: 16, bytes: 65536, split: false))
        let write = BlockRequest(operation: .write, offset: 4096, length: 4096, forceUnitAccess: true)
        #expect(ISCSICommand.next(for: write, done: 0, blockSize: 4096, maxIOBytes: 65536, limits: Self.limits)
                == .write16(lba: 1, bytes: 4096, split: false, forceUnitAccess: true))
    }

    @Test func largerTransfersAreSentInPartsFromWhereTheLastEnded() {
        let read = BlockRequest(operation: .read, offset: 0, length: 150_000 - 150_000 % 512)
        #expect(ISCSICommand.next(for: read, done: 0, blockSize: 512, maxIOBytes: 65536, limits: Self.limits)
                == .read16(lba: 0, bytes: 65536, split: true))
        #expect(ISCSICommand.next(for: read, done: 131_072, blockSize: 512, maxIOBytes: 65536, limits: Self.limits)
                == .read16(lba: 256, bytes: read.length - 131_072, split: true))
    }

    @Test func discardAndWriteZeroesAreSplitByTheirBlockLimits() {
        let discard = BlockRequest(operation: .discard, offset: 512, length: 300 * 512)
        #expect(ISCSICommand.next(for: discard, done: 0, blockSize: 512, maxIOBytes: 65536, limits: Self.limits)
                == .unmap(lba: 1, blocks: 256))
        #expect(ISCSICommand.next(for: discard, done: 256 * 512, blockSize: 512, maxIOBytes: 65536, limits: Self.limits)
                == .unmap(lba: 257, blocks: 44))
        let zeroes = BlockRequest(operation: .writeZeroes, offset: 0, length: 250 * 512, mayUnmap: true)
        #expect(ISCSICommand.next(for: zeroes, done: 200 * 512, blockSize: 512, maxIOBytes: 65536, limits: Self.limits)
                == .writeSame16(lba: 200, blocks: 50, unmap: true))
        let flush = BlockRequest(operation: .flush, offset: 0, length: 0)
        #expect(ISCSICommand.next(for: flush, done: 0, blockSize: 512, maxIOBytes: 65536, limits: Self.limits) == .synchronizeCache16)
    }

    @Test func passThroughKeepsTheCDBAndTakesTheDirectionFromTheOperation() {
        // COMPARE AND WRITE (89h), 16 bytes, one block: data-out of two blocks.
        var bytes = [UInt8](repeating: 0, count: 16)
        bytes[0] = 0x89
        bytes[13] = 1
        var request = BlockRequest(operation: .write, offset: 0, length: 1024)
        request.passThrough = bytes.withUnsafeBytes { SCSIPassThrough(cdb: $0) }
        let command = ISCSIPassThroughCommand(request)
        var cdb = command.cdb
        let wire = withUnsafeBytes(of: &cdb) { Array($0) }
        #expect(wire == bytes)
        #expect(command.cdbLength == 16 && command.direction == .write && command.transferLength == 1024)
        request.operation = .flush
        let none = ISCSIPassThroughCommand(request)
        #expect(none.direction == .none && none.transferLength == 0)
    }
}

@Suite struct ISCSITransferSplitTests {
    /// Runs `body` with iovecs of the given lengths over one buffer, and an output array of `room` entries.
    func withVectors<R>(_ lengths: [Int], room: Int,
                        _ body: (IOVectorList, UnsafeMutableRawPointer, UnsafeMutablePointer<iovec>) -> R) -> R {
        let total = lengths.reduce(0, +)
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: max(total, 1), alignment: 4096)
        let vectors = UnsafeMutablePointer<iovec>.allocate(capacity: lengths.count)
        let out = UnsafeMutablePointer<iovec>.allocate(capacity: room)
        defer { buffer.deallocate(); vectors.deallocate(); out.deallocate() }
        var offset = 0
        for (i, n) in lengths.enumerated() {
            vectors[i] = iovec(iov_base: buffer + offset, iov_len: n)
            offset += n
        }
        return body(IOVectorList(base: vectors, count: lengths.count), buffer, out)
    }

    @Test func cutsFromTheMiddleOfAnEntry() {
        withVectors([4096, 8192, 4096], room: 4) { list, base, out in
            let part = ISCSITransferSplit.part(of: list, from: 6144, upTo: 8192, blockSize: 512, wholeBlocks: true, into: out, capacity: 4)
            #expect(part.count == 2 && part.bytes == 8192)
            #expect(out[0].iov_base == base + 6144 && out[0].iov_len == 6144)
            #expect(out[1].iov_base == base + 12288 && out[1].iov_len == 2048)
        }
    }

    @Test func trimsToWholeBlocksWhenTheEntriesRunOut() {
        withVectors([700, 700, 700, 700], room: 2) { list, _, out in
            // Two entries cover 1400 bytes: the part ends at the block boundary, 1024.
            let part = ISCSITransferSplit.part(of: list, from: 0, upTo: 2800, blockSize: 512, wholeBlocks: true, into: out, capacity: 2)
            #expect(part.count == 2 && part.bytes == 1024)
            #expect(out[0].iov_len == 700 && out[1].iov_len == 324)
            // Without whole blocks (pass-through buffers) every covered byte counts.
            let raw = ISCSITransferSplit.part(of: list, from: 0, upTo: 1000, blockSize: 512, wholeBlocks: false, into: out, capacity: 2)
            #expect(raw.count == 2 && raw.bytes == 1000 && out[1].iov_len == 300)
        }
    }

    @Test func dropsEntriesThatHoldOnlyAPartialBlock() {
        withVectors([512, 100, 4096], room: 2) { list, _, out in
            let part = ISCSITransferSplit.part(of: list, from: 0, upTo: 4708, blockSize: 512, wholeBlocks: true, into: out, capacity: 2)
            #expect(part.count == 1 && part.bytes == 512)
        }
    }

    @Test func beyondTheBuffersGivesNothing() {
        withVectors([4096], room: 2) { list, _, out in
            let part = ISCSITransferSplit.part(of: list, from: 4096, upTo: 4096, blockSize: 512, wholeBlocks: true, into: out, capacity: 2)
            #expect(part.count == 0 && part.bytes == 0)
        }
    }
}
