import VirtioTestSupport
import BlockIO
import CSystem
import Testing
import VhostUser
import VirtioDevices
import Virtio
#if canImport(Glibc)
import Glibc
#endif

/// The queue groups' lost-notification watchdog: a request made available without a kick reaching
/// the loop, or published entries whose interrupt the driver never got, cost one watchdog period
/// instead of a stalled guest (and say so in the log).
@Suite(.serialized) struct WatchdogTests {
    /// Publishes a GET_ID request on ring 0 without kicking; returns the status byte's address.
    static func postGetID(_ f: BlkFixture, kick: Bool) -> UInt64 {
        let r = f.ram.blkRequest(type: VirtioBlk.typeGetID, sector: 0, inLength: 20)
        f.ring.publish(f.ring.addChain(r.buffers))
        if kick { _ = csys_eventfd_signal(f.kick, 1) }
        return r.status
    }

    @Test func aRequestWithoutAKickIsServicedByTheWatchdog() throws {
        // Without the watchdog it waits for a kick that never comes.
        do {
            let f = try BlkFixture(watchdogMilliseconds: 0)
            usleep(100_000)
            _ = Self.postGetID(f, kick: false)
            usleep(400_000)
            #expect(f.ring.usedIndex == 0)
        }
        let f = try BlkFixture(watchdogMilliseconds: 100)
        usleep(100_000)
        let status = Self.postGetID(f, kick: false)
        #expect(waitFor(seconds: 3) { f.ring.usedIndex == 1 })
        #expect(f.ram.pointer(status).load(as: UInt8.self) == VirtioBlk.statusOK)
        #expect(f.log.contains("no kick"))
    }

    @Test func anInterruptTheDriverStillWaitsForIsSignalledAgainOnce() throws {
        let features = VirtioFeature.version1 | VirtioFeature.ringEventIndex | VirtioFeature.ringIndirectDescriptors
            | vhostUserFeatureProtocolFeatures
        let f = try BlkFixture(features: features, watchdogMilliseconds: 100)
        var v: UInt64 = 0
        // used_event 0: the driver wants an interrupt for the first entry.
        f.ring.setUsedEvent(0)
        _ = Self.postGetID(f, kick: true)
        #expect(waitFor { f.ring.usedIndex == 1 })
        #expect(waitFor { csys_wait_readable(f.call, 0) == 1 })
        // The interrupt is "lost": the driver never saw it (used_event stays 0, behind the used index).
        _ = csys_eventfd_drain(f.call, &v)
        #expect(waitFor(seconds: 3) { csys_wait_readable(f.call, 0) == 1 }, "the watchdog signals again")
        // The watchdog logs just after it signals: under load the line may follow the interrupt.
        #expect(waitFor { f.log.contains("lost interrupt") })
        _ = csys_eventfd_drain(f.call, &v)
        // Only once for the same entries.
        usleep(400_000)
        #expect(csys_wait_readable(f.call, 0) == 0)
        // A driver that consumed everything (used_event == used index) gets no extra interrupt.
        f.ring.setUsedEvent(1)
        _ = Self.postGetID(f, kick: true)
        #expect(waitFor { f.ring.usedIndex == 2 })
        #expect(waitFor { csys_wait_readable(f.call, 0) == 1 })
        _ = csys_eventfd_drain(f.call, &v)
        f.ring.setUsedEvent(2)
        usleep(400_000)
        #expect(csys_wait_readable(f.call, 0) == 0, "no interrupt for a driver that saw every entry")
    }
}
