import GuestMemoryMap
import Virtio
import VirtioDevices
#if canImport(Glibc)
import Glibc
#endif

// One handler per vhost-user request (as libvhost-user's vu_*_exec and rust-vmm's backend_req_handler):
// each checks its payload and fds, acts, and returns whether it sent its own reply; `dispatch` only routes.
// A `RequestFailure` is answered with a failed REPLY_ACK when one was asked for, otherwise it closes the
// connection (`Session.handle`).

extension VhostUserServer.Session {
    /// Routes a request to its handler; returns whether the handler sent its own reply.
    func dispatch(_ request: VhostUserRequest, _ p: [UInt8], _ fds: inout [Int32]) throws -> Bool {
        switch request {
        case .getFeatures: return try getFeatures(p, fds)
        case .setFeatures: return try setFeatures(p, fds)
        case .getProtocolFeatures: return try getProtocolFeatures(p, fds)
        case .setProtocolFeatures: return try setProtocolFeatures(p, fds)
        case .setOwner: return try setOwner(p, fds)
        case .resetOwner, .resetDevice: return try resetOwner(p, fds)
        case .getQueueNum: return try getQueueNum(p, fds)
        case .getMaxMemSlots: return try getMaxMemSlots(p, fds)
        case .setMemTable: return try setMemTable(p, fds)
        case .addMemReg: return try addMemReg(p, fds)
        case .remMemReg: return try remMemReg(p, fds)
        case .setVringNum: return try setVringNum(p, fds)
        case .setVringAddr: return try setVringAddr(p, fds)
        case .setVringBase: return try setVringBase(p, fds)
        case .getVringBase: return try getVringBase(p, fds)
        case .setVringKick: return try setVringKick(p, &fds)
        case .setVringCall: return try setVringCall(p, &fds)
        case .setVringErr: return try setVringErr(p, &fds)
        case .setVringEnable: return try setVringEnable(p, fds)
        case .getConfig: return try getConfig(p, fds)
        case .setConfig: return try setConfig(p, fds)
        case .setBackendReqFD: return try setBackendReqFD(p, &fds)
        case .getInflightFD: return try getInflightFD(p, fds)
        case .setInflightFD: return try setInflightFD(p, &fds)
        case .setLogBase: return try setLogBase(p, &fds)
        case .setLogFD: return try setLogFD(p, fds)
        case .sendRARP, .netSetMTU, .iotlbMessage, .setVringEndian, .setStatus, .getStatus:
            throw RequestFailure(reason: "not supported")
        }
    }

    /// Answers a GET request that has no payload with one u64.
    private func replyU64(_ request: VhostUserRequest, _ p: [UInt8], _ fds: [Int32], _ value: UInt64) throws(RequestFailure) -> Bool {
        try expectSize(p, 0, fds, 0, own: true)
        sendU64(request.rawValue, value)
        return true
    }

    /// GET_FEATURES: the virtio and vhost-user feature bits offered.
    func getFeatures(_ p: [UInt8], _ fds: [Int32]) throws(RequestFailure) -> Bool {
        try replyU64(.getFeatures, p, fds, offeredFeatures)
    }

    /// SET_FEATURES: the negotiated features (VHOST_F_LOG_ALL switches dirty logging).
    func setFeatures(_ p: [UInt8], _ fds: [Int32]) throws(RequestFailure) -> Bool {
        try expectSize(p, 8, fds, 0)
        let f = p.readLE(UInt64.self, at: 0)!
        guard f & ~offeredFeatures == 0 else {
            throw RequestFailure(reason: String(format16(f & ~offeredFeatures)) + " not offered")
        }
        let wasLogging = activeLog != nil
        features = f
        featuresSet = true
        log(.info, "features \(format16(f)) (\(VirtqueueOptions(features: f).packed ? "packed" : "split") rings)")
        if mayDriveDevice { device.setNegotiatedFeatures(f & ~(vhostUserFeatureProtocolFeatures | vhostFeatureLogAll)) }
        if wasLogging != (activeLog != nil) {
            log(.info, "dirty logging \(activeLog != nil ? "on" : "off") (live migration)")
            applyDirtyLog()
        }
        return false
    }

    /// GET_PROTOCOL_FEATURES: the protocol features offered.
    func getProtocolFeatures(_ p: [UInt8], _ fds: [Int32]) throws(RequestFailure) -> Bool {
        try replyU64(.getProtocolFeatures, p, fds, offeredProtocolFeatures)
    }

