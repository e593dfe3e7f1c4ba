import ArgumentParser
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
        subcommands: [Serve.self, CheckConfig.self, Version.self])
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

        // Block the stop signals before any thread starts, so only sigwait below receives them.
        var signals = sigset_t()
        sigemptyset(&signals)
        sigaddset(&signals, SIGTERM)
        sigaddset(&signals, SIGINT)
        pthread_sigmask(SIG_BLOCK, &signals, nil)
        signal(SIGPIPE, SIG_IGN)

        let gateway = Gateway(config: loaded, logger: logger)
        do throws(GatewayError) {
            try gateway.start()
        } catch {
            for problem in error.problems { logger.critical("\(problem)") }
            logger.critical("not starting")
            throw ExitCode(1)
        }
        logger.info("running; stop with SIGTERM or SIGINT")
        var received: Int32 = 0
        while true {
            let rc = sigwait(&signals, &received)
            if rc == 0 && (received == SIGTERM || received == SIGINT) { break }
        }
        logger.info("received \(received == SIGTERM ? "SIGTERM" : "SIGINT"); shutting down")
        gateway.stop()
        logger.info("stopped")
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
