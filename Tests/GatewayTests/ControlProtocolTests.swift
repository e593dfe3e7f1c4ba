import Foundation
import Testing
@testable import Gateway

@Suite("Control protocol: JSON values, JSON-RPC framing without a socket")
struct ControlProtocolTests {
    @Test("JSON parsing keeps integers, floating-point numbers and Booleans apart")
    func parsing() {
        #expect(JSONValue.parse(Array("1".utf8)) == .int(1))
        #expect(JSONValue.parse(Array("1.5".utf8)) == .double(1.5))
        #expect(JSONValue.parse(Array("true".utf8)) == .bool(true))
        #expect(JSONValue.parse(Array("9223372036854775807".utf8)) == .int(.max))
        #expect(JSONValue.parse(Array("null".utf8)) == .null)
        #expect(JSONValue.parse(Array(#"{"a":[1,"x",false,null]}"#.utf8)) == ["a": [1, "x", false, nil]])
        #expect(JSONValue.parse(Array("{".utf8)) == nil)
        #expect(JSONValue.parse(Array("[1 2]".utf8)) == nil)
    }

    @Test("serialization escapes strings and sorts keys; it parses back to the same value")
    func serialization() {
        let value: JSONValue = ["b": "quote\" backslash\\ newline\n tab\t bell\u{7} é \u{2028}", "a": [1, -2, 0.5, true, nil], "c": [:]]
        let text = value.serialized
        #expect(text == #"{"a":[1,-2,0.5,true,null],"b":"quote\" backslash\\ newline\n tab\t bell\u0007 é \u2028","c":{}}"#)
        #expect(JSONValue.parse(Array(text.utf8)) == value)
        #expect(JSONValue.parse(Array(value.pretty.utf8)) == value)
        #expect(!text.contains("\n"), "one request or response per line")
    }

    @Test("RPCParams: typed getters name the field; sizes accept bytes or units")
    func params() throws {
        let p = try RPCParams(["name": "x", "n": 5, "flag": true, "size": "2MiB", "bytes": 4096, "nothing": nil])
        #expect(try p.string("name") == "x")
        #expect(try p.int("n", range: 0...10) == 5)
        #expect(try p.bool("flag") == true)
        #expect(try p.size("size") == 2 << 20)
        #expect(try p.size("bytes") == 4096)
        #expect(!p.has("nothing"), "null means absent")
        #expect(throws: RPCError.invalidParams("n", "must be between 6 and 10, found 5")) { try p.int("n", range: 6...10) }
        #expect(throws: RPCError.invalidParams("name", "expected an integer, found a string")) { try p.int("name") }
        #expect(throws: RPCError.invalidParams("flag", "expected a string, found a boolean")) { try p.string("flag") }
        #expect(throws: RPCError.invalidParams("missing", "required parameter is missing")) { try p.bool("missing", required: true) }
        #expect(throws: RPCError.self) { try p.allowOnly(["name"]) }
        #expect(throws: RPCError.self) { try RPCParams(.array([1])) }
        #expect(try RPCParams(nil).members.isEmpty)
    }

    @Test("dispatcher: notifications get no answer, batches of notifications neither, errors keep the id")
    func dispatcher() {
        let d = JSONRPCDispatcher(methods: [
            "echo": { p, _ throws(RPCError) in .object(p.members) },
            "fail": { _, _ throws(RPCError) in throw RPCError(code: 1234, message: "no") },
        ])
        func respond(_ text: String) -> JSONValue? {
            d.respond(to: Array(text.utf8), peer: ControlPeer()).flatMap { JSONValue.parse(Array($0.utf8)) }
        }
        #expect(respond(#"{"jsonrpc":"2.0","id":"x","method":"echo","params":{"a":1}}"#)
                == ["jsonrpc": "2.0", "id": "x", "result": ["a": 1]])
        #expect(respond(#"{"jsonrpc":"2.0","id":3,"method":"fail"}"#)
                == ["jsonrpc": "2.0", "id": 3, "error": ["code": 1234, "message": "no"]])
        #expect(d.respond(to: Array(#"{"jsonrpc":"2.0","method":"echo"}"#.utf8), peer: ControlPeer()) == nil)
        #expect(d.respond(to: Array(#"[{"jsonrpc":"2.0","method":"echo"},{"jsonrpc":"2.0","method":"fail"}]"#.utf8),
                          peer: ControlPeer()) == nil)
        #expect(respond(#"{"jsonrpc":"2.0","id":1,"method":"echo","extra":1}"#)?["error"]?["code"]
                == .number(ControlErrorCode.invalidRequest))
        #expect(respond(#"{"jsonrpc":"2.0","id":1}"#)?["error"]?["code"] == .number(ControlErrorCode.invalidRequest))
        #expect(respond(#"{"jsonrpc":"2.0","id":1.5,"method":"echo"}"#)?["id"] == .null)
    }

    @Test("line framing: CRLF and blank lines are tolerated, partial lines wait for the rest")
    func lineFraming() {
        let handler = JSONLineHandler(dispatcher: JSONRPCDispatcher(methods: ["ping": { _, _ throws(RPCError) in "pong" }]),
                                      maximumRequestBytes: 1024)
        var input = Array("\r\n  \n{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\"}\r\n{\"jsonrpc\":\"2.0\",\"id\":2,".utf8)
        let (output, close) = handler.consume(&input, peer: ControlPeer())
        #expect(!close)
        #expect(String(decoding: output, as: UTF8.self) == "{\"id\":1,\"jsonrpc\":\"2.0\",\"result\":\"pong\"}\n")
        #expect(String(decoding: input, as: UTF8.self) == "{\"jsonrpc\":\"2.0\",\"id\":2,")
        input += Array("\"method\":\"ping\"}\n".utf8)
        #expect(String(decoding: handler.consume(&input, peer: ControlPeer()).output, as: UTF8.self)
                == "{\"id\":2,\"jsonrpc\":\"2.0\",\"result\":\"pong\"}\n")
        #expect(input.isEmpty)
    }
}
