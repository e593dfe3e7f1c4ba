import BlockIO
import Foundation
@testable import ISCSIBackend
import SCSI
import Synchronization
import TestSupport
import Testing

/// The SCSI core on top of a real iSCSI channel: what a guest would see.
final class CoreOverChannel {
    let target: SCSITarget
    let unit: LogicalUnit
    let driver: ChannelDriver
    var view = LUNMapView()
    private var nextToken: UInt64 = 1_000_000
    static let nexus = ITNexus(initiator: 1)

    struct Outcome {
        var status: SCSIStatus
        var sense: [UInt8]
        var data: [UInt8]
    }

    init(backend: ISCSIBackend, channel: ISCSIChannel) throws {
        target = SCSITarget(name: "iscsi-test")
        unit = LogicalUnit(number: LogicalUnitNumber(0)!, identity: LogicalUnitIdentity(serial: "SG-IS", naa: 0x6001_4051_0000_0001),
                           geometry: backend.geometry, backendID: 1)
        try target.add(unit)
        driver = ChannelDriver(channel)
        _ = run([0, 0, 0, 0, 0, 0])  // consume POWER ON
    }

    /// Runs one command through execute/resume with the channel as back-end.
    func run(_ cdb: [UInt8], dataOut: [UInt8] = [], dataIn: Int = 0, seconds: Double = 40) -> Outcome {
        let inBuffer = TestBuffers(length: max(dataIn, 512), pieces: 1)
        let outBuffer = TestBuffers(length: max(dataOut.count, 512), pieces: dataOut.count >= 4096 ? 3 : 1)
        outBuffer.bytes = dataOut + [UInt8](repeating: 0, count: max(0, 512 - dataOut.count))
        let inList = dataIn == 0 ? IOVectorList.empty : IOVectorList(base: inBuffer.list.base, count: 1)
        var outList = dataOut.isEmpty ? IOVectorList.empty : outBuffer.list
        if !dataOut.isEmpty && dataOut.count < 512 {
            inBuffer.iovecs.elements[0].iov_len = dataIn
            outBuffer.iovecs.elements[0].iov_len = dataOut.count
            outList = IOVectorList(base: outBuffer.iovecs.elements, count: 1)
        }
        if dataIn > 0 && dataIn < 512 { inBuffer.iovecs.elements[0].iov_len = dataIn }
        var task = SCSITask(nexus: Self.nexus, lun: unit.number, tag: 1, cdb: CDB(cdb), dataOut: outList,
                            dataIn: dataIn == 0 ? .empty : IOVectorList(base: inBuffer.iovecs.elements, count: 1))
        _ = inList
        var disposition = target.execute(&task, view: &view)
        while case let .submit(request) = disposition {
            nextToken += 1
            let token = nextToken
            let result = driver.perform(request, token: token, seconds: seconds) ?? .failure(ETIMEDOUT)
            disposition = target.resume(&task, with: result)
        }
        let data = Array(inBuffer.bytes.prefix(task.dataInLength))
        withExtendedLifetime(outBuffer) {}
        return Outcome(status: task.status, sense: task.sense.array, data: data)
    }
}

func be16(_ v: Int) -> [UInt8] { [UInt8(v >> 8 & 0xFF), UInt8(v & 0xFF)] }
func be32(_ v: UInt64) -> [UInt8] { [UInt8(v >> 24 & 0xFF), UInt8(v >> 16 & 0xFF), UInt8(v >> 8 & 0xFF), UInt8(v & 0xFF)] }
func be64(_ v: UInt64) -> [UInt8] { be32(v >> 32) + be32(v & 0xFFFF_FFFF) }
func read16CDB(lba: UInt64, blocks: UInt32) -> [UInt8] { [0x88, 0] + be64(lba) + be32(UInt64(blocks)) + [0, 0] }
func write16CDB(lba: UInt64, blocks: UInt32) -> [UInt8] { [0x8A, 0] + be64(lba) + be32(UInt64(blocks)) + [0, 0] }
func fixedSense(_ key: UInt8, _ asc: UInt8, _ ascq: UInt8, information: UInt32? = nil) -> [UInt8] {
    var s: [UInt8] = [information == nil ? 0x70 : 0xF0, 0, key, 0, 0, 0, 0, 10, 0, 0, 0, 0, asc, ascq, 0, 0, 0, 0]
    if let i = information {
        s[3] = UInt8(i >> 24); s[4] = UInt8(i >> 16 & 0xFF); s[5] = UInt8(i >> 8 & 0xFF); s[6] = UInt8(i & 0xFF)
    }
    return s
}

