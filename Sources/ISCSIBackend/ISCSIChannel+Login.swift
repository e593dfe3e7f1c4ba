import BlockIO
import CLibISCSI
import CSystem
#if canImport(Glibc)
import Glibc
#endif

// The connection state machine: connect, login, backoff and reconnect, session loss.

extension ISCSIChannel {
    func lastLibraryError() -> String {
        guard let context, let text = iscsi_get_error(context) else { return "unknown error" }
        var s = String(cString: text)
        while let last = s.last, last == "\n" || last == " " || last == "." { s.removeLast() }
        // libiscsi's own reconnect machinery (disabled here) explains nothing useful.
        if s.isEmpty || s.contains("reconnect") { return "the target closed the connection" }
        return s
    }

    func startConnect(now: UInt64) {
        guard context == nil else { return }
        guard let ctx = iscsi_create_context(config.initiatorName) else {
            failureReason = "iscsi_create_context failed"
            scheduleRetry(now: now)
            return
        }
        context = ctx
        pollGeneration &+= 1
        iscsi_set_noautoreconnect(ctx, 1)
        _ = iscsi_set_targetname(ctx, config.url.targetName)
        _ = iscsi_set_session_type(ctx, ISCSI_SESSION_NORMAL)
        _ = iscsi_set_header_digest(ctx, config.headerDigest == .crc32c ? ISCSI_HEADER_DIGEST_CRC32C : ISCSI_HEADER_DIGEST_NONE)
        if let user = config.chapUser, let secret = config.chapSecret {
            _ = iscsi_set_initiator_username_pwd(ctx, user, secret.value)
        }
        // Dead peers: keepalive probes on idle sessions (~11 s), and unacknowledged data aborts
        // the connection after a third of the timeout, leaving time to reconnect and resubmit.
        iscsi_set_tcp_keepidle(ctx, 5)
        iscsi_set_tcp_keepintvl(ctx, 2)
        iscsi_set_tcp_keepcnt(ctx, 3)
        iscsi_set_tcp_user_timeout(ctx, Int32(min(max(Int(config.timeoutSeconds) * 1000 / 3, 2000), 20_000)))
        phase = .connecting
        loggingIn = false
        nextAttempt = now
        let loginBudget = min(max(timeoutNanoseconds / 3, 2_000_000_000), 10_000_000_000)
        phaseDeadline = now &+ loginBudget
        lostConnection = false
        if iscsi_connect_async(ctx, backend.portal, iscsiTrampoline, UnsafeMutableRawPointer(tags + capacity)) != 0 {
            failureReason = "cannot connect to \(config.url.portal): \(lastLibraryError())"
            lostConnection = true
        }
    }

    func scheduleRetry(now: UInt64) {
        let delayMs = config.reconnectBackoff.delay(afterFailures: consecutiveFailures)
        consecutiveFailures += 1
        nextAttempt = now &+ delayMs * 1_000_000
        phase = .waiting
        if failureReason != lastLoggedFailure && !quiet {
            lastLoggedFailure = failureReason
            config.emit(.warning, "\(config.url): \(failureReason); retrying in \(delayMs) ms (backoff up to \(config.reconnectBackoff.maximumMilliseconds) ms)"
                + (inFlight > 0 ? " (\(inFlight) requests held, timeout \(config.timeoutSeconds) s)" : ""))
        }
    }

    /// Closes the socket, takes every in-flight command back into the submit queue, and schedules a reconnect.
    func dropConnection(now: UInt64) {
        let wasOnline = phase == .online
        if wasOnline {
            outageStart = now
            statistics.connectionLosses += 1
        }
        destroyContext()
        // The cancellations destroyContext triggered report the same loss again.
        lostConnection = false
        if failureReason.isEmpty { failureReason = "connection to \(config.url.portal) lost" }
        backend.channelWentOffline(wasOnline: wasOnline, reason: failureReason)
        scheduleRetry(now: now)
    }

    func destroyContext() {
        guard let ctx = context else { return }
        // Cancels every PDU: SCSI callbacks run with SCSI_STATUS_CANCELLED and requeue their slots.
        _ = iscsi_destroy_context(ctx)
        context = nil
        pollGeneration &+= 1
        for i in 0..<capacity {
            let slot = slots + i
            if let task = slot.pointee.task {
                // No callback came (libiscsi skips them when not logged in): take the command back.
                slot.pointee.task = nil
                scsi_free_scsi_task(task)
                if slot.pointee.phase == .inFlight {
                    if slot.pointee.aborting {
                        complete(Int32(i), .failure(ECANCELED))
                    } else {
                        statistics.commandsResubmitted += 1
                        requeue(Int32(i), delayNanoseconds: 0)
                    }
                }
            }
        }
        if let task = discoveryTask {
            discoveryTask = nil
            scsi_free_scsi_task(task)
        }
        discovery.abandon()
        if phase != .closed { phase = .waiting }
    }

    func afterLibraryCall(now: UInt64) {
        if cancelsPending { performRequestedCancels() }
        if lostConnection { dropConnection(now: now) }
        if phase == .online {
            if rediscoverPending && discovery.step == .idle {
                rediscoverPending = false
                startDiscovery()
            }
            issueQueued(now: now)
            flushSocket()
        }
    }

    /// Writes queued PDUs now instead of waiting for the next POLLOUT round trip.
    func flushSocket() {
        guard let context, phase == .online || phase == .discovering else { return }
        if iscsi_which_events(context) & Int32(POLLOUT) != 0 {
            if iscsi_service(context, Int32(POLLOUT)) < 0 {
                failureReason = "connection to \(config.url.portal) lost: \(lastLibraryError())"
                lostConnection = true
                dropConnection(now: monotonicNanoseconds())
            }
        }
    }

    func connectStepDone(status: Int32) {
        guard let context else { return }
        if !loggingIn {
            guard status == Int32(bitPattern: SCSI_STATUS_GOOD.rawValue) else {
                failureReason = "cannot connect to \(config.url.portal): \(lastLibraryError())"
                lostConnection = true
                return
            }
            loggingIn = true
            if iscsi_login_async(context, iscsiTrampoline, UnsafeMutableRawPointer(tags + capacity)) != 0 {
                loggingIn = false
                failureReason = "login to \(config.url.targetName) failed: \(lastLibraryError())"
                lostConnection = true
            }
            return
        }
        loggingIn = false
        guard status == Int32(bitPattern: SCSI_STATUS_GOOD.rawValue) else {
            let detail = lastLibraryError()
            let lower = detail.lowercased()
            if lower.contains("authentication") || lower.contains("authorization") {
                failureReason = "login to \(config.url.targetName) at \(config.url.portal) refused: CHAP authentication failed"
                    + (config.chapUser == nil ? " (the target requires CHAP; set chap_user and chap_secret_file)" : " for user \(config.chapUser!) (check the CHAP secret)")
                    + " [\(detail)]"
            } else {
                failureReason = "login to \(config.url.targetName) at \(config.url.portal) failed: \(detail)"
            }
            lostConnection = true
            return
        }
        phase = .discovering
        startDiscovery()
    }
}
