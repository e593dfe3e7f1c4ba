import BlockIO
import Foundation
import Glibc
import Synchronization
import TestSupport
import Testing
@testable import Backends

/// The QoS bucket math (GCRA on one atomic time line per limit) and the LUN policy's admission.
@Suite struct RateBucketTests {
    @Test func costOfOperationsAndBytes() {
        #expect(RateMath.cost(units: 1, rate: 2000) == 500_000)
        #expect(RateMath.cost(units: 1 << 20, rate: 1 << 20) == 1_000_000_000)
        #expect(RateMath.cost(units: 4096, rate: 200 << 20) == 19_531)
        #expect(RateMath.cost(units: 5, rate: 0) == 0)
        // No overflow for the largest request at the smallest rate.
        #expect(RateMath.cost(units: UInt64(UInt32.max), rate: 1) > 1_000_000_000 * 1_000_000)
    }

    @Test func burstStartsAtOnceThenTheRateHolds() {
        // 1000/s (1 ms each) with 10 ms of burst: 11 requests start at once, then one per millisecond.
        let now: UInt64 = 5_000_000_000
        var tat: UInt64 = 0
        var starts: [UInt64] = []
        for _ in 0..<20 {
            let (next, start) = RateMath.reserve(tat: tat, now: now, cost: 1_000_000, burst: 10_000_000)
            tat = next
            starts.append(start)
        }
        #expect(starts.prefix(11).allSatisfy { $0 == now })
        #expect(Array(starts.suffix(9)) == (1...9).map { now + UInt64($0) * 1_000_000 })
        #expect(tat == now + 20 * 1_000_000)
    }

    @Test func idleTimeDoesNotAccumulateBeyondTheBurst() {
        // The time line was far in the past: the request starts now and the line restarts from now.
        let (tat, start) = RateMath.reserve(tat: 1_000, now: 9_000_000_000, cost: 500_000, burst: 1_000_000_000)
        #expect(start == 9_000_000_000)
        #expect(tat == 9_000_500_000)
    }

    @Test func admitHoldsEachLimitAndOnlyItsDirection() {
        let policy = LUNPolicy(limits: QoSLimits(readIOPS: 1000, burstMilliseconds: 0))
        #expect(policy.flags == LUNPolicy.throttling)
        let now: UInt64 = 1_000_000_000
        let read = BlockRequest(operation: .read, offset: 0, length: 4096)
        let write = BlockRequest(operation: .write, offset: 0, length: 4096)
        var last: UInt64 = 0
        for _ in 0..<100 { last = policy.admit(read, now: now) }
        #expect(last == now + 99 * 1_000_000)
        // Writes and flushes are not limited by a read limit.
        #expect(policy.admit(write, now: now) == now)
        #expect(policy.admit(BlockRequest(operation: .flush, offset: 0, length: 0), now: now) == now)
        let s = policy.snapshot
        #expect(s.throttledRequests == 99)
        #expect(s.throttledNanoseconds == (1...99).reduce(0) { $0 + UInt64($1) * 1_000_000 })
    }

    @Test func bandwidthLimitCountsBytes() {
        // 1 MiB/s: 64 KiB requests are 1/16 s each.
        let policy = LUNPolicy(limits: QoSLimits(writeBandwidth: 1 << 20, burstMilliseconds: 0))
        let write = BlockRequest(operation: .write, offset: 0, length: 64 << 10)
        var last: UInt64 = 0
        for _ in 0..<17 { last = policy.admit(write, now: 0) }
        #expect(last == 1_000_000_000)
    }

    @Test func limitsChangeAtRunTimeAndCanBeRemoved() {
        let policy = LUNPolicy()
        #expect(policy.flags == 0)
        policy.setLimits(QoSLimits(iops: 10, burstMilliseconds: 0))
        #expect(policy.flags == LUNPolicy.throttling)
        let read = BlockRequest(operation: .read, offset: 0, length: 512)
        _ = policy.admit(read, now: 0)
        #expect(policy.admit(read, now: 0) == 100_000_000)
        policy.setLimits(.unlimited)
        #expect(policy.flags == 0)
        policy.setOutOfSpace(.hold, holdSeconds: 5)
        #expect(policy.flags == LUNPolicy.holdingOnENOSPC)
        #expect(policy.outOfSpace.holdSeconds == 5)
    }

    @Test func concurrentAdmissionsLoseNoReservation() {
        // Four threads reserve 10 000 operations each at one instant: the shared time line must end
        // exactly 40 000 intervals later (every compare-and-swap retried, none lost or doubled).
        let policy = LUNPolicy(limits: QoSLimits(iops: 1_000_000, burstMilliseconds: 0))
        let now: UInt64 = 1_000_000_000
        final class Latest: Sendable { let value = Mutex<UInt64>(0) }
        let latest = Latest()
        DispatchQueue.concurrentPerform(iterations: 4) { _ in
            let read = BlockRequest(operation: .read, offset: 0, length: 512)
            var mine: UInt64 = 0
            for _ in 0..<10_000 { mine = max(mine, policy.admit(read, now: now)) }
            let value = mine
            latest.value.withLock { $0 = max($0, value) }
        }
        #expect(latest.value.withLock { $0 } == now + 39_999 * 1_000)
        #expect(policy.snapshot.throttledRequests == 39_999)
    }
}
