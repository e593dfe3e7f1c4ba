import BlockIO

/// What the channel learns about the remote LUN after login, one command at a time: READ CAPACITY(16),
/// VPD B0h (block limits), VPD B2h (logical block provisioning, only with LBPME), the caching mode page,
/// PERSISTENT RESERVE IN (READ KEYS) and REPORT SUPPORTED OPERATION CODES for COMPARE AND WRITE.
/// The answers go in, decoded; the geometry for the core and the per-command limits come out.
/// Pure: no libiscsi, no I/O (`ISCSIChannel+Discovery.swift` sends the commands and feeds the answers).
struct ISCSIGeometryDiscovery {
    /// The command whose answer is awaited (`idle`: no discovery running).
    enum Step: Equatable {
        case idle, readCapacity, blockLimits, provisioning, caching, persistentReservations, compareAndWrite
    }

    /// What to do after an answer.
    enum Outcome: Equatable {
        /// Send the command for `step` next.
        case next(Step)
        /// Every answer is in: take `finish()`.
        case finished
        /// The LUN cannot be used (the message says why); the step is back to `idle`.
        case failed(String)
    }

    /// READ CAPACITY(16) parameter data (SBC-3 5.16.2), decoded.
    struct Capacity: Equatable {
        var blockLength: UInt32
        var returnedLBA: UInt64
        /// LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT.
        var logicalPerPhysicalExponent: UInt8
        var lbpme: Bool
        var lbprz: Bool
    }

    /// VPD B0h (Block Limits), decoded; counts in logical blocks.
    struct BlockLimits: Equatable {
        var maximumTransferLength: UInt32
        var optimalUnmapGranularity: UInt32
        var maximumUnmapLBACount: UInt32
        var maximumWriteSameLength: UInt64
    }

    /// VPD B2h (Logical Block Provisioning), decoded.
    struct Provisioning: Equatable {
        var lbpu: Bool
        var lbpws: Bool
        var lbprz: Bool
    }

    /// Blocks per UNMAP / WRITE SAME when the remote states no limit.
    static let defaultBlocksPerCommand: UInt64 = 0x40_0000

    private(set) var step: Step = .idle
    private(set) var geometry = BlockGeometry(logicalBlockSize: 512, physicalBlockSize: 512, blockCount: 0)
    private var remoteMaxTransferBytes: UInt64 = 0
    private var lbpme = false
    private var lbpu = false
    private var lbpws = false
    private var maxUnmap: UInt64 = 0
    private var maxWriteSame: UInt64 = 0

    /// Starts over from the geometry known so far: the first command is READ CAPACITY(16).
    mutating func start(from current: BlockGeometry) {
        geometry = current
        step = .readCapacity
    }

    /// Stops (session lost, command failed): nothing is awaited any more.
    mutating func abandon() { step = .idle }

    mutating func readCapacity(_ capacity: Capacity) -> Outcome {
        let bs = capacity.blockLength
        guard bs >= 512, bs <= 65536, bs & (bs - 1) == 0 else {
            step = .idle
            return .failed("remote block size \(bs) is not supported")
        }
        geometry = BlockGeometry(logicalBlockSize: bs, physicalBlockSize: bs << min(UInt32(capacity.logicalPerPhysicalExponent), 8),
                                 blockCount: capacity.returnedLBA &+ 1, readOnly: false,
                                 supportsDiscard: false, supportsWriteZeroes: true,
                                 discardReadsZeroes: capacity.lbprz, volatileWriteCache: true,
                                 maxTransferBytes: 0, discardGranularity: 0)
        geometry.supportsPassThrough = true
        remoteMaxTransferBytes = 0
        lbpme = capacity.lbpme
        lbpu = false
        lbpws = false
        maxUnmap = 0
        maxWriteSame = 0
        return advance(to: .blockLimits)
    }

    /// The B0h page, or nil when the remote did not return it (no limits then).
    mutating func blockLimits(_ limits: BlockLimits?) -> Outcome {
        if let limits {
            let bs = UInt64(geometry.logicalBlockSize)
            let maxTransfer = UInt64(limits.maximumTransferLength) * bs
            remoteMaxTransferBytes = maxTransfer == 0 ? 0 : min(maxTransfer, UInt64(UInt32.max) & ~(bs - 1))
            geometry.discardGranularity = UInt32(truncatingIfNeeded: min(UInt64(limits.optimalUnmapGranularity) * bs, UInt64(UInt32.max)))
            maxUnmap = UInt64(limits.maximumUnmapLBACount)
            maxWriteSame = limits.maximumWriteSameLength
        }
        return advance(to: lbpme ? .provisioning : .caching)
    }

    /// The B2h page, or nil when the remote did not return it.
    mutating func provisioning(_ page: Provisioning?) -> Outcome {
        if let page {
            lbpu = page.lbpu
            lbpws = page.lbpws
            if page.lbprz { geometry.discardReadsZeroes = true }
        }
        return advance(to: .caching)
    }

    /// MODE SENSE(10) data for the caching page (current values), or nil when it failed.
    mutating func caching(modeSense10 data: UnsafeRawBufferPointer?) -> Outcome {
        if let data, data.count >= 8 {
            // Mode parameter header(10): byte 3 = device-specific parameter (bit 7 WP).
            geometry.readOnly = data[3] & 0x80 != 0
            let descriptorLength = Int(data[6]) << 8 | Int(data[7])
            let page = 8 + descriptorLength
            if data.count >= page + 3, data[page] & 0x3f == 0x08 {
                geometry.volatileWriteCache = data[page + 2] & 0x04 != 0
            }
        }
        return advance(to: .persistentReservations)
    }

    /// Whether READ KEYS was answered: the remote implements persistent reservations (SPC-3 or later).
    mutating func persistentReservations(supported: Bool) -> Outcome {
        geometry.remotePersistentReservations = supported
        return advance(to: .compareAndWrite)
    }

    /// REPORT SUPPORTED OPERATION CODES data for COMPARE AND WRITE (one command), or nil when it failed.
    mutating func compareAndWrite(reportedOperationCode data: UnsafeRawBufferPointer?) -> Outcome {
        // SUPPORT field 011b (supported as in the standard) or 101b (vendor-specific manner).
        var supported = false
        if let data, data.count >= 2 {
            let support = data[1] & 0x07
            supported = support == 3 || support == 5
        }
        geometry.remoteCompareAndWrite = supported
        return .finished
    }

    /// The discovered geometry and per-command limits; the step is back to `idle`.
    mutating func finish() -> (geometry: BlockGeometry, limits: ISCSITransferLimits) {
        step = .idle
        geometry.supportsDiscard = lbpme && lbpu
        // WRITE SAME(16) writing zeroes works on any SBC target; with UNMAP=1 it deallocates only when LBPWS.
        geometry.supportsWriteZeroes = true
        if !(lbpme && lbpws) { geometry.discardReadsZeroes = geometry.discardReadsZeroes && geometry.supportsDiscard }
        let limits = ISCSITransferLimits(
            remoteMaxTransferBytes: remoteMaxTransferBytes,
            maxUnmapBlocks: maxUnmap == 0 || maxUnmap == 0xFFFF_FFFF ? Self.defaultBlocksPerCommand : maxUnmap,
            maxWriteSameBlocks: maxWriteSame == 0 ? Self.defaultBlocksPerCommand : min(maxWriteSame, 0xFFFF_FFFF))
        return (geometry, limits)
    }

    private mutating func advance(to next: Step) -> Outcome {
        step = next
        return .next(next)
    }
}
