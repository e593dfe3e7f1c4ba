import BlockIO
import CSystem
import EventLoop
import SCSI
import VfioUser
#if canImport(Glibc)
import Glibc
#endif

/// Register access and commands: BAR reads and writes (command, command data, status, interrupt
/// status and mask, kick registers), command execution (SETUP_RINGS, SETUP_MSG_RING, CONFIG, ABORT_CMD,
/// resets) and the adapter reset.
extension PVSCSIDevice {
    public func barRead(bar: Int, offset: UInt64, count: Int) -> UInt64 {
        guard bar == 0 else { return 0 }
        let aligned = offset & ~3
        let value: UInt32
        switch aligned {
        case PVSCSI.Register.commandStatus: value = commandStatus
        case PVSCSI.Register.interruptStatus: value = interruptStatus
        case PVSCSI.Register.interruptMask: value = interruptMask
        default: value = 0
        }
        let shifted = UInt64(value) >> ((offset & 3) * 8)
        return count >= 8 ? shifted : shifted & ((1 << (UInt64(count) * 8)) - 1)
    }

    public func barWrite(bar: Int, offset: UInt64, count: Int, value: UInt64, posted: Bool) {
        guard bar == 0 else { return }
        guard count == 4 || count == 8, offset & 3 == 0 else {
            log.warning("pvscsi: ignored \(count)-byte register write at 0x\(String(offset, radix: 16))")
            return
        }
        let v = UInt32(truncatingIfNeeded: value)
        switch offset {
        case PVSCSI.Register.command: writeCommand(v)
        case PVSCSI.Register.commandData: writeCommandData(v, posted: posted)
        case PVSCSI.Register.interruptStatus:
            interruptStatus &= ~v
            updateInterruptLine()
        case PVSCSI.Register.interruptMask:
            interruptMask = v & PVSCSI.interruptAll
            updateInterruptLine()
            if interruptStatus & interruptMask != 0 && messageSignalled { signalMessage() }
        case PVSCSI.Register.kickNonRWIO, PVSCSI.Register.kickRWIO:
            processRequestRing()
        case PVSCSI.Register.debug:
            log.debug("pvscsi: guest DEBUG register 0x\(String(v, radix: 16))")
        default:
            break  // MSI-X table/PBA (emulated by the client) and unused space
        }
    }


    private func writeCommand(_ value: UInt32) {
        commandSequence &+= 1
        commandWordCount = 0
        currentCommand = nil
        guard let command = PVSCSI.Command(rawValue: value) else {
            log.warning("pvscsi: unknown command \(value)")
            commandStatus = PVSCSI.commandFailed
            return
        }
        let words: Int
        switch command {
        case .adapterReset, .resetBus: words = 0
        case .setupRings: words = PVSCSI.setupRingsWords
        case .resetDevice: words = PVSCSI.resetDeviceWords
        case .abortCommand: words = PVSCSI.abortCommandWords
        case .config: words = PVSCSI.configWords
        case .setupMessageRing: words = PVSCSI.setupMessageRingWords
        case .issueSCSI, .deviceUnplug, .setupRequestCallThreshold:
            // Not implemented (as in QEMU): the driver reads -1 and falls back (no request-call threshold).
            commandStatus = PVSCSI.commandFailed
            return
        }
        if words == 0 {
            commandStatus = execute(command, posted: false)
            return
        }
        currentCommand = command
        commandWordsNeeded = words
        // SETUP_MSG_RING support probe: the status register answers the descriptor size in words.
        commandStatus = command == .setupMessageRing ? UInt32(PVSCSI.setupMessageRingWords) : PVSCSI.commandNeedsData
    }

    func writeCommandData(_ value: UInt32, posted: Bool) {
        guard let command = currentCommand else {
            log.warning("pvscsi: COMMAND_DATA write with no command pending")
            return
        }
        commandWords[commandWordCount] = value
        commandWordCount += 1
        if commandWordCount == commandWordsNeeded {
            currentCommand = nil
            let sequence = commandSequence
            let status = execute(command, posted: posted)
            // A command written while this one waited for DMA by message owns the status register now.
            if sequence == commandSequence { commandStatus = status }
        }
    }

    func word64(_ i: Int) -> UInt64 { UInt64(commandWords[i]) | UInt64(commandWords[i + 1]) << 32 }

