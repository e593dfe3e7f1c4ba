import SCSI
import SystemErrors

/// Why a front-end could not be created or started.
public struct FrontEndError: ReasonedError, Sendable {
    /// Why it failed: a failed system call (the socket's group or mode) or another reason, naming the controller and socket.
    public var reason: FailureReason
    public init(reason: FailureReason) { self.reason = reason }
}

/// A running front-end: the device model of one controller (virtio-scsi or virtio-blk over vhost-user,
/// PVSCSI over vfio-user). It owns its listening socket, its event-loop threads and its guest connection,
/// and reaches LUNs through `ControllerRuntime` (targets, LUN map views, back-ends by `backendID`).
public protocol FrontEnd: AnyObject, Sendable {
    /// Creates the listening socket and starts serving; returns once connections are accepted.
    func start() throws(FrontEndError)
    /// Stops accepting, drains in-flight I/O, completes nothing twice, closes the socket. Idempotent.
    func stop()
}

/// Builds the front-end of one transport for a controller.
public protocol FrontEndFactory: Sendable {
    /// The transport this factory serves.
    var transport: TransportKind { get }
    /// A front-end for `controller` (not yet started).
    func makeFrontEnd(for controller: ControllerRuntime) throws(FrontEndError) -> any FrontEnd
}

/// The front-end factories available to a gateway, one per transport.
public struct FrontEndRegistry: Sendable {
    private var factories: [TransportKind: any FrontEndFactory] = [:]

    /// A registry with `factories` (a later one replaces an earlier one of the same transport).
    public init(_ factories: [any FrontEndFactory] = []) {
        for factory in factories { register(factory) }
    }

    /// Adds or replaces the factory of `factory.transport`.
    public mutating func register(_ factory: any FrontEndFactory) {
        factories[factory.transport] = factory
    }

    /// The factory of `transport`, if this build has one.
    public func factory(for transport: TransportKind) -> (any FrontEndFactory)? {
        factories[transport]
    }

    /// Transports with a factory.
    public var transports: [TransportKind] {
        TransportKind.allCases.filter { factories[$0] != nil }
    }

    /// The front-ends built into this binary.
    ///
    /// One `VirtioFrontEndFactory` per virtio transport (vhost-user, and virtio-pci over vfio-user) and the PVSCSI one.
    public static var standard: FrontEndRegistry {
        FrontEndRegistry(TransportKind.allCases.compactMap(VirtioFrontEndFactory.init) + [PVSCSIFrontEndFactory()])
    }
}
