import BlockIO
import CSystem
import EventLoop
import SCSI
import VfioUser
#if canImport(Glibc)
import Glibc
#endif

/// Ring setup: the rings-state, request, completion and message ring pages given by SETUP_RINGS and
/// SETUP_MSG_RING, translated through the DMA windows, with shadow pages (pulled and pushed by DMA message)
/// for guest memory without an fd, and the rings-state field access.
extension PVSCSIDevice {
    func dropRings() {
        ringsGeneration &+= 1
        ringsConfigured = false
        ringsState = nil
        requestPageCount = 0
        completionPageCount = 0
        messagePageCount = 0
        requestEntries = 0
        completionEntries = 0
        messageEntries = 0
        requestConsumer = 0
        completionProducer = 0
        messageProducer = 0
        loggedRingError = false
    }

    /// A page-aligned guest page: its host mapping, or shadow page `shadow` when it lies in fd-less guest memory
    /// (reachable by DMA messages, read and write); nil when the PPN is out of range or not mapped with the access.
    func page(_ ppn: UInt64, write: Bool, shadow: Int) -> UnsafeMutableRawPointer? {
        guard ppn < (UInt64(1) << 52) else { return nil }
        if let p = memory.translate(ppn << 12, length: PVSCSI.pageSize, write: write) { return p }
        guard memory.isRemote(ppn << 12, length: PVSCSI.pageSize, write: write),
              memory.isRemote(ppn << 12, length: PVSCSI.pageSize, write: false) else { return nil }
        return shadowPages + shadow * 4096
    }

    @inline(__always) private func isShadow(_ p: UnsafeMutableRawPointer) -> Bool {
        p >= shadowPages && p < shadowPages + Self.shadowPageCount * 4096
    }

    /// Refreshes `count` bytes of a shadow ring page from guest memory (no-op for mapped pages).
    @inline(__always) func pull(_ p: UnsafeMutableRawPointer, ppn: UInt64, offset: Int, count: Int) -> Bool {
        guard isShadow(p) else { return true }
        return memory.read((ppn << 12) + UInt64(offset), into: UnsafeMutableRawBufferPointer(start: p + offset, count: count))
    }

    /// Copies `count` bytes of a shadow ring page out to guest memory (no-op for mapped pages).
    @inline(__always) func push(_ p: UnsafeMutableRawPointer, ppn: UInt64, offset: Int, count: Int) -> Bool {
        guard isShadow(p) else { return true }
        let ok = memory.write((ppn << 12) + UInt64(offset), from: UnsafeRawBufferPointer(start: p + offset, count: count))
        if !ok { stats.ringErrors += 1 }
        return ok
    }

    private static func validPageCount(_ n: UInt32, max: Int) -> Bool {
        n > 0 && n <= UInt32(max) && n & (n - 1) == 0
    }

    func setupRings() -> Bool {
        let reqPages = commandWords[0]
        let cmpPages = commandWords[1]
        guard Self.validPageCount(reqPages, max: PVSCSI.maxRingPages), Self.validPageCount(cmpPages, max: PVSCSI.maxRingPages) else {
            log.warning("pvscsi: SETUP_RINGS rejected: page counts \(reqPages)/\(cmpPages) (need a power of two in 1...\(PVSCSI.maxRingPages))")
            return false
        }
        let statePPN = word64(2)
        var newReq: [UnsafeMutableRawPointer?] = Array(repeating: nil, count: PVSCSI.maxRingPages)
        var newCmp: [UnsafeMutableRawPointer?] = Array(repeating: nil, count: PVSCSI.maxRingPages)
        guard let state = page(statePPN, write: true, shadow: 0) else {
            log.warning("pvscsi: SETUP_RINGS rejected: rings state PPN 0x\(String(statePPN, radix: 16)) not in mapped guest memory")
            return false
        }
        for i in 0..<Int(reqPages) {
            let ppn = word64(4 + 2 * i)
            guard let p = page(ppn, write: false, shadow: 1 + i) else {
                log.warning("pvscsi: SETUP_RINGS rejected: request ring PPN[\(i)] 0x\(String(ppn, radix: 16)) not in mapped guest memory")
                return false
            }
            newReq[i] = p
            requestPPNs[i] = ppn
        }
        for i in 0..<Int(cmpPages) {
            let ppn = word64(4 + 2 * PVSCSI.maxRingPages + 2 * i)
            guard let p = page(ppn, write: true, shadow: 1 + PVSCSI.maxRingPages + i) else {
                log.warning("pvscsi: SETUP_RINGS rejected: completion ring PPN[\(i)] 0x\(String(ppn, radix: 16)) not in mapped guest memory")
                return false
            }
            newCmp[i] = p
            completionPPNs[i] = ppn
        }
        orphanInFlight()
        dropRings()
        ringsStatePPN = statePPN
        ringsState = state
        ringsConfigured = true
        requestPages = newReq
        completionPages = newCmp
        requestPageCount = Int(reqPages)
        completionPageCount = Int(cmpPages)
        requestEntries = reqPages * UInt32(4096 / PVSCSI.requestDescriptorSize)
        completionEntries = cmpPages * UInt32(4096 / PVSCSI.completionDescriptorSize)
        // The outcome is known: publish it before the ring-state writes, which may be DMA messages during which
        // the client's register reads are answered.
        commandStatus = PVSCSI.commandSucceeded
        store32(PVSCSI.RingsState.requestEntriesLog2, UInt32(requestEntries.trailingZeroBitCount))
        store32(PVSCSI.RingsState.completionEntriesLog2, UInt32(completionEntries.trailingZeroBitCount))
        store32(PVSCSI.RingsState.requestConsumer, 0)
        store32(PVSCSI.RingsState.completionProducer, 0)
        log.info("pvscsi: rings set up: \(requestEntries) request / \(completionEntries) completion entries")
        return true
    }

