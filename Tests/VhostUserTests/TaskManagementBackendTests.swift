import VirtioTestSupport
import BlockIO
import CSystem
import SCSI
import Testing
import VhostUser
import VirtioDevices
import Virtio
#if canImport(Glibc)
import Glibc
#endif

/// virtio-scsi task management reaching the back-end: aborted tasks whose I/O the back-end owns are
/// aborted there (ABORT TASK per task, LOGICAL UNIT RESET once per channel); the ECANCELED
/// completion answers VIRTIO_SCSI_S_ABORTED and the TMF answers after them. The back-end here is the
/// in-memory channel whose abort completes the held request with ECANCELED (as the iSCSI channel does
/// when the target honours the abort); ISCSITaskManagementThroughVirtioSCSITests covers the same against a frozen tgtd.
@Suite(.serialized) struct TaskManagementBackendTests {
    static let read8: [UInt8] = [0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0]

    @Test func abortTaskAbortsTheBackendRequestAndAnswersAborted() throws {
        let f = try SCSIFixture()
        f.clearUnitAttention()
        f.channel.cancels.store(true, ordering: .releasing)
        f.channel.hold.store(true, ordering: .releasing)
        let before = f.rings[2].usedIndex
        let keep = f.post(tag: 5, cdb: Self.read8, inLength: 4096)
        let victim = f.post(tag: 6, cdb: Self.read8, inLength: 4096)
        #expect(waitFor { f.channel.inFlight == 2 })
        let a = f.control(SCSIFixture.tmf(VirtioSCSI.TMF.abortTask.rawValue, tag: 6), responseLength: 1)
        // The abort is answered without releasing the back-end: the back-end cancelled the request.
        #expect(waitFor { f.rings[0].usedIndex == 1 })
        #expect(f.ram.read(a.resp, 1) == [VirtioSCSI.Response.ok.rawValue])
        #expect(f.channel.abortedTokens.withLock { $0.count } == 1)
        #expect(f.channel.abortedTokens.withLock { $0.first.map { UInt16(truncatingIfNeeded: $0) } } == victim.head)
        #expect(f.rings[2].usedIndex == before &+ 1)
        #expect(f.rings[2].usedElement(before).id == UInt32(victim.head))
        let r = f.readResponse(victim.resp, data: victim.data, inLength: 0, usedLength: 0)
        #expect(r.response == VirtioSCSI.Response.aborted.rawValue)
        // The other READ is untouched and completes normally.
        f.channel.releaseHeld()
        #expect(waitFor { f.rings[2].usedIndex == before &+ 2 })
        let k = f.readResponse(keep.resp, data: keep.data, inLength: 0, usedLength: 0)
        #expect(k.response == VirtioSCSI.Response.ok.rawValue && k.status == SCSIStatus.good.rawValue)
        #expect(f.channel.abortedTokens.withLock { $0.count } == 1)
    }

    @Test func abortTaskSetAndClearTaskSetAbortEveryBackendRequest() throws {
        for subtype in [VirtioSCSI.TMF.abortTaskSet.rawValue, VirtioSCSI.TMF.clearTaskSet.rawValue, VirtioSCSI.TMF.itNexusReset.rawValue] {
            let f = try SCSIFixture()
            f.clearUnitAttention()
            f.channel.cancels.store(true, ordering: .releasing)
            f.channel.hold.store(true, ordering: .releasing)
            let before = f.rings[2].usedIndex
            let posted = (0..<3).map { f.post(tag: UInt64(10 + $0), cdb: Self.read8, inLength: 4096) }
            #expect(waitFor { f.channel.inFlight == 3 })
            let a = f.control(SCSIFixture.tmf(subtype), responseLength: 1)
            #expect(waitFor { f.rings[0].usedIndex == 1 }, "TMF \(subtype) answered")
            #expect(f.ram.read(a.resp, 1) == [VirtioSCSI.Response.ok.rawValue])
            #expect(f.channel.abortedTokens.withLock { $0.count } == 3)
            #expect(f.rings[2].usedIndex == before &+ 3)
            for p in posted {
                #expect(f.readResponse(p.resp, data: p.data, inLength: 0, usedLength: 0).response == VirtioSCSI.Response.aborted.rawValue)
            }
        }
    }

