/// Front-end to back-end request codes (vhost-user protocol).
public enum VhostUserRequest: UInt32, Sendable {
    case getFeatures = 1
    case setFeatures = 2
    case setOwner = 3
    case resetOwner = 4
    case setMemTable = 5
    case setLogBase = 6
    case setLogFD = 7
    case setVringNum = 8
    case setVringAddr = 9
    case setVringBase = 10
    case getVringBase = 11
    case setVringKick = 12
    case setVringCall = 13
    case setVringErr = 14
    case getProtocolFeatures = 15
    case setProtocolFeatures = 16
    case getQueueNum = 17
    case setVringEnable = 18
    case sendRARP = 19
    case netSetMTU = 20
    case setBackendReqFD = 21
    case iotlbMessage = 22
    case setVringEndian = 23
    case getConfig = 24
    case setConfig = 25
    case getInflightFD = 31
    case setInflightFD = 32
    case resetDevice = 34
    case getMaxMemSlots = 36
    case addMemReg = 37
    case remMemReg = 38
    case setStatus = 39
    case getStatus = 40
}

/// Back-end to front-end request codes (on the BACKEND_REQ channel).
public enum VhostUserBackendRequest: UInt32, Sendable {
    case configChange = 2
}

/// Protocol feature bits (GET/SET_PROTOCOL_FEATURES).
public enum VhostUserProtocolFeature {
    public static let multiQueue: UInt64 = 1 << 0
    public static let logSharedMemory: UInt64 = 1 << 1
    public static let replyAck: UInt64 = 1 << 3
    public static let backendRequest: UInt64 = 1 << 5
    public static let config: UInt64 = 1 << 9
    public static let inflightSharedMemory: UInt64 = 1 << 12
    public static let resetDevice: UInt64 = 1 << 13
    public static let configureMemSlots: UInt64 = 1 << 15
    public static let status: UInt64 = 1 << 16
}

/// Feature bit 30: the back-end speaks GET/SET_PROTOCOL_FEATURES.
public let vhostUserFeatureProtocolFeatures: UInt64 = 1 << 30

/// Feature bit 26 (VHOST_F_LOG_ALL): the back-end logs every guest page it writes while set (live migration).
public let vhostFeatureLogAll: UInt64 = 1 << 26

/// SET_VRING_ADDR flag VHOST_VRING_F_LOG: the log address is valid and used-ring writes are logged at it.
public let vhostVringFlagLog: UInt32 = 1 << 0

/// Fixed sizes and limits of the wire format.
public enum VhostUserWire {
    /// Header: request u32, flags u32, size u32.
    public static let headerSize = 12
    /// Largest payload accepted (a full SET_MEM_TABLE is 8 + 8 * 32; GET_CONFIG 12 + 256).
    public static let maxPayload = 4096
    /// Largest ring a VMM offers the driver (QEMU's VIRTQUEUE_MAX_SIZE, over PCI and MMIO alike): over virtio-mmio
    /// the guest driver chooses the size itself, up to this, whatever the PCI `virtqueue_size` would have been.
    public static let maxQueueSize = 1024
    /// Most regions SET_MEM_TABLE carries.
    public static let maxMemTableRegions = 8
    /// Memory slots offered with CONFIGURE_MEM_SLOTS.
    public static let maxMemSlots = 32
    /// Largest config space transfer.
    public static let maxConfigSize = 256
    /// Most fds one message may carry.
    public static let maxFDs = 8
    /// Protocol version in the flags' low two bits.
    public static let version: UInt32 = 1
    public static let flagReply: UInt32 = 1 << 2
    public static let flagNeedReply: UInt32 = 1 << 3
}

/// A decoded message header plus its payload bytes and received fds.
public struct VhostUserMessage: Sendable {
    /// Raw request code.
    public var request: UInt32
    /// Flags (version, reply, need-reply).
    public var flags: UInt32
    /// Payload.
    public var payload: [UInt8]
    /// File descriptors received with the message (owned by the receiver of this value).
    public var fds: [Int32]

    /// Creates a message.
    public init(request: UInt32, flags: UInt32, payload: [UInt8], fds: [Int32] = []) {
        self.request = request
        self.flags = flags
        self.payload = payload
        self.fds = fds
    }

    /// Whether the front-end asked for a REPLY_ACK.
    public var needsReply: Bool { flags & VhostUserWire.flagNeedReply != 0 }

    /// Encodes header and payload.
    public func encoded() -> [UInt8] {
        var out = [UInt8]()
        out.reserveCapacity(VhostUserWire.headerSize + payload.count)
        out.appendLE(request)
        out.appendLE(flags)
        out.appendLE(UInt32(payload.count))
        out += payload
        return out
    }
}
