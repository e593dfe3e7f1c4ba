import VfioUser

/// The VIRTIO_PCI_CAP_PCI_CFG window (virtio 1.2 4.1.4.9): the driver selects a BAR, an offset and a length of 1, 2 or
/// 4 in the capability, then reads or writes `pci_cfg_data`; each such access is carried out on the BAR as the same
/// access through the BAR would be (firmware and drivers without BAR mappings use it). Accesses the spec does not allow
/// (another length, an offset not aligned to it, outside the BAR) are refused and logged; the data then stays as it was.
extension VirtioPCIFunction {
    /// A read of `pci_cfg_data` fills its first cap.length bytes from the BAR.
    func configWillRead(offset: Int, count: Int) {
        guard let (bar, at, width) = windowAccess(offset, count) else { return }
        _ = configSpace.store(offset: VirtioPCILayout.PCICfgWindow(configSpace).data, count: width,
                              value: barRead(bar: bar, offset: at, count: width))
    }

    /// A write of `pci_cfg_data` writes its first cap.length bytes to the BAR.
    func configDidWrite(offset: Int, count: Int) {
        guard let (bar, at, width) = windowAccess(offset, count) else { return }
        let data = UInt64(configSpace.u32(VirtioPCILayout.PCICfgWindow(configSpace).data))
        barWrite(bar: bar, offset: at, count: width, value: data & (UInt64(1) << (8 * UInt64(width)) - 1), posted: false)
    }

    /// The BAR access the window selects when the config access [`offset`, +`count`) touches `pci_cfg_data`.
    private func windowAccess(_ offset: Int, _ count: Int) -> (bar: Int, offset: UInt64, width: Int)? {
        let window = VirtioPCILayout.PCICfgWindow(configSpace)
        guard offset < window.data + 4, window.data < offset + count else { return nil }
        let bar = Int(configSpace.u16(window.bar) & 0xFF)
        let at = UInt64(configSpace.u32(window.offset))
        let width = Int(configSpace.u32(window.length))
        guard width == 1 || width == 2 || width == 4, at % UInt64(width) == 0, bar < configSpace.bars.count,
              at + UInt64(width) <= UInt64(configSpace.bars[bar].size) else {
            refuse("PCI_CFG window access to BAR \(bar) offset 0x\(String(at, radix: 16)) length \(width)")
            return nil
        }
        return (bar, at, width)
    }
}
