import BlockIO
import Glibc
@testable import SCSI
import Synchronization
import Testing

/// The remote device server's status and sense (iSCSI back-end) reach the initiator unchanged; a
/// remote capacity change becomes the target's resize event; COMPARE AND WRITE and PERSISTENT RESERVE
/// pass through to a remote that must execute them.
@Suite struct RemoteSenseTests {
    static func remoteCheck(_ key: UInt8, _ asc: UInt8, _ ascq: UInt8, information: UInt64? = nil, sks: UInt32 = 0) -> RemoteSCSIStatus {
        RemoteSCSIStatus(status: 0x02, senseKey: key, additionalSenseCode: asc, additionalSenseCodeQualifier: ascq,
                         information: information, senseKeySpecific: sks)
    }

    @Test func remoteCheckConditionReachesTheInitiatorUnchanged() {
        var h = Harness()
        // MEDIUM ERROR with the remote's own INFORMATION (not the one the errno mapping would derive).
        h.disk.override = { _ in .failure(EIO, remote: Self.remoteCheck(0x03, 0x11, 0x04, information: 0x1234)) }
        let read = h.run(read10(lba: 5, blocks: 2), dataIn: 1024)
        #expect(read.status == .checkCondition)
        #expect(read.sense == fixedFormatSense(0x03, 0x11, 0x04, information: 0x1234))
        // DATA PROTECT from a read-only remote LUN.
        h.disk.override = { _ in .failure(EROFS, remote: Self.remoteCheck(0x07, 0x27, 0x00)) }
        #expect(h.run(write10(lba: 0, blocks: 1), dataOut: pattern(512)).sense == writeProtectedSense)
        // ILLEGAL REQUEST with the remote's field pointer.
        h.disk.override = { _ in .failure(EINVAL, remote: Self.remoteCheck(0x05, 0x24, 0x00, sks: 0xC0_0002)) }
        #expect(h.run(read10(lba: 0, blocks: 1), dataIn: 512).sense == fixedFormatSense(0x05, 0x24, 0x00, sks: (0xC0, 0x00, 0x02)))
        // A sense key outside the common set is still reported as the remote said (VOLUME OVERFLOW).
        h.disk.override = { _ in .failure(EIO, remote: Self.remoteCheck(0x0D, 0x00, 0x00)) }
        #expect(h.run(read10(lba: 0, blocks: 1), dataIn: 512).sense == fixedFormatSense(0x0D, 0x00, 0x00))
    }

    @Test func remoteSenseUsesTheDescriptorFormatTheInitiatorChose() {
        var h = Harness()
        var mode = h.unit.mode
        mode.descriptorSense = true
        h.unit.setMode(mode)
        h.unit.unitAttentions.clear(for: Harness.nexus)
        h.disk.override = { _ in .failure(EIO, remote: Self.remoteCheck(0x03, 0x11, 0x00, information: 0x1_0000_0001)) }
        let o = h.run(read16(lba: 7, blocks: 1), dataIn: 512)
        #expect(o.status == .checkCondition)
        // 72h, key, ASC/ASCQ, additional length 12, then the information descriptor (VALID, 8-byte LBA).
        #expect(o.sense == [0x72, 0x03, 0x11, 0x00, 0, 0, 0, 12, 0x00, 0x0A, 0x80, 0] + bytesBE64(0x1_0000_0001))
    }

    @Test(arguments: [(UInt8(0x08), SCSIStatus.busy), (0x28, .taskSetFull), (0x18, .reservationConflict),
                      (0x40, .taskAborted), (0x30, .busy)])
    func remoteStatusWithoutSenseIsReportedAsIs(_ remote: UInt8, _ expected: SCSIStatus) {
        var h = Harness()
        h.disk.override = { _ in .failure(EBUSY, remote: RemoteSCSIStatus(status: remote)) }
        let o = h.run(write10(lba: 1, blocks: 1), dataOut: pattern(512))
        #expect(o.status == expected)
        #expect(o.sense.isEmpty)
    }

    @Test func failuresWithoutRemoteSenseKeepTheErrnoMapping() {
        var h = Harness()
        // An outage longer than the back-end's timeout: retryable NOT READY, BECOMING READY.
        h.disk.override = { _ in .failure(ETIMEDOUT) }
        #expect(h.run(read10(lba: 0, blocks: 1), dataIn: 512).sense == fixedFormatSense(0x02, 0x04, 0x01))
    }