    /// SET_PROTOCOL_FEATURES: the negotiated protocol features.
    func setProtocolFeatures(_ p: [UInt8], _ fds: [Int32]) throws(RequestFailure) -> Bool {
        try expectSize(p, 8, fds, 0)
        let f = p.readLE(UInt64.self, at: 0)!
        guard f & ~offeredProtocolFeatures == 0 else { throw RequestFailure(reason: "protocol features \(format16(f)) not offered") }
        protocolFeatures = f
        if mayDriveDevice { updateConfigNotifier() }
        return false
    }

    /// SET_OWNER: nothing to do (one session per connection).
    func setOwner(_ p: [UInt8], _ fds: [Int32]) throws(RequestFailure) -> Bool {
        try expectSize(p, 0, fds, 0)
        return false
    }

    /// RESET_OWNER, RESET_DEVICE: stops every ring and forgets the negotiated features.
    func resetOwner(_ p: [UInt8], _ fds: [Int32]) throws(RequestFailure) -> Bool {
        try expectSize(p, 0, fds, 0)
        stopAllRings()
        features = 0
        featuresSet = false
        return false
    }

    /// GET_QUEUE_NUM: how many queues the device has.
    func getQueueNum(_ p: [UInt8], _ fds: [Int32]) throws(RequestFailure) -> Bool {
        try replyU64(.getQueueNum, p, fds, UInt64(rings.count))
    }

    /// GET_MAX_MEM_SLOTS: how many regions ADD_MEM_REG may map.
    func getMaxMemSlots(_ p: [UInt8], _ fds: [Int32]) throws(RequestFailure) -> Bool {
        try replyU64(.getMaxMemSlots, p, fds, UInt64(VhostUserWire.maxMemSlots))
    }

    /// SET_MEM_TABLE: the whole guest memory table, one fd per region.
    func setMemTable(_ p: [UInt8], _ fds: [Int32]) throws(RequestFailure) -> Bool {
        guard p.count >= 8, let n = p.readLE(UInt32.self, at: 0) else { throw RequestFailure(reason: "short memory table") }
        guard n >= 1, Int(n) <= VhostUserWire.maxMemTableRegions else { throw RequestFailure(reason: "\(n) memory regions") }
        try expectSize(p, 8 + 32 * Int(n), fds, Int(n))
        var table: [(GuestMemoryRegionDescriptor, Int32)] = []
        for i in 0..<Int(n) {
            table.append((region(p, at: 8 + 32 * i), fds[i]))
        }
        do {
            let newMemory = try GuestMemory.map(table, limit: VhostUserWire.maxMemTableRegions)
            install(newMemory)
            log(.info, "memory table: \(n) region(s)")
        } catch {
            throw RequestFailure(reason: "memory table: \(error)")
        }
        return false
    }

    /// Makes `newMemory` the session's memory table, and the running rings' (their queue groups switch over).
    private func install(_ newMemory: GuestMemory) {
        memory = newMemory
        if runsRings { device.updateMemory(newMemory) }
    }

    /// ADD_MEM_REG: one more guest memory region (CONFIGURE_MEM_SLOTS).
    func addMemReg(_ p: [UInt8], _ fds: [Int32]) throws(RequestFailure) -> Bool {
        try expectSize(p, 40, fds, 1)
        let d = region(p, at: 8)
        do {
            let mapped = try MappedGuestRegion(d, fd: fds[0], index: memory.regionCount)
            let newMemory = try memory.adding(mapped, limit: VhostUserWire.maxMemSlots)
            install(newMemory)
            log(.info, "memory region added: guest 0x\(String(d.guestPhysicalAddress, radix: 16)), \(d.size) bytes; \(newMemory.regionCount) region(s)")
        } catch {
            throw RequestFailure(reason: "add region: \(error)")
        }
        return false
    }

    /// REM_MEM_REG: removes the region with these addresses.
    func remMemReg(_ p: [UInt8], _ fds: [Int32]) throws(RequestFailure) -> Bool {
        guard p.count == 40, fds.count <= 1 else { throw RequestFailure(reason: "bad REM_MEM_REG size \(p.count) / fds \(fds.count)") }
        do {
            let newMemory = try memory.removing(region(p, at: 8))
            install(newMemory)
            log(.info, "memory region removed: \(newMemory.regionCount) region(s) left")
        } catch {
            throw RequestFailure(reason: "remove region: \(error)")
        }
        return false
    }

