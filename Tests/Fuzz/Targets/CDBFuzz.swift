import BlockIO
import SCSI
#if canImport(Glibc)
import Glibc
#endif

/// CDB decode and dispatch over every opcode: `SCSITarget.execute`/`resume` (what all three front-ends call)
/// against a LUN backed by memory, with back-end errors injected.
///
/// Input: flags (bit 0: 4096-byte blocks, bit 1: read-only, bit 2: no discard support), then up to 8
/// commands: CDB length (6-32), CDB, control byte (bit 0: second initiator, bits 1-3: data-in buffer size,
/// bits 4-5: buffer segmentation, bits 6-7: back-end fault), data-out length (16 bits) and data-out bytes.
///
/// Checks: every back-end request lies inside the LUN and inside the task's buffers, data-in never exceeds
/// its buffer, sense is well formed, no command runs away.
public enum CDBFuzz {
    static let blocks: UInt64 = 64
    static let dataInSizes = [0, 1, 8, 36, 252, 512, 4096, 65536]

    /// Buffers described by iovecs, split into segments.
    final class Buffer {
        let memory: UnsafeMutableRawBufferPointer
        let iovecs: UnsafeMutablePointer<iovec>
        let count: Int
        init(_ bytes: UnsafeRawBufferPointer, size: Int, split: Int) {
            memory = .allocate(byteCount: max(size, 1), alignment: 16)
            memory.initializeMemory(as: UInt8.self, repeating: 0xEE)
            if bytes.count > 0 { memory.baseAddress!.copyMemory(from: bytes.baseAddress!, byteCount: min(size, bytes.count)) }
            let pieces = size == 0 ? 0 : min(size, [1, 2, 3, 7][split])
            count = pieces
            iovecs = .allocate(capacity: max(pieces, 1))
            var at = 0
            for i in 0 ..< pieces {
                let n = i == pieces - 1 ? size - at : size / pieces
                iovecs[i] = iovec(iov_base: memory.baseAddress! + at, iov_len: n)
                at += n
            }
        }
        deinit { iovecs.deallocate(); memory.deallocate() }
        var list: IOVectorList { count == 0 ? .empty : IOVectorList(base: iovecs, count: count) }
        func contains(_ v: iovec) -> Bool {
            let lo = UInt(bitPattern: memory.baseAddress), hi = lo + UInt(memory.count)
            let s = UInt(bitPattern: v.iov_base)
            return s >= lo && s + UInt(v.iov_len) <= hi
        }
    }

    /// Whether `v` lies inside `memory`.
    static func within(_ memory: UnsafeRawBufferPointer?, _ v: iovec) -> Bool {
        guard let memory, let base = memory.baseAddress else { return false }
        let lo = UInt(bitPattern: base), s = UInt(bitPattern: v.iov_base)
        return s >= lo && s + UInt(v.iov_len) <= lo + UInt(memory.count)
    }

    /// The memory LUN: executes block requests against bytes, checking they stay inside the LUN and the buffers.
    struct MemoryLUN {
        var bytes: UnsafeMutableRawBufferPointer
        func perform(_ r: BlockRequest, fault: UInt8, buffers: [Buffer], scratch: UnsafeRawBufferPointer?) -> BlockResult {
            if r.operation != .flush {
                precondition(r.offset <= UInt64(bytes.count) && r.length <= UInt64(bytes.count) - r.offset,
                             "back-end request \(r.operation) at \(r.offset)+\(r.length) outside the LUN")
            }
            for i in 0 ..< r.buffers.count {
                precondition(buffers.contains { $0.contains(r.buffers[i]) } || CDBFuzz.within(scratch, r.buffers[i]),
                             "back-end buffer outside the task's buffers and the core's scratch memory")
            }
            switch fault {
            case 1: return .failure(EIO)
            case 2: return .failure(ENOSPC)
            case 3: return .success(r.length / 2)
            default: break
            }
            let start = Int(r.offset), n = Int(r.length)
            switch r.operation {
            case .read:
                _ = r.buffers.scatter(at: 0, from: UnsafeRawBufferPointer(rebasing: bytes[start ..< start + n]))
            case .write:
                _ = r.buffers.gather(from: 0, into: UnsafeMutableRawBufferPointer(rebasing: bytes[start ..< start + n]))
            case .discard, .writeZeroes:
                UnsafeMutableRawBufferPointer(rebasing: bytes[start ..< start + n]).initializeMemory(as: UInt8.self, repeating: 0)
            case .flush:
                break
            }
            return .success(r.length)
        }
    }