    func setupMessageRing() -> Bool {
        guard ringsConfigured, ringsState != nil || attachRings() else {
            log.warning("pvscsi: SETUP_MSG_RING before SETUP_RINGS ignored")
            return false
        }
        let pages = commandWords[0]
        guard Self.validPageCount(pages, max: PVSCSI.maxMessageRingPages) else {
            log.warning("pvscsi: SETUP_MSG_RING rejected: \(pages) pages (need a power of two in 1...\(PVSCSI.maxMessageRingPages))")
            return false
        }
        var newPages: [UnsafeMutableRawPointer?] = Array(repeating: nil, count: PVSCSI.maxMessageRingPages)
        for i in 0..<Int(pages) {
            let ppn = word64(2 + 2 * i)
            guard let p = page(ppn, write: true, shadow: 1 + 2 * PVSCSI.maxRingPages + i) else {
                log.warning("pvscsi: SETUP_MSG_RING rejected: PPN[\(i)] 0x\(String(ppn, radix: 16)) not in mapped guest memory")
                return false
            }
            newPages[i] = p
            messagePPNs[i] = ppn
        }
        messagePages = newPages
        messagePageCount = Int(pages)
        messageEntries = pages * UInt32(4096 / PVSCSI.messageDescriptorSize)
        messageProducer = 0
        commandStatus = PVSCSI.commandSucceeded  // before DMA messages, as in setupRings
        store32(PVSCSI.RingsState.messageEntriesLog2, UInt32(messageEntries.trailingZeroBitCount))
        store32(PVSCSI.RingsState.messageProducer, 0)
        log.info("pvscsi: message ring set up: \(messageEntries) entries")
        return true
    }

    /// A rings-state field (through DMA_READ when the page is fd-less; nil when that fails).
    @inline(__always) func load32(_ offset: Int) -> UInt32? {
        guard let state = ringsState, pull(state, ppn: ringsStatePPN, offset: offset, count: 4) else { return nil }
        return csys_load32_acquire(state + offset)
    }
    @inline(__always) func store32(_ offset: Int, _ value: UInt32) {
        guard let state = ringsState else { return }
        csys_store32_release(state + offset, value)
        _ = push(state, ppn: ringsStatePPN, offset: offset, count: 4)
    }

    /// Translates every configured ring page; on success the rings are attached, otherwise detached.
    @discardableResult
    func attachRings() -> Bool {
        ringsGeneration &+= 1
        ringsState = nil
        guard ringsConfigured, let state = page(ringsStatePPN, write: true, shadow: 0) else { return false }
        for i in 0..<requestPageCount {
            guard let p = page(requestPPNs[i], write: false, shadow: 1 + i) else { return false }
            requestPages[i] = p
        }
        for i in 0..<completionPageCount {
            guard let p = page(completionPPNs[i], write: true, shadow: 1 + PVSCSI.maxRingPages + i) else { return false }
            completionPages[i] = p
        }
        for i in 0..<messagePageCount {
            guard let p = page(messagePPNs[i], write: true, shadow: 1 + 2 * PVSCSI.maxRingPages + i) else { return false }
            messagePages[i] = p
        }
        ringsState = state
        return true
    }
}
