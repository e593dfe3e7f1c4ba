import CLibISCSI

// libiscsi's C callbacks: one trampoline for every command, connect and login, routed by the tag
// passed as private data to the channel part that waits for it.

/// What libiscsi's callbacks get as private data: the channel and the slot the command belongs to.
struct CallbackTag {
    /// Unretained `ISCSIChannel`, or nil once the channel is being torn down.
    var channel: UnsafeMutableRawPointer?
    /// Slot index, or one of the special tags below.
    var slot: Int32

    static let connectSlot: Int32 = -1
    static let discoverySlot: Int32 = -2
    static let lunResetSlot: Int32 = -3
    /// ABORT TASK for slot i uses `abortSlotBase - i`.
    static let abortSlotBase: Int32 = -1000
}

/// The single C callback for every command libiscsi completes (SCSI, connect, login).
let iscsiTrampoline: iscsi_command_cb = { _, status, commandData, privateData in
    guard let privateData else { return }
    let tag = privateData.assumingMemoryBound(to: CallbackTag.self).pointee
    guard let channelPointer = tag.channel else { return }
    let channel = Unmanaged<ISCSIChannel>.fromOpaque(channelPointer).takeUnretainedValue()
    channel.handleCallback(slot: tag.slot, status: status, commandData: commandData)
}

extension ISCSIChannel {
    func handleCallback(slot index: Int32, status: Int32, commandData: UnsafeMutableRawPointer?) {
        switch index {
        case CallbackTag.connectSlot:
            connectStepDone(status: status)
        case CallbackTag.discoverySlot:
            discoveryStepDone(status: status, task: commandData?.assumingMemoryBound(to: scsi_task.self))
        case CallbackTag.lunResetSlot:
            taskManagementDone(slot: nil, status: status, response: commandData)
        case ...CallbackTag.abortSlotBase:
            let slot = CallbackTag.abortSlotBase - index
            guard Int(slot) < capacity else { return }
            taskManagementDone(slot: slot, status: status, response: commandData)
        default:
            guard index >= 0 && Int(index) < capacity else { return }
            commandDone(index, status: status, task: commandData?.assumingMemoryBound(to: scsi_task.self))
        }
    }
}