/// Remote sense, pass-through and split transfers against a real tgtd, seen through the SCSI core.
@Suite(.serialized, .enabled(if: TgtTarget.availability.ok, "tgtd cannot be started on this machine (see stderr)"))
struct ISCSICoreIntegrationTests {
    func config(_ target: TgtTarget, initiator: String = testInitiator, timeout: Int = 30, log: TestLog? = nil) throws -> ISCSIBackendConfig {
        try ISCSIBackendConfig(url: target.url, initiatorName: initiator, timeoutSeconds: timeout,
                               reconnectBackoff: ISCSIReconnectBackoff(initialMilliseconds: 50, maximumMilliseconds: 400),
                               queueDepth: 32, log: log?.logger)
    }

    func gateway(_ target: TgtTarget, initiator: String = testInitiator, timeout: Int = 30) throws -> (ISCSIBackend, CoreOverChannel) {
        let backend = try ISCSIBackend.open(config: config(target, initiator: initiator, timeout: timeout))
        let channel = try backend.makeChannel()
        let core = try CoreOverChannel(backend: backend, channel: channel)
        #expect(core.driver.waitOnline(seconds: 5))
        return (backend, core)
    }

    @Test func writeToReadOnlyRemoteLUNReturnsTheRemoteDataProtectSense() throws {
        let target = try TgtTarget(sizeMiB: 4)
        let (_, core) = try gateway(target)
        try TgtTarget.run(["luparam", "\(target.controlPort)", "1", "1", "readonly=1"])
        let o = core.run(write16CDB(lba: 8, blocks: 1), dataOut: [UInt8](repeating: 0x77, count: 512))
        #expect(o.status == .checkCondition)
        #expect(o.sense == fixedSense(0x07, 0x27, 0x00))
        #expect(target.readBacking(offset: 8 * 512, count: 512) == [UInt8](repeating: 0, count: 512))
    }

    @Test func readBeyondTheShrunkRemoteLUNReturnsTheRemoteSense() throws {
        let target = try TgtTarget(sizeMiB: 4)
        let (_, core) = try gateway(target)
        let full = core.run(read16CDB(lba: 6000, blocks: 8), dataIn: 4096)
        #expect(full.status == .good)
        // The remote's backing store shrinks under tgtd (which still reports 4 MiB): reads past the
        // new end fail on the remote, and its sense reaches the initiator.
        truncate(target.backingFile, 1 << 20)
        let o = core.run(read16CDB(lba: 6000, blocks: 8), dataIn: 4096)
        #expect(o.status == .checkCondition)
        #expect(o.sense.count == 18)
        #expect(o.sense.count == 18 && o.sense[2] == 0x03, "remote sense \(o.sense)")  // MEDIUM ERROR from tgtd
        // A split read (parts of 64 KiB) whose later part fails: the whole command fails with that sense.
        core.driver.channel.transferLimitOverride = 65536
        let split = core.run(read16CDB(lba: 1024, blocks: 2048), dataIn: 1 << 20)
        #expect(split.status == .checkCondition && split.sense == o.sense, "\(split.sense)")
        // Parts 0-7 (LBA 1024 ..< 2048) succeeded, part 8 (the new end of the file) failed: no part after it was sent.
        #expect(core.driver.channel.statistics.splitParts == 8)
    }

    @Test func transfersAboveTheRemoteMaximumAreSplitIntoSeveralCommands() throws {
        let target = try TgtTarget(sizeMiB: 16)
        let (backend, core) = try gateway(target)
        #expect(backend.geometry.maxTransferBytes == 0)  // the core reports no limit: the channel splits
        let channel = core.driver.channel
        channel.transferLimitOverride = 65536
        let size = 3 << 20
        let data = TestBuffers.pattern(size, seed: 91)
        let w = core.run(write16CDB(lba: 2048, blocks: UInt32(size / 512)), dataOut: data)
        #expect(w.status == .good)
        #expect(channel.statistics.splitParts == UInt64(size / 65536 - 1))
        #expect(target.readBacking(offset: 2048 * 512, count: size) == data)
        let r = core.run(read16CDB(lba: 2048, blocks: UInt32(size / 512)), dataIn: size)
        #expect(r.status == .good)
        #expect(r.data == data)
        #expect(channel.statistics.splitParts == UInt64(2 * (size / 65536 - 1)))
    }

