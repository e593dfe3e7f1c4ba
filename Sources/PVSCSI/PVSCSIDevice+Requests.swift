import BlockIO
import CSystem
import EventLoop
import SCSI
import VfioUser
#if canImport(Glibc)
import Glibc
#endif

/// The request ring: reading request descriptors once from guest memory, starting requests (REPORT LUNS
/// answered here), and turning a request's data buffer or SG list into the slot's iovecs.
extension PVSCSIDevice {
    /// A request descriptor, each field read once from guest memory.
    struct RequestDescriptor {
        var context: UInt64
        var dataAddress: UInt64
        var dataLength: UInt64
        var senseAddress: UInt64
        var senseLength: UInt32
        var flags: UInt32
        var cdb: CDB
        var cdbLength: UInt8
        var lun: UInt64
        var tag: UInt8
        var bus: UInt8
        var target: UInt8
    }

    private func readRequest(_ index: UInt32) -> RequestDescriptor? {
        let perPage = UInt32(4096 / PVSCSI.requestDescriptorSize)
        let page = requestPages[Int(index / perPage)]!
        let offset = Int(index % perPage) * PVSCSI.requestDescriptorSize
        guard pull(page, ppn: requestPPNs[Int(index / perPage)], offset: offset, count: PVSCSI.requestDescriptorSize) else { return nil }
        let p = page + offset
        let cdbLength = p.load(fromByteOffset: 56, as: UInt8.self)
        let cdb = CDB(copying: UnsafeRawBufferPointer(start: p + 40, count: Int(min(cdbLength, 16))))
        var lun: UInt64 = 0
        for i in 0..<8 { lun = lun << 8 | UInt64(p.load(fromByteOffset: 57 + i, as: UInt8.self)) }
        return RequestDescriptor(
            context: p.loadUnaligned(fromByteOffset: 0, as: UInt64.self),
            dataAddress: p.loadUnaligned(fromByteOffset: 8, as: UInt64.self),
            dataLength: p.loadUnaligned(fromByteOffset: 16, as: UInt64.self),
            senseAddress: p.loadUnaligned(fromByteOffset: 24, as: UInt64.self),
            senseLength: p.loadUnaligned(fromByteOffset: 32, as: UInt32.self),
            flags: p.loadUnaligned(fromByteOffset: 36, as: UInt32.self),
            cdb: cdb, cdbLength: cdbLength, lun: lun,
            tag: p.load(fromByteOffset: 65, as: UInt8.self),
            bus: p.load(fromByteOffset: 66, as: UInt8.self),
            target: p.load(fromByteOffset: 67, as: UInt8.self))
    }

    @inline(__always) func beginWork() { work += 1 }

    /// Ends a stretch of device work; the outermost one processes a kick that arrived meanwhile.
    func endWork() {
        work -= 1
        if work == 0 && kickPending {
            kickPending = false
            processRequestRing()
        }
    }

    /// Consumes new request descriptors (KICK_RW_IO / KICK_NON_RW_IO, or a slot freed up).
    func processRequestRing() {
        if work > 0 {
            kickPending = true
            return
        }
        beginWork()
        defer { endWork() }
        guard ringsConfigured else {
            if !loggedRingError { log.warning("pvscsi: kick before SETUP_RINGS ignored") }
            loggedRingError = true
            stats.ringErrors += 1
            return
        }
        guard ringsState != nil || attachRings() else {
            log.warning("pvscsi: kick while the ring pages are not mapped: waiting for the client to map them again")
            return
        }
        let generation = ringsGeneration
        flushAwaitingRing()
        guard generation == ringsGeneration, ringsState != nil else { return }
        let producerIndex = load32(PVSCSI.RingsState.requestProducer)
        guard generation == ringsGeneration else { return }
        guard let producer = producerIndex else {
            log.error("pvscsi: request producer index not readable (DMA by message failed)")
            return
        }
        var available = producer &- requestConsumer
        if available > requestEntries {
            stats.ringErrors += 1
            if !loggedRingError {
                log.warning("pvscsi: request producer index \(producer) is \(available) entries ahead of the consumer (ring holds \(requestEntries)): ignoring the ring until it is sane")
                loggedRingError = true
            }
            return
        }
        target.refresh(&view)
        let bounced = memory.remoteRegionCount > 0
        if bounced && segments == nil { segments = .allocate(capacity: Self.slotCount * Self.iovecsPerSlot) }
        while available > 0, !freeSlots.isEmpty {
            let descriptor = readRequest(requestConsumer & (requestEntries - 1))
            guard generation == ringsGeneration else { break }  // rings replaced during a DMA wait
            guard let descriptor else {
                log.error("pvscsi: request descriptor not readable (DMA by message failed)")
                break
            }
            if bounced && descriptor.dataLength > 0 {
                let needed = Int((descriptor.dataLength + UInt64(Self.bounceChunkSize) - 1) / UInt64(Self.bounceChunkSize))
                let total = bouncePool == nil ? max(1, options.bounceBufferBytes / Self.bounceChunkSize) : totalChunks
                let free = bouncePool == nil ? total : freeChunks.count
                if needed <= min(total, Self.iovecsPerSlot) && needed > free {
                    bounceStalled = true  // retried when bounced requests complete
                    break
                }
            }
            let slot = freeSlots.removeLast()
            requestConsumer &+= 1
            available -= 1
            store32(PVSCSI.RingsState.requestConsumer, requestConsumer)
            guard generation == ringsGeneration else {
                freeSlots.append(slot)
                break
            }
            stats.requests += 1
            start(slot, descriptor)
            guard generation == ringsGeneration else { break }
        }
        commitChannels()
        raiseCompletionInterruptIfNeeded()
        sweepRetired()
    }

