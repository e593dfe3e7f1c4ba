import BlockIO
import CSystem
import SCSI
import TestSupport
import Testing
@testable import VfioUserVirtio
import VirtioDevices
import VirtioTestSupport
#if canImport(Glibc)
import Glibc
#endif

private func env(_ name: String) -> String? { getenv(name).map { String(cString: $0) } }

/// Serves a virtio-blk (or, with SCSIGATE_VFU_KIND=scsi, virtio-scsi) function on an in-memory 64 MiB disk for a real
/// QEMU (`-device vfio-user-pci`) started outside the test. Only runs when SCSIGATE_VFU_SERVE_SOCKET names the
/// socket; ends when the client disconnects (or after SCSIGATE_VFU_SERVE_SECONDS, default 300) and checks that
/// the guest's driver ran I/O through it.
@Suite struct VfioUserVirtioRealQEMUTests {
    @Test(.enabled(if: env("SCSIGATE_VFU_SERVE_SOCKET") != nil))
    func serveForRealQEMU() throws {
        let path = env("SCSIGATE_VFU_SERVE_SOCKET")!
        let seconds = Int(env("SCSIGATE_VFU_SERVE_SECONDS") ?? "") ?? 300
        let blocks: UInt64 = 131072
        let channel = MemoryChannel(bytes: Int(blocks) * 512)
        let say = TestLog.logger { _, line in
            let text = "[scsigate] \(line)\n"
            _ = text.withCString { write(2, $0, strlen($0)) }
        }
        let geometry = BlockGeometry(logicalBlockSize: 512, physicalBlockSize: 512, blockCount: blocks)
        var connected: () -> Bool
        var stop: () -> Void
        if env("SCSIGATE_VFU_KIND") == "scsi" {
            let target = SCSITarget(name: "qemu")
            try target.add(LogicalUnit(number: LogicalUnitNumber(0)!, identity: LogicalUnitIdentity(serial: "SGVFU0", naa: 0x5000_0000_0000_0001),
                                       geometry: geometry, backendID: 0))
            let device = try VirtioSCSIDevice(target: target, options: VirtioSCSIOptions(requestQueues: 1, maxQueueSize: 256, expectedQueueSize: 128),
                                              channelFactory: { _ in channel }, log: say)
            let c = try VfioUserVirtioController(socketPath: path, device: device, kind: .scsi, log: say)
            try c.start()
            connected = { c.server.clientFD >= 0 }
            stop = { c.stop() }
        } else {
            let device = try VirtioBlkDevice(geometry: geometry, options: VirtioBlkOptions(queues: 1, maxQueueSize: 256, expectedQueueSize: 128,
                                                                                        serial: "SG-VFU-QEMU"),
                                             channelFactory: { channel }, log: say)
            let c = try VfioUserVirtioController(socketPath: path, device: device, kind: .blk, log: say)
            try c.start()
            connected = { c.server.clientFD >= 0 }
            stop = { c.stop() }
        }
        var seen = false
        for _ in 0..<(seconds * 10) {
            usleep(100_000)
            // clientFD is an Int32 the loop thread writes; a torn read is impossible and a stale one costs a tick.
            let now = connected()
            if now { seen = true }
            if seen && !now { break }
        }
        stop()
        let ops = channel.operations.withLock { $0 }
        say.info("guest I/O: \(ops.count) requests (\(ops.filter { $0 == .write }.count) writes, \(ops.filter { $0 == .read }.count) reads)")
        #expect(seen)
        #expect(ops.contains(.write) && ops.contains(.read))
    }
}
