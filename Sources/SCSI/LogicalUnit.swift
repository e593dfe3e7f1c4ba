import BlockIO
import Synchronization

/// How a LUN identifies itself in INQUIRY and VPD pages.
public struct LogicalUnitIdentity: Sendable, Equatable {
    /// T10 vendor identification (8 ASCII characters, space padded).
    public var vendor: String
    /// Product identification (16 ASCII characters, space padded).
    public var product: String
    /// Product revision level (4 ASCII characters).
    public var revision: String
    /// Unit serial number (VPD 80h), printable ASCII.
    public var serial: String
    /// NAA identifier (VPD 83h): 64-bit IEEE registered (NAA 5) value.
    public var naa: UInt64

    public init(vendor: String = "SCSIGATE", product: String = "VIRTUAL-DISK", revision: String = "0001",
                serial: String, naa: UInt64) {
        self.vendor = vendor
        self.product = product
        self.revision = revision
        self.serial = serial
        self.naa = naa
    }
}

/// Mode parameters that MODE SELECT can change; shared by every I_T nexus of a LUN.
public struct ModeParameters: Sendable, Equatable {
    /// Caching page: write cache enabled.
    public var writeCacheEnabled: Bool = true
    /// Caching page: read cache disabled.
    public var readCacheDisabled: Bool = false
    /// Control page: descriptor-format sense (D_SENSE).
    public var descriptorSense: Bool = false
    /// Control page: software write protect (SWP).
    public var softwareWriteProtect: Bool = false
    /// Control page: queue algorithm modifier (0 restricted, 1 unrestricted).
    public var queueAlgorithmModifier: UInt8 = 1
    /// Informational exceptions control page (1Ch): MRIE.
    public var informationalExceptionsReportingMethod: UInt8 = 0
    /// Informational exceptions control page (1Ch): DEXCPT.
    public var disableExceptionControl: Bool = true
    /// Read-write error recovery page (01h): AWRE/ARRE.
    public var automaticWriteReallocation: Bool = true
    public var automaticReadReallocation: Bool = true

    public init() {}
}

/// One logical unit: identity, geometry, mode parameters, unit attentions and reservations.
///
/// Shared by every queue of every front-end that reaches it; the per-I/O path reads only the
/// atomics (block count, pending-UA count, reservation flag) and takes no lock unless one of them
/// says there is work.
public final class LogicalUnit: Sendable {
    /// The LUN within its target.
    public let number: LogicalUnitNumber
    /// Identity for INQUIRY / VPD.
    public let identity: LogicalUnitIdentity
    /// Opaque back-end handle chosen by the gateway, echoed in `SCSITask.backendID`.
    public let backendID: Int
    /// Incremented each time this LUN is (re)added, to tell apart tasks of an older instance.
    public let generation: UInt64

    private let geometryState: Mutex<BlockGeometry>
    private let blockCountAtomic: Atomic<UInt64>
    private let readOnlyAtomic: Atomic<Bool>
    private let modeState: Mutex<ModeParameters>
    /// Descriptor sense, mirrored for the hot path.
    private let descriptorSenseAtomic: Atomic<Bool>
    /// Logical block size, fixed for the life of the LUN (lock-free copy of the geometry's).
    private let logicalBlockSize: UInt32
    /// Largest transfer in logical blocks a command may ask for (B0h MAXIMUM TRANSFER LENGTH; 0: no limit).
    let maximumTransferBlocks: UInt32
    /// COMPARE AND WRITE goes unchanged to a remote device server that implements it
    /// (`BlockGeometry.supportsPassThrough` and `remoteCompareAndWrite`); otherwise it is emulated
    /// (read, compare, write: atomic only among this gateway's queues). Turned off for good when the
    /// remote answers INVALID COMMAND OPERATION CODE although its REPORT SUPPORTED OPERATION CODES listed it.
    public var passesThroughCommands: Bool { compareAndWritePassThrough.load(ordering: .relaxed) }
    private let compareAndWritePassThrough: Atomic<Bool>
    /// PERSISTENT RESERVE IN/OUT go to the remote device server, which implements them
    /// (`BlockGeometry.remotePersistentReservations`); otherwise `reservations` emulates them.
    public let remotePersistentReservations: Bool
    /// Whether the back-end has a volatile write cache (fixed at creation).
    private let hasVolatileWriteCache: Bool
    /// Writes must be forced to stable storage: WCE = 0 on a back-end with a volatile cache (hot path).
    private let writeThroughAtomic: Atomic<Bool>
    /// Per-nexus PREVENT ALLOW MEDIUM REMOVAL state and other rarely used command-layer state.
    let mediumState = Mutex(MediumState())

    /// Back-end allocation query for GET LBA STATUS; nil: every LBA is reported "mapped or unknown".
    public let allocationQuery: AllocationQuery?