    @Test func remoteCapacityChangeBecomesTheResizeEvent() {
        var h = Harness(blocks: 64)
        let events = Mutex<[LUNEvent]>([])
        h.target.subscribe { e in events.withLock { $0.append(e) } }
        // The back-end re-read the capacity after the remote's CAPACITY DATA HAS CHANGED and retried the read.
        h.disk.override = { r in
            guard r.operation == .read else { return nil }
            var result = BlockResult.success(r.length)
            result.remoteBlockCount = 96
            return result
        }
        let o = h.run(read10(lba: 0, blocks: 1), dataIn: 512)
        #expect(o.status == .good)
        #expect(h.unit.blockCount == 96)
        #expect(events.withLock { $0 } == [.capacityChanged(h.unit.number, blockCount: 96)])
        // Every nexus then learns it through the usual unit attention.
        h.disk.override = nil
        #expect(h.run([0, 0, 0, 0, 0, 0]).sense == fixedFormatSense(0x06, 0x2A, 0x09))
        #expect(h.run([0, 0, 0, 0, 0, 0], nexus: Harness.other).sense == fixedFormatSense(0x06, 0x2A, 0x09))
        // The same count again is no new event; a shrink is followed too.
        h.disk.override = { r in
            var result = BlockResult.success(r.length)
            result.remoteBlockCount = 96
            return result
        }
        _ = h.run(read10(lba: 0, blocks: 1), dataIn: 512)
        #expect(events.withLock { $0.count } == 1)
        h.disk.override = { r in
            var result = BlockResult.failure(EINVAL, remote: Self.remoteCheck(0x05, 0x21, 0x00))
            result.remoteBlockCount = 32
            return result
        }
        let beyond = h.run(read10(lba: 40, blocks: 1), dataIn: 512)
        #expect(beyond.sense == lbaOutOfRangeSense)
        #expect(h.unit.blockCount == 32)
        #expect(events.withLock { $0.last } == .capacityChanged(h.unit.number, blockCount: 32))
        // The core now refuses the range itself, without asking the back-end.
        h.disk.override = nil
        _ = h.run([0, 0, 0, 0, 0, 0])
        let local = h.run(read10(lba: 40, blocks: 1), dataIn: 512)
        #expect(local.sense == lbaOutOfRangeSense)
        #expect(local.requests.isEmpty)
    }

    static func compareAndWrite(lba: UInt64, blocks: UInt8) -> [UInt8] {
        [0x89, 0] + bytesBE64(lba) + [0, 0, 0, blocks, 0, 0]
    }

    @Test func compareAndWritePassesThroughWhenTheBackEndCan() {
        var h = Harness(passThrough: true)
        let cdb = Self.compareAndWrite(lba: 3, blocks: 2)
        let data = pattern(2048)
        let seen = Mutex<[UInt8]>([])
        h.disk.override = { r in
            guard r.passThrough.isPresent else { return .failure(EIO) }
            var bytes = [UInt8](repeating: 0, count: r.buffers.totalLength)
            _ = bytes.withUnsafeMutableBytes { r.buffers.gather(from: 0, into: $0) }
            seen.withLock { $0 = bytes }
            return .success(r.length)
        }
        let ok = h.run(cdb, dataOut: data)
        #expect(ok.status == .good)
        #expect(ok.requests.count == 1)
        let request = ok.requests[0]
        #expect(request.passThrough.isPresent)
        #expect(request.operation == .write)
        #expect(request.length == 2048)
        #expect((0..<16).map { request.passThrough[$0] } == cdb)
        #expect(seen.withLock { $0 } == data)  // the initiator's own data-out buffers, verify and write halves
        // The remote's MISCOMPARE (with the offset of the first differing byte) reaches the initiator.
        h.disk.override = { _ in .failure(EILSEQ, remote: Self.remoteCheck(0x0E, 0x1D, 0x00, information: 7)) }
        let miscompare = h.run(cdb, dataOut: data)
        #expect(miscompare.status == .checkCondition)
        #expect(miscompare.sense == fixedFormatSense(0x0E, 0x1D, 0x00, information: 7))
        // Field checks stay local.
        h.disk.override = nil
        #expect(h.run(Self.compareAndWrite(lba: 63, blocks: 2), dataOut: data).sense == lbaOutOfRangeSense)
    }

    @Test func compareAndWriteFallsBackToEmulationWhenTheRemoteRejectsTheOpcode() {
        var h = Harness(passThrough: true)
        #expect(h.unit.passesThroughCommands)
        h.disk.override = { r in
            r.passThrough.isPresent ? .failure(EOPNOTSUPP, remote: Self.remoteCheck(0x05, 0x20, 0x00)) : nil
        }
        let o = h.run(Self.compareAndWrite(lba: 3, blocks: 1), dataOut: [UInt8](repeating: 0, count: 512) + pattern(512))
        #expect(o.status == .good)
        #expect(o.requests.map(\.passThrough.isPresent) == [true, false, false])
        #expect(Array(h.disk.bytes[1536 ..< 2048]) == pattern(512))
        #expect(!h.unit.passesThroughCommands)
        // From then on it is emulated at once.
        let again = h.run(Self.compareAndWrite(lba: 3, blocks: 1), dataOut: pattern(512) + pattern(512, seed: 9))
        #expect(again.status == .good)
        #expect(again.ops == [.read, .write] && !again.requests.contains { $0.passThrough.isPresent })
    }

