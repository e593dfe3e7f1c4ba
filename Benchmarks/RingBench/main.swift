// Virtqueue micro-benchmark: the data-path cost of dirty logging (live migration). A split ring of 128
// over a memfd "guest": each request is a 16-byte header, a 4 KiB data-in buffer and a status byte; the
// device pops it, writes the status, pushes it, and flushes every 32. Runs with logging off (no log)
// and on (a log covering the guest, LOG_ALL and the used-ring log address), and prints ns per request.
// Usage: ring-bench [requests-per-run] [runs]
import CSystem
import Glibc
import GuestMemoryMap
import Virtio

let requests = CommandLine.arguments.count > 1 ? Int(CommandLine.arguments[1]) ?? 2_000_000 : 2_000_000
let runs = CommandLine.arguments.count > 2 ? Int(CommandLine.arguments[2]) ?? 3 : 3

func tenths(_ v: Double) -> String { "\((v * 10).rounded() / 10)" }

func benchmark() {
    let ramSize = 16 << 20
    let gpaBase: UInt64 = 0x1_0000_0000
    let ramFD = csys_memfd_create("ring-bench", 0)
    precondition(ramFD >= 0 && ftruncate(ramFD, off_t(ramSize)) == 0)
    let host = mmap(nil, ramSize, PROT_READ | PROT_WRITE, MAP_SHARED, ramFD, 0)!
    let memory = try! GuestMemory.map([(GuestMemoryRegionDescriptor(guestPhysicalAddress: gpaBase, size: UInt64(ramSize),
                                                                   userAddress: gpaBase, mmapOffset: 0), ramFD)], limit: 8)
    let size = 128
    let desc: UInt64 = gpaBase, avail = gpaBase + 0x1000, used = gpaBase + 0x2000
    func at(_ gpa: UInt64) -> UnsafeMutableRawPointer { host + Int(gpa - gpaBase) }

    // Descriptor chains 3k, 3k+1, 3k+2 for slots k < 42: header, data-in (writable), status (writable).
    let chains = size / 3
    for k in 0..<chains {
        let header = gpaBase + 0x10_0000 + UInt64(k) * 64
        let data = gpaBase + 0x20_0000 + UInt64(k) * 4096
        let status = header + 32
        for (j, (addr, len, flags)) in [(header, UInt32(16), UInt16(1)), (data, 4096, 3), (status, 1, 2)].enumerated() {
            let d = at(desc) + 16 * (3 * k + j)
            d.storeBytes(of: addr, as: UInt64.self)
            d.storeBytes(of: len, toByteOffset: 8, as: UInt32.self)
            d.storeBytes(of: flags, toByteOffset: 12, as: UInt16.self)
            d.storeBytes(of: UInt16(3 * k + j + 1), toByteOffset: 14, as: UInt16.self)
        }
    }

    let logBytes = Int((gpaBase + UInt64(ramSize)) >> 15) + 1
    let logFD = csys_memfd_create("ring-bench-log", 0)
    precondition(logFD >= 0 && ftruncate(logFD, off_t(logBytes)) == 0)
    let log = try! DirtyLog(fd: logFD, size: UInt64(logBytes), offset: 0)

    func now() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }

    @inline(never)
    func run(logging: Bool) -> Double {
        at(avail).initializeMemory(as: UInt8.self, repeating: 0, count: 0x2000)
        let ring = try! Virtqueue(size: size, options: VirtqueueOptions(features: VirtioFeature.version1),
                                  addresses: VirtqueueAddresses(descriptorTable: desc, driverArea: avail, deviceArea: used),
                                  memory: memory, base: 0, segmentsPerSlot: 8)
        ring.setDirtyLog(logging ? log : nil, usedRingLogAddress: logging ? used : nil)
        var availIndex: UInt16 = 0
        let start = now()
        var done = 0
        while done < requests {
            // The driver makes 32 chains available, the device completes them and publishes once.
            for i in 0..<32 {
                at(avail).storeBytes(of: UInt16(3 * (i % chains)), toByteOffset: 4 + 2 * Int(availIndex % UInt16(size)), as: UInt16.self)
                availIndex &+= 1
            }
            csys_store_release_u16(at(avail) + 2, availIndex)
            while case let .chain(chain) = ring.pop() {
                chain.writable.base![chain.writableCount - 1].iov_base!.storeBytes(of: 0, as: UInt8.self)
                ring.push(head: chain.head, length: 4097)
            }
            _ = ring.flush()
            done += 32
        }
        return (now() - start) * 1e9 / Double(done)
    }

    var best = (off: Double.infinity, on: Double.infinity)
    for r in 1...runs {
        let off = run(logging: false)
        let on = run(logging: true)
        best = (min(best.off, off), min(best.on, on))
        print("run \(r): logging off \(tenths(off)) ns/request, on \(tenths(on)) ns/request (+\(tenths(on - off)) ns; "
            + "\(log.markedPages.count) pages marked)")
    }
    print("best of \(runs): logging off \(tenths(best.off)) ns/request, on \(tenths(best.on)) ns/request (+\(tenths(best.on - best.off)) ns)")
}

benchmark()
