// Core micro-benchmark: how many READ(10) and WRITE(10) commands of 4 KiB the SCSI core decodes,
// turns into back-end requests and completes per second, with a null back-end that completes every
// request at once with its full length. Usage: core-bench [commands-per-run] [runs]
import BlockIO
import Glibc
import SCSI

let commands = CommandLine.arguments.count > 1 ? Int(CommandLine.arguments[1]) ?? 5_000_000 : 5_000_000
let runs = CommandLine.arguments.count > 2 ? Int(CommandLine.arguments[2]) ?? 3 : 3

let nexus = ITNexus(initiator: 1)
let target = SCSITarget(name: "bench")
let geometry = BlockGeometry(logicalBlockSize: 512, physicalBlockSize: 4096, blockCount: 1 << 31)
let unit = LogicalUnit(number: LogicalUnitNumber(0)!, identity: LogicalUnitIdentity(serial: "BENCH", naa: 1),
                       geometry: geometry, backendID: 0)
try! target.add(unit)
unit.unitAttentions.clear(for: nexus)

// One queue slot: a 4 KiB buffer described by one iovec, reused for every command.
let buffer = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
let iovecs = IOVectorStorage(capacity: 1)
iovecs.elements[0] = iovec(iov_base: buffer, iov_len: 4096)
let list = iovecs.view(count: 1)

// CDBs prepared up front (8 blocks each, spread over the LUN).
func cdbs(_ opcode: UInt8) -> [CDB] {
    (0 ..< 1024).map { i in
        let lba = UInt32(i * 4099 % (1 << 20)) * 8
        return CDB([opcode, 0, UInt8(lba >> 24), UInt8(lba >> 16 & 0xFF), UInt8(lba >> 8 & 0xFF), UInt8(lba & 0xFF), 0, 0, 8, 0])
    }
}

func now() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

@inline(never)
func run(_ name: String, _ prepared: [CDB], write: Bool) -> Double {
    var view = LUNMapView()
    var task = SCSITask(nexus: nexus, lun: LogicalUnitNumber(0), tag: 0, cdb: prepared[0])
    var failures = 0
    let start = now()
    prepared.withUnsafeBufferPointer { cdbs in
        for i in 0 ..< commands {
            task.reset(nexus: nexus, lun: LogicalUnitNumber(0), tag: UInt64(i), attribute: .simple, cdb: cdbs[i & 1023],
                       dataOut: write ? list : .empty, dataIn: write ? .empty : list)
            var disposition = target.execute(&task, view: &view)
            while case let .submit(request) = disposition {
                disposition = target.resume(&task, with: .success(request.length))
            }
            if task.status != .good { failures += 1 }
        }
    }
    let elapsed = now() - start
    precondition(failures == 0, "\(name): \(failures) commands failed")
    return Double(commands) / elapsed
}

let reads = cdbs(0x28)
let writes = cdbs(0x2A)
var bestRead = 0.0
var bestWrite = 0.0
for _ in 0 ..< runs {
    bestRead = max(bestRead, run("READ(10)", reads, write: false))
    bestWrite = max(bestWrite, run("WRITE(10)", writes, write: true))
}
func format(_ v: Double) -> String { String(Int(v.rounded())) }
print("READ(10)  4 KiB: \(format(bestRead)) commands/s (best of \(runs) runs of \(commands), \(format(1e9 / bestRead)) ns/command)")
print("WRITE(10) 4 KiB: \(format(bestWrite)) commands/s (best of \(runs) runs of \(commands), \(format(1e9 / bestWrite)) ns/command)")
buffer.deallocate()