    func execute(_ command: PVSCSI.Command, posted: Bool) -> UInt32 {
        switch command {
        case .adapterReset:
            adapterReset()
            return PVSCSI.commandSucceeded
        case .setupRings: return setupRings() ? PVSCSI.commandSucceeded : PVSCSI.commandFailed
        case .setupMessageRing: return setupMessageRing() ? PVSCSI.commandSucceeded : PVSCSI.commandFailed
        case .abortCommand:
            abortCommand(context: word64(0), target: commandWords[2])
            return PVSCSI.commandSucceeded
        case .resetBus:
            resetRequests(target: nil)
            return PVSCSI.commandSucceeded
        case .resetDevice:
            resetRequests(target: commandWords[0])
            return PVSCSI.commandSucceeded
        case .config:
            // Linux reads the page right after its last COMMAND_DATA write and frees it at once. When that
            // write was posted the guest did not wait for it, so by now the page may hold anything (a kernel
            // stack, seen under QEMU 11): writing it would corrupt the guest. Answer only synchronous writes;
            // the driver then falls back to 16 targets.
            if posted {
                if !loggedPostedConfig {
                    log.warning("pvscsi: CONFIG arrived as a posted write: not answered (the guest no longer waits for it); the driver assumes 16 targets. Synchronous writes need fd-backed guest memory (memory-backend-memfd share=on) or x-no-posted-writes")
                    loggedPostedConfig = true
                }
                return PVSCSI.commandFailed
            }
            // The page must be host-mapped: a DMA_WRITE would let the server acknowledge the write first
            // (see VfioUserServer), and the guest would read (and free) the page before the answer landed.
            let completion = word64(0)
            guard memory.translate(completion, length: UInt64(PVSCSI.configPageControllerSize), write: true) != nil else {
                log.warning("pvscsi: CONFIG page 0x\(String(completion, radix: 16)) is not in fd-backed guest memory: not answered; the driver assumes 16 targets")
                return PVSCSI.commandFailed
            }
            return configCommand() ? PVSCSI.commandSucceeded : PVSCSI.commandFailed
        case .issueSCSI, .deviceUnplug, .setupRequestCallThreshold: return PVSCSI.commandFailed
        }
    }

    /// Drops rings, interrupts and command state; in-flight requests finish silently.
    func adapterReset() {
        orphanInFlight()
        dropRings()
        currentCommand = nil
        commandWordCount = 0
        commandStatus = 0
        interruptStatus = 0
        interruptMask = 0
        updateInterruptLine()
    }

    /// The adapter reset ends every task of the adapter's nexus in the task set (no unit attention, and no
    /// further back-end step for them); their completions are dropped.
    func orphanInFlight() {
        _ = taskSet.markAborted(TaskScope(nexus: nexus, lun: nil, tag: nil))
        for i in 0..<slots.count {
            switch slots[i].state {
            case .submitted:
                slots[i].orphaned = true
                // Nobody waits for it any more: let a remote back-end drop it.
                if channels.openedChannel(Int(slots[i].use))?.abort(token: UInt64(i)) == true { stats.backendAborts += 1 }
            case .executing: slots[i].orphaned = true
            case .awaitingRing: release(i)
            case .free: break
            }
        }
        awaitingRing.removeAll(keepingCapacity: true)
        awaitingRingHead = 0
    }

    private func configCommand() -> Bool {
        let completionAddress = word64(0)
        let pageAddress = word64(2)
        let pageNumber = commandWords[4]
        // PVSCSIConfigPageController: 16-byte header, nodeWWN, 5 UTF-16 strings (64+64+32+32+32 units), numPhys, flags.
        let size = PVSCSI.configPageControllerSize
        var pageBytes = [UInt8](repeating: 0, count: size)
        func put16(_ o: Int, _ v: UInt16) { pageBytes[o] = UInt8(v & 0xFF); pageBytes[o + 1] = UInt8(v >> 8) }
        func put32(_ o: Int, _ v: UInt32) { put16(o, UInt16(v & 0xFFFF)); put16(o + 2, UInt16(v >> 16)) }
        put32(0, pageNumber)
        let supported = pageNumber == PVSCSI.configPageController
            && pageAddress == UInt64(PVSCSI.configControllerAddress) << 32
        if supported {
            put16(4, UInt16(size / 4))
            put16(6, HostAdapterStatus.success.rawValue)
            put16(8, UInt16(SCSIStatus.good.rawValue))
            let wwn: UInt64 = 0x5000_C0DE_0000_0000 | (options.initiatorID & 0xFFFF_FFFF)
            for i in 0..<8 { pageBytes[16 + i] = UInt8(truncatingIfNeeded: wwn >> (8 * UInt64(i))) }
            for (i, c) in "ScsiGate".utf16.enumerated() { put16(24 + 2 * i, c) }
            put32(size - 8, options.maxTargets)
        } else {
            put16(6, HostAdapterStatus.invalidParameter.rawValue)
            put16(8, UInt16(SCSIStatus.checkCondition.rawValue))
        }
        let written = pageBytes.withUnsafeBytes { memory.write(completionAddress, from: $0) }
        if !written { log.warning("pvscsi: CONFIG completion address 0x\(String(completionAddress, radix: 16)) not in mapped guest memory") }
        return written && supported
    }
}
