// swift-tools-version:6.3
import PackageDescription

let package = Package(
    name: "ScsiGate",
    products: [
        .executable(name: "scsigate", targets: ["scsigate"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/LebJe/TOMLKit", from: "0.6.0"),
    ],
    targets: [
        // C shims for Linux APIs that Glibc does not export to Swift (eventfd, memfd, CMSG, ioctls).
        .target(name: "CSystem", cSettings: [.define("_GNU_SOURCE")]),
        // libaio (libaio-dev ships no pkg-config file).
        .systemLibrary(name: "CLibAIO", providers: [.apt(["libaio-dev"])]),
        // libiscsi (asynchronous iSCSI initiator).
        .systemLibrary(name: "CLibISCSI", pkgConfig: "libiscsi", providers: [.apt(["libiscsi-dev"])]),
        // `SystemCallError`, the one errno-carrying error (call, errno, context): its own module because BlockIO, the
        // lowest module that reports system-call failures, depends on nothing else (not EventLoop, not CSystem).
        .target(name: "SystemErrors"),
        // Vectored block I/O vocabulary shared by the SCSI core, back-ends and front-ends.
        .target(name: "BlockIO", dependencies: ["SystemErrors"]),
        // The transport-agnostic SCSI target core (SPC-4 / SBC-3).
        .target(name: "SCSI", dependencies: ["BlockIO"]),
        // LUN providers: libaio file/block device, buffered, null (the iSCSI one is ISCSIBackend; the gateway chooses).
        .target(name: "Backends", dependencies: ["BlockIO", "SystemErrors", "CSystem", "CLibAIO"]),
        // Remote iSCSI LUNs as a back-end (libiscsi async API, driven by the owner event loop).
        .target(name: "ISCSIBackend", dependencies: ["BlockIO", "CLibISCSI", "CSystem", .product(name: "Logging", package: "swift-log")]),
        // One epoll reactor per queue group, with adaptive polling.
        .target(name: "EventLoop", dependencies: ["CSystem", "SystemErrors"]),
        // Guest memory: mapped regions (reference counted) and checked translation of guest addresses, the one type both
        // transports produce (the vhost-user memory table, the vfio-user DMA windows with an fd). No transport.
        .target(name: "GuestMemoryMap", dependencies: ["CSystem"]),
        // Virtqueues over guest memory (split, packed, indirect, EVENT_IDX).
        .target(name: "Virtio", dependencies: ["GuestMemoryMap", "BlockIO", "CSystem", "EventLoop"]),
        // The virtio-scsi and virtio-blk device models (config space, features, queue groups, requests), transport-neutral.
        .target(name: "VirtioDevices", dependencies: ["GuestMemoryMap", "Virtio", "SCSI", "BlockIO", "CSystem", "EventLoop", "SystemErrors", .product(name: "Logging", package: "swift-log")]),
        // vhost-user back-end server hosting the virtio device models.
        .target(name: "VhostUser", dependencies: ["VirtioDevices", "Virtio", "GuestMemoryMap", "SCSI", "BlockIO", "CSystem", "EventLoop", "SystemErrors", .product(name: "Logging", package: "swift-log")]),
        // vfio-user server (PCI config space, BARs, MSI-X, DMA windows: those with an fd as a GuestMemoryMap table).
        .target(name: "VfioUser", dependencies: ["GuestMemoryMap", "CSystem", "EventLoop", "SystemErrors", .product(name: "Logging", package: "swift-log")]),
        // The virtio device models as modern virtio-pci functions over vfio-user (no other transport imported).
        .target(name: "VfioUserVirtio", dependencies: ["VfioUser", "VirtioDevices", "Virtio", "GuestMemoryMap", "CSystem", "EventLoop", "SystemErrors", .product(name: "Logging", package: "swift-log")]),
        // The PVSCSI device model.
        .target(name: "PVSCSI", dependencies: ["VfioUser", "SCSI", "BlockIO", "CSystem", "EventLoop", "SystemErrors", .product(name: "Logging", package: "swift-log")]),
        // Config, daemon wiring, control socket.
        .target(name: "Gateway", dependencies: [
            "ISCSIBackend",
            "SCSI", "BlockIO", "Backends", "VirtioDevices", "VhostUser", "VfioUserVirtio", "PVSCSI", "CSystem", "EventLoop", "SystemErrors",
            .product(name: "Logging", package: "swift-log"),
            .product(name: "TOMLKit", package: "TOMLKit"),
        ], resources: [.embedInCode("DefaultConfig/scsigate.toml")]),
        .executableTarget(name: "scsigate", dependencies: [
            "Gateway",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        // Core micro-benchmark: READ(10)/WRITE(10) through execute/resume against a null back-end.
        .executableTarget(name: "core-bench", dependencies: ["SCSI", "BlockIO"], path: "Benchmarks/CoreBench"),
        // QoS benchmark: per-LUN IOPS limit held across threads while an unlimited LUN keeps its speed.
        .executableTarget(name: "qos-bench", dependencies: ["Gateway", "Backends", "BlockIO"], path: "Benchmarks/QoSBench"),
        // Virtqueue micro-benchmark: the data-path cost of dirty logging (live migration), off vs on.
        .executableTarget(name: "ring-bench", dependencies: ["Virtio", "GuestMemoryMap", "CSystem"], path: "Benchmarks/RingBench"),
        // libFuzzer targets for every guest- and client-facing parser (Tests/Fuzz, README "Fuzzing"). They build in
        // every debug build so that they follow API changes; Tests/Fuzz/fuzz.sh links scsigate-fuzz with
        // -sanitize=fuzzer,address -DFUZZING (libFuzzer's main) into .build/fuzz. Without FUZZING it replays inputs.
        .target(name: "FuzzTargets", dependencies: [
            "TestSupport", "GuestMemoryMap", "Virtio", "VirtioDevices", "VhostUser", "VfioUser", "VfioUserVirtio", "PVSCSI", "SCSI", "BlockIO", "Backends", "Gateway", "CSystem",
            .product(name: "Logging", package: "swift-log"),
        ], path: "Tests/Fuzz/Targets"),
        .executableTarget(name: "scsigate-fuzz", dependencies: ["FuzzTargets"], path: "Tests/Fuzz/Main"),
        .testTarget(name: "FuzzTests", dependencies: ["FuzzTargets"]),
        // What the test targets share: a swift-log Logger that records lines (TestLog), scratch directories, aligned
        // I/O buffers, waiting for a channel's completions, running a program.
        .target(name: "TestSupport", dependencies: ["BlockIO", .product(name: "Logging", package: "swift-log")], path: "Tests/TestSupport"),
        .testTarget(name: "EventLoopTests", dependencies: ["EventLoop", "CSystem"]),
        .testTarget(name: "SCSITests", dependencies: ["SCSI", "BlockIO"]),
        .testTarget(name: "BlockIOTests", dependencies: ["BlockIO"]),
        .testTarget(name: "BackendsTests", dependencies: ["TestSupport", "Backends", "BlockIO", "CSystem", "SystemErrors"]),
        .testTarget(name: "ISCSIBackendTests", dependencies: ["TestSupport", "ISCSIBackend", "BlockIO", "EventLoop", "SCSI", .product(name: "Logging", package: "swift-log")]),
        .testTarget(name: "GuestMemoryMapTests", dependencies: ["GuestMemoryMap", "CSystem"]),
        .testTarget(name: "VirtioTests", dependencies: ["Virtio", "GuestMemoryMap", "BlockIO", "CSystem"]),
        // Guest RAM, driver-side rings, an in-memory back-end and log helpers shared by the virtio transports' tests.
        .target(name: "VirtioTestSupport", dependencies: ["TestSupport", "VirtioDevices", "Virtio", "GuestMemoryMap", "BlockIO", "CSystem"], path: "Tests/VirtioTestSupport"),
        // The vhost-user front-end (the VMM side) and a virtio-scsi guest driver over it, shared by the vhost-user and integration tests.
        .target(name: "VhostUserTestSupport", dependencies: ["VirtioTestSupport", "VhostUser", "VirtioDevices", "Virtio", "CSystem"], path: "Tests/VhostUserTestSupport"),
        .testTarget(name: "VhostUserTests", dependencies: ["TestSupport", "VirtioTestSupport", "VhostUserTestSupport", "VhostUser", "VirtioDevices", "Virtio", "GuestMemoryMap", "SCSI", "BlockIO", "CSystem", "Backends", "Gateway"]),
        .testTarget(name: "VfioUserTests", dependencies: ["VfioUser", "GuestMemoryMap", "CSystem"]),
        // The PVSCSI guest driver over the vfio-user test client, in-memory disks and the command target, CDB builders:
        // shared by the PVSCSI and integration tests.
        .target(name: "PVSCSITestSupport", dependencies: ["TestSupport", "VfioUserTestSupport", "PVSCSI", "VfioUser", "SCSI", "BlockIO", "CSystem"], path: "Tests/PVSCSITestSupport"),
        .testTarget(name: "PVSCSITests", dependencies: ["TestSupport", "VfioUserTestSupport", "PVSCSITestSupport", "PVSCSI", "VfioUser", "SCSI", "BlockIO", "Backends", "Gateway", "CSystem", "ISCSIBackend"]),
        // The vfio-user test client (the role QEMU's vfio-user-pci plays), shared by the PVSCSI and virtio-pci tests.
        .target(name: "VfioUserTestSupport", dependencies: ["TestSupport", "VfioUser", "CSystem"], path: "Tests/VfioUserTestSupport"),
        .testTarget(name: "VfioUserVirtioTests", dependencies: [
            "TestSupport", "VfioUserTestSupport", "VirtioTestSupport", "VfioUserVirtio", "VfioUser", "VirtioDevices", "Virtio", "GuestMemoryMap", "SCSI", "BlockIO", "CSystem",
        ]),
        // Cross-layer suites: the gateway with a transport (hotplug), transports over real back-ends, iSCSI task
        // management through virtio-scsi against tgtd, and the servers for a real QEMU started outside the test.
        .testTarget(name: "IntegrationTests", dependencies: [
            "TestSupport", "VirtioTestSupport", "VhostUserTestSupport", "VfioUserTestSupport", "PVSCSITestSupport", "VhostUser",
            "VfioUserVirtio", "VfioUser", "PVSCSI", "VirtioDevices", "Virtio", "SCSI", "BlockIO", "CSystem", "Backends", "Gateway", "ISCSIBackend",
        ]),
        .testTarget(name: "GatewayTests", dependencies: ["TestSupport", "Gateway", "SCSI", "Backends", "BlockIO", "SystemErrors", "ISCSIBackend"]),
    ],
    swiftLanguageModes: [.v6]
)
