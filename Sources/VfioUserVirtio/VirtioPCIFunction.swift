import CSystem
import EventLoop
import GuestMemoryMap
import Logging
import VfioUser
import Virtio
import VirtioDevices
#if canImport(Glibc)
import Glibc
#endif

/// A `VirtioDeviceModel` as a modern virtio 1.x PCI function (layout: `VirtioPCILayout`), served by a
/// `VfioUserServer`. Every call arrives on the server's loop thread; the device runs its rings on its own
/// queue groups.
///
/// - Guest memory: the DMA windows that came with an fd, as the server's `DMAWindows.table` (one reference-counted
///   mapping per window, user address = IOVA, since virtio-pci ring addresses are guest physical): the tables the
///   device holds keep their windows mapped after an unmap until its requests are done; the device gets the new
///   table after each DMA_MAP/DMA_UNMAP. Guest RAM without an fd (plain `-m`): the rings run on a shadow copy kept in
///   step with DMA_READ/DMA_WRITE messages (`PlainMemoryRings`, VirtioPCIFunction+PlainMemory.swift).
/// - Kicks: a notify-region write signals the queue's kick eventfd (owned here). QEMU's vfio-user client has
///   no ioeventfds, so every kick is a REGION_WRITE message (posted by QEMU).
/// - Interrupts: with MSI-X, a queue's call fd is a duplicate of the eventfd the client set for its vector (the
///   device signals it directly); without MSI-X, a relay eventfd watched here sets ISR bit 0 and raises INTx.
///   Configuration changes set ISR bit 1 and fire the config vector (or INTx).
final class VirtioPCIFunction<Device: VirtioDeviceModel>: VfioUserDevice, @unchecked Sendable {
    typealias L = VirtioPCILayout
    typealias C = VirtioPCILayout.Common
    typealias S = VirtioPCILayout.Status

    struct QueueState {
        var size: UInt16
        var vector: UInt16 = VirtioPCILayout.noVector
        var enabled = false
        var desc: UInt64 = 0
        var driver: UInt64 = 0
        var device: UInt64 = 0
        var kickFD: Int32 = -1
        /// The call fd handed to the running queue (a vector eventfd duplicate, the relay fd, or -1).
        var callFD: Int32 = -1
        /// Guest RAM without fd: the enable waits for a DMA_READ, whose wait handles the driver's next messages
        /// (its queue_enable write was acknowledged first, as it must be: the client answers DMA only then).
        /// Meanwhile the queue's registers are refused and its notifications remembered, not dropped (SeaBIOS
        /// enables its request queue, sets DRIVER_OK and notifies at once, then polls the used ring forever).
        var enabling = false
        var notifiedWhileEnabling = false
    }

    var configSpace: PCIConfigSpace
    let device: Device
    let kind: VirtioPCIDeviceKind
    let loop: EventLoop
    private let log: Logger
    private let name: String
    /// Set by the controller once the server exists.
    var dmaWindows: DMAWindows!
    var interrupts: InterruptController!

    let deviceFeatures: UInt64
    private(set) var deviceFeatureSelect: UInt32 = 0
    private(set) var driverFeatureSelect: UInt32 = 0
    private(set) var driverFeatures: UInt64 = 0
    private(set) var status: UInt8 = 0
    private(set) var generation: UInt8 = 0
    private(set) var configVector: UInt16 = VirtioPCILayout.noVector
    private(set) var queueSelect: UInt16 = 0
    private(set) var queues: [QueueState]
    private(set) var isr: UInt8 = 0
    /// The rings' memory table (the DMA windows with an fd; with guest RAM without fd, the shadow's regions).
    var memoryTable = GuestMemory()
    /// INTx relay: the queues' call fd without MSI-X.
    private var relayFD: Int32 = -1
    /// Guest RAM without fd: the rings' shadow and its DMA-by-message upkeep (from FEATURES_OK to the reset).
    var plainRings: PlainMemoryRings?
    var plainMemoryLogged = false
    /// Counts for tests and the log.
    private(set) var ignoredWrites = 0
    private(set) var ignoredNotifies = 0
    private(set) var configInterrupts = 0
    /// A running ring was outside the DMA windows at the last map change: the device kept its previous table.
    private(set) var deviceTableHeld = false
    private(set) var ringsOutsideMemory = 0
    /// Changes whenever a ring stops: a broken-ring report from before is then stale.
    private(set) var queueEpoch: UInt64 = 0
    /// Changes at every device reset: work that waited for DMA (a queue enable) is then stale.
    private var resetEpoch: UInt64 = 0

