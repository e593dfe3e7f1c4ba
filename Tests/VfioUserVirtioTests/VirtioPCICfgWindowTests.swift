import Testing
import VfioUser
import VfioUserTestSupport
@testable import VfioUserVirtio
import Virtio
import VirtioTestSupport

/// VIRTIO_PCI_CAP_PCI_CFG (virtio 1.2 4.1.4.9): a driver that reaches the BARs only through config space.
@Suite(.serialized) struct VirtioPCICfgWindowTests {
    /// Config-space offset of the PCI_CFG capability, found by walking the list as a driver does.
    func windowCapability(_ d: VirtioPCIDriver) throws -> Int? {
        var at = Int(try d.config(0x34, 1))
        var steps = 0
        while at != 0 && steps < 48 {
            steps += 1
            if try d.config(at, 1) == 0x09, try d.config(at + 3, 1) == 5 { return at }
            at = Int(try d.config(at + 1, 1))
        }
        return nil
    }

    func setConfig(_ d: VirtioPCIDriver, _ offset: Int, _ bytes: [UInt8]) throws {
        #expect(try !d.client.regionWrite(UInt32(VfioPCIRegion.config), offset: UInt64(offset), data: bytes).isError)
    }

    func le32(_ v: UInt32) -> [UInt8] { (0..<4).map { UInt8(truncatingIfNeeded: v >> (8 * UInt32($0))) } }

    /// Selects BAR `bar` at `offset` with `length` bytes.
    func select(_ d: VirtioPCIDriver, _ cap: Int, bar: UInt8 = 0, offset: UInt32, length: UInt32) throws {
        try setConfig(d, cap + 4, [bar])
        try setConfig(d, cap + 8, le32(offset))
        try setConfig(d, cap + 12, le32(length))
    }

    @Test func theWindowReadsAndWritesTheBARs() throws {
        let f = try BlkPCIFixture()
        let d = try VirtioPCIDriver(path: f.path, ram: f.ram)
        let cap = try #require(try windowCapability(d))
        #expect(cap == 0xA4)  // after the four other vendor capabilities (the vfio-user-virtio fuzz seeds use it)
        #expect(try d.config(cap + 2, 1) == 20)  // sizeof(struct virtio_pci_cfg_cap)
        // Reads: num_queues (2 bytes), the virtio-blk capacity (4 bytes), a byte of the device features.
        try select(d, cap, offset: 0x12, length: 2)
        #expect(try d.config(cap + 16, 4) & 0xFFFF == 1)
        try select(d, cap, offset: 0x2000, length: 4)
        #expect(try d.config(cap + 16, 4) == 2048)
        let features = try d.deviceFeatures  // leaves device_feature_select at 1: the high word
        try select(d, cap, offset: 0x04, length: 4)
        #expect(try d.config(cap + 16, 4) == features >> 32)
        try d.setCommon(0x00, 4, 0)
        #expect(try d.config(cap + 16, 4) == features & 0xFFFF_FFFF)
        // Writes: device_status through the window, read back through BAR 0 (and through the window).
        try select(d, cap, offset: 0x14, length: 1)
        try setConfig(d, cap + 16, le32(0x01))
        #expect(try d.status == 1)
        try setConfig(d, cap + 16, le32(0x03))
        #expect(try d.status == 3)
        #expect(try d.config(cap + 16, 1) == 3)
        // A whole driver start through BAR 0 still works after it.
        #expect(try d.negotiate(wanted: ~VirtioFeature.ringPacked) == 0x0B)
        try select(d, cap, offset: 0x14, length: 1)
        #expect(try d.config(cap + 16, 1) == 0x0B)
    }

    @Test func accessesTheSpecForbidsAreRefused() throws {
        let f = try BlkPCIFixture()
        let d = try VirtioPCIDriver(path: f.path, ram: f.ram)
        let cap = try #require(try windowCapability(d))
        let function = f.controller.function
        try select(d, cap, offset: 0x12, length: 2)
        #expect(try d.config(cap + 16, 4) & 0xFFFF == 1)
        let refusedBefore = function.ignoredWrites
        for (bar, offset, length) in [(UInt8(0), UInt32(0x14), UInt32(3)), (0, 0x13, 2), (0, 0x3FFE, 4), (0, 0x4000, 1), (0, 0, 8), (0, 0, 0),
                                      (5, 0, 4), (0xFF, 0, 4), (0, 0xFFFF_FFFC, 4)] {
            try select(d, cap, bar: bar, offset: offset, length: length)
            try setConfig(d, cap + 16, le32(0xFF))  // a write: refused, status untouched
            #expect(try d.config(cap + 16, 4) == 0xFF)  // a read: refused, data as written
        }
        #expect(function.ignoredWrites == refusedBefore + 18)
        #expect(try d.status == 0)
        // The selection fields keep what the driver wrote.
        #expect(try d.config(cap + 4, 1) == 0)
        #expect(try d.config(cap + 8, 4) == 0xFFFF_FFFC)
        // The MSI-X BAR through the window: emulated by the VMM, reads 0 here, writes go nowhere.
        try select(d, cap, bar: 1, offset: 0, length: 4)
        try setConfig(d, cap + 16, le32(0x1234))
        #expect(try d.config(cap + 16, 4) == 0)
    }
}
