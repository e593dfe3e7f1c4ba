import BlockIO
import GuestMemoryMap
import Virtio
#if canImport(Glibc)
import Glibc
#endif

/// Virtqueue chain parsing (split and packed, with indirect tables and EVENT_IDX): the `Virtqueue` the
/// vhost-user devices pop from, over a real mapped guest memory region.
///
/// Input: options byte (bit 0 EVENT_IDX, bit 1 INDIRECT_DESC, bit 2 complete in reverse order), ring size
/// selector, ring base (16 bits), used index (split) / segments per slot, then the descriptor table/ring
/// (16 bytes per entry), the driver area (split: flags, idx, ring; packed: event suppression), and the rest
/// as guest memory from 0x4000 (indirect tables and buffers).
///
/// Checks: every popped buffer lies inside guest memory, the byte counts add up, nothing is popped twice
/// while in flight, and the queue never pops more than it could have been given.
public enum VirtqueueFuzz {
    static let gpaBase: UInt64 = 0x10000
    static let userBase: UInt64 = 0x7F00_0000_0000
    static let ramSize = 64 << 10
    static let descOffset = 0, driverOffset = 0x2000, deviceOffset = 0x3000, dataOffset = 0x4000

    final class State: @unchecked Sendable {
        let ram = SharedRAM(size: VirtqueueFuzz.ramSize, name: "fuzz-virtqueue")
        let memory: GuestMemory
        init() {
            let d = GuestMemoryRegionDescriptor(guestPhysicalAddress: VirtqueueFuzz.gpaBase, size: UInt64(VirtqueueFuzz.ramSize),
                                                userAddress: VirtqueueFuzz.userBase, mmapOffset: 0)
            memory = GuestMemory(regions: [try! MappedGuestRegion(d, fd: ram.fd)])
        }
    }

    nonisolated(unsafe) static var state: State?

    static func run(_ data: UnsafeRawBufferPointer, packed: Bool) {
        if state == nil { state = State() }
        let s = state!
        var r = FuzzReader(data)
        let flags = r.u8()
        let size = packed ? Int(r.u8()) % 256 + 1 : 1 << (Int(r.u8()) % 9)
        let base = UInt32(r.u16())
        let usedIdx = r.u16()
        let segments = Int(r.u8() % 32) + 1
        s.ram.clear()
        s.ram.load(r.take(16 * size), at: descOffset)
        s.ram.load(r.take(packed ? 4 : 6 + 2 * size), at: driverOffset)
        if !packed { (s.ram.host + deviceOffset + 2).storeBytes(of: usedIdx.littleEndian, as: UInt16.self) }
        s.ram.load(r.rest(), at: dataOffset)
        let options = VirtqueueOptions(packed: packed, eventIndex: flags & 1 != 0, indirect: flags & 2 != 0)
        let addresses = VirtqueueAddresses(descriptorTable: userBase + UInt64(descOffset), driverArea: userBase + UInt64(driverOffset),
                                           deviceArea: userBase + UInt64(deviceOffset))
        guard let q = try? Virtqueue(size: size, options: options, addresses: addresses, memory: s.memory,
                                     base: base, segmentsPerSlot: segments) else { return }
        // The device sees guest memory through its own mapping of the memfd.
        let lo = UInt(bitPattern: s.memory.regions[0].host), hi = lo + UInt(ramSize)
        var held: [(UInt16, UInt16, UInt32)] = []
        var pops = 0
        loop: while pops < 3 * size + 8 {
            pops += 1
            switch q.pop() {
            case .empty, .broken:
                break loop
            case let .invalid(head, entries, _):
                precondition(Int(head) < size, "invalid request id \(head) outside the ring")
                held.append((head, entries, 0))
            case let .chain(chain):
                precondition(Int(chain.head) < size, "request id \(chain.head) outside the ring")
                precondition(chain.readableCount + chain.writableCount <= segments, "more segments than the slot holds")
                var readable: UInt64 = 0, writable: UInt64 = 0
                for i in 0 ..< chain.readableCount + chain.writableCount {
                    let v = chain.vectors[i]
                    let start = UInt(bitPattern: v.iov_base)
                    precondition(start >= lo && start + UInt(v.iov_len) <= hi, "buffer outside guest memory")
                    if i < chain.readableCount { readable += UInt64(v.iov_len) } else {
                        writable += UInt64(v.iov_len)
                        v.iov_base.initializeMemory(as: UInt8.self, repeating: 0xA5, count: v.iov_len)
                    }
                }
                precondition(readable == chain.readableBytes && writable == chain.writableBytes, "byte counts do not add up")
                held.append((chain.head, chain.ringEntries, UInt32(truncatingIfNeeded: writable)))
            }
            precondition(q.inFlight <= size, "more requests in flight than ring entries")
            // Complete some at once, the rest (in reverse order when asked) at the end.
            if flags & 8 != 0, let last = held.popLast() { q.push(head: last.0, ringEntries: last.1, length: last.2) }
        }
        if flags & 4 != 0 { held.reverse() }
        for (head, entries, length) in held { q.push(head: head, ringEntries: entries, length: length) }
        _ = q.flush()
        precondition(q.inFlight == 0, "requests still in flight after every push")
        _ = q.enableNotificationsAndCheck()
        _ = q.driverAwaitsInterrupt
    }

