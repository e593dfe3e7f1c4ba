import BlockIO
import Glibc
@testable import SCSI
import Testing

@Suite struct ErrnoSenseTests {
    struct Case: Sendable, CustomStringConvertible {
        var errno: Int32
        var write: Bool
        var status: SCSIStatus
        var sense: [UInt8]
        var description: String { "errno \(errno) on \(write ? "write" : "read")" }
    }

    static let cases: [Case] = [
        Case(errno: EIO, write: false, status: .checkCondition, sense: fixedFormatSense(0x03, 0x11, 0x00, information: 5)),
        Case(errno: EIO, write: true, status: .checkCondition, sense: fixedFormatSense(0x03, 0x0C, 0x00, information: 5)),
        Case(errno: ENOSPC, write: true, status: .checkCondition, sense: fixedFormatSense(0x07, 0x27, 0x07)),
        Case(errno: EDQUOT, write: true, status: .checkCondition, sense: fixedFormatSense(0x07, 0x27, 0x07)),
        Case(errno: EROFS, write: true, status: .checkCondition, sense: fixedFormatSense(0x07, 0x27, 0x00)),
        Case(errno: ENOMEM, write: false, status: .busy, sense: []),
        Case(errno: EAGAIN, write: true, status: .busy, sense: []),
        Case(errno: EBUSY, write: false, status: .busy, sense: []),
        Case(errno: ETIMEDOUT, write: true, status: .checkCondition, sense: fixedFormatSense(0x02, 0x04, 0x01)),
        Case(errno: ENOTCONN, write: false, status: .checkCondition, sense: fixedFormatSense(0x02, 0x04, 0x01)),
        Case(errno: ECONNRESET, write: false, status: .checkCondition, sense: fixedFormatSense(0x02, 0x04, 0x01)),
        Case(errno: ECANCELED, write: false, status: .taskAborted, sense: []),
        Case(errno: EINVAL, write: false, status: .checkCondition, sense: fixedFormatSense(0x04, 0x44, 0x00)),
        Case(errno: ENXIO, write: true, status: .checkCondition, sense: fixedFormatSense(0x04, 0x44, 0x00)),
    ]

    @Test(arguments: cases)
    func backEndErrorsBecomeSense(_ c: Case) {
        var h = Harness()
        h.disk.override = { _ in .failure(c.errno) }
        let o = c.write ? h.run(write10(lba: 5, blocks: 2), dataOut: pattern(1024)) : h.run(read10(lba: 5, blocks: 2), dataIn: 1024)
        #expect(o.status == c.status)
        #expect(o.sense == c.sense)
        #expect(o.requests.count == 1)
    }

    @Test func flushFailureIsAWriteError() {
        var h = Harness()
        h.disk.override = { _ in .failure(EIO) }
        #expect(h.run([0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0]).sense == fixedFormatSense(0x03, 0x0C, 0x00))
        h.disk.override = { _ in .failure(ENOSPC) }
        #expect(h.run([0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0]).sense == fixedFormatSense(0x07, 0x27, 0x07))
    }

    @Test func unsupportedDiscardIsAnIllegalRequest() {
        var h = Harness()
        h.disk.override = { _ in .failure(EOPNOTSUPP) }
        let list = bytesBE16(22) + bytesBE16(16) + [0, 0, 0, 0] + bytesBE64(3) + bytesBE32(2) + [0, 0, 0, 0]
        #expect(h.run([0x42, 0, 0, 0, 0, 0, 0] + bytesBE16(24) + [0], dataOut: list).sense == fixedFormatSense(0x05, 0x24, 0x00))
        #expect(h.run([0x93, 0x09] + bytesBE64(0) + bytesBE32(2) + [0, 0]).sense == fixedFormatSense(0x05, 0x24, 0x00))
        // Elsewhere it is a target failure.
        #expect(h.run(read10(lba: 0, blocks: 1), dataIn: 512).sense == fixedFormatSense(0x04, 0x44, 0x00))
    }

    @Test func compareAndWriteWriteFailure() {
        var h = Harness()
        h.disk.override = { r in r.operation == .write ? .failure(ENOSPC) : nil }
        let o = h.run([0x89, 0] + bytesBE64(0) + [0, 0, 0, 1, 0, 0], dataOut: [UInt8](repeating: 0, count: 1024))
        #expect(o.sense == fixedFormatSense(0x07, 0x27, 0x07))
        #expect(o.ops == [.read, .write])
    }

    @Test func writeSameFailureInLaterChunk() {
        var h = Harness(blocks: 5000)
        var count = 0
        h.disk.override = { _ in
            count += 1
            return count == 2 ? .failure(EIO) : nil
        }
        let o = h.run([0x93, 0] + bytesBE64(0) + bytesBE32(4096) + [0, 0], dataOut: pattern(512))
        #expect(o.sense == fixedFormatSense(0x03, 0x0C, 0x00, information: 2048))
        #expect(o.requests.count == 2)
    }
}
