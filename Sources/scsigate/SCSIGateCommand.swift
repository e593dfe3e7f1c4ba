import ArgumentParser
import Foundation
import Gateway
import Glibc
import Logging

/// The `scsigate` command: the daemon (`serve`) and its tools.
@main
struct SCSIGateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "scsigate",
        abstract: "ScsiGate: a user-space SCSI target gateway (virtio-scsi, virtio-blk, PVSCSI).",
        version: ScsiGateVersion.string,
        subcommands: [Serve.self, CheckConfig.self, Version.self,
                      LUNCommand.self, ControllerCommand.self, StatsCommand.self, ConfigCommand.self])
}

extension LogLevel: ExpressibleByArgument {}

/// `scsigate serve`: run the gateway until SIGTERM or SIGINT.
struct Serve: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Serve the configured controllers until SIGTERM or SIGINT.",
        discussion: "Without --config, serves the built-in default configuration (see Config/scsigate.toml).")

    @Option(name: .shortAndLong, help: ArgumentHelp("Configuration file (TOML).", valueName: "file"))
    var config: String?

    @Option(help: ArgumentHelp("Log level, overriding the configuration: \(LogLevel.allCases.map(\.rawValue).joined(separator: ", ")).",
                               valueName: "level"))
    var logLevel: LogLevel?

    func run() throws {
        let loaded: GatewayConfig
        do throws(ConfigErrors) {
            if let config { loaded = try ConfigLoader.load(file: config) } else { loaded = try ConfigLoader.loadDefault() }
        } catch {
            printError(error.description)
            printError("scsigate: configuration is not valid; not starting")
            throw ExitCode(1)
        }
        let level = (logLevel ?? loaded.settings.logLevel).loggerLevel
        LoggingSystem.bootstrap { label in StderrLogHandler(label: label, level: level) }
        let logger = Logger(label: "scsigate")
        logger.info("scsigate \(ScsiGateVersion.string) starting with \(loaded.source): \(loaded.controllers.count) controller(s), \(loaded.lunCount) LUN(s)")

        // Block the stop and reload signals before any thread starts, so only the main loop below receives them.
        var signals = sigset_t()
        sigemptyset(&signals)
        sigaddset(&signals, SIGTERM)
        sigaddset(&signals, SIGINT)
        sigaddset(&signals, SIGHUP)
        pthread_sigmask(SIG_BLOCK, &signals, nil)
        signal(SIGPIPE, SIG_IGN)

        let environment = ProcessInfo.processInfo.environment
        let notifier = ServiceNotifier.fromEnvironment(environment)
        let activation: SocketActivation
        do throws(GatewayError) {
            activation = try SocketActivation.fromEnvironment(environment)
        } catch {
            for problem in error.problems { logger.critical("\(problem)") }
            logger.critical("not starting")
            throw ExitCode(1)
        }
        if !activation.remaining.isEmpty {
            let list = activation.remaining.map { "fd \($0.fd) '\($0.name)' \($0.path)" }.joined(separator: ", ")
            logger.info("socket activation: \(activation.remaining.count) socket(s) from systemd: \(list)")
        }
        let gateway = Gateway(config: loaded, logger: logger, activation: activation, notifier: notifier)
        do throws(GatewayError) {
            try gateway.start()
        } catch {
            for problem in error.problems { logger.critical("\(problem)") }
            logger.critical("not starting")
            throw ExitCode(1)
        }
        let adminPlane: AdminPlane
        do throws(SocketServerError) {
            adminPlane = try AdminPlane(gateway: gateway, logger: logger)
        } catch {
            logger.critical("\(error.description)")
            gateway.stop()
            logger.critical("not starting")
            throw ExitCode(1)
        }
        activation.closeUnclaimed(logger: logger)
        // Every controller socket and the control socket listen now.
        notifier.ready(status: gateway.readyStatus)
        logger.info("running; stop with SIGTERM or SIGINT, reload the configuration with SIGHUP")
        let received = waitForStop(signals, gateway: gateway, notifier: notifier, logger: logger)
        logger.info("received \(received == SIGTERM ? "SIGTERM" : "SIGINT"); shutting down")
        notifier.stopping()
        adminPlane.stop()
        gateway.stop()
        logger.info("stopped")
    }

    /// Waits for SIGTERM or SIGINT (returned); reloads the configuration on SIGHUP, and sends WATCHDOG=1
    /// every half watchdog interval when systemd watches the process (from this thread, which also runs
    /// reloads: a stuck reload stops the pings).
    private func waitForStop(_ signals: sigset_t, gateway: Gateway, notifier: ServiceNotifier, logger: Logger) -> Int32 {
        var signals = signals
        let pingMilliseconds = notifier.isEnabled ? notifier.watchdogPingMilliseconds : nil
        if let pingMilliseconds { logger.info("systemd watchdog: WATCHDOG=1 every \(pingMilliseconds) ms") }
        while true {
            var received: Int32
            if let pingMilliseconds {
                notifier.watchdogPing()
                var timeout = timespec(tv_sec: pingMilliseconds / 1000, tv_nsec: (pingMilliseconds % 1000) * 1_000_000)
                received = sigtimedwait(&signals, nil, &timeout)
                if received < 0 { continue }
            } else {
                received = 0
                guard sigwait(&signals, &received) == 0 else { continue }
            }
            if received == SIGTERM || received == SIGINT { return received }
            if received == SIGHUP {
                logger.info("received SIGHUP; reloading the configuration")
                do throws(AdminError) {
                    let report = try gateway.reload(logMetadata: ["signal": "SIGHUP"])
                    logger.notice("reload of \(report.path): \(report.changes.isEmpty ? "no changes" : report.changes.joined(separator: "; "))")
                } catch {
                    logger.error("reload refused: \(error.message)")
                }
            }
        }
    }
}

/// `scsigate check-config FILE`: validate without starting.
struct CheckConfig: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check-config",
        abstract: "Validate a configuration file without starting; exit 1 if it has errors.",
        discussion: "Prints each problem as FILE:LINE: key 'path': message, or a summary when the file is valid.")

    @Argument(help: ArgumentHelp("Configuration file to check; leave out to check the built-in default.", valueName: "file"))
    var file: String?

    func run() throws {
        let report = ConfigCheckReport.check(path: file)
        for line in report.output { print(line) }
        for line in report.errors { printError(line) }
        if report.exitCode != 0 { throw ExitCode(report.exitCode) }
    }
}

/// `scsigate version`.
struct Version: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Print the version.")

    func run() {
        print("scsigate \(ScsiGateVersion.string)")
    }
}

/// Writes one line to standard error.
func printError(_ line: String) {
    let text = line + "\n"
    _ = text.utf8CString.withUnsafeBufferPointer { buffer in
        Glibc.write(2, buffer.baseAddress!, buffer.count - 1)
    }
}