    static func compareAndWrite(lba: UInt64, blocks: UInt8) -> [UInt8] { [0x89, 0] + be64(lba) + [0, 0, 0, blocks, 0, 0] }

    /// tgt 1.0.85 lists COMPARE AND WRITE in REPORT SUPPORTED OPERATION CODES (the login probe) but
    /// answers it with INVALID COMMAND OPERATION CODE: the first pass-through falls back to the core's
    /// emulation for good, so the guest still gets a working COMPARE AND WRITE with MISCOMPARE sense.
    @Test func compareAndWriteFollowsTheRemotesSupport() throws {
        let target = try TgtTarget(sizeMiB: 4)
        let (backend, core) = try gateway(target)
        #expect(backend.geometry.supportsPassThrough)
        #expect(core.unit.passesThroughCommands == backend.geometry.remoteCompareAndWrite)
        // What the remote itself answers to COMPARE AND WRITE, sent as a raw pass-through.
        let probe = TestBuffers(length: 1024, pieces: 1)
        let raw = try #require(core.driver.perform(.passThrough(SCSIPassThrough(head: 0x8900_0000_0000_0000, tail: 0x0000_0000_0001_0000, length: 16),
                                                   direction: .write, length: 1024, buffers: probe.list), token: 77))
        let remoteHasIt = raw.succeeded
        if !remoteHasIt {
            #expect(raw.remote == RemoteSCSIStatus(status: 2, senseKey: 5, additionalSenseCode: 0x20, additionalSenseCodeQualifier: 0))
        }
        let old = [UInt8](repeating: 0x11, count: 1024)
        let new = TestBuffers.pattern(1024, seed: 3)
        target.writeBacking(offset: 100 * 512, bytes: old)
        let ok = core.run(Self.compareAndWrite(lba: 100, blocks: 2), dataOut: old + new)
        #expect(ok.status == .good, "\(ok.sense)")
        #expect(core.unit.passesThroughCommands == (backend.geometry.remoteCompareAndWrite && remoteHasIt))
        #expect(target.readBacking(offset: 100 * 512, count: 1024) == new)
        // Miscompare: MISCOMPARE sense, INFORMATION = offset of the first differing byte; nothing written.
        var wrong = new
        wrong[700] ^= 0xFF
        let mis = core.run(Self.compareAndWrite(lba: 100, blocks: 2), dataOut: wrong + old)
        #expect(mis.status == .checkCondition)
        #expect(mis.sense == fixedSense(0x0E, 0x1D, 0x00, information: 700), "\(mis.sense)")
        #expect(target.readBacking(offset: 100 * 512, count: 1024) == new)
    }

    static let writeExclusive: UInt8 = 1
    static func prOut(_ action: UInt8, type: UInt8 = 0, key: UInt64, serviceKey: UInt64 = 0) -> (cdb: [UInt8], data: [UInt8]) {
        ([0x5F, action, type, 0, 0] + be32(24) + [0], be64(key) + be64(serviceKey) + [UInt8](repeating: 0, count: 8))
    }

    @Test func persistentReservationsAreSharedThroughTheRemote() throws {
        let target = try TgtTarget(sizeMiB: 4)
        let (backendA, a) = try gateway(target, initiator: "iqn.2026-11.test.scsigate:host-a")
        let (_, b) = try gateway(target, initiator: "iqn.2026-11.test.scsigate:host-b")
        #expect(backendA.geometry.remotePersistentReservations)
        #expect(a.unit.remotePersistentReservations)
        // Each host registers its key through its own gateway session.
        let regA = Self.prOut(0x00, key: 0, serviceKey: 0xAAAA)
        #expect(a.run(regA.cdb, dataOut: regA.data).status == .good)
        let regB = Self.prOut(0x00, key: 0, serviceKey: 0xBBBB)
        #expect(b.run(regB.cdb, dataOut: regB.data).status == .good)
        // READ KEYS from A lists both registrations (held by the remote, not by either gateway).
        let keys = a.run([0x5E, 0x00, 0, 0, 0, 0, 0] + be16(64) + [0], dataIn: 64)
        #expect(keys.status == .good)
        #expect(keys.data.count == 24, "\(keys.data)")
        if keys.data.count == 24 {
            #expect(Set([Array(keys.data[8..<16]), Array(keys.data[16..<24])]) == Set([be64(0xAAAA), be64(0xBBBB)]))
        }
        // A takes a WRITE EXCLUSIVE reservation: B's writes conflict on the remote, B's reads do not.
        let reserve = Self.prOut(0x01, type: Self.writeExclusive, key: 0xAAAA)
        #expect(a.run(reserve.cdb, dataOut: reserve.data).status == .good)
        let held = b.run([0x5E, 0x01, 0, 0, 0, 0, 0] + be16(64) + [0], dataIn: 64)
        #expect(held.status == .good && held.data.count >= 24 && Array(held.data[8..<16]) == be64(0xAAAA), "\(held.data)")
        let conflicted = b.run(write16CDB(lba: 0, blocks: 1), dataOut: [UInt8](repeating: 0xB0, count: 512))
        #expect(conflicted.status == .reservationConflict)
        #expect(b.run(read16CDB(lba: 0, blocks: 1), dataIn: 512).status == .good)
        #expect(a.run(write16CDB(lba: 0, blocks: 1), dataOut: [UInt8](repeating: 0xA0, count: 512)).status == .good)
        #expect(target.readBacking(offset: 0, count: 512) == [UInt8](repeating: 0xA0, count: 512))
        // Neither gateway's local emulation holds anything.
        #expect(!a.unit.reservations.isReserved && !b.unit.reservations.isReserved)
        // B preempts A: A's next command gets the remote's unit attention or conflict, B can write.
        let preempt = Self.prOut(0x04, type: Self.writeExclusive, key: 0xBBBB, serviceKey: 0xAAAA)
        #expect(b.run(preempt.cdb, dataOut: preempt.data).status == .good)
        #expect(b.run(write16CDB(lba: 0, blocks: 1), dataOut: [UInt8](repeating: 0xB1, count: 512)).status == .good)
        let aAfter = a.run(write16CDB(lba: 1, blocks: 1), dataOut: [UInt8](repeating: 0xA1, count: 512))
        #expect(aAfter.status == .reservationConflict)
        #expect(target.readBacking(offset: 512, count: 512) == [UInt8](repeating: 0, count: 512))
    }

    @Test func outageLongerThanTheTimeoutIsRetryableSenseThenRecovers() throws {
        let target = try TgtTarget(sizeMiB: 4)
        let (_, core) = try gateway(target, timeout: 2)
        target.stop(hard: true)
        let start = Date()
        let o = core.run(write16CDB(lba: 0, blocks: 1), dataOut: [UInt8](repeating: 0x42, count: 512), seconds: 10)
        let elapsed = Date().timeIntervalSince(start)
        // NOT READY, LOGICAL UNIT IS IN PROCESS OF BECOMING READY: initiators retry after a delay.
        #expect(o.status == .checkCondition)
        #expect(o.sense == fixedSense(0x02, 0x04, 0x01))
        #expect(elapsed >= 1.9 && elapsed < 8, "completed after \(elapsed) s")
        try target.start()
        #expect(core.driver.waitOnline(seconds: 10))
        let again = core.run(write16CDB(lba: 0, blocks: 1), dataOut: [UInt8](repeating: 0x42, count: 512))
        #expect(again.status == .good)
        #expect(target.readBacking(offset: 0, count: 512) == [UInt8](repeating: 0x42, count: 512))
    }
}