    init(device: Device, kind: VirtioPCIDeviceKind, loop: EventLoop, name: String, log: Logger) throws(VfioUserError) {
        guard device.queueCount >= 1, device.queueCount <= VirtioPCILayout.maxQueues, device.queueCount + 1 <= 2048 else {
            throw VfioUserError("\(kind.name): \(device.queueCount) queues (1...\(VirtioPCILayout.maxQueues) supported)")
        }
        self.device = device
        self.kind = kind
        self.loop = loop
        self.log = log
        self.name = name
        configSpace = VirtioPCILayout.configSpace(kind: kind, queues: device.queueCount)
        deviceFeatures = device.offeredFeatures | VirtioFeature.version1
        queues = Array(repeating: QueueState(size: UInt16(clamping: device.expectedQueueSize)), count: device.queueCount)
        relayFD = csys_eventfd(0, 1)
        guard relayFD >= 0 else { throw .systemCall(.current("eventfd", context: "\(kind.name): interrupt relay")) }
    }

    deinit { if relayFD >= 0 { close(relayFD) } }

    /// Registers the INTx relay and installs the config-change notifier (loop thread, before the server runs).
    func activate() throws(VfioUserError) {
        do {
            try loop.register(fd: relayFD) { [unowned self] _ in self.relaySignalled() }
        } catch {
            throw .systemCall(error.within("\(kind.name): cannot watch the interrupt relay"))
        }
        let loop = self.loop
        let notify = ConfigChangeRelay(self)
        device.setConfigChangeNotifier { loop.execute { notify.fire() } }
    }

    func deactivate() {
        device.setConfigChangeNotifier(nil)
        loop.unregister(fd: relayFD)
    }

    private func note(_ level: Logger.Level, _ text: String) { log.log(level: level, "\(name): \(text)") }
    func logLine(_ level: Logger.Level, _ text: String) { note(level, text) }

    var msixMode: Bool { interrupts.msixActive || configSpace.msixEnabled }
    private var negotiated: Bool { status & S.featuresOK != 0 }

    // MARK: VfioUserDevice

    func barRead(bar: Int, offset: UInt64, count: Int) -> UInt64 {
        guard bar == L.virtioBAR else { return 0 }  // MSI-X table and PBA: the VMM emulates them
        switch offset {
        case L.commonOffset..<(L.commonOffset + L.commonLength):
            return commonRead(Int(offset - L.commonOffset), count)
        case L.isrOffset..<(L.isrOffset + 0x1000):
            guard offset == L.isrOffset else { return 0 }
            let v = isr
            isr = 0
            interrupts.setINTx(false)
            return UInt64(v)
        case L.deviceConfigOffset..<(L.deviceConfigOffset + L.deviceConfigLength):
            let config = device.readConfig()
            let start = Int(offset - L.deviceConfigOffset)
            var v: UInt64 = 0
            for i in 0..<count where start + i < config.count { v |= UInt64(config[start + i]) << (8 * UInt64(i)) }
            return v
        default:
            return 0
        }
    }

    func barWrite(bar: Int, offset: UInt64, count: Int, value: UInt64, posted: Bool) {
        guard bar == L.virtioBAR else { return }
        switch offset {
        case L.commonOffset..<(L.commonOffset + L.commonLength):
            commonWrite(Int(offset - L.commonOffset), count, value)
        case L.deviceConfigOffset..<(L.deviceConfigOffset + L.deviceConfigLength):
            let start = Int(offset - L.deviceConfigOffset)
            let bytes = (0..<count).map { UInt8(truncatingIfNeeded: value >> (8 * UInt64($0))) }
            if !device.writeConfig(offset: start, bytes: bytes) { refuse("device config write at \(start) (\(count) bytes)") }
        case L.notifyOffset..<(L.notifyOffset + L.notifyLength):
            notify(Int(offset - L.notifyOffset), count)
        default:
            refuse("write to BAR 0 offset 0x\(String(offset, radix: 16)) outside every register")
        }
    }

