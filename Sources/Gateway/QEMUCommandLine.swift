/// The QEMU arguments that attach a controller, for logs, `check-config` and the README.
public enum QEMUCommandLine {
    /// Guest RAM shared with the gateway (vhost-user and vfio-user map it): `size` like `"1G"`.
    public static func sharedMemoryArguments(size: String = "1G") -> [String] {
        ["-object", "memory-backend-memfd,id=mem0,size=\(size),share=on", "-numa", "node,memdev=mem0"]
    }

    /// The `-chardev`/`-device` arguments of one controller (shell-quoted where needed).
    public static func deviceArguments(for controller: ControllerConfig) -> [String] {
        let id = "sg-" + controller.name
        switch controller.transport {
        case .vhostUserSCSI:
            return ["-chardev", "socket,id=\(id),path=\(controller.socket)",
                    "-device", "vhost-user-scsi-pci,chardev=\(id),num_queues=\(controller.queues),virtqueue_size=\(controller.queueSize)"
                        + (controller.hotplug ? "" : ",hotplug=off")]
        case .vhostUserBlk:
            return ["-chardev", "socket,id=\(id),path=\(controller.socket)",
                    "-device", "vhost-user-blk-pci,chardev=\(id),num-queues=\(controller.queues),queue-size=\(controller.queueSize)"]
        case .pvscsi:
            return ["-device", "'{\"driver\":\"vfio-user-pci\",\"socket\":{\"path\":\"\(controller.socket)\",\"type\":\"unix\"}}'"]
        }
    }

    /// A complete example command line for one controller.
    public static func example(for controller: ControllerConfig) -> String {
        var parts = ["qemu-system-x86_64", "-m", "1G"]
        parts += sharedMemoryArguments()
        parts += deviceArguments(for: controller)
        return parts.joined(separator: " ")
    }
}
