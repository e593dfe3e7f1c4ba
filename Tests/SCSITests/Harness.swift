import BlockIO
import Glibc
@testable import SCSI
import Testing

/// Swift-owned memory described by real iovecs, optionally split into several segments.
final class IOBuffer {
    let memory: UnsafeMutableRawBufferPointer
    let iovecs: UnsafeMutablePointer<iovec>
    let segmentCount: Int

    /// `size` bytes, split at the given segment sizes (the last segment takes the rest).
    init(size: Int, segments: [Int] = [], fill: UInt8 = 0xEE) {
        memory = .allocate(byteCount: max(size, 1), alignment: 4096)
        memory.initializeMemory(as: UInt8.self, repeating: fill)
        var sizes: [Int] = []
        var left = size
        for s in segments where left > 0 {
            let n = min(s, left)
            sizes.append(n)
            left -= n
        }
        if left > 0 || sizes.isEmpty { sizes.append(left) }
        segmentCount = sizes.count
        iovecs = .allocate(capacity: sizes.count)
        var at = 0
        for (i, n) in sizes.enumerated() {
            iovecs[i] = iovec(iov_base: memory.baseAddress! + at, iov_len: n)
            at += n
        }
    }

    convenience init(_ bytes: [UInt8], segments: [Int] = []) {
        self.init(size: bytes.count, segments: segments)
        bytes.withUnsafeBytes { raw in
            if raw.count > 0 { memory.baseAddress!.copyMemory(from: raw.baseAddress!, byteCount: raw.count) }
        }
    }

    deinit {
        iovecs.deallocate()
        memory.deallocate()
    }

    var size: Int { (0 ..< segmentCount).reduce(0) { $0 + iovecs[$1].iov_len } }
    var list: IOVectorList { size == 0 ? .empty : IOVectorList(base: iovecs, count: segmentCount) }
    func bytes(_ count: Int) -> [UInt8] { (0 ..< count).map { memory[$0] } }
}

/// An in-memory back-end: executes block requests against a byte array.
final class MemoryDisk {
    var bytes: [UInt8]
    /// Every request executed, in order.
    var log: [BlockRequest] = []
    /// When set, decides the result of a request instead of the disk (errno injection, short transfers).
    var override: ((BlockRequest) -> BlockResult?)? = nil

    init(size: Int) { bytes = [UInt8](repeating: 0, count: size) }

    func perform(_ r: BlockRequest) -> BlockResult {
        log.append(r)
        if let o = override, let result = o(r) { return result }
        let start = Int(r.offset)
        switch r.operation {
        case .read:
            let n = max(0, min(Int(r.length), bytes.count - start))
            let copied = bytes.withUnsafeBytes { raw in
                r.buffers.scatter(at: 0, from: UnsafeRawBufferPointer(rebasing: raw[start ..< start + n]))
            }
            return .success(UInt64(copied))
        case .write:
            let n = max(0, min(Int(r.length), bytes.count - start))
            let copied = bytes.withUnsafeMutableBytes { raw in
                r.buffers.gather(from: 0, into: UnsafeMutableRawBufferPointer(rebasing: raw[start ..< start + n]))
            }
            return .success(UInt64(copied))
        case .discard, .writeZeroes:
            for i in start ..< start + Int(r.length) { bytes[i] = 0 }
            return .success(r.length)
        case .flush:
            return .success(0)
        }
    }
}

/// What a command produced.
struct Outcome {
    var status: SCSIStatus
    var sense: [UInt8]
    var data: [UInt8]
    var dataInLength: Int
    var residual: Int
    var requests: [BlockRequest]
    var ops: [BlockOperation] { requests.map(\.operation) }
}

/// A target with one LUN backed by a `MemoryDisk`, driven through execute/resume.
struct Harness {
    static let nexus = ITNexus(initiator: 1)
    static let other = ITNexus(initiator: 2)
    let target: SCSITarget
    var view = LUNMapView()
    let disk: MemoryDisk
    let unit: LogicalUnit
    var blockSize: Int { Int(unit.blockSize) }

    init(blocks: UInt64 = 64, blockSize: UInt32 = 512, physicalBlockSize: UInt32? = nil, readOnly: Bool = false,
         discard: Bool = true, writeZeroes: Bool = true, readsZeroes: Bool = true, volatileCache: Bool = true,
         maxTransferBytes: UInt32 = 0, lun: Int = 0, keepPowerOnUA: Bool = false,
         passThrough: Bool = false, remotePersistentReservations: Bool = false) {
        target = SCSITarget(name: "test")
        var geometry = BlockGeometry(logicalBlockSize: blockSize, physicalBlockSize: physicalBlockSize ?? blockSize,
                                     blockCount: blocks, readOnly: readOnly, supportsDiscard: discard,
                                     supportsWriteZeroes: writeZeroes, discardReadsZeroes: readsZeroes,
                                     volatileWriteCache: volatileCache, maxTransferBytes: maxTransferBytes)
        geometry.supportsPassThrough = passThrough
        geometry.remoteCompareAndWrite = passThrough
        geometry.remotePersistentReservations = remotePersistentReservations
        unit = LogicalUnit(number: LogicalUnitNumber(lun)!,
                           identity: LogicalUnitIdentity(serial: "SN0001", naa: 0x6001_4051_2345_6789),
                           geometry: geometry, backendID: 7)
        try! target.add(unit)
        disk = MemoryDisk(size: Int(min(blocks * UInt64(blockSize), 1 << 23)))
        if !keepPowerOnUA {
            unit.unitAttentions.clear(for: Self.nexus)
            unit.unitAttentions.clear(for: Self.other)
        }
    }