    /// VFIO_USER_DEVICE_RESET or the client went away: the VMM's device state is gone with the rings.
    func reset() {
        resetDevice()
        plainMemoryLogged = false
        device.connectionClosed()
    }

    func quiesce() {
        // The rings' tables hold their windows' mappings: nothing to finish here.
    }

    func memoryChanged() {
        rebuildMemory()
    }

    func interruptsChanged() {
        // Vector eventfds changed: every running queue takes a duplicate of its vector's new fd.
        // (Guest RAM without fd: the queues signal the function, which raises the vector it finds at that time.)
        for i in queues.indices where queues[i].enabled && plainRings == nil { refreshCallFD(i) }
    }

    // MARK: Common configuration

    private func commonRead(_ offset: Int, _ count: Int) -> UInt64 {
        guard let (start, width, value) = commonField(offset), offset + count <= start + width else {
            refuse("common config read at 0x\(String(offset, radix: 16)) (\(count) bytes) across fields")
            return 0
        }
        let shifted = value >> (8 * UInt64(offset - start))
        return count >= 8 ? shifted : shifted & ((1 << (8 * UInt64(count))) - 1)
    }

    /// The field holding `offset`: its start, width and current value.
    private func commonField(_ offset: Int) -> (Int, Int, UInt64)? {
        let q = Int(queueSelect) < queues.count ? queues[Int(queueSelect)] : nil
        switch offset {
        case 0x00..<0x04: return (C.deviceFeatureSelect, 4, UInt64(deviceFeatureSelect))
        case 0x04..<0x08:
            let offered = offeredFeatures
            let v: UInt64 = deviceFeatureSelect == 0 ? offered & 0xFFFF_FFFF : deviceFeatureSelect == 1 ? offered >> 32 : 0
            return (C.deviceFeature, 4, v)
        case 0x08..<0x0C: return (C.driverFeatureSelect, 4, UInt64(driverFeatureSelect))
        case 0x0C..<0x10:
            let v: UInt64 = driverFeatureSelect == 0 ? driverFeatures & 0xFFFF_FFFF : driverFeatureSelect == 1 ? driverFeatures >> 32 : 0
            return (C.driverFeature, 4, v)
        case 0x10..<0x12: return (C.configMSIXVector, 2, UInt64(configVector))
        case 0x12..<0x14: return (C.numQueues, 2, UInt64(queues.count))
        case 0x14: return (C.deviceStatus, 1, UInt64(status))
        case 0x15: return (C.configGeneration, 1, UInt64(generation))
        case 0x16..<0x18: return (C.queueSelect, 2, UInt64(queueSelect))
        case 0x18..<0x1A: return (C.queueSize, 2, UInt64(q?.size ?? 0))
        case 0x1A..<0x1C: return (C.queueMSIXVector, 2, UInt64(q?.vector ?? L.noVector))
        case 0x1C..<0x1E: return (C.queueEnable, 2, q?.enabled == true ? 1 : 0)
        case 0x1E..<0x20: return (C.queueNotifyOff, 2, q == nil ? 0 : UInt64(queueSelect))
        case 0x20..<0x28: return (C.queueDesc, 8, q?.desc ?? 0)
        case 0x28..<0x30: return (C.queueDriver, 8, q?.driver ?? 0)
        case 0x30..<0x38: return (C.queueDevice, 8, q?.device ?? 0)
        case 0x38..<0x3A: return (C.queueNotifyData, 2, q == nil ? 0 : UInt64(queueSelect))
        case 0x3A..<0x3C: return (C.queueReset, 2, 0)
        default: return nil
        }
    }

