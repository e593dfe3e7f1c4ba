import FuzzTargets
#if canImport(Glibc)
import Glibc
#endif

/// Writes to standard error (fd 2).
func eprint(_ text: String) {
    var text = text
    text.withUTF8 { _ = write(2, $0.baseAddress, $0.count) }
}

#if FUZZING
// libFuzzer build (Tests/Fuzz/fuzz.sh: -sanitize=fuzzer,address -DFUZZING): libFuzzer owns main and calls
// these. The target is chosen by SCSIGATE_FUZZ_TARGET.
nonisolated(unsafe) var selectedTarget: FuzzTarget?

@_cdecl("LLVMFuzzerInitialize")
public func fuzzerInitialize(_ argc: UnsafeMutablePointer<Int32>, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>) -> Int32 {
    guard let raw = getenv("SCSIGATE_FUZZ_TARGET"), let target = FuzzTargets.named(String(cString: raw)) else {
        eprint("scsigate-fuzz: set SCSIGATE_FUZZ_TARGET to one of: \(FuzzTargets.all.map(\.name).joined(separator: " "))\n")
        exit(2)
    }
    selectedTarget = target
    signal(SIGPIPE, SIG_IGN)
    return 0
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzerTestOneInput(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    selectedTarget!.run(UnsafeRawBufferPointer(start: data, count: size))
    return 0
}
#else
/// Normal build: lists the targets, writes their seed corpora, or replays inputs through a target
/// (without sanitizers; `swift test --filter FuzzTests` replays every committed corpus file).
@main
struct FuzzReplay {
    static func usage() -> Never {
        eprint("""
        usage: scsigate-fuzz --list
               scsigate-fuzz --write-seeds DIR     (DIR/<target>/<seed>)
               scsigate-fuzz TARGET FILE|DIR...    (replays inputs)

        """)
        exit(2)
    }

    static func main() {
        signal(SIGPIPE, SIG_IGN)
        let args = Array(CommandLine.arguments.dropFirst())
        guard let first = args.first else { usage() }
        switch first {
        case "--list":
            for t in FuzzTargets.all { print(t.name) }
        case "--write-seeds":
            guard args.count == 2 else { usage() }
            for t in FuzzTargets.all {
                let dir = args[1] + "/" + t.name
                mkdir(dir, 0o755)
                for (name, bytes) in t.seeds() { writeFile(dir + "/" + name, bytes) }
            }
        default:
            guard let target = FuzzTargets.named(first) else { usage() }
            var count = 0
            for path in args.dropFirst() {
                for file in files(path) {
                    target.run(readFile(file))
                    count += 1
                }
            }
            print("\(target.name): replayed \(count) input(s)")
        }
    }

    static func files(_ path: String) -> [String] {
        guard let d = opendir(path) else { return [path] }
        defer { closedir(d) }
        var out: [String] = []
        while let e = readdir(d) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if !name.hasPrefix(".") { out.append(path + "/" + name) }
        }
        return out.sorted()
    }

    static func readFile(_ path: String) -> [UInt8] {
        guard let f = fopen(path, "rb") else { eprint("cannot read \(path)\n"); exit(1) }
        defer { fclose(f) }
        var out: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = fread(&buffer, 1, buffer.count, f)
            if n <= 0 { break }
            out += buffer[0 ..< n]
        }
        return out
    }

    static func writeFile(_ path: String, _ bytes: [UInt8]) {
        guard let f = fopen(path, "wb") else { eprint("cannot write \(path)\n"); exit(1) }
        _ = bytes.withUnsafeBytes { fwrite($0.baseAddress, 1, $0.count, f) }
        fclose(f)
    }
}
#endif
