import BlockIO
import CSystem
import EventLoop
import SCSI
import VfioUser
#if canImport(Glibc)
import Glibc
#endif

/// The bounce pool (allocated on first use): chunks that stand in for guest data buffers without an fd, copied
/// from or to guest memory by DMA message before or after the I/O.
extension PVSCSIDevice {
    /// Allocates the bounce pool the first time a request's data lies in fd-less guest memory.
    private func ensureBouncePool() {
        guard bouncePool == nil else { return }
        totalChunks = max(1, options.bounceBufferBytes / Self.bounceChunkSize)
        bouncePool = .allocate(byteCount: totalChunks * Self.bounceChunkSize, alignment: 4096)
        freeChunks = Array((0..<totalChunks).reversed())
        log.info("pvscsi: guest memory without fd: \((totalChunks * Self.bounceChunkSize) >> 20) MiB of bounce buffers for DMA by message")
    }

    /// Points the slot's iovecs at bounce chunks for `length` bytes (its `ranges` guest ranges stay in the
    /// segment table); for data-out, fetches the data with DMA_READ. Returns the iovec count, or nil after
    /// failing the request.
    func bounce(_ slot: Int, ranges: Int, length: UInt64, toHost: Bool) -> Int? {
        ensureBouncePool()
        guard let pool = bouncePool else { finish(slot, host: .hardwareFailure); return nil }
        let needed = Int((length + UInt64(Self.bounceChunkSize) - 1) / UInt64(Self.bounceChunkSize))
        guard needed <= Self.iovecsPerSlot, needed <= freeChunks.count else {
            invalid(slot, "data length \(length) exceeds the bounce buffers for guest memory without fd (\(freeChunks.count) of \(totalChunks) chunks free)")
            return nil
        }
        let base = iovecs.elements + slot * Self.iovecsPerSlot
        var left = Int(length)
        for k in 0..<needed {
            let chunk = freeChunks.removeLast()
            let n = min(left, Self.bounceChunkSize)
            base[k] = iovec(iov_base: pool + chunk * Self.bounceChunkSize, iov_len: n)
            left -= n
        }
        slots[slot].bounceChunks = needed
        slots[slot].segmentCount = ranges
        if !toHost && !copyBounce(slot, toGuest: false, length: Int(length)) {
            log.error("pvscsi: request context \(slots[slot].context): data-out not readable from guest memory (DMA by message failed)")
            finish(slot, host: .hardwareFailure)
            return nil
        }
        return needed
    }

    /// Copies `length` bytes between the slot's bounce chunks and its guest ranges.
    func copyBounce(_ slot: Int, toGuest: Bool, length: Int) -> Bool {
        guard let table = segments else { return false }
        let chunks = iovecs.elements + slot * Self.iovecsPerSlot
        let ranges = table + slot * Self.iovecsPerSlot
        var done = 0
        var r = 0
        var rOffset = 0
        while done < length && r < slots[slot].segmentCount {
            let (guest, rLength) = ranges[r]
            let chunk = done / Self.bounceChunkSize
            let cOffset = done % Self.bounceChunkSize
            let n = min(rLength - rOffset, Self.bounceChunkSize - cOffset, length - done)
            let host = chunks[chunk].iov_base! + cOffset
            let address = guest + UInt64(rOffset)
            let ok = toGuest ? memory.write(address, from: UnsafeRawBufferPointer(start: host, count: n))
                             : memory.read(address, into: UnsafeMutableRawBufferPointer(start: host, count: n))
            guard ok else { return false }
            done += n
            rOffset += n
            if rOffset == rLength { r += 1; rOffset = 0 }
        }
        return done == length
    }

    func releaseBounce(_ slot: Int) {
        let chunks = iovecs.elements + slot * Self.iovecsPerSlot
        if let pool = bouncePool {
            for k in 0..<slots[slot].bounceChunks {
                freeChunks.append((chunks[k].iov_base! - pool) / Self.bounceChunkSize)
            }
        }
        slots[slot].bounceChunks = 0
        slots[slot].segmentCount = 0
    }
}