    func start(_ slot: Int, _ d: RequestDescriptor) {
        let arrival = IOCounters.now()
        slots[slot] = RequestSlot(state: .executing, context: d.context, target: UInt32(d.target),
                                  senseAddress: d.senseAddress, senseLength: d.senseLength, dataLength: d.dataLength)
        // Addressing: bus 0, target n <-> LUN n of the SCSI target, PVSCSI LUN 0 only.
        guard d.bus == 0, d.lun == 0, UInt32(d.target) < options.maxTargets,
              let lun = LogicalUnitNumber(Int(d.target)), let unit = view.unit(lun) else {
            finish(slot, host: .selectionTimeout)
            return
        }
        guard d.cdbLength >= 1, d.cdbLength <= 16, d.flags & PVSCSI.flagOutOfBandCDB == 0 else {
            invalid(slot, "CDB length \(d.cdbLength) / flags 0x\(String(d.flags, radix: 16))")
            return
        }
        let toHost = d.flags & PVSCSI.flagDirectionToHost != 0
        let toDevice = d.flags & PVSCSI.flagDirectionToDevice != 0
        if toHost && toDevice { invalid(slot, "both data directions"); return }
        var list = IOVectorList.empty
        if d.dataLength > 0 && (toHost || toDevice) {
            guard d.dataLength <= options.maxTransferBytes else { invalid(slot, "data length \(d.dataLength)"); return }
            guard let count = buildIOVectors(slot, d, toHost: toHost) else { return }
            list = IOVectorList(base: iovecs.elements + slot * Self.iovecsPerSlot, count: count)
        } else if d.dataLength > 0 && d.flags & PVSCSI.flagDirectionNone == 0 {
            invalid(slot, "data length \(d.dataLength) without a direction")
            return
        }
        slots[slot].toHost = toHost && d.dataLength > 0
        slots[slot].toDevice = toDevice && d.dataLength > 0
        let attribute: TaskAttribute
        switch d.tag {
        case 0x21: attribute = .headOfQueue
        case 0x22: attribute = .ordered
        default: attribute = .simple
        }
        tasks[slot].reset(nexus: nexus, lun: lun, tag: d.context, attribute: attribute,
                          cdb: d.cdb, dataOut: toDevice ? list : .empty, dataIn: toHost ? list : .empty)
        // The LUN's channel opens on its first command; the command counts on it until its completion is posted.
        var use = channels.existingUse(unit.backendID)
        if use < 0 {
            use = channels.use(for: unit.backendID)
            if use >= 0 { _ = channels.channel(use) }
        }
        if use >= 0 {
            channels.beginTask(use)
            channels.counters(use)?.begin()
            slots[slot].use = Int32(use)
            slots[slot].arrival = arrival
        }
        switch taskSet.register(slot: slot, nexus: nexus, lun: lun, tag: d.context, attribute: attribute) {
        case .registered:
            slots[slot].registered = true
        case .overlapped:
            tasks[slot].status = .checkCondition
            _ = TaskSet.overlappedCommandsError.sense?.encode(.fixed, into: &tasks[slot].sense)
            finishTask(slot)
            return
        case .slotUnavailable:
            tasks[slot].status = .busy
            finishTask(slot)
            return
        }
        if d.cdb.opcode == 0xA0 {
            answerReportLUNs(slot)
            return
        }
        let disposition = target.execute(&tasks[slot], view: &view)
        handle(slot, disposition)
    }