    /// SET_VRING_NUM: a stopped ring's size.
    func setVringNum(_ p: [UInt8], _ fds: [Int32]) throws(RequestFailure) -> Bool {
        try expectSize(p, 8, fds, 0)
        let i = try ringIndex(p.readLE(UInt32.self, at: 0)!)
        let num = Int(p.readLE(UInt32.self, at: 4)!)
        guard num >= 1, num <= device.maxQueueSize else {
            throw RequestFailure(reason: "ring \(i) size \(num) outside 1...\(device.maxQueueSize)")
        }
        // virtio 1.2 2.7: a split ring's Queue Size is a power of 2; a packed ring's need not be.
        guard VirtqueueOptions(features: features).packed || num & (num - 1) == 0 else {
            throw RequestFailure(reason: "ring \(i) size \(num) of a split ring is not a power of 2")
        }
        guard !rings[i].running else { throw RequestFailure(reason: "ring \(i) is running") }
        rings[i].size = num
        return false
    }

    /// SET_VRING_ADDR: a ring's addresses (and its used-ring log address); on a running ring only the logging may change.
    func setVringAddr(_ p: [UInt8], _ fds: [Int32]) throws(RequestFailure) -> Bool {
        try expectSize(p, 40, fds, 0)
        let i = try ringIndex(p.readLE(UInt32.self, at: 0)!)
        let flags = p.readLE(UInt32.self, at: 4)!
        guard flags & ~vhostVringFlagLog == 0 else { throw RequestFailure(reason: "ring \(i): address flags \(flags)") }
        let addresses = VirtqueueAddresses(descriptorTable: p.readLE(UInt64.self, at: 8)!,
                                           driverArea: p.readLE(UInt64.self, at: 24)!,
                                           deviceArea: p.readLE(UInt64.self, at: 16)!)
        let logAddress: UInt64? = flags & vhostVringFlagLog != 0 ? p.readLE(UInt64.self, at: 32)! : nil
        // A running ring may only switch used-ring logging (QEMU resends the same addresses for that).
        guard !rings[i].running || rings[i].addresses == addresses else { throw RequestFailure(reason: "ring \(i) is running") }
        rings[i].addresses = addresses
        rings[i].logAddress = logAddress
        if rings[i].running { device.setDirtyLog(i, activeLog, usedRingLogAddress: logAddress) }
        return false
    }

    /// SET_VRING_BASE: where a stopped ring starts.
    func setVringBase(_ p: [UInt8], _ fds: [Int32]) throws(RequestFailure) -> Bool {
        try expectSize(p, 8, fds, 0)
        let i = try ringIndex(p.readLE(UInt32.self, at: 0)!)
        guard !rings[i].running else { throw RequestFailure(reason: "ring \(i) is running") }
        rings[i].base = p.readLE(UInt32.self, at: 4)!
        return false
    }

    /// GET_VRING_BASE: stops the ring (draining its requests) and replies where it stopped.
    func getVringBase(_ p: [UInt8], _ fds: [Int32]) throws(RequestFailure) -> Bool {
        try expectSize(p, 8, fds, 0, own: true)
        let raw = p.readLE(UInt32.self, at: 0)!
        guard Int(raw) < rings.count else { throw RequestFailure(reason: "ring index \(raw)", hasOwnReply: true) }
        let base = stopRing(Int(raw))
        var reply = [UInt8]()
        reply.appendLE(raw)
        reply.appendLE(base)
        send(VhostUserRequest.getVringBase.rawValue, reply)
        return true
    }

    /// SET_VRING_KICK / SET_VRING_CALL / SET_VRING_ERR payload: the ring index in bits 0-7, bit 8 "no fd";
    /// returns the ring and the fd taken from the message (-1 with bit 8).
    func vringFD(_ p: [UInt8], _ fds: inout [Int32]) throws(RequestFailure) -> (ring: Int, fd: Int32) {
        try expectSize(p, 8, fds, fds.count)
        let v = p.readLE(UInt64.self, at: 0)!
        let i = try ringIndex(UInt32(v & 0xFF))
        let noFD = v & 0x100 != 0
        guard v & ~UInt64(0x1FF) == 0 else { throw RequestFailure(reason: "reserved bits in \(format16(v))") }
        guard fds.count == (noFD ? 0 : 1) else { throw RequestFailure(reason: "\(fds.count) fds with flag \(noFD ? "no-fd" : "fd")") }
        return (i, noFD ? -1 : fds.removeFirst())
    }