    func refuse(_ what: String) {
        ignoredWrites += 1
        if ignoredWrites <= 20 || ignoredWrites % 1000 == 0 { note(.warning, "ignored: \(what) (#\(ignoredWrites))") }
    }

    private func commonWrite(_ offset: Int, _ count: Int, _ value: UInt64) {
        guard let (start, width, _) = commonField(offset) else { refuse("common config write at 0x\(String(offset, radix: 16))"); return }
        // Whole fields only; a 64-bit address may be written as two 32-bit halves.
        let whole = offset == start && count == width
        let half = width == 8 && count == 4 && (offset == start || offset == start + 4)
        guard whole || half else {
            refuse("common config write at 0x\(String(offset, radix: 16)) of \(count) bytes (field 0x\(String(start, radix: 16)) is \(width))")
            return
        }
        let qi = Int(queueSelect)
        switch start {
        case C.deviceFeatureSelect: deviceFeatureSelect = UInt32(truncatingIfNeeded: value)
        case C.driverFeatureSelect: driverFeatureSelect = UInt32(truncatingIfNeeded: value)
        case C.driverFeature:
            guard status & S.featuresOK == 0 else { refuse("driver features written after FEATURES_OK"); return }
            switch driverFeatureSelect {
            case 0: driverFeatures = (driverFeatures & ~0xFFFF_FFFF) | (value & 0xFFFF_FFFF)
            case 1: driverFeatures = (driverFeatures & 0xFFFF_FFFF) | ((value & 0xFFFF_FFFF) << 32)
            default: if value != 0 { refuse("driver feature word \(driverFeatureSelect) = 0x\(String(value, radix: 16))") }
            }
        case C.configMSIXVector:
            configVector = validVector(UInt16(truncatingIfNeeded: value))
        case C.deviceStatus:
            writeStatus(UInt8(truncatingIfNeeded: value))
        case C.queueSelect:
            queueSelect = UInt16(truncatingIfNeeded: value)
        case C.queueSize, C.queueMSIXVector, C.queueEnable, C.queueDesc, C.queueDriver, C.queueDevice, C.queueReset:
            guard qi < queues.count else { refuse("queue register 0x\(String(start, radix: 16)) of queue \(qi) (\(queues.count) queues)"); return }
            if start == C.queueReset {
                refuse("queue_reset of queue \(qi) (VIRTIO_F_RING_RESET not offered)")
                return
            }
            guard !queues[qi].enabled, !queues[qi].enabling else {
                refuse("queue \(qi) register 0x\(String(start, radix: 16)) written while the queue is \(queues[qi].enabled ? "enabled" : "being enabled")")
                return
            }
            switch start {
            case C.queueSize:
                let size = Int(value & 0xFFFF)
                guard size >= 1, size <= device.expectedQueueSize else {
                    refuse("queue \(qi) size \(size) (1...\(device.expectedQueueSize))")
                    return
                }
                queues[qi].size = UInt16(size)
            case C.queueMSIXVector:
                queues[qi].vector = validVector(UInt16(truncatingIfNeeded: value))
            case C.queueEnable:
                guard value == 1 else { refuse("queue \(qi) enable \(value)"); return }
                enableQueue(qi)
            default:
                let shift: UInt64 = offset == start + 4 ? 32 : 0
                let mask: UInt64 = count == 8 ? ~0 : 0xFFFF_FFFF << shift
                let v = count == 8 ? value : (value & 0xFFFF_FFFF) << shift
                switch start {
                case C.queueDesc: queues[qi].desc = (queues[qi].desc & ~mask) | v
                case C.queueDriver: queues[qi].driver = (queues[qi].driver & ~mask) | v
                default: queues[qi].device = (queues[qi].device & ~mask) | v
                }
            }
        default:
            refuse("write to read-only common config field 0x\(String(start, radix: 16))")
        }
    }

    /// A vector the function has, or NO_VECTOR (which the driver reads back as the refusal).
    private func validVector(_ v: UInt16) -> UInt16 {
        if v == L.noVector || Int(v) < queues.count + 1 { return v }
        refuse("MSI-X vector \(v) (the function has \(queues.count + 1))")
        return L.noVector
    }