    @Test func compareAndWriteTheBackEndCannotSendIsEmulatedThisOnce() {
        var h = Harness(passThrough: true)
        h.disk.override = { r in r.passThrough.isPresent ? .failure(EINVAL) : nil }
        let o = h.run(Self.compareAndWrite(lba: 2, blocks: 1), dataOut: [UInt8](repeating: 0, count: 512) + pattern(512))
        #expect(o.status == .good)
        #expect(o.requests.map(\.passThrough.isPresent) == [true, false, false])
        #expect(h.unit.passesThroughCommands)
    }

    @Test func compareAndWriteIsEmulatedWithoutPassThrough() {
        var h = Harness()
        let o = h.run(Self.compareAndWrite(lba: 3, blocks: 1), dataOut: [UInt8](repeating: 0, count: 512) + pattern(512))
        #expect(o.status == .good)
        #expect(o.ops == [.read, .write])
        #expect(!o.requests.contains { $0.passThrough.isPresent })
    }

    @Test func persistentReservePassesThroughOnlyWhenTheRemoteImplementsIt() {
        let readKeys: [UInt8] = [0x5E, 0x00, 0, 0, 0, 0, 0, 0, 64, 0]
        let register: [UInt8] = [0x5F, 0x00, 0, 0, 0, 0, 0, 0, 24, 0]
        let parameters = [UInt8](repeating: 0, count: 8) + bytesBE64(0xABCD) + [UInt8](repeating: 0, count: 8)
        // Remote PR: both go to the back-end unchanged.
        var remote = Harness(passThrough: true, remotePersistentReservations: true)
        remote.disk.override = { r in
            guard r.passThrough.isPresent else { return .failure(EIO) }
            if r.operation == .read {
                let answer: [UInt8] = [0, 0, 0, 1, 0, 0, 0, 8] + bytesBE64(0xABCD)
                _ = answer.withUnsafeBytes { r.buffers.scatter(at: 0, from: $0) }
                return .success(UInt64(answer.count))
            }
            return .success(r.length)
        }
        let out = remote.run(register, dataOut: parameters)
        #expect(out.status == .good)
        #expect(out.requests.count == 1 && out.requests[0].passThrough.isPresent && out.requests[0].operation == .write)
        #expect(out.requests[0].length == 24)
        let keys = remote.run(readKeys, dataIn: 64)
        #expect(keys.status == .good)
        #expect(keys.data == [0, 0, 0, 1, 0, 0, 0, 8] + bytesBE64(0xABCD))
        #expect(keys.requests.count == 1 && keys.requests[0].operation == .read && keys.requests[0].length == 64)
        #expect(!remote.unit.reservations.isReserved)
        // The remote's RESERVATION CONFLICT is passed on.
        remote.disk.override = { _ in .failure(EBADE, remote: RemoteSCSIStatus(status: 0x18)) }
        #expect(remote.run(register, dataOut: parameters).status == .reservationConflict)
        // A parameter list shorter than the CDB says is refused locally.
        #expect(remote.run(register, dataOut: Array(parameters.prefix(16))).sense == parameterListLengthSense)

        // A remote without PR: the local emulation answers, nothing reaches the back-end.
        var local = Harness(passThrough: true)
        let localOut = local.run(register, dataOut: parameters)
        #expect(localOut.status == .good)
        #expect(localOut.requests.isEmpty)
        let localKeys = local.run(readKeys, dataIn: 64)
        #expect(localKeys.requests.isEmpty)
        #expect(localKeys.data == [0, 0, 0, 1, 0, 0, 0, 8] + bytesBE64(0xABCD))
    }

    @Test func remoteSenseBytesAreParsedInBothFormats() {
        let fixed: [UInt8] = [0xF0, 0, 0x03, 0, 0, 0x12, 0x34, 10, 0, 0, 0, 0, 0x11, 0x00, 0, 0xC0, 0x00, 0x05]
        let f = fixed.withUnsafeBytes { RemoteSCSIStatus.checkCondition(sense: $0) }
        #expect(f == RemoteSCSIStatus(status: 2, senseKey: 3, additionalSenseCode: 0x11, additionalSenseCodeQualifier: 0,
                                      information: 0x1234, senseKeySpecific: 0xC0_0005))
        let descriptor: [UInt8] = [0x72, 0x0E, 0x1D, 0x00, 0, 0, 0, 12, 0x00, 0x0A, 0x80, 0] + bytesBE64(9)
        let d = descriptor.withUnsafeBytes { RemoteSCSIStatus.checkCondition(sense: $0) }
        #expect(d == RemoteSCSIStatus(status: 2, senseKey: 0x0E, additionalSenseCode: 0x1D, additionalSenseCodeQualifier: 0,
                                      information: 9))
        // Truncated descriptors and garbage are handled without reading past the bytes.
        let bad: [UInt8] = [0x72, 0x05, 0x24, 0x00, 0, 0, 0, 200, 0x00, 0x0A]
        #expect(bad.withUnsafeBytes { RemoteSCSIStatus.checkCondition(sense: $0) }?.hasInformation == false)
        #expect([UInt8]([0x12, 0x34]).withUnsafeBytes { RemoteSCSIStatus.checkCondition(sense: $0) } == nil)
    }
}
