import GuestMemoryMap
import VfioUser
import Virtio

/// Guest RAM without an fd (QEMU with plain `-m`): the function runs its rings on a shadow copy kept in step by
/// DMA_READ/DMA_WRITE messages (`PlainMemoryRings`). Chosen at FEATURES_OK, for the device's life until a reset.
extension VirtioPCIFunction {
    /// Ring features the shadow cannot follow: EVENT_IDX (used_event and avail_event are read and written by
    /// the device between kicks) and packed rings (the driver's descriptor writes are its publication).
    static var featuresNeedingSharedMemory: UInt64 { VirtioFeature.ringEventIndex | VirtioFeature.ringPacked }

    /// Whether guest RAM came without an fd: the DMA windows without an fd hold more bytes than those with one
    /// (QEMU also exports its ROMs and VGA memory without an fd when guest RAM is a shared memfd).
    var guestRAMWithoutFD: Bool {
        var remote: UInt64 = 0
        var mapped: UInt64 = 0
        for w in dmaWindows.regions {
            if w.host == nil { remote &+= w.size } else { mapped &+= w.size }
        }
        return remote > mapped
    }

    /// The features offered now: without EVENT_IDX and packed rings when guest RAM has no fd.
    var offeredFeatures: UInt64 {
        guestRAMWithoutFD ? deviceFeatures & ~Self.featuresNeedingSharedMemory : deviceFeatures
    }

    /// At FEATURES_OK: with guest RAM without fd, the rings will run on the shadow.
    func startPlainMemoryIfNeeded() {
        guard plainRings == nil, guestRAMWithoutFD else { return }
        do {
            plainRings = try PlainMemoryRings(
                queueCount: queues.count, windows: dmaWindows, loop: loop,
                note: { [unowned self] level, text in self.logLine(level, text) },
                fail: { [unowned self] why in self.needsReset(why) },
                raise: { [unowned self] i in self.raiseQueueInterrupt(i) })
        } catch {
            needsReset("guest RAM without fd: \(error)")
            return
        }
        if !plainMemoryLogged {
            plainMemoryLogged = true
            logLine(.info, "guest RAM has no fd: the rings run on a shadow copy kept by DMA_READ/DMA_WRITE messages "
                    + "(EVENT_IDX and packed rings not offered; an interrupt per completion batch)")
        }
        memoryTable = GuestMemory()
        rebuildMemory()
    }

    /// At reset (rings stopped): back to fd-backed windows.
    func stopPlainMemory() {
        guard let plainRings else { return }
        if plainRings.chains > 0 { logLine(.info, plainRings.summary) }
        self.plainRings = nil
        memoryTable = GuestMemory()
        rebuildMemory()
    }
}
