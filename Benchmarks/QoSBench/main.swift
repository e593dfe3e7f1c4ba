// QoS benchmark: an in-process driver of `PolicyChannel` (the channel every front-end submits through)
// over the null back-end. Two LUNs as on one controller: LUN "limited" (iops_limit, its load spread over
// several threads, as over several queues) and LUN "free" (no limit, one thread). Each thread keeps
// `depth` 4 KiB reads in flight, waiting on the channel's completion fd like an event loop.
//
// Phases (each `seconds` long, counted after a warm-up of 1.5 s so the 1 s burst is spent):
//   0. free LUN on the bare null channel (what PolicyChannel without a policy costs, against phase 1)
//   1. free alone             -> the unlimited LUN's speed
//   2. limited without limit  -> the load the limited LUN's threads would do
//   3. both, limit set        -> limited LUN within 10 % of its limit? free LUN within 10 % of phase 1?
//
// Usage: qos-bench [--limit IOPS=2000] [--threads N=2] [--depth D=32] [--seconds S=5]
import Backends
import BlockIO
import Foundation
import Gateway
import Glibc
import Synchronization

var limit: UInt64 = 2000, threads = 2, depth = 32, seconds = 5.0
var arguments = CommandLine.arguments.dropFirst().makeIterator()
while let a = arguments.next() {
    guard let v = arguments.next() else { fatalError("\(a) needs a value") }
    switch a {
    case "--limit": limit = UInt64(v)!
    case "--threads": threads = Int(v)!
    case "--depth": depth = Int(v)!
    case "--seconds": seconds = Double(v)!
    default: fatalError("unknown argument \(a)")
    }
}

final class Counter: Sendable {
    let completions = Atomic<UInt64>(0)
}

/// Drives one channel until `stop`; counts completions after `warmUpEnd`.
func drive<C: BlockChannel>(_ channel: C, depth: Int, counter: Counter, countFrom: UInt64, until: UInt64) {
    let buffer = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
    let storage = IOVectorStorage(capacity: 1)
    storage.elements[0] = iovec(iov_base: buffer, iov_len: 4096)
    let request = BlockRequest(operation: .read, offset: 0, length: 4096, buffers: storage.view(count: 1))
    var token: UInt64 = 0
    for _ in 0..<depth {
        _ = channel.submit(request, token: token)
        token += 1
    }
    channel.commit()
    var counted: UInt64 = 0
    while true {
        let now = IOCounters.now()
        if now >= until { break }
        var descriptor = pollfd(fd: channel.completionFD, events: Int16(POLLIN), revents: 0)
        _ = poll(&descriptor, 1, 10)
        let done = channel.reap { _, _ in }
        if done == 0 { continue }
        if now >= countFrom { counted += UInt64(done) }
        for _ in 0..<done {
            _ = channel.submit(request, token: token)
            token += 1
        }
        channel.commit()
    }
    // Drain what is still held or in flight before the channel goes.
    let drainEnd = IOCounters.now() + 5_000_000_000
    while channel.inFlight > 0 && IOCounters.now() < drainEnd {
        var descriptor = pollfd(fd: channel.completionFD, events: Int16(POLLIN), revents: 0)
        _ = poll(&descriptor, 1, 10)
        _ = channel.reap { _, _ in }
    }
    counter.completions.add(counted, ordering: .relaxed)
    buffer.deallocate()
}

/// Runs the LUNs (policy, thread count) together; returns IOPS per LUN.
func phase(_ luns: [(LUNPolicy, Int)], depth: Int, seconds: Double, bare: Bool = false) -> [Double] {
    let warmUp: UInt64 = 1_500_000_000
    let start = IOCounters.now()
    let countFrom = start + warmUp
    let until = countFrom + UInt64(seconds * 1e9)
    var workers: [Thread] = []
    var counters: [Counter] = []
    for (policy, count) in luns {
        let backend = try! NullBackend(spec: BackendSpec(kind: .null, path: "", size: 1 << 30))
        let counter = Counter()
        counters.append(counter)
        for _ in 0..<count {
            let inner = try! backend.makeChannel()
            let thread: Thread
            if bare {
                let box = UncheckedBox(inner)
                thread = Thread { drive(box.value, depth: depth, counter: counter, countFrom: countFrom, until: until) }
            } else {
                let box = UncheckedBox(try! PolicyChannel(.null(inner), policy: policy))
                thread = Thread { drive(box.value, depth: depth, counter: counter, countFrom: countFrom, until: until) }
            }
            workers.append(thread)
        }
    }
    for w in workers { w.start() }
    while workers.contains(where: { !$0.isFinished }) { usleep(50_000) }
    return counters.map { Double($0.completions.load(ordering: .relaxed)) / seconds }
}

final class UncheckedBox<T>: @unchecked Sendable {
    let value: T
    init(_ value: T) { self.value = value }
}

func fmt(_ v: Double) -> String { String(format: "%.0f", v) }

print("qos-bench: null back-end, 4 KiB reads, depth \(depth) per thread, \(seconds) s per phase after 1.5 s warm-up")
let bareIOPS = phase([(LUNPolicy(), 1)], depth: depth, seconds: seconds, bare: true)[0]
print("phase 0  free LUN, bare null channel (no PolicyChannel): \(fmt(bareIOPS)) IOPS")
let alone = phase([(LUNPolicy(), 1)], depth: depth, seconds: seconds)[0]
print("phase 1  free LUN alone (1 thread, no limit):        \(fmt(alone)) IOPS  (\(String(format: "%.1f", alone / bareIOPS * 100)) % of phase 0)")
let offered = phase([(LUNPolicy(), threads)], depth: depth, seconds: seconds)[0]
print("phase 2  limited LUN without its limit (\(threads) threads):  \(fmt(offered)) IOPS  (\(String(format: "%.1f", offered / Double(limit)))x the limit)")
let limitedPolicy = LUNPolicy(limits: QoSLimits(iops: limit))
let both = phase([(limitedPolicy, threads), (LUNPolicy(), 1)], depth: depth, seconds: seconds)
let error = (both[0] - Double(limit)) / Double(limit) * 100
let keep = both[1] / alone * 100
print("phase 3  limited LUN, iops_limit = \(limit):           \(fmt(both[0])) IOPS  (\(String(format: "%+.1f", error)) % of the limit)")
print("         free LUN alongside it:                      \(fmt(both[1])) IOPS  (\(String(format: "%.1f", keep)) % of phase 1)")
let s = limitedPolicy.snapshot
print("         limited LUN throttled: \(s.throttledRequests) requests, \(String(format: "%.1f", Double(s.throttledNanoseconds) / 1e9)) s waited in total")
let ok = offered >= 10 * Double(limit) && abs(error) <= 10 && keep >= 90
print("qos-bench: \(ok ? "PASS" : "FAIL"): load >= 10x the limit, limited within 10 %, free LUN >= 90 % of its speed alone")
exit(ok ? 0 : 1)