    // MARK: Seeds

    static func gpa(_ dataOffset: Int) -> UInt64 { gpaBase + UInt64(VirtqueueFuzz.dataOffset + dataOffset) }

    static func desc(_ addr: UInt64, _ len: UInt32, _ flags: UInt16, _ next: UInt16) -> [UInt8] {
        var s = SeedBytes()
        s.u64(addr); s.u32(len); s.u16(flags); s.u16(next)
        return s.bytes
    }

    /// The ring part of a seed (shared with the virtio-scsi/virtio-blk targets): the descriptor table or ring
    /// padded to `size` entries, then the split driver area (flags, idx, ring, used_event) or the packed one.
    static func ringImage(size: Int, descriptors: [[UInt8]], avail: [UInt16]?) -> [UInt8] {
        var s = SeedBytes()
        let table = descriptors.flatMap { $0 }
        s.append(table + [UInt8](repeating: 0, count: 16 * size - table.count))
        if let avail {
            s.u16(0); s.u16(UInt16(avail.count))
            for i in 0 ..< size { s.u16(i < avail.count ? avail[i] : 0) }
            s.u16(0)  // used_event
        } else {
            s.zeros(4)
        }
        return s.bytes
    }

    static func splitSeed(flags: UInt8, size: Int, descriptors: [[UInt8]], avail: [UInt16], data: [UInt8]) -> [UInt8] {
        [flags, UInt8(size.trailingZeroBitCount), 0, 0, 0, 0, 15] + ringImage(size: size, descriptors: descriptors, avail: avail) + data
    }

    static func packedSeed(flags: UInt8, size: Int, descriptors: [[UInt8]], data: [UInt8]) -> [UInt8] {
        [flags, UInt8(size - 1), 0, 0x80, 0, 0, 15] + ringImage(size: size, descriptors: descriptors, avail: nil) + data
    }

    /// Packed descriptor: addr, len, id, flags (AVAIL bit 7 set with the wrap counter 1, USED bit 15 clear).
    static func packedDesc(_ addr: UInt64, _ len: UInt32, id: UInt16, flags: UInt16) -> [UInt8] {
        var s = SeedBytes()
        s.u64(addr); s.u32(len); s.u16(id); s.u16(flags | 0x80)
        return s.bytes
    }

    static func splitSeeds() -> [(String, [UInt8])] {
        // A virtio-scsi style request: header readable, response writable.
        let two = [desc(gpa(0), 51, 1, 1), desc(gpa(0x100), 108, 2, 0)]
        let three = [desc(gpa(0), 51, 1, 1), desc(gpa(0x100), 108, 3, 2), desc(gpa(0x1000), 4096, 2, 0)]
        var indirectTable = desc(gpa(0), 16, 1, 1) + desc(gpa(0x200), 512, 1, 2) + desc(gpa(0x400), 1, 2, 0)
        indirectTable += []
        let indirect = [desc(gpa(0x800), 48, 4, 0)]
        var data = [UInt8](repeating: 0, count: 0x800)
        data += indirectTable
        return [
            ("split-two", splitSeed(flags: 0, size: 8, descriptors: two, avail: [0], data: [])),
            ("split-three-eventidx", splitSeed(flags: 1, size: 8, descriptors: three, avail: [0], data: [])),
            ("split-indirect", splitSeed(flags: 2, size: 4, descriptors: indirect, avail: [0], data: data)),
            ("split-batch", splitSeed(flags: 4, size: 16, descriptors: two + two + two, avail: [0, 2, 4], data: [])),
            ("split-loop", splitSeed(flags: 0, size: 4, descriptors: [desc(gpa(0), 16, 1, 1), desc(gpa(16), 16, 1, 0)], avail: [0], data: [])),
        ]
    }

    static func packedSeeds() -> [(String, [UInt8])] {
        let one = [packedDesc(gpa(0), 51, id: 0, flags: 1), packedDesc(gpa(0x100), 108, id: 0, flags: 2)]
        let two = one + [packedDesc(gpa(0x200), 16, id: 1, flags: 1), packedDesc(gpa(0x300), 4096, id: 1, flags: 2)]
        var data = [UInt8](repeating: 0, count: 0x800)
        data += desc(gpa(0), 16, 0, 0) + desc(gpa(0x400), 512, 2, 0)
        let indirect = [packedDesc(gpa(0x800), 32, id: 0, flags: 4)]
        return [
            ("packed-one", packedSeed(flags: 0, size: 8, descriptors: one, data: [])),
            ("packed-two-eventidx", packedSeed(flags: 1, size: 8, descriptors: two, data: [])),
            ("packed-indirect", packedSeed(flags: 2, size: 4, descriptors: indirect, data: data)),
        ]
    }

    public static let split = FuzzTarget(name: "virtqueue-split", summary: "split virtqueue chains (indirect, EVENT_IDX)",
                                         run: { run($0, packed: false) }, seeds: splitSeeds)
    public static let packed = FuzzTarget(name: "virtqueue-packed", summary: "packed virtqueue chains (indirect, EVENT_IDX)",
                                          run: { run($0, packed: true) }, seeds: packedSeeds)
}
