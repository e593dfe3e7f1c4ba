import CSystem
import EventLoop
#if canImport(Glibc)
import Glibc
#endif

/// Interrupts (compare libvfio-user's irq.c): GET_IRQ_INFO and SET_IRQS (eventfds for INTx, MSI and
/// MSI-X; trigger, mask and unmask actions), every index, range and flag checked.
extension VfioUserServer {
    func handleGetIRQInfo(_ h: VfioUserHeader, _ p: PayloadReader) {
        guard p.count >= 16, let argsz = p.u32(0), let index = p.u32(8) else { fail(h, EINVAL, "GET_IRQ_INFO payload shorter than 16 bytes"); return }
        guard argsz >= 16 else { fail(h, EINVAL, "GET_IRQ_INFO argsz \(argsz)"); return }
        guard index < UInt32(VfioPCIIRQ.count) else { fail(h, EINVAL, "GET_IRQ_INFO index \(index)"); return }
        let count = interrupts.count(for: Int(index))
        var flags: UInt32 = 0
        if count > 0 {
            flags = 0x1 | 0x2  // EVENTFD | MASKABLE
            if Int(index) == VfioPCIIRQ.intx { flags |= 0x4 }  // AUTOMASKED
            else { flags |= 0x8 }  // NORESIZE
        }
        reply(h) { w in
            w.u32(16)
            w.u32(flags)
            w.u32(index)
            w.u32(UInt32(count))
        }
    }

    func handleSetIRQs(_ h: VfioUserHeader, _ p: PayloadReader) {
        guard p.count >= 20, let argsz = p.u32(0), let flags = p.u32(4), let index = p.u32(8),
              let start = p.u32(12), let count = p.u32(16) else { fail(h, EINVAL, "SET_IRQS payload shorter than 20 bytes"); return }
        guard argsz >= 20 else { fail(h, EINVAL, "SET_IRQS argsz \(argsz)"); return }
        guard index < UInt32(VfioPCIIRQ.count) else { fail(h, EINVAL, "SET_IRQS index \(index)"); return }
        let dataNone: UInt32 = 1, dataBool: UInt32 = 2, dataEventfd: UInt32 = 4
        let actionMask: UInt32 = 8, actionUnmask: UInt32 = 16, actionTrigger: UInt32 = 32
        let data = flags & 0x7
        let action = flags & 0x38
        guard flags & ~UInt32(0x3F) == 0, data.nonzeroBitCount == 1, action.nonzeroBitCount == 1 else {
            fail(h, EINVAL, "SET_IRQS flags 0x\(String(flags, radix: 16))")
            return
        }
        let idx = Int(index)
        let available = interrupts.count(for: idx)
        if data == dataNone && action == actionTrigger && count == 0 {
            guard start == 0 else { fail(h, EINVAL, "SET_IRQS disable with start \(start)"); return }
            interrupts.disableAll(index: idx)
            device.interruptsChanged()
            reply(h) { _ in }
            return
        }
        let (end, overflow) = start.addingReportingOverflow(count)
        guard !overflow, count > 0, Int(end) <= available else {
            fail(h, EINVAL, "SET_IRQS index \(index) start \(start) count \(count) beyond \(available) vectors")
            return
        }
        switch data {
        case dataEventfd:
            guard action == actionTrigger else { fail(h, ENOTSUP, "SET_IRQS eventfd for mask/unmask"); return }
            guard fdCount == 0 || fdCount == Int(count) else {
                fail(h, EINVAL, "SET_IRQS count \(count) with \(fdCount) fds")
                return
            }
            for i in 0..<Int(count) {
                var fd: Int32 = -1
                if fdCount > 0 { fd = fds[i]; fds[i] = -1 }
                interrupts.assign(index: idx, vector: Int(start) + i, fd: fd)
            }
            if fdCount > 0 {
                let name = idx == VfioPCIIRQ.intx ? "INTx" : idx == VfioPCIIRQ.msi ? "MSI" : idx == VfioPCIIRQ.msix ? "MSI-X" : "index \(idx)"
                log.info("vfio-user: interrupt eventfd for \(name) vector \(start)\(count > 1 ? "...\(start + count - 1)" : "")")
            }
            device.interruptsChanged()
        case dataBool, dataNone:
            guard fdCount == 0 else { fail(h, EINVAL, "SET_IRQS fds without DATA_EVENTFD"); return }
            if data == dataBool && p.count < 20 + Int(count) { fail(h, EINVAL, "SET_IRQS bool array shorter than count"); return }
            for i in 0..<Int(count) {
                if data == dataBool && p.u8(20 + i) == 0 { continue }
                let v = Int(start) + i
                switch action {
                case actionMask: interrupts.mask(index: idx, vector: v)
                case actionUnmask: interrupts.unmask(index: idx, vector: v)
                default: interrupts.trigger(index: idx, vector: v)
                }
            }
        default:
            fail(h, EINVAL, "SET_IRQS data flags")
            return
        }
        reply(h) { _ in }
    }
}
