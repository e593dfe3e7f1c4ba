import Foundation
import Logging

/// What a configuration reload changed.
public struct ReloadReport: Sendable, Equatable {
    /// The file that was read.
    public var path: String
    /// One line per change applied, in the order applied ("added controller scsi0 target 0 lun 1: ...").
    public var changes: [String]
}

/// One change a reload applies, planned (and checked) before anything is applied.
enum ReloadStep {
    case add(ControllerRuntime, LUNConfig)
    case resize(ControllerRuntime, LUNConfig, from: UInt64, to: UInt64)
    case setReadOnly(ControllerRuntime, LUNConfig, Bool)
    case setPolicy(ControllerRuntime, LUNConfig, LUNPolicyConfig)
    case remove(ControllerRuntime, LUNConfig, online: Bool)
}

extension Gateway {
    /// The file `reload` reads: the one `serve` was started with; nil when it runs the built-in default
    /// (there is no file to read again: start it with `--config FILE`).
    public var reloadPath: String? {
        config.source == ConfigLoader.embeddedSourceName ? nil : defaultSavePath
    }

    /// Reads the configuration file again, validates it fully and applies the difference to the running
    /// LUN map as the admin commands would: LUNs added, removed, grown, made read-only or writable, their
    /// QoS limits and out-of-space policy changed (as `lun set-limits`: from each queue's next request).
    /// Anything else that differs (a `[gateway]` key, a controller added, removed or changed, a LUN's
    /// back-end, path, block size, identity, a shrink) cannot change while guests run: the reload is
    /// refused naming each such key, and nothing is applied when the file is invalid or anything is refused.
    /// Sends RELOADING=1 before and READY=1 after to systemd. Serialized with the admin commands.
    public func reload(logMetadata: Logger.Metadata = [:]) throws(AdminError) -> ReloadReport {
        notifier.reloading()
        defer { notifier.ready(status: readyStatus) }
        return try changeLock.withLock { _ throws(AdminError) in try reloadLocked(logMetadata: logMetadata) }
    }

    /// The STATUS= line sent with READY=1.
    public var readyStatus: String {
        "serving \(controllers.count) controller(s), \(lunStatuses().count) LUN(s)"
    }

    private func reloadLocked(logMetadata: Logger.Metadata) throws(AdminError) -> ReloadReport {
        guard let path = reloadPath else {
            throw AdminError(.reloadRefused, "the gateway runs the built-in default configuration: there is no file to reload (start it with --config FILE)")
        }
        let new: GatewayConfig
        do throws(ConfigErrors) {
            new = try ConfigLoader.load(file: path)
        } catch {
            let lines = error.errors.map(\.description)
            throw AdminError(.reloadRefused, "\(path) is not valid, nothing changed: " + lines.joined(separator: "; "))
        }
        let steps = try planReload(new)
        var applied: [String] = []
        var added: [(ControllerRuntime, LUNConfig)] = []
        var metadata = logMetadata
        metadata["source"] = "reload"
        // Adds first: opening a back-end is what may still fail; then every earlier add is undone.
        for case let .add(runtime, lun) in steps {
            do throws(AdminError) {
                try addCheckedLUN(lun, to: runtime)
            } catch {
                for (r, l) in added.reversed() {
                    _ = try? removeLUN(target: l.target, lun: l.lun, from: r.config.name, drainTimeoutMilliseconds: 0)
                }
                throw AdminError(error.kind, "controller \(runtime.config.name) target \(lun.target) lun \(lun.lun): \(error.message); nothing changed")
            }
            added.append((runtime, lun))
            logAdmin("lun added", runtime: runtime, lun, metadata)
            applied.append("added controller \(runtime.config.name) target \(lun.target) lun \(lun.lun): \(ConfigSummary.describe(lun, controller: runtime.config))")
        }
        for step in steps {
            switch step {
            case .add: continue
            case let .resize(runtime, lun, from, to):
                _ = try resizeLUN(controller: runtime.config.name, target: lun.target, lun: lun.lun, size: to, force: false,
                                  logMetadata: metadata)
                applied.append("resized controller \(runtime.config.name) target \(lun.target) lun \(lun.lun): \(ByteSize.format(from)) -> \(ByteSize.format(to))")
            case let .setReadOnly(runtime, lun, readOnly):
                try setLUNReadOnly(controller: runtime.config.name, target: lun.target, lun: lun.lun, readOnly: readOnly,
                                   logMetadata: metadata)
                applied.append("controller \(runtime.config.name) target \(lun.target) lun \(lun.lun): read-only \(readOnly ? "on" : "off")")
            case let .setPolicy(runtime, lun, policy):
                try setLUNPolicy(controller: runtime.config.name, target: lun.target, lun: lun.lun, policy: policy,
                                 logMetadata: metadata)
                let text = policy.lines.joined(separator: ", ")
                applied.append("controller \(runtime.config.name) target \(lun.target) lun \(lun.lun): policy \(text.isEmpty ? "none (no limit, out_of_space report)" : text)")
            case let .remove(runtime, lun, online):
                if online {
                    do throws(BackendOpeningError) {
                        try removeLUN(target: lun.target, lun: lun.lun, from: runtime.config.name, drainTimeoutMilliseconds: 5_000)
                    } catch {
                        throw AdminError(.noSuchLUN, error.description)
                    }
                } else {
                    forgetOfflineLUN(controller: runtime.config.name, target: lun.target, lun: lun.lun)
                }
                logAdmin("lun removed", runtime: runtime, lun, metadata)
                applied.append("removed controller \(runtime.config.name) target \(lun.target) lun \(lun.lun) (\(ConfigSummary.describe(lun, controller: runtime.config)))")
            }
        }
        logger.notice("config reloaded", metadata: ["event": "config reloaded", "path": "\(path)", "changes": "\(applied.count)"]
                        .merging(logMetadata) { $1 })
        return ReloadReport(path: path, changes: applied)
    }