/// A transfer split into many parts survives a target kill in the middle: only the parts not yet
/// acknowledged are sent again, and the guest sees one successful completion.
@Suite(.serialized, .enabled(if: TgtTarget.availability.ok, "tgtd cannot be started on this machine (see stderr)"))
struct ISCSISplitTransferReconnectTests {
    @Test func splitWriteResumesAfterTheTargetIsKilledMidway() throws {
        let target = try TgtTarget(sizeMiB: 32)
        let config = try ISCSIBackendConfig(url: target.url, initiatorName: testInitiator, timeoutSeconds: 30,
                                            reconnectBackoff: ISCSIReconnectBackoff(initialMilliseconds: 50, maximumMilliseconds: 400),
                                            queueDepth: 8)
        let backend = try ISCSIBackend.open(config: config)
        let channel = try backend.makeChannel()
        let driver = ChannelDriver(channel)
        #expect(driver.waitOnline(seconds: 5))
        channel.transferLimitOverride = 16384
        let size = 16 << 20
        let w = TestBuffers(length: size, pieces: 7)
        w.bytes = TestBuffers.pattern(size, seed: 17)
        #expect(channel.submit(BlockRequest(operation: .write, offset: 8 << 20, length: UInt64(size), buffers: w.list), token: 1) == 0)
        driver.pump(seconds: 20) { channel.statistics.splitParts >= 40 || driver.results[1] != nil }
        #expect(driver.results[1] == nil, "the write finished before the target could be killed")
        let partsBefore = channel.statistics.splitParts
        target.stop(hard: true)
        driver.pump(seconds: 0.3) { false }
        try target.start()
        driver.pump(seconds: 30) { driver.results[1] != nil }
        #expect(driver.results[1]?.0 == .success(UInt64(size)))
        #expect(channel.statistics.connectionLosses >= 1)
        // Every part was acknowledged exactly once (the lost one was sent again, not counted as a new part).
        #expect(channel.statistics.splitParts == UInt64(size / 16384 - 1), "before the kill: \(partsBefore)")
        #expect(target.readBacking(offset: 8 << 20, count: size) == TestBuffers.pattern(size, seed: 17))
    }
}

