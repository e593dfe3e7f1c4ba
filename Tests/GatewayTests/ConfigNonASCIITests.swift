import Testing
@testable import Gateway

/// Found by the `config` fuzz target: toml++ (inside TOMLKit) asserted, aborting `check-config` and `serve`,
/// on a non-ASCII character where a key starts. Reproducer: Tests/Fuzz/Corpus/config/crash-nonascii-table-header.
@Suite("Config: non-ASCII text outside strings and comments")
struct ConfigNonASCIITests {
    @Test("is a syntax error with its line, not an abort", arguments: [
        ("[[\u{FFFD}]]\n", 1),
        ("[\u{FFFD}[a]]\n", 1),
        ("# ok\n[gateway]\nst\u{E9}te_dir = \"/x\"\n", 3),
        ("a = \"\"\"x\n\"\"\"\n[\u{FFFD}]\n", 3),
    ])
    func refused(_ text: String, _ line: Int) {
        let errors = configErrors(text)
        #expect(errors.count == 1)
        #expect(errors.first?.line == line)
        #expect(errors.first?.message.contains("outside a string or comment") == true)
    }

    @Test("is fine in comments and in every kind of string")
    func allowed() {
        let text = #"""
            # caf\#u{E9}
            a = "\#u{E9}\"\#u{E9}"
            b = '\#u{E9}'
            c = """
            \#u{E9}""""
            d = '''\#u{E9}''''
            e = 1
            """#
        #expect(firstNonASCIIOutsideStringsAndComments(text) == nil)
        #expect(firstNonASCIIOutsideStringsAndComments("e = 1\nf\u{E9} = 2") != nil)
    }
}
