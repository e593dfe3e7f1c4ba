import FuzzTargets
import Foundation
import Testing

/// Every committed corpus input (seeds and the reproducers of fixed crashes) replayed through its fuzz target
/// without sanitizers: a regression of a fixed crash fails here, in the normal test suite.
@Suite(.serialized) struct CorpusReplayTests {
    static let corpus = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fuzz/Corpus").path

    static func inputs(_ target: String) -> [String] {
        let dir = corpus + "/" + target
        let names = (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []
        return names.filter { !$0.hasPrefix(".") }.sorted().map { dir + "/" + $0 }
    }

    @Test func everyTargetHasASeedCorpus() {
        let dirs = Set(((try? FileManager.default.contentsOfDirectory(atPath: Self.corpus)) ?? []).filter { !$0.hasPrefix(".") })
        #expect(dirs == Set(FuzzTargets.all.map(\.name)))
        for t in FuzzTargets.all {
            #expect(Self.inputs(t.name).count >= t.seeds().count, "\(t.name): corpus misses seeds (regenerate with scsigate-fuzz --write-seeds)")
        }
    }

    @Test(arguments: FuzzTargets.all.map(\.name))
    func corpusReplays(_ name: String) throws {
        let target = try #require(FuzzTargets.named(name))
        let files = Self.inputs(name)
        #expect(!files.isEmpty)
        let start = ContinuousClock.now
        for file in files {
            let data = try #require(FileManager.default.contents(atPath: file), "cannot read \(file)")
            target.run([UInt8](data))
        }
        print("\(name): \(files.count) corpus input(s) replayed in \(ContinuousClock.now - start)")
    }
}