/// A remote LUN grown on its target: the back-end's geometry observer (what the gateway registers with
/// `OpenedBackend.followRemoteCapacity`) turns it into the target's resize event.
@Suite(.serialized, .enabled(if: TgtTarget.availability.ok, "tgtd cannot be started on this machine (see stderr)"))
struct ISCSIRemoteCapacityTests {
    @Test func remoteCapacityChangeResizesTheLogicalUnit() throws {
        let target = try TgtTarget(sizeMiB: 4)
        let config = try ISCSIBackendConfig(url: target.url, initiatorName: testInitiator, timeoutSeconds: 30,
                                            reconnectBackoff: ISCSIReconnectBackoff(initialMilliseconds: 50, maximumMilliseconds: 400),
                                            queueDepth: 8)
        let backend = try ISCSIBackend.open(config: config)
        let core = try CoreOverChannel(backend: backend, channel: try backend.makeChannel())
        #expect(core.driver.waitOnline(seconds: 5))
        let events = Mutex<[LUNEvent]>([])
        core.target.subscribe { e in events.withLock { $0.append(e) } }
        let unit = core.unit
        let scsiTarget = core.target
        backend.addGeometryObserver { [weak unit] g in
            if let unit { scsiTarget.followCapacity(of: unit, blockCount: g.blockCount) }
        }
        #expect(unit.blockCount == 4 * 2048)
        // tgtd reads the size when the LUN is created: grow the file and recreate the target.
        target.stop(hard: true)
        let fh = try FileHandle(forWritingTo: URL(fileURLWithPath: target.backingFile))
        try fh.truncate(atOffset: 6 << 20)
        try fh.close()
        try target.start()
        core.driver.pump(seconds: 10) { unit.blockCount == 6 * 2048 }
        #expect(unit.blockCount == 6 * 2048)
        #expect(events.withLock { $0 } == [.capacityChanged(unit.number, blockCount: 6 * 2048)])
        // The initiator learns it (CAPACITY DATA HAS CHANGED), then READ CAPACITY(16) shows the new size
        // and a write beyond the old end reaches the remote.
        #expect(core.run([0, 0, 0, 0, 0, 0]).sense == fixedSense(0x06, 0x2A, 0x09))
        let capacity = core.run([0x9E, 0x10] + be64(0) + be32(32) + [0, 0], dataIn: 32)
        #expect(capacity.status == .good && Array(capacity.data.prefix(8)) == be64(6 * 2048 - 1))
        let data = TestBuffers.pattern(4096, seed: 8)
        #expect(core.run(write16CDB(lba: 5 * 2048, blocks: 8), dataOut: data).status == .good)
        #expect(target.readBacking(offset: 5 << 20, count: 4096) == data)
    }
}
