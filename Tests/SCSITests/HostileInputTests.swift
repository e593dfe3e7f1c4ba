import BlockIO
@testable import SCSI
import Testing

/// A small deterministic generator (SplitMix64) so failures reproduce.
struct SplitMix: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

@Suite struct HostileInputTests {
    /// Random CDBs (supported opcodes with random fields, and random opcodes) with random buffer sizes:
    /// every command completes, never touches memory outside its buffers (the harness buffers are exact),
    /// never asks for I/O outside the LUN, and sense is well formed.
    @Test func randomCommandsCompleteSafely() {
        var h = Harness(blocks: 256)
        var rng = SplitMix(state: 0x5C51_6A7E)
        let opcodes = CommandTable.all.map(\.opcode)
        let capacity = UInt64(256 * 512)
        let payloads = [0, 7, 512, 1024, 4096, 70000].map { n in (0 ..< n).map { UInt8(truncatingIfNeeded: $0) } }
        for i in 0 ..< 20000 {
            var cdb = (0 ..< 16).map { _ in UInt8.random(in: 0 ... 255, using: &rng) }
            cdb[0] = i % 5 == 0 ? UInt8.random(in: 0 ... 255, using: &rng) : opcodes.randomElement(using: &rng)!
            if i % 2 == 0 { cdb[1] &= 0x1F }        // often valid flags / service actions
            if i % 3 == 0 { for j in 2 ..< 6 { cdb[j] = 0 } }   // often small LBAs
            if i % 3 == 1 { cdb[cdb.count - 1] = 0 }            // often a clean CONTROL byte
            let payload = payloads.randomElement(using: &rng)!
            let inSize = [0, 3, 36, 512, 4096].randomElement(using: &rng)!
            let o = h.run(cdb, dataOut: payload, dataIn: inSize)
            #expect(o.dataInLength <= inSize)
            for r in o.requests where r.operation != .flush {
                #expect(r.offset &+ r.length <= capacity && r.offset <= capacity, "cdb \(cdb)")
            }
            if o.status == .checkCondition {
                #expect(o.sense.count == 18 && o.sense[7] == 10 && (o.sense[0] & 0x7F) == 0x70)
            } else {
                #expect(o.sense.isEmpty)
            }
            h.unit.unitAttentions.clear(for: Harness.nexus)
            h.unit.reservations.resetSPC2Reservation()
        }
    }
}
