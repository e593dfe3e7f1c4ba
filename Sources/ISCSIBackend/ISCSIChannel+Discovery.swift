import BlockIO
import CLibISCSI
import CSystem
#if canImport(Glibc)
import Glibc
#endif

// Geometry discovery glue: sends the commands `ISCSIGeometryDiscovery` asks for and feeds it the answers.

extension ISCSIChannel {
    func capacityChanged() {
        config.emit(.info, "\(config.url): remote reports CAPACITY DATA HAS CHANGED; re-reading capacity")
        rediscoverPending = true
        statistics.capacityChanges += 1
    }

    func startDiscovery() {
        discoveryRetries = 0
        discovery.start(from: geometry)
        issueDiscoveryStep()
    }

    /// Sends the command for the discovery's current step (again, after BUSY or UNIT ATTENTION).
    func issueDiscoveryStep() {
        guard let context else { return }
        let tag = UnsafeMutableRawPointer(tags + capacity + 1)
        switch discovery.step {
        case .readCapacity:
            discoveryTask = iscsi_readcapacity16_task(context, config.url.lun, iscsiTrampoline, tag)
        case .blockLimits:
            discoveryTask = iscsi_inquiry_task(context, config.url.lun, 1, 0xB0, 255, iscsiTrampoline, tag)
        case .provisioning:
            discoveryTask = iscsi_inquiry_task(context, config.url.lun, 1, 0xB2, 255, iscsiTrampoline, tag)
        case .caching:
            // MODE SENSE(10), DBD, current values of the caching page: WP bit and WCE.
            discoveryTask = iscsi_modesense10_task(context, config.url.lun, 0, 1, Int32(SCSI_MODESENSE_PC_CURRENT.rawValue),
                                                   Int32(SCSI_MODEPAGE_CACHING.rawValue), 0, 255, iscsiTrampoline, tag)
        case .persistentReservations:
            discoveryTask = iscsi_persistent_reserve_in_task(context, config.url.lun,
                                                             Int32(SCSI_PERSISTENT_RESERVE_READ_KEYS.rawValue), 255,
                                                             iscsiTrampoline, tag)
        case .compareAndWrite:
            // REPORT SUPPORTED OPERATION CODES, one command: COMPARE AND WRITE (89h).
            discoveryTask = iscsi_report_supported_opcodes_task(context, config.url.lun, 0, 1, 0x89, 0, 64,
                                                                iscsiTrampoline, tag)
        case .idle:
            return
        }
        if discoveryTask == nil {
            let what = discovery.step == .readCapacity ? "READ CAPACITY(16)" : "discovery command"
            failureReason = "cannot send \(what): \(lastLibraryError())"
            lostConnection = true
        }
    }