    /// Runs one command to completion; `dataIn` is the data-in buffer size.
    mutating func run(_ cdb: [UInt8], dataOut: [UInt8] = [], dataIn: Int = 0, segments: [Int] = [],
                      nexus: ITNexus = Harness.nexus, lun: Int? = nil) -> Outcome {
        let inBuffer = IOBuffer(size: dataIn, segments: segments)
        let outBuffer = IOBuffer(dataOut, segments: segments)
        var task = SCSITask(nexus: nexus, lun: LogicalUnitNumber(lun ?? Int(unit.number.value)), tag: 1,
                            cdb: CDB(cdb), dataOut: outBuffer.list, dataIn: inBuffer.list)
        let before = disk.log.count
        var d = target.execute(&task, view: &view)
        var steps = 0
        while case let .submit(request) = d {
            #expect(task.backendID == 7)
            let result = disk.perform(request)
            d = target.resume(&task, with: result)
            steps += 1
            precondition(steps < 100_000, "runaway command")
        }
        withExtendedLifetime(outBuffer) {}
        return Outcome(status: task.status, sense: task.sense.array, data: inBuffer.bytes(task.dataInLength),
                       dataInLength: task.dataInLength, residual: task.dataInResidual,
                       requests: Array(disk.log[before...]))
    }
}

// MARK: - Expected sense, built by hand

/// Fixed-format sense (18 bytes): response code 70h (F0h with VALID), key, INFORMATION, additional
/// length 10, ASC/ASCQ, sense-key specific.
func fixedFormatSense(_ key: UInt8, _ asc: UInt8, _ ascq: UInt8, information: UInt32? = nil,
                sks: (UInt8, UInt8, UInt8)? = nil) -> [UInt8] {
    var s: [UInt8] = [information == nil ? 0x70 : 0xF0, 0, key, 0, 0, 0, 0, 10, 0, 0, 0, 0, asc, ascq, 0, 0, 0, 0]
    if let i = information {
        s[3] = UInt8(i >> 24); s[4] = UInt8(i >> 16 & 0xFF); s[5] = UInt8(i >> 8 & 0xFF); s[6] = UInt8(i & 0xFF)
    }
    if let sks { s[15] = sks.0; s[16] = sks.1; s[17] = sks.2 }
    return s
}

/// ILLEGAL REQUEST, INVALID FIELD IN CDB with a field pointer.
func invalidCDB(byte: UInt16, bit: UInt8? = nil) -> [UInt8] {
    fixedFormatSense(0x05, 0x24, 0x00, sks: (0xC0 | (bit.map { 0x08 | $0 } ?? 0), UInt8(byte >> 8), UInt8(byte & 0xFF)))
}

/// ILLEGAL REQUEST, INVALID FIELD IN PARAMETER LIST with a field pointer.
func invalidParameter(byte: UInt16, bit: UInt8? = nil) -> [UInt8] {
    fixedFormatSense(0x05, 0x26, 0x00, sks: (0x80 | (bit.map { 0x08 | $0 } ?? 0), UInt8(byte >> 8), UInt8(byte & 0xFF)))
}

let lbaOutOfRangeSense = fixedFormatSense(0x05, 0x21, 0x00)
let writeProtectedSense = fixedFormatSense(0x07, 0x27, 0x00)
let invalidOpcodeSense = fixedFormatSense(0x05, 0x20, 0x00, sks: (0xC0, 0, 0))
let parameterListLengthSense = fixedFormatSense(0x05, 0x1A, 0x00)

/// Big-endian helpers for building CDBs.
func bytesBE16(_ v: Int) -> [UInt8] { [UInt8(v >> 8 & 0xFF), UInt8(v & 0xFF)] }
func bytesBE32(_ v: UInt64) -> [UInt8] { [UInt8(v >> 24 & 0xFF), UInt8(v >> 16 & 0xFF), UInt8(v >> 8 & 0xFF), UInt8(v & 0xFF)] }
func bytesBE64(_ v: UInt64) -> [UInt8] { bytesBE32(v >> 32) + bytesBE32(v & 0xFFFF_FFFF) }

func read10(lba: UInt64, blocks: Int, flags: UInt8 = 0, control: UInt8 = 0) -> [UInt8] {
    [0x28, flags] + bytesBE32(lba) + [0] + bytesBE16(blocks) + [control]
}
func write10(lba: UInt64, blocks: Int, flags: UInt8 = 0) -> [UInt8] { [0x2A, flags] + bytesBE32(lba) + [0] + bytesBE16(blocks) + [0] }
func read16(lba: UInt64, blocks: UInt64, flags: UInt8 = 0) -> [UInt8] { [0x88, flags] + bytesBE64(lba) + bytesBE32(blocks) + [0, 0] }
func write16(lba: UInt64, blocks: UInt64, flags: UInt8 = 0) -> [UInt8] { [0x8A, flags] + bytesBE64(lba) + bytesBE32(blocks) + [0, 0] }

/// A byte pattern that differs per position.
func pattern(_ count: Int, seed: Int = 0) -> [UInt8] { (0 ..< count).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ seed &+ 1) } }