    /// SET_VRING_KICK: the ring's kick eventfd; (re)starts the ring.
    func setVringKick(_ p: [UInt8], _ fds: inout [Int32]) throws(RequestFailure) -> Bool {
        let (i, newFD) = try vringFD(p, &fds)
        guard newFD >= 0 else { throw RequestFailure(reason: "ring \(i): polling without a kick fd is not supported") }
        if rings[i].running { _ = stopRing(i) }
        if rings[i].kickFD >= 0 { close(rings[i].kickFD) }
        rings[i].kickFD = newFD
        if protocolFeatures == 0 && features & vhostUserFeatureProtocolFeatures == 0 { rings[i].enabled = true }
        try startRing(i)
        return false
    }

    /// SET_VRING_CALL: the ring's call eventfd (-1: none), replaced in a running ring's queue group.
    func setVringCall(_ p: [UInt8], _ fds: inout [Int32]) throws(RequestFailure) -> Bool {
        let (i, newFD) = try vringFD(p, &fds)
        if rings[i].running {
            let old = device.replaceCallFD(i, with: newFD)
            if let old, old >= 0 { close(old) }
        } else if rings[i].callFD >= 0 {
            close(rings[i].callFD)
        }
        rings[i].callFD = newFD
        return false
    }

    /// SET_VRING_ERR: the ring's error eventfd (kept, not signalled).
    func setVringErr(_ p: [UInt8], _ fds: inout [Int32]) throws(RequestFailure) -> Bool {
        let (i, newFD) = try vringFD(p, &fds)
        if rings[i].errFD >= 0 { close(rings[i].errFD) }
        rings[i].errFD = newFD
        return false
    }

    /// SET_VRING_ENABLE: enables or disables a ring.
    func setVringEnable(_ p: [UInt8], _ fds: [Int32]) throws(RequestFailure) -> Bool {
        try expectSize(p, 8, fds, 0)
        let i = try ringIndex(p.readLE(UInt32.self, at: 0)!)
        let state = p.readLE(UInt32.self, at: 4)!
        guard state <= 1 else { throw RequestFailure(reason: "enable state \(state)") }
        rings[i].enabled = state == 1
        if rings[i].running { device.setQueueEnabled(i, state == 1) }
        return false
    }

    /// GET_CONFIG: a range of the device's config space, zero-padded.
    func getConfig(_ p: [UInt8], _ fds: [Int32]) throws(RequestFailure) -> Bool {
        guard p.count >= 12, p.count <= 12 + VhostUserWire.maxConfigSize, fds.isEmpty else {
            throw RequestFailure(reason: "GET_CONFIG size \(p.count)", hasOwnReply: true)
        }
        let offset = Int(p.readLE(UInt32.self, at: 0)!)
        let size = Int(p.readLE(UInt32.self, at: 4)!)
        // The device's config space, zero-padded to the largest a front-end may ask for.
        var config = device.readConfig()
        if config.count < VhostUserWire.maxConfigSize { config += [UInt8](repeating: 0, count: VhostUserWire.maxConfigSize - config.count) }
        var reply = [UInt8]()
        reply.appendLE(UInt32(offset))
        if size == p.count - 12, offset <= config.count, size <= config.count - offset {
            reply.appendLE(UInt32(size))
            reply.appendLE(UInt32(0))
            reply += config[offset..<(offset + size)]
        } else {
            log(.warning, "GET_CONFIG offset \(offset) size \(size) outside \(config.count) bytes")
            reply.appendLE(UInt32(0))
            reply.appendLE(UInt32(0))
        }
        send(VhostUserRequest.getConfig.rawValue, reply)
        return true
    }

    /// SET_CONFIG: writes the device's config space (the device decides what it accepts).
    func setConfig(_ p: [UInt8], _ fds: [Int32]) throws(RequestFailure) -> Bool {
        guard p.count >= 12, p.count <= 12 + VhostUserWire.maxConfigSize, fds.isEmpty else {
            throw RequestFailure(reason: "SET_CONFIG size \(p.count)")
        }
        let offset = Int(p.readLE(UInt32.self, at: 0)!)
        let size = Int(p.readLE(UInt32.self, at: 4)!)
        guard size == p.count - 12 else { throw RequestFailure(reason: "SET_CONFIG size field \(size)") }
        guard device.writeConfig(offset: offset, bytes: Array(p[12...])) else {
            throw RequestFailure(reason: "SET_CONFIG offset \(offset) size \(size) refused")
        }
        return false
    }

