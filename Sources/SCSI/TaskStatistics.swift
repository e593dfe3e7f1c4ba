import BlockIO

extension IOCommandClass {
    /// The class of a SCSI command by its operation code (READ, WRITE, SYNCHRONIZE CACHE, UNMAP, other).
    @inline(__always)
    public init(scsiOpcode opcode: UInt8) {
        switch opcode {
        case 0x08, 0x28, 0xA8, 0x88: self = .read
        case 0x0A, 0x2A, 0xAA, 0x8A, 0x2E, 0x8E, 0x41, 0x93, 0x89: self = .write
        case 0x35, 0x91: self = .flush
        case 0x42: self = .discard
        default: self = .other
        }
    }
}

extension SCSITask {
    /// The sense key of the task's sense data (fixed or descriptor format), or 0 when it has none.
    /// Inlinable, as `IOCounters.record(task:)`: a call would need the whole task as a value.
    @inlinable @inline(__always)
    public var senseKey: UInt8 {
        guard sense.length >= 3 else { return 0 }
        switch sense[0] & 0x7F {
        case 0x70, 0x71: return sense[2] & 0x0F
        case 0x72, 0x73: return sense[1] & 0x0F
        default: return 0
        }
    }
}

extension IOCounters {
    /// Counts a completed SCSI task: class from its opcode, bytes from its data-in/data-out lengths,
    /// status and sense key from its result. Call on the queue's owner thread when the front-end sends
    /// the task's status (aborted tasks too, with TASK ABORTED). No lock, no allocation.
    @inlinable @inline(__always)
    public func record(task: borrowing SCSITask, latencyNanos: UInt64) {
        withUnsafePointer(to: task) { record(task: $0, latencyNanos: latencyNanos) }
    }

    /// The same for a task in a device's slot memory: only the fields counted are read (passing `slots[i]`
    /// by value would copy the whole task, retaining its references, on every command).
    @inlinable @inline(__always)
    public func record(task: UnsafePointer<SCSITask>, latencyNanos: UInt64) {
        let kind = IOCommandClass(scsiOpcode: task.pointee.cdb.opcode)
        let bytes = kind == .read ? task.pointee.dataInLength : (kind == .write ? task.pointee.dataOutLength : 0)
        record(command: kind, bytes: bytes, latencyNanos: latencyNanos, status: task.pointee.status.rawValue,
               senseKey: task.pointee.senseKey)
    }
}