    @Test func logicalUnitResetResetsTheBackendOnceAndAnswersAfterTheTasks() throws {
        let f = try SCSIFixture()
        f.clearUnitAttention()
        f.channel.cancels.store(true, ordering: .releasing)
        f.channel.hold.store(true, ordering: .releasing)
        let before = f.rings[2].usedIndex
        let posted = (0..<2).map { f.post(tag: UInt64(20 + $0), cdb: Self.read8, inLength: 4096) }
        #expect(waitFor { f.channel.inFlight == 2 })
        let a = f.control(SCSIFixture.tmf(VirtioSCSI.TMF.logicalUnitReset.rawValue), responseLength: 1)
        #expect(waitFor { f.rings[0].usedIndex == 1 })
        #expect(f.ram.read(a.resp, 1) == [VirtioSCSI.Response.ok.rawValue])
        #expect(f.channel.resets.load(ordering: .relaxed) == 1)
        #expect(f.channel.abortedTokens.withLock { $0.isEmpty }, "the LUN reset replaced per-task aborts")
        #expect(f.rings[2].usedIndex == before &+ 2)
        for p in posted {
            #expect(f.readResponse(p.resp, data: p.data, inLength: 0, usedLength: 0).response == VirtioSCSI.Response.aborted.rawValue)
        }
    }

    @Test func aBackendThatCannotAbortLetsTheTaskFinishThenAnswersAborted() throws {
        let f = try SCSIFixture()
        f.clearUnitAttention()
        f.channel.hold.store(true, ordering: .releasing)  // cancels stays false: local I/O
        let before = f.rings[2].usedIndex
        let p = f.post(tag: 30, cdb: Self.read8, inLength: 4096)
        #expect(waitFor { f.channel.inFlight == 1 })
        let a = f.control(SCSIFixture.tmf(VirtioSCSI.TMF.abortTask.rawValue, tag: 30), responseLength: 1)
        usleep(100_000)
        #expect(f.rings[0].usedIndex == 0, "the TMF waits for the task")
        #expect(f.channel.abortedTokens.withLock { $0.count } == 1)
        // A second ABORT TASK for the same task does not ask the back-end again.
        let b = f.control(SCSIFixture.tmf(VirtioSCSI.TMF.abortTask.rawValue, tag: 30), responseLength: 1)
        usleep(50_000)
        #expect(f.channel.abortedTokens.withLock { $0.count } == 1)
        f.channel.releaseHeld()
        #expect(waitFor { f.rings[0].usedIndex == 2 })
        #expect(f.ram.read(a.resp, 1) == [VirtioSCSI.Response.ok.rawValue])
        #expect(f.ram.read(b.resp, 1) == [VirtioSCSI.Response.ok.rawValue])
        #expect(f.rings[2].usedIndex == before &+ 1)
        #expect(f.readResponse(p.resp, data: p.data, inLength: 0, usedLength: 0).response == VirtioSCSI.Response.aborted.rawValue)
    }

    @Test func hotplugOffHidesTheFeatureAndSendsNoTransportResetEvents() throws {
        let f = try SCSIFixture(features: VirtioFeature.version1 | VirtioFeature.ringEventIndex | vhostUserFeatureProtocolFeatures
                                    | VirtioSCSI.featureChange, hotplug: false)
        let offered = try #require(f.client.getU64(.getFeatures))
        #expect(offered & VirtioSCSI.featureHotplug == 0)
        #expect(offered & VirtioSCSI.featureChange != 0)
        // Setting HOTPLUG anyway is refused (not offered).
        #expect(f.device.offeredFeatures & VirtioSCSI.featureHotplug == 0)
        f.clearUnitAttention()
        _ = f.postEventBuffers(2)
        try f.target.add(SCSIFixture.unit(5, blocks: 100))
        usleep(100_000)
        #expect(f.rings[1].usedIndex == 0, "no TRANSPORT_RESET event without hotplug")
        // The guest learns of it from REPORTED LUNS DATA HAS CHANGED.
        let ua = try #require(f.command(cdb: [0x00, 0, 0, 0, 0, 0]))
        #expect(ua.status == SCSIStatus.checkCondition.rawValue && ua.sense[12] == 0x3F && ua.sense[13] == 0x0E)
        try f.target.remove(LogicalUnitNumber(5)!)
        usleep(100_000)
        #expect(f.rings[1].usedIndex == 0)
        let ua2 = try #require(f.command(cdb: [0x00, 0, 0, 0, 0, 0]))
        #expect(ua2.status == SCSIStatus.checkCondition.rawValue && ua2.sense[12] == 0x3F && ua2.sense[13] == 0x0E)
        // With hotplug (the default) the feature is offered.
        let g = try SCSIFixture()
        #expect((g.client.getU64(.getFeatures) ?? 0) & VirtioSCSI.featureHotplug != 0)
    }
}
