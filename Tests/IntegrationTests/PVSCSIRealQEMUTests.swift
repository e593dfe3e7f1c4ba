import PVSCSITestSupport
import CSystem
import PVSCSI
import SCSI
import TestSupport
import Testing
#if canImport(Glibc)
import Glibc
#endif

private func say(_ line: String) {
    let text = "[scsigate] \(line)\n"
    _ = text.withCString { write(2, $0, strlen($0)) }
}

private func env(_ name: String) -> String? {
    guard let v = getenv(name) else { return nil }
    return String(cString: v)
}

/// Serves a PVSCSI controller for a real QEMU (`-device vfio-user-pci`) started outside the test, with the
/// real SCSI core and in-memory LUNs. Only runs when SCSIGATE_PVSCSI_SERVE_SOCKET names the socket:
///   SCSIGATE_PVSCSI_SERVE_SECONDS  (default 300) upper bound on serving time
///   SCSIGATE_PVSCSI_MAX_TARGETS    numPhys in the controller config page (default 16)
///   SCSIGATE_PVSCSI_HOTPLUG        "ADD_AFTER,REMOVE_AFTER" seconds after the client connects: add LUN 1, then remove it
/// It ends when the client disconnects and checks that the guest did I/O and no request was malformed.
@Suite struct PVSCSIRealQEMUTests {
    @Test(.enabled(if: env("SCSIGATE_PVSCSI_SERVE_SOCKET") != nil))
    func servePVSCSIForRealQEMU() throws {
        let path = env("SCSIGATE_PVSCSI_SERVE_SOCKET")!
        let seconds = Int(env("SCSIGATE_PVSCSI_SERVE_SECONDS") ?? "") ?? 300
        let hotplug = (env("SCSIGATE_PVSCSI_HOTPLUG") ?? "").split(separator: ",").compactMap { Int($0) }
        let table = SCSITarget(name: "qemu")
        let blocks: UInt64 = 131072  // 64 MiB
        let registry = ChannelRegistry(disks: [0: MemoryDisk(blocks: blocks)])
        try table.add(makeUnit(0, blocks: blocks, backendID: 0))
        let target = TestCommandTarget(table: table, useCore: true)
        var options = PVSCSIOptions()
        if let n = UInt32(env("SCSIGATE_PVSCSI_MAX_TARGETS") ?? "") { options.maxTargets = n }
        let controller = try PVSCSIController(socketPath: path, target: target, options: options, channelFactory: { registry.channel($0) },
                                              log: TestLog.logger { _, line in say(line) })
        try controller.start()
        defer { controller.stop() }
        let server = controller.server
        let device = controller.device
        var connectedAt: Int? = nil
        var added = false, removed = false
        var t = 0
        while t < seconds * 10 {
            usleep(100_000)
            t += 1
            let connected = controller.sync { server.clientFD >= 0 }
            if connected && connectedAt == nil { connectedAt = t }
            if !connected && connectedAt != nil { break }
            if let c = connectedAt, hotplug.count == 2 {
                if !added && t - c >= hotplug[0] * 10 {
                    registry.addDisk(1, MemoryDisk(blocks: 65536))
                    try table.add(makeUnit(1, blocks: 65536, backendID: 1))
                    say("hot-added LUN 1 (PVSCSI target 1)")
                    added = true
                }
                if added && !removed && t - c >= hotplug[1] * 10 {
                    try table.remove(LogicalUnitNumber(1)!)
                    say("hot-removed LUN 1")
                    removed = true
                }
            }
        }
        let stats = controller.sync { device.stats }
        say("stats: \(stats)")
        #expect(connectedAt != nil)
        #expect(stats.requests > 0)
        #expect(stats.invalidRequests == 0)
    }
}
