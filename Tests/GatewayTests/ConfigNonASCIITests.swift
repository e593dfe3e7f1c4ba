import Testing
@testable import Gateway

/// Found by the `config` fuzz target: toml++ (inside TOMLKit) asserted, aborting `check-config` and `serve`,
/// where a key starts with a character that cannot start one: a non-ASCII character outside strings and
/// comments, or a table header such as `[@]`. Reproducers: Tests/Fuzz/Corpus/config/crash-*.
@Suite("Config: text toml++ cannot take is refused before parsing")
struct ConfigTextProblemTests {
    @Test("is a syntax error with its line, not an abort", arguments: [
        ("[[\u{FFFD}]]\n", 1, "U+FFFD outside a string or comment"),
        ("[\u{FFFD}[a]]\n", 1, "U+FFFD outside a string or comment"),
        ("# ok\n[gateway]\nst\u{E9}te_dir = \"/x\"\n", 3, "U+E9 outside a string or comment"),
        ("a = \"\"\"x\n\"\"\"\n[\u{FFFD}]\n", 3, "U+FFFD outside a string or comment"),
        ("[@]\n", 1, "table header must start with a key"),
        ("a = 1\n[[ =]]\n", 2, "table header must start with a key"),
        ("[.]\n", 1, "table header must start with a key"),
    ])
    func refused(_ text: String, _ line: Int, _ message: String) {
        let errors = configErrors(text)
        #expect(errors.count == 1)
        #expect(errors.first?.line == line)
        #expect(errors.first?.message.contains(message) == true, "\(errors)")
    }

    @Test("leaves valid TOML alone: non-ASCII in comments and strings, arrays across lines")
    func allowed() {
        let text = #"""
            # caf\#u{E9}
            a = "\#u{E9}\"\#u{E9}"
            b = '\#u{E9}'
            c = """
            \#u{E9}""""
            d = '''\#u{E9}''''
            e = [
              [1, 2],
              [{ x = 1 }],
            ]
            [ "quoted" ]
            [[ f.g ]]
            """#
        #expect(textProblemBeforeParsing(text) == nil)
        #expect(textProblemBeforeParsing("e = 1\nf\u{E9} = 2")?.0 == 2)
    }
}