    nonisolated(unsafe) static var disk = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(blocks) * 4096, alignment: 4096)

    static func run(_ data: UnsafeRawBufferPointer) {
        var r = FuzzReader(data)
        let flags = r.u8()
        let blockSize: UInt32 = flags & 1 != 0 ? 4096 : 512
        let geometry = BlockGeometry(logicalBlockSize: blockSize, physicalBlockSize: blockSize, blockCount: blocks,
                                     readOnly: flags & 2 != 0, supportsDiscard: flags & 4 == 0, supportsWriteZeroes: true,
                                     discardReadsZeroes: true, volatileWriteCache: true, maxTransferBytes: 0)
        let target = SCSITarget(name: "fuzz")
        let unit = LogicalUnit(number: LogicalUnitNumber(0)!, identity: LogicalUnitIdentity(serial: "FUZZ0001", naa: 0x6001_4051_2345_6789),
                               geometry: geometry, backendID: 1)
        try! target.add(unit)
        let lun = MemoryLUN(bytes: UnsafeMutableRawBufferPointer(rebasing: disk[0 ..< Int(blocks) * Int(blockSize)]))
        lun.bytes.initializeMemory(as: UInt8.self, repeating: 0)
        var view = LUNMapView()
        var commands = 0
        while !r.isEmpty && commands < 8 {
            commands += 1
            let cdbLength = max(6, min(CDB.capacity, Int(r.u8())))
            let cdb = CDB(copying: r.take(cdbLength))
            let control = r.u8()
            let outLength = Int(r.u16()) % (70 * 1024)
            let out = Buffer(r.take(outLength), size: outLength, split: Int(control >> 4) & 3)
            let inSize = dataInSizes[Int(control >> 1) & 7]
            let input = Buffer(UnsafeRawBufferPointer(start: nil, count: 0), size: inSize, split: Int(control >> 4) & 3)
            var task = SCSITask(nexus: ITNexus(initiator: control & 1 == 0 ? 1 : 2), lun: LogicalUnitNumber(0), tag: UInt64(commands),
                                cdb: cdb, dataOut: out.list, dataIn: input.list)
            var d = target.execute(&task, view: &view)
            var steps = 0
            while case let .submit(request) = d {
                precondition(task.backendID == 1, "request for back-end \(task.backendID)")
                let fault = steps == 0 ? control >> 6 : 0
                d = target.resume(&task, with: lun.perform(request, fault: fault, buffers: [out, input], scratch: task.scratchMemory))
                steps += 1
                precondition(steps < 1_000_000, "runaway command")
            }
            precondition(task.dataInLength <= inSize, "data-in \(task.dataInLength) exceeds its buffer \(inSize)")
            let sense = task.sense.array
            if task.status == .checkCondition {
                precondition(sense.count >= 8 && (sense[0] & 0x7F == 0x70 || sense[0] & 0x7F == 0x72), "malformed sense \(sense)")
            }
            withExtendedLifetime((out, input)) {}
        }
    }

    // MARK: Seeds

    static func command(_ cdb: [UInt8], control: UInt8 = 0b0000_1010, out: [UInt8] = []) -> [UInt8] {
        var s = SeedBytes()
        s.u8(UInt8(cdb.count)); s.append(cdb); s.u8(control); s.u16(UInt16(out.count)); s.append(out)
        return s.bytes
    }

    /// One seed per opcode/service action the target reports in REPORT SUPPORTED OPERATION CODES (asked
    /// through the same dispatch), with the CDB length it reports, plus multi-command sequences.
    static func seeds() -> [(String, [UInt8])] {
        let target = SCSITarget(name: "seed")
        let geometry = BlockGeometry(logicalBlockSize: 512, physicalBlockSize: 512, blockCount: blocks)
        try! target.add(LogicalUnit(number: LogicalUnitNumber(0)!, identity: LogicalUnitIdentity(serial: "S", naa: 0x6001_4051_2345_6789),
                                    geometry: geometry, backendID: 1))
        let input = Buffer(UnsafeRawBufferPointer(start: nil, count: 0), size: 8192, split: 0)
        var view = LUNMapView()
        let rsoc: [UInt8] = [0xA3, 0x0C, 0, 0, 0, 0, 0, 0, 0x20, 0, 0, 0]
        var task = SCSITask(nexus: ITNexus(initiator: 1), lun: LogicalUnitNumber(0), tag: 1, cdb: CDB(rsoc), dataIn: input.list)
        _ = target.execute(&task, view: &view)  // the power-on unit attention
        task = SCSITask(nexus: ITNexus(initiator: 1), lun: LogicalUnitNumber(0), tag: 2, cdb: CDB(rsoc), dataIn: input.list)
        _ = target.execute(&task, view: &view)
        let data = UnsafeRawBufferPointer(input.memory)
        let total = Int(data[0]) << 24 | Int(data[1]) << 16 | Int(data[2]) << 8 | Int(data[3])
        var out: [(String, [UInt8])] = []
        var at = 4
        while at + 8 <= min(4 + total, data.count) {
            let opcode = data[at], sa = UInt16(data[at + 2]) << 8 | UInt16(data[at + 3])
            let hasSA = data[at + 5] & 1 != 0
            let length = Int(data[at + 6]) << 8 | Int(data[at + 7])
            var cdb = [UInt8](repeating: 0, count: max(6, length))
            cdb[0] = opcode
            if hasSA { cdb[1] = UInt8(sa & 0x1F) }
            // A small transfer: one block / a short allocation length in the usual places.
            if length == 6 { cdb[4] = 1 } else if length == 10 { cdb[8] = 1 } else if length == 12 { cdb[9] = 1 } else if length == 16 { cdb[13] = 1 }
            let name = String(format2: opcode) + (hasSA ? "-" + String(format2: UInt8(sa & 0xFF)) : "")
            out.append(("op-" + name, [0] + command(cdb, out: [UInt8](repeating: 0x5A, count: 512))))
            at += 8 + (data[at + 5] & 2 != 0 ? 12 : 0)
        }
        // Sequences: write then read back; reserve/persistent reservations from two initiators; unmap.
        let write10: [UInt8] = [0x2A, 0, 0, 0, 0, 4, 0, 0, 2, 0]
        let read10: [UInt8] = [0x28, 0, 0, 0, 0, 4, 0, 0, 2, 0]
        out.append(("seq-write-read", [0] + command(write10, out: [UInt8](repeating: 0x33, count: 1024)) + command(read10, control: 0b0000_1100)))
        var register = [UInt8](repeating: 0, count: 24)
        register[15] = 0x11
        out.append(("seq-pr-register-reserve", [0]
            + command([0x5F, 0x00, 0, 0, 0, 0, 0, 0, 24, 0], out: register)
            + command([0x5F, 0x01, 0x03, 0, 0, 0, 0, 0, 24, 0], out: [UInt8](repeating: 0, count: 8) + [0, 0, 0, 0, 0, 0, 0, 0x11] + [UInt8](repeating: 0, count: 8))
            + command(write10, control: 0b0000_1011, out: [UInt8](repeating: 1, count: 1024))))
        var unmap = SeedBytes()
        unmap.append([0, 22, 0, 16, 0, 0, 0, 0]); unmap.u64(UInt64(8).bigEndian); unmap.u32(UInt32(4).bigEndian); unmap.u32(0)
        out.append(("seq-unmap", [0] + command([0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], out: unmap.bytes)))
        out.append(("seq-4k-readonly-write", [3] + command([0x8A, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0], out: [UInt8](repeating: 7, count: 4096))))
        out.append(("seq-compare-and-write", [0] + command([0x89, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0], out: [UInt8](repeating: 0, count: 1024))))
        return out
    }

    public static let target = FuzzTarget(name: "cdb", summary: "CDB decode and dispatch over every opcode against a memory LUN",
                                          run: run, seeds: seeds)
}

extension String {
    init(format2 value: UInt8) {
        let s = String(value, radix: 16)
        self = s.count == 1 ? "0" + s : s
    }
}
