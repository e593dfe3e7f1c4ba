import Foundation
import TestSupport
import Testing
@testable import Backends

/// The lock-free hand-over ring between a channel and its workers.
@Suite struct SPSCRingTests {
    @Test func fillsToCapacityAndKeepsOrder() {
        let ring = SPSCRing(minimumCapacity: 5)
        #expect(ring.capacity == 8)
        #expect(ring.isEmpty)
        for i in 0..<8 { #expect(ring.push(UInt32(i))) }
        #expect(!ring.push(8))
        for i in 0..<8 { #expect(ring.pop() == UInt32(i)) }
        #expect(ring.pop() == nil)
        #expect(ring.isEmpty)
    }

    @Test func transfersAcrossThreadsInOrder() async {
        let ring = SPSCRing(minimumCapacity: 64)
        let total: UInt32 = 200_000
        let producer = Thread {
            var next: UInt32 = 0
            while next < total { if ring.push(next) { next += 1 } }
        }
        producer.start()
        var expected: UInt32 = 0
        var inOrder = true
        while expected < total {
            if let value = ring.pop() {
                if value != expected { inOrder = false }
                expected += 1
            }
        }
        #expect(inOrder)
        #expect(ring.isEmpty)
    }
}
