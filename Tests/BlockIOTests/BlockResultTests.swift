import BlockIO
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The values a back-end hands back: results, the remote's status and sense (parsed from the raw sense
/// bytes an iSCSI target returned), and a LUN's geometry.
@Suite("BlockResult, RemoteSCSIStatus and BlockGeometry")
struct BlockResultTests {
    static func parse(_ bytes: [UInt8]) -> RemoteSCSIStatus? {
        bytes.withUnsafeBytes { RemoteSCSIStatus.checkCondition(sense: $0) }
    }

    @Test("fixed-format sense: key, ASC/ASCQ, INFORMATION only when VALID is set, sense-key specific only when SKSV is set")
    func fixedFormat() throws {
        var sense = [UInt8](repeating: 0, count: 18)
        sense[0] = 0xF0                                  // VALID + current error, fixed format
        sense[2] = 0x03                                  // MEDIUM ERROR
        sense[3] = 0x00; sense[4] = 0x00; sense[5] = 0x12; sense[6] = 0x34
        sense[7] = 10
        sense[12] = 0x11; sense[13] = 0x00               // UNRECOVERED READ ERROR
        sense[15] = 0x80; sense[16] = 0x00; sense[17] = 0x10
        let r = try #require(Self.parse(sense))
        #expect(r.status == 0x02 && r.isPresent)
        #expect(r.senseKey == 0x03 && r.additionalSenseCode == 0x11 && r.additionalSenseCodeQualifier == 0x00)
        #expect(r.hasInformation && r.information == 0x1234)
        #expect(r.senseKeySpecific == 0x80_0010)

        sense[0] = 0x70                                  // VALID clear: INFORMATION is not reported
        sense[15] = 0x00                                 // SKSV clear
        let plain = try #require(Self.parse(sense))
        #expect(!plain.hasInformation && plain.information == 0 && plain.senseKeySpecific == 0)
        // Short fixed sense: the key only.
        let short = try #require(Self.parse([0x70, 0x00, 0x06]))
        #expect(short.senseKey == 0x06 && short.additionalSenseCode == 0 && !short.hasInformation)
    }

    @Test("descriptor-format sense: information and sense-key specific descriptors; a descriptor past the end is ignored")
    func descriptorFormat() throws {
        var sense: [UInt8] = [0x72, 0x05, 0x24, 0x00, 0, 0, 0, 20]
        sense += [0x00, 0x0A, 0x80, 0x00, 0, 0, 0, 0, 0, 0xAB, 0xCD, 0xEF]   // information, VALID
        sense += [0x02, 0x06, 0x00, 0x00, 0xC0, 0x00, 0x02, 0x00]             // sense-key specific, SKSV
        let r = try #require(Self.parse(sense))
        #expect(r.status == 0x02 && r.senseKey == 0x05 && r.additionalSenseCode == 0x24)
        #expect(r.hasInformation && r.information == 0xAB_CDEF)
        #expect(r.senseKeySpecific == 0xC0_0002)

        // The additional length claims 20 bytes but only 14 arrived: the cut descriptor is not read.
        let cut = try #require(Self.parse(Array(sense[0..<22])))
        #expect(cut.hasInformation && cut.information == 0xAB_CDEF && cut.senseKeySpecific == 0)
        // An information descriptor without VALID carries nothing.
        var invalid = sense
        invalid[10] = 0x00
        #expect(try #require(Self.parse(invalid)).hasInformation == false)
    }

    @Test("bytes that are not sense data give nil, never a status")
    func notSense() {
        #expect(Self.parse([]) == nil)
        #expect(Self.parse([0x70]) == nil)
        #expect(Self.parse([0x70, 0x00]) == nil, "fixed format needs the sense key byte")
        #expect(Self.parse([0x72, 0x05, 0x24]) == nil, "descriptor format needs ASC and ASCQ")
        #expect(Self.parse([0x00, 0x00, 0x05, 0x00]) == nil)
        #expect(Self.parse([0x7F, 0x00, 0x05, 0x00]) == nil, "vendor-specific response code")
        #expect(RemoteSCSIStatus.none.isPresent == false)
    }

    @Test("results: success counts bytes, failure carries the errno and the remote status")
    func results() {
        #expect(BlockResult.success(4096).succeeded && BlockResult.success(4096).bytesTransferred == 4096)
        let failed = BlockResult.failure(EIO)
        #expect(!failed.succeeded && failed.errno == EIO && failed.bytesTransferred == 0 && !failed.remote.isPresent)
        let busy = RemoteSCSIStatus(status: 0x08)
        let remote = BlockResult.failure(EAGAIN, remote: busy)
        #expect(remote.remote == busy && remote.remoteBlockCount == 0)
        #expect(remote != BlockResult.failure(EAGAIN), "the remote status is part of the result")
    }

    @Test("geometry: capacity in bytes and the defaults a new geometry starts with")
    func geometry() {
        let g = BlockGeometry(logicalBlockSize: 4096, physicalBlockSize: 4096, blockCount: 1 << 20)
        #expect(g.capacityBytes == 4 << 30)
        #expect(!g.readOnly && g.supportsDiscard && g.supportsWriteZeroes && g.discardReadsZeroes && g.volatileWriteCache)
        #expect(g.maxTransferBytes == 0 && g.discardGranularity == 0)
        #expect(!g.supportsPassThrough && !g.remoteCompareAndWrite && !g.remotePersistentReservations)
        let small = BlockGeometry(logicalBlockSize: 512, physicalBlockSize: 4096, blockCount: 3, readOnly: true)
        #expect(small.capacityBytes == 1536 && small.readOnly)
    }
}
