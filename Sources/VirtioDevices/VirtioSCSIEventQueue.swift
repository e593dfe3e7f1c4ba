import BlockIO
import CSystem
import Logging
import SCSI
import Synchronization
import Virtio
#if canImport(Glibc)
import Glibc
#endif

extension SCSIGroupHandler {
    // MARK: Event queue

    func lunEvent(_ event: LUNEvent) {
        let features = device.negotiated.load(ordering: .relaxed)
        if features == 0 {
            // No driver has negotiated yet: a gateway restarted under a running guest, changed by the CLI before
            // QEMU reconnected. The guest learns of it as missed events (it rescans) once its event queue runs.
            if device.options.hotplug { eventsMissed = true }
            return
        }
        switch event {
        case let .added(lun):
            guard features & VirtioSCSI.featureHotplug != 0 else { return }
            pendingEvents.append((.transportReset, lun, VirtioSCSI.ResetReason.rescan.rawValue))
        case let .removed(lun):
            guard features & VirtioSCSI.featureHotplug != 0 else { return }
            pendingEvents.append((.transportReset, lun, VirtioSCSI.ResetReason.removed.rawValue))
        case let .capacityChanged(lun, _):
            guard features & VirtioSCSI.featureChange != 0 else { return }
            pendingEvents.append((.parameterChange, lun, 0x2A | 0x09 << 8))
        case let .parametersChanged(lun):
            guard features & VirtioSCSI.featureChange != 0 else { return }
            pendingEvents.append((.parameterChange, lun, 0x2A | 0x01 << 8))
        }
        deliverEvents()
    }

    /// Sends pending events into event-queue buffers; with no buffer, the events are dropped and the
    /// next event (or a NO_EVENT when a buffer arrives) carries VIRTIO_SCSI_T_EVENTS_MISSED.
    func deliverEvents() {
        guard let queue = group.queue(VirtioSCSI.eventQueue), queue.enabled else {
            if !pendingEvents.isEmpty { eventsMissed = true }
            pendingEvents.removeAll()
            return
        }
        while !pendingEvents.isEmpty || eventsMissed {
            let chain: DescriptorChain
            switch queue.ring.pop() {
            case let .chain(c): chain = c
            case let .invalid(head, entries, error):
                device.log.warning("virtio-scsi event queue: buffer \(head) refused: \(error)")
                queue.complete(head: head, ringEntries: entries, length: 0)
                continue
            case .empty, .broken:
                if !pendingEvents.isEmpty { eventsMissed = true }
                pendingEvents.removeAll()
                return
            }
            guard chain.writableBytes >= UInt64(VirtioSCSI.eventSize) else {
                queue.complete(head: chain.head, ringEntries: chain.ringEntries, length: 0)
                continue
            }
            var event = VirtioSCSI.Event.noEvent.rawValue
            var lunBytes: [UInt8] = [0, 0, 0, 0, 0, 0, 0, 0]
            var reason: UInt32 = 0
            if !pendingEvents.isEmpty {
                let e = pendingEvents.removeFirst()
                event = e.0.rawValue
                if let lun = e.1 { lunBytes = VirtioSCSI.encodeAddress(lun) }
                reason = e.2
            }
            if eventsMissed {
                event |= VirtioSCSI.Event.missedFlag
                eventsMissed = false
            }
            var bytes = [UInt8]()
            bytes.appendLE(event)
            bytes += lunBytes
            bytes.appendLE(reason)
            _ = bytes.withUnsafeBytes { chain.writable.scatter(at: 0, from: $0) }
            queue.complete(head: chain.head, ringEntries: chain.ringEntries, length: UInt32(VirtioSCSI.eventSize))
        }
    }

    /// The event queue was kicked: report missed events if any.
    func eventQueueKicked() {
        if eventsMissed { deliverEvents() }
    }
}