    private func writeStatus(_ new: UInt8) {
        if new == 0 {
            resetDevice()
            return
        }
        // Bits are only added (a driver clears them by reset), except that NEEDS_RESET stays the device's.
        let old = status
        guard new & old & ~S.needsReset == old & ~S.needsReset else {
            refuse("device status 0x\(String(new, radix: 16)) clears bits of 0x\(String(old, radix: 16)) (write 0 to reset)")
            return
        }
        var value = (new & ~S.needsReset) | (old & S.needsReset)
        if value & S.featuresOK != 0 && old & S.featuresOK == 0 {
            let unknown = driverFeatures & ~offeredFeatures
            if unknown != 0 || driverFeatures & VirtioFeature.version1 == 0 {
                note(.warning, unknown != 0
                     ? "FEATURES_OK refused: driver features 0x\(String(driverFeatures, radix: 16)) include 0x\(String(unknown, radix: 16)) not offered"
                     : "FEATURES_OK refused: the driver did not accept VIRTIO_F_VERSION_1 (legacy drivers are not served)")
                value &= ~S.featuresOK
            } else {
                device.setNegotiatedFeatures(driverFeatures)
                startPlainMemoryIfNeeded()
            }
        }
        if value & S.driverOK != 0 && old & S.driverOK == 0 && value & S.featuresOK == 0 {
            refuse("DRIVER_OK without FEATURES_OK")
            value &= ~S.driverOK
        }
        status = value
    }

    /// Running ring `i` broke (its group found it so): the device needs a reset, unless the ring stopped since.
    func ringBroke(_ i: Int, epoch: UInt64, _ reason: String) {
        guard epoch == queueEpoch, i < queues.count, queues[i].enabled else { return }
        needsReset("queue \(i): \(reason)")
    }

    /// Marks the device broken (DEVICE_NEEDS_RESET) and tells the driver with a config interrupt.
    func needsReset(_ why: String) {
        note(.error, "device needs reset: \(why)")
        guard status & S.needsReset == 0 else { return }
        status |= S.needsReset
        raiseConfigInterrupt()
    }

    // MARK: Queues

    private func enableQueue(_ i: Int) {
        guard negotiated, status & S.needsReset == 0 else { refuse("queue \(i) enabled before FEATURES_OK (or while the device needs reset)"); return }
        let q = queues[i]
        let options = VirtqueueOptions(features: driverFeatures)
        let size = Int(q.size)
        guard options.packed || size & (size - 1) == 0 else { needsReset("queue \(i): split ring size \(size) is not a power of 2"); return }
        let addresses = VirtqueueAddresses(descriptorTable: q.desc, driverArea: q.driver, deviceArea: q.device)
        // Guest RAM without fd: the ring's shadow takes the guest's used index before the device reads it.
        var plainUsedIndex: UInt16 = 0
        queues[i].notifiedWhileEnabling = false
        if let plainRings {
            plainRings.deviceTable = memoryTable
            let epoch = resetEpoch
            queues[i].enabling = true
            let used = plainRings.prepareShadow(i, size: size, desc: q.desc, avail: q.driver, used: q.device)
            // The driver's messages handled during that DMA wait may have reset the device or marked it broken.
            guard epoch == resetEpoch else {
                note(.info, "queue \(i): the device was reset while the queue was being enabled; it stays disabled")
                return
            }
            queues[i].enabling = false
            guard status & S.needsReset == 0 else { return }
            guard let used else {
                needsReset("queue \(i): its ring cannot run over guest RAM without fd")
                return
            }
            plainUsedIndex = used
        }
        let ring: Virtqueue
        do {
            ring = try Virtqueue(size: size, options: options, addresses: addresses, memory: memoryTable,
                                 base: options.packed ? 0x8000 : 0,  // packed: both wrap counters start at 1
                                 segmentsPerSlot: max(device.segmentsPerSlot, min(size, device.expectedQueueSize) + 8))
        } catch {
            if plainRings == nil && guestRAMWithoutFD {
                note(.error, "queue \(i): the ring is not in a DMA window with an fd: guest RAM must be shared memory: memory-backend-memfd,share=on")
            }
            needsReset("queue \(i): \(error)")
            return
        }
        let kick = csys_eventfd(0, 1)
        guard kick >= 0 else { needsReset("queue \(i): cannot create its kick eventfd (errno \(errno))"); return }
        queues[i].kickFD = kick
        if let plainRings {
            guard let call = plainRings.start(i, size: size, desc: q.desc, avail: q.driver, used: q.device,
                                              segments: ring.segmentsPerSlot, kickFD: kick, usedIndex: plainUsedIndex) else {
                close(kick)
                queues[i].kickFD = -1
                needsReset("queue \(i): its ring cannot run over guest RAM without fd")
                return
            }
            queues[i].callFD = call
        } else {
            queues[i].callFD = newCallFD(for: i)
        }
        queues[i].enabled = true
        device.startQueue(RunningQueue(index: i, ring: ring, kickFD: kick, callFD: queues[i].callFD, enabled: true,
                                       onBroken: { [relay = QueueBrokenRelay(self, queue: i)] in relay.fire($0) }))
        if queues[i].notifiedWhileEnabling {
            queues[i].notifiedWhileEnabling = false
            plainRings?.kicked(i)
        }
    }

