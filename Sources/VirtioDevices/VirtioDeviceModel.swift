import GuestMemoryMap
import Virtio

/// A virtio device model (virtio-scsi, virtio-blk), apart from the transport that hosts it: the vhost-user
/// server and the virtio-pci function over vfio-user each drive it through these calls, from their control
/// thread; the device runs its queues on its own queue groups. It knows no transport message.
public protocol VirtioDeviceModel: AnyObject, Sendable {
    /// Virtio device feature bits offered (device-specific and ring bits; the transport adds VERSION_1 and
    /// its own bits).
    var offeredFeatures: UInt64 { get }
    /// Whether the device raises configuration-change notifications (virtio-blk resize): vhost-user offers
    /// the CONFIG protocol feature for it, virtio-pci a config interrupt.
    var notifiesConfigChanges: Bool { get }
    /// Number of virtqueues (GET_QUEUE_NUM reports request queues plus fixed ones as the device counts them).
    var queueCount: Int { get }
    /// Largest ring size accepted.
    var maxQueueSize: Int { get }
    /// The ring size the VMM's command line asks for (the controller's `queue_size`). A virtio-mmio driver may
    /// choose larger rings (up to `maxQueueSize`), but QEMU still derives the segment limit it gives the
    /// virtio-scsi driver (seg_max = virtqueue_size - 2) from this size, so per-slot iovec storage follows it.
    var expectedQueueSize: Int { get }
    /// Iovecs per request slot (segment limit plus headers and region splits).
    var segmentsPerSlot: Int { get }
    /// The device configuration space.
    func readConfig() -> [UInt8]
    /// Writes config bytes at `offset` (only writable fields change). Returns false when refused.
    func writeConfig(offset: Int, bytes: [UInt8]) -> Bool
    /// The driver's features were accepted (before rings start).
    func setNegotiatedFeatures(_ features: UInt64)
    /// Starts a ring: the device puts it on one of its queue groups.
    func startQueue(_ queue: RunningQueue)
    /// Stops ring `index`, draining in-flight requests; returns it (nil if it was not running or did not drain).
    func stopQueue(_ index: Int) -> RunningQueue?
    /// Replaces the call fd of running ring `index`; returns the previous fd.
    func replaceCallFD(_ index: Int, with fd: Int32) -> Int32?
    /// Enables or disables running ring `index`.
    func setQueueEnabled(_ index: Int, _ enabled: Bool)
    /// A new memory table for the running rings.
    func updateMemory(_ memory: GuestMemory)
    /// Starts (`log` non-nil) or stops dirty logging on running ring `index` (live migration).
    func setDirtyLog(_ index: Int, _ log: DirtyLog?, usedRingLogAddress: UInt64?)
    /// Called with a closure that sends a config-change notification to the front-end (nil when the
    /// front-end did not negotiate one).
    func setConfigChangeNotifier(_ notify: (@Sendable () -> Void)?)
    /// The front-end connection went away (rings already stopped).
    func connectionClosed()
    /// Stops the device's queue-group threads (after its transport stopped).
    func shutdown()
}
