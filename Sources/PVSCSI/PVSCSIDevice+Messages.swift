import BlockIO
import CSystem
import EventLoop
import SCSI
import VfioUser
#if canImport(Glibc)
import Glibc
#endif

/// Hotplug messages: LUN events posted to the message ring as DEV_ADDED / DEV_REMOVED, raising MSG_0.
extension PVSCSIDevice {
    /// Posts DEV_ADDED / DEV_REMOVED for `event` on the message ring and raises MSG_0.
    public func handle(_ event: LUNEvent) {
        let type: UInt32
        let lun: LogicalUnitNumber
        switch event {
        case .added(let l): type = PVSCSI.messageDeviceAdded; lun = l
        case .removed(let l):
            type = PVSCSI.messageDeviceRemoved; lun = l
            retireUnmappedBackends()
        case .capacityChanged, .parametersChanged: return  // reported through unit attentions by the core
        }
        guard options.hotplugMessages else { return }
        guard UInt32(lun.value) < options.maxTargets else {
            log.warning("pvscsi: \(lun) is beyond the adapter's \(options.maxTargets) targets: no hotplug message")
            return
        }
        postMessage(type: type, target: UInt32(lun.value))
    }

    private func postMessage(type: UInt32, target: UInt32) {
        beginWork()
        defer { endWork() }
        if ringsConfigured && ringsState == nil { attachRings() }
        guard messageRingReady else {
            stats.messagesDropped += 1
            log.warning("pvscsi: no message ring: hotplug message for target \(target) dropped")
            return
        }
        guard let consumer = load32(PVSCSI.RingsState.messageConsumer) else {
            stats.messagesDropped += 1
            log.warning("pvscsi: message consumer index not readable: hotplug message for target \(target) dropped")
            return
        }
        guard messageProducer &- consumer < messageEntries else {
            stats.messagesDropped += 1
            log.warning("pvscsi: message ring full: hotplug message for target \(target) dropped")
            return
        }
        let perPage = UInt32(4096 / PVSCSI.messageDescriptorSize)
        let index = messageProducer & (messageEntries - 1)
        let page = messagePages[Int(index / perPage)]!
        let offset = Int(index % perPage) * PVSCSI.messageDescriptorSize
        let p = page + offset
        p.initializeMemory(as: UInt8.self, repeating: 0, count: PVSCSI.messageDescriptorSize)
        p.storeBytes(of: type, toByteOffset: 0, as: UInt32.self)
        p.storeBytes(of: UInt32(0), toByteOffset: 4, as: UInt32.self)  // bus
        p.storeBytes(of: target, toByteOffset: 8, as: UInt32.self)
        // lun[8] at 12: LUN 0 of the target.
        _ = push(page, ppn: messagePPNs[Int(index / perPage)], offset: offset, count: PVSCSI.messageDescriptorSize)
        messageProducer &+= 1
        store32(PVSCSI.RingsState.messageProducer, messageProducer)
        stats.messagesPosted += 1
        raise(PVSCSI.interruptMessage0)
    }
}