    /// The call fd queue `i` should have now (the caller owns it unless it is the relay fd).
    private func newCallFD(for i: Int) -> Int32 {
        guard msixMode else { return relayFD }
        let v = queues[i].vector
        guard v != L.noVector else { return -1 }
        let fd = interrupts.eventFD(index: VfioPCIIRQ.msix, vector: Int(v))
        return fd >= 0 ? fcntl(fd, F_DUPFD_CLOEXEC, 0) : -1
    }

    private func closeOwnedCallFD(_ fd: Int32) {
        if fd >= 0 && fd != relayFD { close(fd) }
    }

    private func refreshCallFD(_ i: Int) {
        let fd = newCallFD(for: i)
        let old = device.replaceCallFD(i, with: fd)
        closeOwnedCallFD(old ?? queues[i].callFD)
        queues[i].callFD = fd
    }

    private func stopQueue(_ i: Int) {
        guard queues[i].enabled else { return }
        queues[i].enabled = false
        queueEpoch &+= 1
        plainRings?.stop(i)
        if let q = device.stopQueue(i), q.abandoned {
            // Late completions of the abandoned requests may still signal it: keep the call fd open.
            note(.error, "queue \(i) did not drain; its \(q.ring.inFlight) late request(s) will be dropped")
        } else {
            closeOwnedCallFD(queues[i].callFD)
        }
        queues[i].callFD = -1
        if queues[i].kickFD >= 0 { close(queues[i].kickFD) }
        queues[i].kickFD = -1
    }

    private func notify(_ offset: Int, _ count: Int) {
        let i = offset / Int(L.notifyOffMultiplier)
        if offset % Int(L.notifyOffMultiplier) == 0, count == 2 || count == 4, i < queues.count, queues[i].enabling {
            queues[i].notifiedWhileEnabling = true
            return
        }
        guard offset % Int(L.notifyOffMultiplier) == 0, count == 2 || count == 4, i < queues.count, queues[i].enabled else {
            ignoredNotifies += 1
            if ignoredNotifies <= 10 || ignoredNotifies % 1000 == 0 {
                note(.warning, "ignored notification at 0x\(String(offset, radix: 16)) (\(count) bytes): no running queue there (#\(ignoredNotifies))")
            }
            return
        }
        if let plainRings { plainRings.kicked(i) } else { _ = csys_eventfd_signal(queues[i].kickFD, 1) }
    }