    /// Unit attentions pending per I_T nexus.
    public let unitAttentions: UnitAttentionBoard
    /// SPC-2 and persistent reservations.
    public let reservations: ReservationState

    public init(number: LogicalUnitNumber, identity: LogicalUnitIdentity, geometry: BlockGeometry,
                backendID: Int, generation: UInt64 = 0, mode: ModeParameters = ModeParameters(),
                allocationQuery: AllocationQuery? = nil) {
        self.number = number
        self.allocationQuery = allocationQuery
        self.identity = identity
        self.backendID = backendID
        self.generation = generation
        var mode = mode
        mode.writeCacheEnabled = mode.writeCacheEnabled && geometry.volatileWriteCache
        self.geometryState = Mutex(geometry)
        self.blockCountAtomic = Atomic(geometry.blockCount)
        self.readOnlyAtomic = Atomic(geometry.readOnly)
        self.modeState = Mutex(mode)
        self.descriptorSenseAtomic = Atomic(mode.descriptorSense)
        self.logicalBlockSize = geometry.logicalBlockSize
        self.maximumTransferBlocks = geometry.logicalBlockSize == 0 ? 0 : geometry.maxTransferBytes / geometry.logicalBlockSize
        self.hasVolatileWriteCache = geometry.volatileWriteCache
        self.compareAndWritePassThrough = Atomic(geometry.supportsPassThrough && geometry.remoteCompareAndWrite)
        self.remotePersistentReservations = geometry.supportsPassThrough && geometry.remotePersistentReservations
        self.writeThroughAtomic = Atomic(geometry.volatileWriteCache && !mode.writeCacheEnabled)
        self.unitAttentions = UnitAttentionBoard()
        self.reservations = ReservationState()
    }

    /// Stops passing COMPARE AND WRITE through (the remote turned out not to implement it).
    func stopCompareAndWritePassThrough() { compareAndWritePassThrough.store(false, ordering: .relaxed) }

    /// Current geometry (takes a lock; not for the per-I/O path).
    public var geometry: BlockGeometry { geometryState.withLock { $0 } }

    /// Current number of logical blocks (lock-free).
    @inline(__always) public var blockCount: UInt64 { blockCountAtomic.load(ordering: .acquiring) }

    /// Logical block size (fixed for the life of the LUN).
    @inline(__always) public var blockSize: UInt32 { logicalBlockSize }

    /// Whether every write must reach stable storage before completing (write cache disabled by
    /// MODE SELECT while the back-end caches writes); lock-free.
    @inline(__always) public var writeThrough: Bool { writeThroughAtomic.load(ordering: .relaxed) }

    /// Whether writes are refused (back-end read-only or set read-only by the operator).
    @inline(__always) public var isReadOnly: Bool {
        readOnlyAtomic.load(ordering: .acquiring)
    }

    /// Sense format from the control mode page (lock-free).
    @inline(__always) public var senseFormat: SenseFormat {
        descriptorSenseAtomic.load(ordering: .relaxed) ? .descriptor : .fixed
    }

    /// Current mode parameters.
    public var mode: ModeParameters { modeState.withLock { $0 } }

    /// Replaces the mode parameters (MODE SELECT). Returns whether anything changed.
    @discardableResult
    public func setMode(_ new: ModeParameters) -> Bool {
        modeState.withLock { state -> Bool in
            let old = state
            state = new
            publishMode(new)
            return old != new
        }
    }

    /// Validates and changes the mode parameters atomically (MODE SELECT): `body` sees the current
    /// parameters and edits a copy, which replaces them unless it throws. Returns whether anything changed.
    func updateMode(_ body: (inout ModeParameters) throws(SCSIError) -> Void) throws(SCSIError) -> Bool {
        try modeState.withLock { state throws(SCSIError) -> Bool in
            var edited = state
            try body(&edited)
            let changed = edited != state
            state = edited
            publishMode(edited)
            return changed
        }
    }

    /// Mirrors the hot-path mode bits (called with the mode lock held).
    private func publishMode(_ mode: ModeParameters) {
        descriptorSenseAtomic.store(mode.descriptorSense, ordering: .relaxed)
        writeThroughAtomic.store(hasVolatileWriteCache && !mode.writeCacheEnabled, ordering: .relaxed)
    }

    /// Changes the capacity (operator resize or back-end change). Does not raise the UA; the target does.
    public func setBlockCount(_ blocks: UInt64) {
        geometryState.withLock { $0.blockCount = blocks }
        blockCountAtomic.store(blocks, ordering: .releasing)
    }

    /// Sets or clears operator read-only.
    public func setReadOnly(_ readOnly: Bool) {
        geometryState.withLock { $0.readOnly = readOnly }
        readOnlyAtomic.store(readOnly, ordering: .releasing)
    }
}
