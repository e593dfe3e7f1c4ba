import BlockIO
import Synchronization
import Testing

/// LUNIOStatistics, the lock-free per-queue counters every front-end records into (the Gateway's
/// statistics and Prometheus text read them: GatewayTests).
@Suite("I/O statistics: lock-free counters and histograms")
struct IOStatisticsTests {
    @Test("latency buckets are log2 from 1 µs; the last one is open-ended")
    func buckets() {
        let cases: [(UInt64, Int)] = [(0, 0), (1023, 0), (1024, 1), (2047, 1), (2048, 2), (1_000_000, 10),
                                      (10_000_000_000, 24), (1 << 34, 25), (UInt64.max, 25)]
        for (nanos, bucket) in cases { #expect(LatencyHistogram.bucket(nanos: nanos) == bucket, "\(nanos) ns") }
        #expect(LatencyHistogram.upperBoundNanos(0) == 1024)
        #expect(LatencyHistogram.upperBoundNanos(24) == 1 << 34)
        #expect(LatencyHistogram.upperBoundNanos(25) == nil)
    }

    @Test("record counts classes, bytes, statuses, sense keys, latency; begin makes in-flight")
    func record() {
        let stats = LUNIOStatistics(queues: 2)
        let q0 = stats.counters(queue: 0), q1 = stats.counters(queue: 1)
        q0.begin(); q0.begin(); q1.begin()
        #expect(stats.inFlight == 3)
        q0.record(command: .read, bytes: 4096, latencyNanos: 1500)
        q0.record(command: .write, bytes: 512, latencyNanos: 900, status: 0x02, senseKey: 0x07)
        q1.record(command: .flush, bytes: 0, latencyNanos: 5_000_000, status: 0x08)
        q1.record(command: .other, bytes: 36, latencyNanos: 100, status: 0x18)
        q1.record(command: .discard, bytes: 0, latencyNanos: 100, status: 0x40)
        let total = stats.snapshot()
        #expect(total.commands == 5 && total.started == 3 && total.inFlight == 0)
        #expect(total.commands(.read) == 1 && total.commands(.write) == 1 && total.commands(.flush) == 1)
        #expect(total.commands(.discard) == 1 && total.commands(.other) == 1)
        #expect(total.readBytes == 4096 && total.writeBytes == 512, "bytes of other classes are not counted")
        #expect(total.errors(senseKey: 7) == 1 && total.checkConditions == 1)
        #expect(total.busy == 1 && total.reservationConflicts == 1 && total.taskAborted == 1 && total.errors == 4)
        #expect(total.latencySumNanos == 1500 + 900 + 5_000_000 + 200)
        #expect(total.latencyBucket(0) == 3 && total.latencyBucket(1) == 1 && total.latencyBucket(13) == 1)
        #expect(total.latencyQuantileNanos(0.5) == 1024)
        #expect(total.latencyQuantileNanos(0.8) == 2048)
        #expect(total.latencyQuantileNanos(1.0) == 1 << 23)
        #expect(stats.snapshot(queue: 0).commands == 2 && stats.snapshot(queue: 1).commands == 3)
        #expect(IOStatisticsSnapshot().latencyQuantileNanos(0.5) == nil)
    }

    @Test("owner threads write their own queue while a reader sums: totals are exact, reads never go back")
    func concurrentWritersAndReader() async {
        let stats = LUNIOStatistics(queues: 2)
        let perThread = 200_000
        final class Flags: Sendable {
            let done = Atomic<Int>(0)
            let monotonic = Atomic<Bool>(true)
        }
        let flags = Flags()
        await withTaskGroup(of: Void.self) { group in
            for queue in 0..<2 {
                group.addTask {
                    let counters = stats.counters(queue: queue)
                    for i in 0..<perThread {
                        counters.begin()
                        counters.record(command: i % 2 == 0 ? .read : .write, bytes: 512, latencyNanos: UInt64(i % 5000))
                    }
                    flags.done.add(1, ordering: .sequentiallyConsistent)
                }
            }
            group.addTask {
                var last: UInt64 = 0
                while flags.done.load(ordering: .sequentiallyConsistent) < 2 {
                    let now = stats.snapshot().commands
                    if now < last { flags.monotonic.store(false, ordering: .relaxed) }
                    last = now
                }
            }
        }
        let total = stats.snapshot()
        let neverWentBack = flags.monotonic.load(ordering: .relaxed)
        #expect(neverWentBack)
        #expect(total.commands == UInt64(2 * perThread))
        #expect(total.started == UInt64(2 * perThread) && total.inFlight == 0)
        #expect(total.readBytes + total.writeBytes == UInt64(2 * perThread * 512))
        #expect((0..<LatencyHistogram.bucketCount).reduce(0) { $0 + total.latencyBucket($1) } == UInt64(2 * perThread))
    }
}