    func discoveryStepDone(status: Int32, task: UnsafeMutablePointer<scsi_task>?) {
        guard let mine = discoveryTask else { return }
        discoveryTask = nil
        defer { scsi_free_scsi_task(mine) }
        let step = discovery.step
        let good = status == Int32(bitPattern: SCSI_STATUS_GOOD.rawValue)
        if (step == .persistentReservations || step == .compareAndWrite)
            && status == Int32(bitPattern: SCSI_STATUS_RESERVATION_CONFLICT.rawValue) {
            // Optional probes: a conflict (not expected) counts as "unsupported".
            discoveryRetries = 0
            proceed(step == .persistentReservations ? discovery.persistentReservations(supported: false)
                                                    : discovery.compareAndWrite(reportedOperationCode: nil))
            return
        }
        if status != Int32(bitPattern: SCSI_STATUS_GOOD.rawValue) && status != Int32(bitPattern: SCSI_STATUS_CHECK_CONDITION.rawValue) {
            if status == Int32(bitPattern: SCSI_STATUS_BUSY.rawValue) || status == Int32(bitPattern: SCSI_STATUS_TASK_SET_FULL.rawValue) {
                discoveryRetries += 1
                if discoveryRetries < 50 { issueDiscoveryStep(); return }
            }
            if failureReason.isEmpty || status != Int32(bitPattern: SCSI_STATUS_CANCELLED.rawValue) {
                failureReason = "capacity discovery failed: \(lastLibraryError())"
            }
            lostConnection = true
            discovery.abandon()
            return
        }
        if !good && mine.pointee.sense.key == SCSI_SENSE_UNIT_ATTENTION && discoveryRetries < 16 {
            discoveryRetries += 1
            issueDiscoveryStep()
            return
        }
        discoveryRetries = 0
        let data: UnsafeRawBufferPointer? = good && mine.pointee.datain.data != nil
            ? UnsafeRawBufferPointer(start: mine.pointee.datain.data, count: Int(max(mine.pointee.datain.size, 0))) : nil
        switch step {
        case .readCapacity:
            guard good, let raw = scsi_datain_unmarshall(mine) else {
                let code = UInt16(truncatingIfNeeded: mine.pointee.sense.ascq)
                failureReason = "READ CAPACITY(16) failed on \(config.url) (sense key 0x\(String(mine.pointee.sense.key.rawValue, radix: 16)) asc/ascq 0x\(String(code, radix: 16)))"
                lostConnection = true
                discovery.abandon()
                return
            }
            let rc = raw.assumingMemoryBound(to: scsi_readcapacity16.self).pointee
            proceed(discovery.readCapacity(.init(blockLength: rc.block_length, returnedLBA: rc.returned_lba,
                                                 logicalPerPhysicalExponent: rc.lbppbe, lbpme: rc.lbpme != 0, lbprz: rc.lbprz != 0)))
        case .blockLimits:
            let page = good ? scsi_datain_unmarshall(mine)?.assumingMemoryBound(to: scsi_inquiry_block_limits.self).pointee : nil
            proceed(discovery.blockLimits(page.map {
                .init(maximumTransferLength: $0.max_xfer_len, optimalUnmapGranularity: $0.opt_unmap_gran,
                      maximumUnmapLBACount: $0.max_unmap, maximumWriteSameLength: $0.max_ws_len)
            }))
        case .provisioning:
            let page = good ? scsi_datain_unmarshall(mine)?.assumingMemoryBound(to: scsi_inquiry_logical_block_provisioning.self).pointee : nil
            proceed(discovery.provisioning(page.map { .init(lbpu: $0.lbpu != 0, lbpws: $0.lbpws != 0, lbprz: $0.lbprz != 0) }))
        case .caching:
            proceed(discovery.caching(modeSense10: data))
        case .persistentReservations:
            proceed(discovery.persistentReservations(supported: good))
        case .compareAndWrite:
            proceed(discovery.compareAndWrite(reportedOperationCode: data))
        case .idle:
            break
        }
    }

    /// Acts on what the discovery says after an answer: the next command, the end, or a failed LUN.
    private func proceed(_ outcome: ISCSIGeometryDiscovery.Outcome) {
        switch outcome {
        case .next:
            issueDiscoveryStep()
        case .failed(let reason):
            failureReason = reason
            lostConnection = true
        case .finished:
            finishDiscovery()
        }
    }

    func finishDiscovery() {
        for i in 0..<capacity { slots[i].awaitingGeometry = false }
        let (discovered, discoveredLimits) = discovery.finish()
        let changed = !geometryKnown || discovered != geometry
        limits = discoveredLimits
        adoptGeometry(discovered)
        backend.publish(geometry: discovered, changed: changed)
        if phase == .discovering {
            let now = monotonicNanoseconds()
            let outageMs = (now &- outageStart) / 1_000_000
            phase = .online
            statistics.logins += 1
            consecutiveFailures = 0
            let wasFailing = !lastLoggedFailure.isEmpty
            lastLoggedFailure = ""
            failureReason = ""
            if !quiet || wasFailing { config.emit(wasFailing ? .warning : .info,
                        "\(config.url): online, \(geometry.blockCount) blocks of \(geometry.logicalBlockSize) bytes"
                        + (statistics.logins == 1 ? "; remote persistent reservations: \(geometry.remotePersistentReservations ? "yes" : "no")"
                           + ", COMPARE AND WRITE: \(geometry.remoteCompareAndWrite ? "listed" : "no")"
                           + ", max transfer: \(remoteMaxTransferBytes == 0 ? "none" : "\(remoteMaxTransferBytes) bytes (larger I/O split)")" : "")
                        + (wasFailing ? " (back after \(outageMs) ms; resubmitting \(submitQueue.count) commands)" : "")) }
            backend.channelCameOnline()
        }
    }
}
