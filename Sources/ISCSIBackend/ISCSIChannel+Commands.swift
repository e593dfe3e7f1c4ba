import BlockIO
import CLibISCSI
import CSystem
#if canImport(Glibc)
import Glibc
#endif

// Hands the next command of a slot to libiscsi (`ISCSICommand` decides which; the CDB is libiscsi's).

extension ISCSIChannel {
    func issue(_ index: Int32, context: OpaquePointer) {
        let slot = slots + Int(index)
        let request = slot.pointee.request
        if request.passThrough.isPresent {
            issuePassThrough(index, context: context)
            return
        }
        let tag = UnsafeMutableRawPointer(tags + Int(index))
        let lun = config.url.lun
        let bs = blockSize
        var task: UnsafeMutablePointer<scsi_task>?
        switch ISCSICommand.next(for: request, done: slot.pointee.done, blockSize: bs, maxIOBytes: maxIOBytes, limits: limits) {
        case .read16(let lba, let bytes, let split), .write16(let lba, let bytes, let split, _):
            var iov = UnsafeMutablePointer<scsi_iovec>(OpaquePointer(request.buffers.base))
            var iovCount = Int32(request.buffers.count)
            var partBytes = bytes
            if split {
                // One part of a transfer above the remote's limit: the next `maxIOBytes` (or fewer,
                // when they need more iovec entries than a slot has), then the rest on completion.
                let part = splitPart(index, request: request, from: slot.pointee.done, upTo: bytes, wholeBlocks: true)
                guard part.bytes > 0 else {
                    complete(index, .failure(EINVAL))
                    return
                }
                iov = part.iov
                iovCount = part.count
                partBytes = part.bytes
            }
            slot.pointee.chunk = partBytes
            if request.operation == .read {
                task = iscsi_read16_iov_task(context, lun, lba, UInt32(partBytes), Int32(bs), 0, 0, 0, 0, 0,
                                             iscsiTrampoline, tag, iov, iovCount)
            } else {
                task = iscsi_write16_iov_task(context, lun, lba, nil, UInt32(partBytes), Int32(bs), 0, 0,
                                              request.forceUnitAccess ? 1 : 0, 0, 0, iscsiTrampoline, tag, iov, iovCount)
            }
        case .synchronizeCache16:
            task = iscsi_synchronizecache16_task(context, lun, 0, 0, 0, 0, iscsiTrampoline, tag)
        case .unmap(let lba, let blocks):
            slot.pointee.chunk = blocks * bs
            slot.pointee.unmap = unmap_list(lba: lba, num: UInt32(blocks))
            task = iscsi_unmap_task(context, lun, 0, 0, &slot.pointee.unmap, 1, iscsiTrampoline, tag)
        case .writeSame16(let lba, let blocks, let unmap):
            slot.pointee.chunk = blocks * bs
            task = iscsi_writesame16_task(context, lun, lba, zeroBlock.assumingMemoryBound(to: UInt8.self),
                                          UInt32(bs), UInt32(blocks), 0, unmap ? 1 : 0, 0, 0,
                                          iscsiTrampoline, tag)
        }
        sent(index, task: task)
    }

    /// Sends a pass-through command unchanged, with the request's buffers as data-in or data-out.
    func issuePassThrough(_ index: Int32, context: OpaquePointer) {
        let request = slots[Int(index)].request
        let command = ISCSIPassThroughCommand(request)
        var cdb = command.cdb
        let direction: Int32
        switch command.direction {
        case .read: direction = Int32(SCSI_XFER_READ.rawValue)
        case .write: direction = Int32(SCSI_XFER_WRITE.rawValue)
        case .none: direction = Int32(SCSI_XFER_NONE.rawValue)
        }
        let length = Int32(command.transferLength)
        let created = withUnsafeMutableBytes(of: &cdb) { raw in
            scsi_create_task(Int32(command.cdbLength), raw.baseAddress!.assumingMemoryBound(to: UInt8.self), direction, length)
        }
        guard let task = created else {
            complete(index, .failure(ENOMEM))
            return
        }
        if length > 0 {
            var iov = UnsafeMutablePointer<scsi_iovec>(OpaquePointer(request.buffers.base))
            var iovCount = Int32(request.buffers.count)
            if UInt64(request.buffers.totalLength) != request.length {
                // Longer buffers than the transfer: libiscsi gets exactly `length` bytes of them.
                let part = splitPart(index, request: request, from: 0, upTo: request.length, wholeBlocks: false)
                guard part.bytes == request.length else {
                    scsi_free_scsi_task(task)
                    complete(index, .failure(EINVAL))
                    return
                }
                iov = part.iov
                iovCount = part.count
            }
            if command.direction == .read {
                scsi_task_set_iov_in(task, iov, iovCount)
            } else {
                scsi_task_set_iov_out(task, iov, iovCount)
            }
        }
        if iscsi_scsi_command_async(context, Int32(config.url.lun), task, iscsiTrampoline, nil,
                                    UnsafeMutableRawPointer(tags + Int(index))) != 0 {
            scsi_free_scsi_task(task)
            sent(index, task: nil)
            return
        }
        sent(index, task: task)
    }

    /// Records the task libiscsi queued for a slot; nil (no session, out of memory): the slot goes back
    /// to the submit queue and the session is dropped, so it goes out again on a new one.
    private func sent(_ index: Int32, task: UnsafeMutablePointer<scsi_task>?) {
        let slot = slots + Int(index)
        guard let task else {
            failureReason = "cannot queue command: \(lastLibraryError())"
            lostConnection = true
            requeue(index, delayNanoseconds: 0)
            return
        }
        slot.pointee.task = task
        if slot.pointee.phase == .queued { slot.pointee.phase = .inFlight }
    }

    /// The slot's preallocated iovec array filled with part of the request's buffers (`ISCSITransferSplit`).
    private func splitPart(_ index: Int32, request: BlockRequest, from: UInt64, upTo: UInt64, wholeBlocks: Bool)
        -> (iov: UnsafeMutablePointer<scsi_iovec>, count: Int32, bytes: UInt64) {
        let out = splitIOV + Int(index) * Self.splitIOVCapacity
        let part = ISCSITransferSplit.part(of: request.buffers, from: from, upTo: upTo, blockSize: blockSize,
                                           wholeBlocks: wholeBlocks, into: out, capacity: Self.splitIOVCapacity)
        return (UnsafeMutablePointer<scsi_iovec>(OpaquePointer(out)), Int32(part.count), part.bytes)
    }
}
