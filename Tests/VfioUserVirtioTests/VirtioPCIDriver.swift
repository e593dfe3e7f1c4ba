import CSystem
import VfioUser
import VfioUserTestSupport
import Virtio
import VirtioTestSupport
#if canImport(Glibc)
import Glibc
#endif

/// A virtio-pci driver over the vfio-user test client, doing what Linux's virtio_pci_modern does: walk the
/// capability list, negotiate features, lay out rings, kick through the notify area, wait on MSI-X eventfds.
final class VirtioPCIDriver {
    struct Cap { var bar: UInt32; var offset: UInt64; var length: UInt32; var multiplier: UInt32 }

    let client: VfioUserTestClient
    let ram: TestGuestRAM
    var caps: [UInt8: Cap] = [:]
    var msixCapOffset = 0
    var msixTableSize = 0
    /// MSI-X eventfds (vector i), or the INTx eventfd.
    var vectorFDs: [Int32] = []
    var intxFD: Int32 = -1

    /// Connects, negotiates the protocol, maps `ram` (with its fd unless `withFD` is false) and walks the caps.
    init(path: String, ram: TestGuestRAM, withFD: Bool = true) throws {
        client = try VfioUserTestClient(path: path)
        self.ram = ram
        _ = try client.negotiateVersion()
        let r = try client.dmaMap(address: ram.gpaBase, size: UInt64(ram.size), fd: withFD ? ram.fd : nil)
        guard !r.isError else { throw TestClientError.io("DMA_MAP failed: \(r.errorNumber)") }
        try walkCapabilities()
    }

    deinit {
        for fd in vectorFDs where fd >= 0 { close(fd) }
        if intxFD >= 0 { close(intxFD) }
    }

    // MARK: Config space

    func config(_ offset: Int, _ count: UInt32) throws -> UInt64 {
        let r = try client.regionRead(UInt32(VfioPCIRegion.config), offset: UInt64(offset), count: count)
        guard !r.isError else { throw TestClientError.io("config read failed") }
        var v: UInt64 = 0
        for i in 0..<Int(count) { v |= UInt64(r.payload[16 + i]) << (8 * UInt64(i)) }
        return v
    }

    func walkCapabilities() throws {
        var at = Int(try config(0x34, 1))
        var guardCount = 0
        while at != 0 && guardCount < 48 {
            guardCount += 1
            let id = try config(at, 1)
            let next = Int(try config(at + 1, 1))
            if id == 0x09 {
                let type = UInt8(try config(at + 3, 1))
                let bar = UInt32(try config(at + 4, 1))
                let offset = try config(at + 8, 4)
                let length = UInt32(try config(at + 12, 4))
                let multiplier = type == 2 ? UInt32(try config(at + 16, 4)) : 0
                if caps[type] == nil { caps[type] = Cap(bar: bar, offset: offset, length: length, multiplier: multiplier) }
            } else if id == 0x11 {
                msixCapOffset = at
                msixTableSize = Int(try config(at + 2, 2) & 0x7FF) + 1
            }
            at = next
        }
    }

    // MARK: Registers

    func read(_ type: UInt8, _ offset: Int, _ count: UInt32) throws -> UInt64 {
        let cap = caps[type]!
        let r = try client.regionRead(cap.bar, offset: cap.offset + UInt64(offset), count: count)
        guard !r.isError else { throw TestClientError.io("BAR read failed errno \(r.errorNumber)") }
        var v: UInt64 = 0
        for i in 0..<Int(count) { v |= UInt64(r.payload[16 + i]) << (8 * UInt64(i)) }
        return v
    }

    func write(_ type: UInt8, _ offset: Int, _ count: Int, _ value: UInt64) throws {
        let cap = caps[type]!
        let data = (0..<count).map { UInt8(truncatingIfNeeded: value >> (8 * UInt64($0))) }
        let r = try client.regionWrite(cap.bar, offset: cap.offset + UInt64(offset), data: data)
        guard !r.isError else { throw TestClientError.io("BAR write failed errno \(r.errorNumber)") }
    }