    /// SET_BACKEND_REQ_FD: the channel for back-end requests (config change notifications).
    func setBackendReqFD(_ p: [UInt8], _ fds: inout [Int32]) throws(RequestFailure) -> Bool {
        try expectSize(p, 0, fds, 1)
        let old = backendReqFD
        backendReqFD = fds.removeFirst()
        if mayDriveDevice {
            server.setBackendChannel(backendReqFD)
            updateConfigNotifier()
        }
        if old >= 0 { close(old) }
        return false
    }

    /// GET_INFLIGHT_FD: creates the shared in-flight region and sends its fd.
    func getInflightFD(_ p: [UInt8], _ fds: [Int32]) throws(RequestFailure) -> Bool {
        guard p.count == 24 || p.count == 20, fds.isEmpty else { throw RequestFailure(reason: "GET_INFLIGHT_FD size \(p.count)", hasOwnReply: true) }
        let queues = Int(p.readLE(UInt16.self, at: 16)!)
        let size = Int(p.readLE(UInt16.self, at: 18)!)
        guard queues >= 1, queues <= rings.count, size >= 1, size <= device.maxQueueSize else {
            throw RequestFailure(reason: "inflight for \(queues) queues of \(size)", hasOwnReply: true)
        }
        let mapping: InflightMapping
        do { mapping = try InflightMapping.create(queues: queues, queueSize: size) } catch {
            throw RequestFailure(reason: "\(error)", hasOwnReply: true)
        }
        inflight = mapping
        log(.info, "in-flight region created: \(queues) queue(s) of \(size), \(mapping.length) bytes")
        var reply = [UInt8]()
        reply.appendLE(UInt64(mapping.length))
        reply.appendLE(UInt64(0))
        reply.appendLE(UInt16(queues))
        reply.appendLE(UInt16(size))
        reply.appendLE(UInt32(0))
        send(VhostUserRequest.getInflightFD.rawValue, reply, fds: [mapping.fd])
        return true
    }

    /// SET_INFLIGHT_FD: adopts the in-flight region a reconnecting front-end kept.
    func setInflightFD(_ p: [UInt8], _ fds: inout [Int32]) throws(RequestFailure) -> Bool {
        guard p.count == 24 || p.count == 20 else { throw RequestFailure(reason: "SET_INFLIGHT_FD size \(p.count)") }
        guard fds.count == 1 else { throw RequestFailure(reason: "SET_INFLIGHT_FD with \(fds.count) fds") }
        let length = p.readLE(UInt64.self, at: 0)!
        let offset = p.readLE(UInt64.self, at: 8)!
        let queues = Int(p.readLE(UInt16.self, at: 16)!)
        let size = Int(p.readLE(UInt16.self, at: 18)!)
        guard queues >= 1, queues <= rings.count, size >= 1, size <= device.maxQueueSize else {
            throw RequestFailure(reason: "inflight for \(queues) queues of \(size)")
        }
        do {
            inflight = try InflightMapping.adopt(fd: fds.removeFirst(), length: length, offset: offset,
                                                 queues: queues, queueSize: size)
            log(.info, "in-flight region adopted: \(queues) queue(s) of \(size)")
        } catch {
            throw RequestFailure(reason: "\(error)")
        }
        return false
    }

    /// SET_LOG_BASE: maps the dirty-page log (live migration) and replies that it is in use.
    func setLogBase(_ p: [UInt8], _ fds: inout [Int32]) throws(RequestFailure) -> Bool {
        // Payload: mmap_size u64, mmap_offset u64; the log memfd in the ancillary data. The reply (same
        // request, empty payload) tells the front-end the log is in use: QEMU waits for it.
        try expectSize(p, 16, fds, 1, own: true)
        let size = p.readLE(UInt64.self, at: 0)!
        let offset = p.readLE(UInt64.self, at: 8)!
        do {
            dirtyLog = try DirtyLog(fd: fds.removeFirst(), size: size, offset: offset)
        } catch {
            throw RequestFailure(reason: "dirty log: \(error)", hasOwnReply: true)
        }
        log(.info, "dirty log: \(size) bytes (\(size * 8) pages of 4 KiB)\(activeLog != nil ? ", logging on" : "")")
        applyDirtyLog()
        send(VhostUserRequest.setLogBase.rawValue, [])
        return true
    }

    /// SET_LOG_FD: the log-call eventfd; this back-end marks the log synchronously and never signals it.
    func setLogFD(_ p: [UInt8], _ fds: [Int32]) throws(RequestFailure) -> Bool {
        // The log-call eventfd: this back-end marks the log synchronously and never signals it.
        try expectSize(p, 0, fds, 1)
        return false
    }
}
