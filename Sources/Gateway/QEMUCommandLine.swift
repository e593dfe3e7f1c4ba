/// The QEMU arguments that attach a controller: the one generator, for the start-up log, `check-config`
/// and the README (the transports print none of their own).
public enum QEMUCommandLine {
    /// Guest RAM shared with the gateway (vhost-user and vfio-user map it): `size` like `"1G"`.
    public static func sharedMemoryArguments(size: String = "1G") -> [String] {
        ["-object", "memory-backend-memfd,id=mem0,size=\(size),share=on", "-numa", "node,memdev=mem0"]
    }

    /// The `-chardev`/`-device` arguments of one controller, as QEMU receives them (not shell-quoted:
    /// `shellLine` quotes them).
    public static func deviceArguments(for controller: ControllerConfig) -> [String] {
        let id = "sg-" + controller.name
        switch controller.transport {
        case .vhostUserSCSI:
            return ["-chardev", "socket,id=\(id),path=\(optionValue(controller.socket))",
                    "-device", "vhost-user-scsi-pci,chardev=\(id),num_queues=\(controller.queues),virtqueue_size=\(controller.queueSize)"
                        + (controller.hotplug ? "" : ",hotplug=off")]
        case .vhostUserBlk:
            return ["-chardev", "socket,id=\(id),path=\(optionValue(controller.socket))",
                    "-device", "vhost-user-blk-pci,chardev=\(id),num-queues=\(controller.queues),queue-size=\(controller.queueSize)"]
        case .pvscsi, .vfioUserVirtioSCSI, .vfioUserVirtioBlk:
            // vfio-user-pci takes its socket as a QAPI SocketAddress: JSON syntax of -device. The PCI function
            // (PVSCSI, or virtio-scsi/virtio-blk as virtio-pci) and its queues are the gateway's: QEMU needs no
            // other option. Guest RAM should be fd-backed and shared (sharedMemoryArguments): the device then
            // maps its DMA windows (zero copy). Plain `-m` RAM works too, through DMA_READ/DMA_WRITE messages
            // and bounce buffers (PVSCSI: about 7 round trips per request, limited to 16 targets, the CONFIG
            // page not being host-mapped).
            let socket: JSONValue = .object(["path": .string(controller.socket), "type": .string("unix")])
            return ["-device", JSONValue.object(["driver": .string("vfio-user-pci"), "socket": socket]).serialized]
        }
    }

    /// The controller's arguments as one shell-safe line (what the log and `check-config` print).
    public static func deviceLine(for controller: ControllerConfig) -> String {
        shellLine(deviceArguments(for: controller))
    }

    /// A complete example command line for one controller.
    public static func example(for controller: ControllerConfig) -> String {
        shellLine(["qemu-system-x86_64", "-m", "1G"] + sharedMemoryArguments() + deviceArguments(for: controller))
    }

    /// Joins arguments into one line a POSIX shell splits back into the same arguments: an argument with
    /// anything beyond letters, digits and `-_=,./:@+` is single-quoted.
    public static func shellLine(_ arguments: [String]) -> String {
        arguments.map { a in
            !a.isEmpty && a.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || "-_=,./:@+".contains($0)) })
                ? a : "'" + a.split(separator: "'", omittingEmptySubsequences: false).joined(separator: "'\\''") + "'"
        }.joined(separator: " ")
    }

    /// A value inside a QEMU `key=value,...` option: commas are doubled (QEMU's escape).
    static func optionValue(_ s: String) -> String {
        s.split(separator: ",", omittingEmptySubsequences: false).joined(separator: ",,")
    }
}
