/// Constants of the VMware PVSCSI device interface (Linux drivers/scsi/vmw_pvscsi.h, QEMU
/// docs/specs/vmw_pvscsi-spec.txt).
public enum PVSCSI {
    public static let vendorID: UInt16 = 0x15AD
    public static let deviceID: UInt16 = 0x07C0
    /// PCI class code: mass storage, SCSI controller (as QEMU's pvscsi: PCI_CLASS_STORAGE_SCSI).
    public static let classCode: UInt32 = 0x01_00_00
    public static let revision: UInt8 = 0x02
    /// BAR0: 8 pages of registers, kick registers and the MSI-X table/PBA pages.
    public static let memorySpaceSize: UInt32 = 8 * 4096
    public static let msixTableOffset: UInt32 = 6 * 4096
    public static let msixPBAOffset: UInt32 = 7 * 4096
    public static let pageSize: UInt64 = 4096

    /// Register offsets in BAR0.
    public enum Register {
        public static let command: UInt64 = 0x0
        public static let commandData: UInt64 = 0x4
        public static let commandStatus: UInt64 = 0x8
        public static let lastStatus0: UInt64 = 0x100
        public static let lastStatus3: UInt64 = 0x10C
        public static let interruptStatus: UInt64 = 0x100C
        public static let interruptMask: UInt64 = 0x2010
        public static let kickNonRWIO: UInt64 = 0x3014
        public static let debug: UInt64 = 0x3018
        public static let kickRWIO: UInt64 = 0x4018
    }

    /// Device commands written to the COMMAND register.
    public enum Command: UInt32, Sendable {
        case adapterReset = 1
        case issueSCSI = 2
        case setupRings = 3
        case resetBus = 4
        case resetDevice = 5
        case abortCommand = 6
        case config = 7
        case setupMessageRing = 8
        case deviceUnplug = 9
        case setupRequestCallThreshold = 10
    }

    /// COMMAND_STATUS values.
    public static let commandFailed: UInt32 = 0xFFFF_FFFF
    public static let commandNeedsData: UInt32 = 0xFFFF_FFFE
    public static let commandSucceeded: UInt32 = 0

    /// Interrupt status / mask bits.
    public static let interruptCompletion0: UInt32 = 1 << 0
    public static let interruptCompletion1: UInt32 = 1 << 1
    public static let interruptMessage0: UInt32 = 1 << 2
    public static let interruptMessage1: UInt32 = 1 << 3
    public static let interruptAll: UInt32 = 0xF

    /// Ring limits.
    public static let maxRingPages = 32
    public static let maxMessageRingPages = 16
    public static let requestDescriptorSize = 128
    public static let completionDescriptorSize = 32
    public static let messageDescriptorSize = 128

    /// Command descriptor sizes in 32-bit words.
    public static let setupRingsWords = (4 + 4 + 8 + 32 * 8 + 32 * 8) / 4  // 132
    public static let setupMessageRingWords = (4 + 4 + 16 * 8) / 4  // 34
    public static let resetDeviceWords = (4 + 8) / 4  // 3
    public static let abortCommandWords = (8 + 4 + 4) / 4  // 4
    public static let configWords = (8 + 8 + 4 + 4) / 4  // 6

    /// Request descriptor flags.
    public static let flagSGList: UInt32 = 1 << 0
    public static let flagOutOfBandCDB: UInt32 = 1 << 1
    public static let flagDirectionNone: UInt32 = 1 << 2
    public static let flagDirectionToHost: UInt32 = 1 << 3
    public static let flagDirectionToDevice: UInt32 = 1 << 4
    /// SG element flag: this element points at the next SG segment.
    public static let sgChainElement: UInt32 = 1 << 0

    /// Message types.
    public static let messageDeviceAdded: UInt32 = 0
    public static let messageDeviceRemoved: UInt32 = 1

    /// Config pages.
    public static let configPageController: UInt32 = 0x1958
    public static let configControllerAddress: UInt32 = 0x2120
    /// PVSCSIConfigPageController: 16-byte header, nodeWWN, 5 UTF-16 strings (64+64+32+32+32 units), numPhys, flags.
    public static let configPageControllerSize = 16 + 8 + 2 * (64 + 64 + 32 + 32 + 32) + 4 + 4

    /// Offsets inside the rings state page.
    public enum RingsState {
        public static let requestProducer = 0
        public static let requestConsumer = 4
        public static let requestEntriesLog2 = 8
        public static let completionProducer = 12
        public static let completionConsumer = 16
        public static let completionEntriesLog2 = 20
        public static let requestCallThreshold = 24
        public static let messageProducer = 128
        public static let messageConsumer = 132
        public static let messageEntriesLog2 = 136
    }
}

/// Host bus adapter status codes reported beside the SCSI status (BTSTAT_*).
public enum HostAdapterStatus: UInt16, Sendable {
    case success = 0x00
    case linkedCommandCompleted = 0x0A
    case linkedCommandCompletedWithFlag = 0x0B
    case dataUnderrun = 0x0C
    case selectionTimeout = 0x11
    case dataRun = 0x12
    case busFree = 0x13
    case invalidPhase = 0x14
    case lunMismatch = 0x17
    case invalidParameter = 0x1A
    case senseFailed = 0x1B
    case tagReject = 0x1C
    case badMessage = 0x1D
    case hardwareFailure = 0x20
    case noResponse = 0x21
    case sentReset = 0x22
    case receivedReset = 0x23
    case disconnect = 0x24
    case busReset = 0x25
    case abortQueue = 0x26
    case softwareFailure = 0x27
    case timeout = 0x30
    case parityError = 0x34
}