    /// The changes from the running gateway to `new`, every one checked; throws listing every refusal.
    func planReload(_ new: GatewayConfig) throws(AdminError) -> [ReloadStep] {
        var refused: [String] = []
        let restart = "cannot change while the gateway runs (restart it)"
        for key in ConfigWriter.changedKeys(ConfigWriter.gatewayLines(config.settings), ConfigWriter.gatewayLines(new.settings)) {
            refused.append("[gateway] key '\(key)' \(restart)")
        }
        let running = controllers
        for runtime in running where !new.controllers.contains(where: { $0.name == runtime.config.name }) {
            refused.append("controller \(runtime.config.name) is not in the file: controllers cannot be removed while the gateway runs (restart it)")
        }
        var steps: [ReloadStep] = []
        for wanted in new.controllers {
            guard let runtime = running.first(where: { $0.config.name == wanted.name }) else {
                refused.append("controller \(wanted.name) is new: controllers cannot be added while the gateway runs (restart it)")
                continue
            }
            for key in ConfigWriter.changedKeys(ConfigWriter.controllerLines(runtime.config), ConfigWriter.controllerLines(wanted)) {
                refused.append("controller \(wanted.name): key '\(key)' \(restart)")
            }
            planLUNs(runtime, wanted.luns, into: &steps, refused: &refused)
        }
        if !refused.isEmpty {
            throw AdminError(.reloadRefused, "config reload refused, nothing changed: " + refused.joined(separator: "; "))
        }
        return steps
    }

    /// The LUN changes of one controller.
    private func planLUNs(_ runtime: ControllerRuntime, _ wanted: [LUNConfig], into steps: inout [ReloadStep], refused: inout [String]) {
        let name = runtime.config.name
        let current = lunStatuses(controller: name)
        for status in current where !wanted.contains(where: { $0.target == status.config.target && $0.lun == status.config.lun }) {
            steps.append(.remove(runtime, status.config, online: status.online))
        }
        for lun in wanted {
            let at = "controller \(name) target \(lun.target) lun \(lun.lun)"
            guard let status = current.first(where: { $0.config.target == lun.target && $0.config.lun == lun.lun }) else {
                do throws(AdminError) {
                    try checkNewLUN(lun, on: runtime)
                    steps.append(.add(runtime, lun))
                } catch {
                    refused.append("\(at): \(error.message)")
                }
                continue
            }
            let old = status.config
            // Keys a reload applies live are compared on their own below; `create` only matters at start.
            var comparable = lun
            comparable.create = old.create
            comparable.readOnly = old.readOnly
            comparable.size = old.size
            comparable.policy = old.policy
            for key in ConfigWriter.changedKeys(ConfigWriter.lines(for: old), ConfigWriter.lines(for: comparable)) {
                refused.append("\(at): key '\(key)' cannot change while the LUN is served (remove the LUN and add it again)")
            }
            if let size = lun.size {
                let currentBytes = status.online ? status.capacityBytes : (old.size ?? 0)
                if size != currentBytes {
                    if !status.online {
                        refused.append("\(at): key 'size': the LUN is offline; it cannot be resized")
                    } else if old.backend != .file {
                        refused.append("\(at): key 'size': a \(old.backend.rawValue) LUN cannot be resized by reload"
                                       + (old.backend == .block ? " (after resizing the device: scsigate lun resize)" : ""))
                    } else if size < currentBytes {
                        refused.append("\(at): key 'size': \(ByteSize.format(size)) is below the current \(ByteSize.format(currentBytes)); shrinking loses data (use scsigate lun resize --force)")
                    } else if size % UInt64(status.blockSize) != 0 {
                        refused.append("\(at): key 'size': \(size) bytes is not a multiple of block_size \(status.blockSize)")
                    } else {
                        steps.append(.resize(runtime, old, from: currentBytes, to: size))
                    }
                }
            }
            // QoS limits and the out-of-space policy change live (keys compared as `config save` writes them:
            // a hold time under `out_of_space = "report"` is no change).
            let policyKeys = ConfigWriter.changedKeys(old.policy.lines, lun.policy.lines)
            if !policyKeys.isEmpty {
                if !status.online {
                    refused.append("\(at): key \(policyKeys.map { "'\($0)'" }.joined(separator: ", ")): the LUN is offline")
                } else {
                    steps.append(.setPolicy(runtime, old, lun.policy))
                }
            }
            if lun.readOnly != old.readOnly {
                if !status.online {
                    refused.append("\(at): key 'read_only': the LUN is offline")
                } else if !lun.readOnly, let id = status.backendID, backends.backend(id)?.backend.geometry.readOnly == true {
                    refused.append("\(at): key 'read_only': the back-end was opened read-only; remove the LUN and add it again to make it writable")
                } else {
                    steps.append(.setReadOnly(runtime, old, lun.readOnly))
                }
            }
        }
    }
}
