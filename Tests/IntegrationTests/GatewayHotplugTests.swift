import VirtioTestSupport
import VhostUserTestSupport
import Backends
import BlockIO
import CSystem
import Foundation
import Gateway
import SCSI
import Testing
import VhostUser
import VirtioDevices
import Virtio

/// The gateway's own vhost-user-scsi front-end (`VirtioFrontEndFactory` on vhost-user-scsi) under LUN hotplug:
/// statistics reach the gateway's counters, and a removed file LUN can be added again at once after
/// its channels closed, while the front-end stays connected.
@Suite(.serialized) struct GatewayHotplugTests {
    @Test func gatewayFrontEndCountsAndReleasesRemovedLUNs() throws {
        let dir = "/tmp/sg-gwhotplug-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let config = try ConfigLoader.parse("""
            [gateway]
            state_dir = "\(dir)/state"
            control_socket = "\(dir)/run/control.sock"
            [[controller]]
            name = "scsi0"
            transport = "vhost-user-scsi"
            socket = "\(dir)/run/scsi0.sock"
            queues = 2
            [[controller.lun]]
            lun = 0
            backend = "file"
            path = "disk0.img"
            size = "4M"
            create = true
            """, source: "hotplug.toml")
        let gateway = Gateway(config: config, logger: .init(label: "hotplug-test"),
                              frontEnds: FrontEndRegistry([VirtioFrontEndFactory(transport: .vhostUserSCSI)!]))
        try gateway.start()
        defer { gateway.stop() }
        let runtime = try #require(gateway.controller(named: "scsi0"))
        let guest = try #require(TestSCSIGuest(socket: runtime.config.socket, requestQueues: 2))

        _ = guest.command([0x00, 0, 0, 0, 0, 0], lun: 0, queue: 0)
        let pattern = [UInt8](repeating: 0x5A, count: 4096)
        #expect(guest.command([0x2A, 0, 0, 0, 0, 8, 0, 0, 8, 0], lun: 0, queue: 0, out: pattern)?.status == 0)
        #expect(guest.command([0x28, 0, 0, 0, 0, 8, 0, 0, 8, 0], lun: 0, queue: 1, inLength: 4096)?.status == 0)
        let disk = try #require(runtime.target.logicalUnit(LogicalUnitNumber(0)!))
        let stats = try #require(runtime.statistics(backendID: disk.backendID))
        #expect(stats.snapshot(queue: 0).commands(.write) == 1 && stats.snapshot(queue: 0).writeBytes == 4096)
        #expect(stats.snapshot(queue: 1).commands(.read) == 1 && stats.snapshot(queue: 1).readBytes == 4096)
        #expect(stats.snapshot().commands == 3 && stats.inFlight == 0)

        let hot = LUNConfig(lun: 1, backend: .file, path: "\(dir)/state/hot1.img", size: 4 << 20, create: true)
        for round in 0..<5 {
            try gateway.addLUN(hot, to: "scsi0")
            let unit = try #require(runtime.target.logicalUnit(LogicalUnitNumber(1)!))
            let hotStats = try #require(runtime.statistics(backendID: unit.backendID))
            _ = guest.command([0x00, 0, 0, 0, 0, 0], lun: 1, queue: round % 2)
            #expect(guest.command([0x2A, 0, 0, 0, 0, 0, 0, 0, 8, 0], lun: 1, queue: 0, out: pattern)?.status == 0)
            #expect(guest.command([0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0], lun: 1, queue: 1, inLength: 4096)?.data == pattern)
            #expect(hotStats.snapshot().commands == 3 && hotStats.snapshot().readBytes == 4096)
            try gateway.removeLUN(target: 0, lun: 1, from: "scsi0", drainTimeoutMilliseconds: 1000)
            // The front-end closes its channels on the removal; then the file opens (and locks) again.
            var reopened = false
            #expect(waitFor(seconds: 10) {
                guard let b = try? AnyBlockBackend.open(BackendSpec(kind: .file, path: "\(dir)/state/hot1.img")) else { return false }
                b.close()
                reopened = true
                return true
            })
            #expect(reopened, "round \(round): the removed LUN's file stays locked")
        }
        // LUN 0 keeps working (after its REPORTED LUNS DATA HAS CHANGED attention).
        _ = guest.command([0x00, 0, 0, 0, 0, 0], lun: 0, queue: 1)
        #expect(guest.command([0x28, 0, 0, 0, 0, 8, 0, 0, 8, 0], lun: 0, queue: 1, inLength: 4096)?.data == pattern)
    }
}

/// The gateway's vhost-user-blk front-end when its one LUN is removed while a front-end is connected.
@Suite(.serialized) struct GatewayBlkRemovalTests {
    @Test func removingTheBlkLUNClosesItsChannelUnlocksTheFileAndFailsRequests() throws {
        let dir = "/tmp/sg-gwblk-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let config = try ConfigLoader.parse("""
            [gateway]
            state_dir = "\(dir)/state"
            control_socket = "\(dir)/run/control.sock"
            [[controller]]
            name = "blk0"
            transport = "vhost-user-blk"
            socket = "\(dir)/run/blk0.sock"
            [[controller.lun]]
            lun = 0
            backend = "file"
            path = "disk0.img"
            size = "4M"
            create = true
            """, source: "blk.toml")
        let gateway = Gateway(config: config, logger: .init(label: "blk-removal-test"),
                              frontEnds: FrontEndRegistry([VirtioFrontEndFactory(transport: .vhostUserBlk)!]))
        try gateway.start()
        defer { gateway.stop() }
        let runtime = try #require(gateway.controller(named: "blk0"))
        let ram = TestGuestRAM()
        let ring = TestSplitRing(ram: ram, size: 16)
        let client = try #require(TestFrontEnd(path: runtime.config.socket))
        let fds = client.setUp(ram: ram, rings: [ring], features: VirtioFeature.version1 | vhostUserFeatureProtocolFeatures,
                               protocolFeatures: VhostUserProtocolFeature.replyAck | VhostUserProtocolFeature.config)
        defer { close(fds[0].kick); close(fds[0].call) }
        func request(_ type: UInt32, out: [UInt8] = []) -> UInt8? {
            let r = ram.blkRequest(type: type, sector: 8, out: out)
            let before = ring.usedIndex
            ring.publish(ring.addChain(r.buffers))
            _ = csys_eventfd_signal(fds[0].kick, 1)
            guard waitFor(seconds: 5, { ring.usedIndex != before }) else { return nil }
            return ram.pointer(r.status).load(as: UInt8.self)
        }
        func capacity() -> UInt64? {
            var p = [UInt8]()
            p.appendLE(UInt32(0))
            p.appendLE(UInt32(8))
            p.appendLE(UInt32(0))
            p += [UInt8](repeating: 0, count: 8)
            client.send(.getConfig, p)
            guard let r = client.receive(), r.payload.count == 20 else { return nil }
            return r.payload.readLE(UInt64.self, at: 12)
        }
        #expect(request(VirtioBlk.typeOut, out: [UInt8](repeating: 0x42, count: 512)) == VirtioBlk.statusOK)
        #expect(capacity() == 8192)
        let path = "\(dir)/state/disk0.img"
        #expect((try? AnyBlockBackend.open(BackendSpec(kind: .file, path: path))) == nil, "the LUN's file is locked while served")
        _ = try gateway.removeLUN(target: 0, lun: 0, from: "blk0", drainTimeoutMilliseconds: 1000)
        // removeLUN returned after the channel closed: the file opens (and locks) at once.
        let reopened = try? AnyBlockBackend.open(BackendSpec(kind: .file, path: path))
        #expect(reopened != nil, "the removed LUN's file stays locked")
        reopened?.close()
        #expect(capacity() == 0)
        #expect(request(VirtioBlk.typeOut, out: [UInt8](repeating: 0x43, count: 512)) == VirtioBlk.statusIOError)
        #expect(request(VirtioBlk.typeFlush) == VirtioBlk.statusIOError)

        // Added again (a bigger file this time): the disk comes back with the new capacity, the
        // front-end is told (config change on the backend channel) and requests reach the file.
        try gateway.addLUN(LUNConfig(lun: 0, backend: .file, path: "\(dir)/state/disk1.img", size: 8 << 20, create: true),
                           to: "blk0")
        #expect(waitFor(seconds: 5, { capacity() == 16384 }))
        #expect(request(VirtioBlk.typeOut, out: [UInt8](repeating: 0x44, count: 512)) == VirtioBlk.statusOK)
        #expect(request(VirtioBlk.typeFlush) == VirtioBlk.statusOK)
        let disk1 = try #require(FileHandle(forReadingAtPath: "\(dir)/state/disk1.img"))
        try disk1.seek(toOffset: 8 * 512)
        #expect(disk1.readData(ofLength: 512) == Data(repeating: 0x44, count: 512))
        try disk1.close()
        // A LUN with another block size cannot become this disk: refused, logged, the disk stays detached.
        _ = try gateway.removeLUN(target: 0, lun: 0, from: "blk0", drainTimeoutMilliseconds: 1000)
        try gateway.addLUN(LUNConfig(lun: 0, backend: .file, path: "\(dir)/state/disk2.img", size: 8 << 20, blockSize: 4096,
                                     create: true), to: "blk0")
        #expect(capacity() == 0)
        #expect(request(VirtioBlk.typeFlush) == VirtioBlk.statusIOError)
    }
}