    func common(_ offset: Int, _ count: UInt32) throws -> UInt64 { try read(1, offset, count) }
    func setCommon(_ offset: Int, _ count: Int, _ value: UInt64) throws { try write(1, offset, count, value) }

    var status: UInt8 { get throws { UInt8(try common(0x14, 1)) } }
    func setStatus(_ s: UInt8) throws { try setCommon(0x14, 1, UInt64(s)) }

    var deviceFeatures: UInt64 {
        get throws {
            try setCommon(0x00, 4, 0)
            let low = try common(0x04, 4)
            try setCommon(0x00, 4, 1)
            let high = try common(0x04, 4)
            return low | high << 32
        }
    }

    /// Reset, ACKNOWLEDGE, DRIVER, features (the offered ones in `wanted`), FEATURES_OK; returns the status read back.
    @discardableResult
    func negotiate(wanted: UInt64, force: UInt64 = 0) throws -> UInt8 {
        try setStatus(0)
        try setStatus(1)
        try setStatus(3)
        let features = (try deviceFeatures & wanted) | force
        try setCommon(0x08, 4, 0)
        try setCommon(0x0C, 4, features & 0xFFFF_FFFF)
        try setCommon(0x08, 4, 1)
        try setCommon(0x0C, 4, features >> 32)
        try setStatus(0x0B)
        return try status
    }

    /// MSI-X: one eventfd per vector through SET_IRQS (as QEMU does once the guest enables MSI-X).
    func enableMSIX() throws {
        vectorFDs = (0..<msixTableSize).map { _ in csys_eventfd(0, 1) }
        let r = try client.setIRQs(index: UInt32(VfioPCIIRQ.msix), flags: 4 | 32, start: 0, count: UInt32(msixTableSize), fds: vectorFDs)
        guard !r.isError else { throw TestClientError.io("SET_IRQS failed") }
    }

    func enableINTx() throws {
        intxFD = csys_eventfd(0, 1)
        let r = try client.setIRQs(index: UInt32(VfioPCIIRQ.intx), flags: 4 | 32, start: 0, count: 1, fds: [intxFD])
        guard !r.isError else { throw TestClientError.io("SET_IRQS INTx failed") }
    }

    /// Sets up queue `index` at the given guest addresses (64-bit registers as two 32-bit halves, as Linux).
    func setupQueue(_ index: Int, size: Int, desc: UInt64, driver: UInt64, device: UInt64, vector: UInt16, enable: Bool = true) throws {
        try setCommon(0x16, 2, UInt64(index))
        try setCommon(0x18, 2, UInt64(size))
        try setCommon(0x1A, 2, UInt64(vector))
        for (offset, value) in [(0x20, desc), (0x28, driver), (0x30, device)] {
            try setCommon(offset, 4, value & 0xFFFF_FFFF)
            try setCommon(offset + 4, 4, value >> 32)
        }
        if enable { try setCommon(0x1C, 2, 1) }
    }

    /// Notifies queue `index` with a posted 16-bit write at its notify address (QEMU posts BAR writes).
    func kick(_ index: Int) throws {
        try setCommon(0x16, 2, UInt64(index))
        let off = try common(0x1E, 2)
        let cap = caps[2]!
        var p = Payload()
        p.u64(cap.offset + off * UInt64(cap.multiplier))
        p.u32(cap.bar)
        p.u32(2)
        p.u16(UInt16(index))
        let (_, bytes) = client.message(.regionWrite, p.bytes, flags: VfioUserHeader.noReply)
        client.sendRaw(bytes)
    }

    /// Waits for an interrupt on `fd`; returns whether one came.
    func waitInterrupt(_ fd: Int32, milliseconds: Int32 = 5000) -> Bool {
        guard csys_wait_readable(fd, milliseconds) == 1 else { return false }
        var v: UInt64 = 0
        _ = csys_eventfd_drain(fd, &v)
        return true
    }
}
