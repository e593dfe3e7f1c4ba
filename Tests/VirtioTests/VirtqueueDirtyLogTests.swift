import CSystem
import Testing
import Virtio
#if canImport(Glibc)
import Glibc
#endif

/// Dirty logging of the device's own writes to the device area (vhost-user: every guest write is logged),
/// beside the data and used-ring logging covered by the vhost-user migration tests.
@Suite struct VirtqueueDirtyLogTests {
    /// A bitmap covering all of `m`'s guest memory.
    static func log(for m: RingMemory) throws -> DirtyLog {
        let bytes = Int(((m.gpaBase + UInt64(m.regionSize)) >> 12 + 7) / 8)
        let fd = csys_memfd_create("dirty-log", 0)
        precondition(fd >= 0 && ftruncate(fd, off_t(bytes)) == 0)
        return try DirtyLog(fd: fd, size: UInt64(bytes), offset: 0)
    }

    @Test func notificationFlagsAndAvailEventWritesAreLogged() throws {
        let m = try RingMemory()
        let d = SplitDriver(m, size: 8)
        let log = try Self.log(for: m)
        let flagsPage = d.used >> 12
        let availEventPage = (d.used + 4 + 8 * 8) >> 12
        // Without EVENT_IDX the device writes used->flags (VRING_USED_F_NO_NOTIFY) both ways.
        let plain = try Virtqueue(size: 8, options: VirtqueueOptions(), addresses: d.addresses, memory: m.memory, base: 0, segmentsPerSlot: 8)
        plain.setDirtyLog(log, usedRingLogAddress: d.used)
        plain.disableNotifications()
        #expect(d.usedFlags == 1)
        #expect(log.markedPages == [flagsPage])
        log.clear()
        _ = plain.enableNotificationsAndCheck()
        #expect(d.usedFlags == 0)
        #expect(log.markedPages == [flagsPage])
        // With EVENT_IDX it writes avail_event when notifications come back on.
        log.clear()
        let indexed = try Virtqueue(size: 8, options: VirtqueueOptions(eventIndex: true), addresses: d.addresses, memory: m.memory,
                                    base: 0, segmentsPerSlot: 8)
        indexed.setDirtyLog(log, usedRingLogAddress: d.used)
        indexed.disableNotifications()
        #expect(log.markedPages.isEmpty)
        _ = indexed.enableNotificationsAndCheck()
        #expect(log.markedPages == [availEventPage])
        // Logging off (or no used-ring logging asked for): nothing is marked.
        log.clear()
        indexed.setDirtyLog(log, usedRingLogAddress: nil)
        _ = indexed.enableNotificationsAndCheck()
        indexed.setDirtyLog(nil, usedRingLogAddress: nil)
        _ = indexed.enableNotificationsAndCheck()
        #expect(log.markedPages.isEmpty)
    }
}