    /// REPORT LUNS for a PVSCSI target: each target carries exactly one LUN (0), whatever the SCSI
    /// target's map holds (those LUNs are the other PVSCSI targets). Answered here so that Linux does not
    /// probe LUN n on every target during its REPORT LUNS scan.
    private func answerReportLUNs(_ slot: Int) {
        let cdb = tasks[slot].cdb
        let allocation = Int(cdb.be32(6))
        let select = cdb[2]
        var badByte: Int? = nil
        for b in [1, 3, 4, 5, 10] where cdb[b] != 0 { badByte = b; break }
        if badByte == nil && select > 0x02 { badByte = 2 }
        if badByte == nil && allocation < 16 { badByte = 6 }
        if let b = badByte {
            tasks[slot].status = .checkCondition
            _ = SCSIError.invalidFieldInCDB(byte: b).sense?.encode(.fixed, into: &tasks[slot].sense)
            finishTask(slot)
            return
        }
        var list: (UInt64, UInt64) = (0, 0)
        withUnsafeMutableBytes(of: &list) { raw in
            // LUN LIST LENGTH: one entry (LUN 0, all zero), none for SELECT REPORT 01h (well-known LUNs).
            raw[3] = select == 0x01 ? 0 : 8
            let length = select == 0x01 ? 8 : 16
            tasks[slot].dataInLength = tasks[slot].dataIn.scatter(at: 0, from: UnsafeRawBufferPointer(rebasing: raw[0..<min(length, allocation)]))
        }
        tasks[slot].status = .good
        finishTask(slot)
    }

    func invalid(_ slot: Int, _ why: String) {
        stats.invalidRequests += 1
        log.warning("pvscsi: request context \(slots[slot].context) rejected: \(why)")
        finish(slot, host: .invalidParameter)
    }

    /// Translates the data buffer or SG list into iovecs; returns the count, or nil after failing the request.
    private func buildIOVectors(_ slot: Int, _ d: RequestDescriptor, toHost: Bool) -> Int? {
        let base = iovecs.elements + slot * Self.iovecsPerSlot
        var count = 0
        var overflow = false
        // Guest memory without an fd: the guest ranges go to the segment table, the data through bounce chunks.
        let recordRanges = memory.remoteRegionCount > 0 && segments != nil
        let ranges = recordRanges ? segments! + slot * Self.iovecsPerSlot : nil
        var remote = false
        func add(_ address: UInt64, _ length: UInt64) -> Bool {
            if !recordRanges {
                return memory.forEachPiece(address, length: length, write: toHost) { p, n in
                    guard count < Self.iovecsPerSlot else { overflow = true; return false }
                    base[count] = iovec(iov_base: p, iov_len: n)
                    count += 1
                    return true
                }
            }
            return memory.forEachRange(address, length: length, write: toHost) { p, guest, n in
                guard count < Self.iovecsPerSlot else { overflow = true; return false }
                if p == nil { remote = true }
                base[count] = iovec(iov_base: p, iov_len: n)
                ranges![count] = (guest, n)
                count += 1
                return true
            }
        }
        if d.flags & PVSCSI.flagSGList == 0 {
            guard add(d.dataAddress, d.dataLength) else {
                invalid(slot, overflow ? "buffer spans too many DMA windows" : "data buffer 0x\(String(d.dataAddress, radix: 16)) +\(d.dataLength) not in mapped guest memory")
                return nil
            }
            return remote ? bounce(slot, ranges: count, length: d.dataLength, toHost: toHost) : count
        }
        var remaining = d.dataLength
        var segment = d.dataAddress
        var index: UInt64 = 0
        var visited = 0
        var element = (UInt64(0), UInt32(0), UInt32(0))
        while remaining > 0 {
            visited += 1
            guard visited <= options.maxSGElements else {
                invalid(slot, "SG list longer than \(options.maxSGElements) elements (loop, or shorter than the data length \(d.dataLength))")
                return nil
            }
            guard (segment & 0xFFF) + 16 * (index + 1) <= 4096 else {
                invalid(slot, "SG segment at 0x\(String(segment, radix: 16)) runs off its page without a chain element")
                return nil
            }
            let ok = withUnsafeMutableBytes(of: &element) { memory.read(segment + 16 * index, into: $0) }
            guard ok else {
                invalid(slot, "SG element at 0x\(String(segment + 16 * index, radix: 16)) not in mapped guest memory")
                return nil
            }
            let (address, length, flags) = element
            if flags & PVSCSI.sgChainElement != 0 {
                segment = address
                index = 0
                continue
            }
            index += 1
            let n = min(UInt64(length), remaining)
            if n == 0 { continue }
            guard add(address, n) else {
                invalid(slot, overflow ? "SG list needs more than \(Self.iovecsPerSlot) buffers" : "SG buffer 0x\(String(address, radix: 16)) +\(n) not in mapped guest memory")
                return nil
            }
            remaining -= n
        }
        return remote ? bounce(slot, ranges: count, length: d.dataLength, toHost: toHost) : count
    }
}