    /// Stops every ring (draining) and returns to the power-on state.
    private func resetDevice() {
        resetEpoch &+= 1
        for i in queues.indices { stopQueue(i) }
        stopPlainMemory()
        let size = UInt16(clamping: device.expectedQueueSize)
        for i in queues.indices { queues[i] = QueueState(size: size) }
        deviceFeatureSelect = 0
        driverFeatureSelect = 0
        driverFeatures = 0
        status = 0
        configVector = L.noVector
        queueSelect = 0
        isr = 0
        deviceTableHeld = false
        interrupts.setINTx(false)
    }

    // MARK: Memory

    func rebuildMemory() {
        // The windows with an fd, each mapped once by DMAWindows (holding the table keeps them mapped), or the shadow.
        let table = plainRings.map { $0.shadowTable(reusing: [memoryTable, $0.deviceTable]) } ?? dmaWindows.table
        memoryTable = table
        defer { plainRings?.memoryChanged() }
        guard queues.contains(where: { $0.enabled }) else {
            plainRings?.deviceTable = table
            return
        }
        // QEMU unmaps and maps windows again as the guest's memory map changes (a ring's window may be gone between
        // the two messages): while a running ring is outside the new table, the device keeps the table it has (this
        // function's own mappings, valid whatever the client unmapped) and gets the next table that holds every ring.
        let options = VirtqueueOptions(features: driverFeatures)
        for i in queues.indices where queues[i].enabled {
            let q = queues[i]
            let n = UInt64(q.size)
            let inside = table.pointer(userAddress: q.desc, length: 16 * n) != nil
                && table.pointer(userAddress: q.driver, length: options.packed ? 4 : 6 + 2 * n) != nil
                && table.pointer(userAddress: q.device, length: options.packed ? 4 : 6 + 8 * n) != nil
            if !inside {
                ringsOutsideMemory += 1
                if !deviceTableHeld { note(.info, "queue \(i): its ring is outside the DMA windows for now; the device keeps its memory table until it is back") }
                deviceTableHeld = true
                return
            }
        }
        if deviceTableHeld { note(.info, "every ring is inside the DMA windows again; the device takes the new memory table") }
        deviceTableHeld = false
        device.updateMemory(table)
        plainRings?.deviceTable = table
    }

    // MARK: Interrupts

    private func relaySignalled() {
        var v: UInt64 = 0
        guard csys_eventfd_drain(relayFD, &v) == 0 else { return }
        raiseQueueINTx()
    }

    private func raiseQueueINTx() {
        isr |= 1
        interrupts.setINTx(true)
    }

    /// Queue `i`'s interrupt, raised here (guest RAM without fd: once its used ring reached the guest).
    func raiseQueueInterrupt(_ i: Int) {
        guard msixMode else { return raiseQueueINTx() }
        if queues[i].vector != L.noVector { interrupts.signalMSIX(Int(queues[i].vector)) }
    }

    /// The device's configuration changed (loop thread).
    func configChanged() {
        generation &+= 1
        raiseConfigInterrupt()
    }

    private func raiseConfigInterrupt() {
        guard status & S.driverOK != 0 else { return }
        isr |= 2
        configInterrupts += 1
        if msixMode {
            if configVector != L.noVector { interrupts.signalMSIX(Int(configVector)) }
        } else {
            interrupts.setINTx(true)
        }
    }
}

/// Carries a broken ring (an avail index running past the ring, a descriptor table it cannot read) from the queue's
/// group thread to the loop thread, without capturing the generic type: the device sets DEVICE_NEEDS_RESET, unless
/// that ring stopped meanwhile.
private final class QueueBrokenRelay: @unchecked Sendable {
    private let loop: EventLoop
    private let body: (String) -> Void
    init<Device>(_ function: VirtioPCIFunction<Device>, queue: Int) {
        loop = function.loop
        let epoch = function.queueEpoch
        body = { [weak function] reason in function?.ringBroke(queue, epoch: epoch, reason) }
    }
    func fire(_ reason: String) { loop.execute { self.body(reason) } }
}

/// Carries the config-change notification to the loop thread without capturing the generic type.
private final class ConfigChangeRelay: @unchecked Sendable {
    let fire: () -> Void
    init<Device>(_ function: VirtioPCIFunction<Device>) {
        fire = { [weak function] in function?.configChanged() }
    }
}
