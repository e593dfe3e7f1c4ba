import Foundation

/// A JSON value as the control protocol carries it. Integers and floating-point numbers are kept apart
/// so that `"size": 1.5` is reported as a wrong type, not silently truncated.
public enum JSONValue: Sendable, Equatable {
    case null
    case bool(Bool)
    case int(Int64)
    case double(Double)
    case string(String)
    case array([JSONValue])
    case object([String: JSONValue])

    /// The member `key` of an object (nil for other values or a missing key).
    public subscript(key: String) -> JSONValue? {
        if case let .object(members) = self { return members[key] }
        return nil
    }

    /// The string, if this is one.
    public var stringValue: String? { if case let .string(s) = self { return s }; return nil }
    /// The integer, if this is one.
    public var intValue: Int64? { if case let .int(i) = self { return i }; return nil }
    /// The integer as UInt64, if this is a non-negative integer.
    public var uint64Value: UInt64? { if case let .int(i) = self, i >= 0 { return UInt64(i) }; return nil }
    /// The Boolean, if this is one.
    public var boolValue: Bool? { if case let .bool(b) = self { return b }; return nil }
    /// The elements, if this is an array.
    public var arrayValue: [JSONValue]? { if case let .array(a) = self { return a }; return nil }
    /// The members, if this is an object.
    public var objectValue: [String: JSONValue]? { if case let .object(o) = self { return o }; return nil }

    /// A JSON integer from an unsigned counter (saturating at Int64.max).
    public static func count(_ value: UInt64) -> JSONValue { .int(value > UInt64(Int64.max) ? .max : Int64(value)) }
    /// A JSON integer from an Int.
    public static func number(_ value: Int) -> JSONValue { .int(Int64(value)) }

    /// A name for messages: "a string", "an integer"...
    public var typeName: String {
        switch self {
        case .null: return "null"
        case .bool: return "a boolean"
        case .int: return "an integer"
        case .double: return "a floating-point number"
        case .string: return "a string"
        case .array: return "an array"
        case .object: return "an object"
        }
    }

    /// Parses JSON text; nil when it is not valid JSON.
    public static func parse(_ bytes: some Collection<UInt8>) -> JSONValue? {
        try? JSONDecoder().decode(JSONValue.self, from: Data(bytes))
    }

    /// Compact JSON text (object keys sorted, so output is stable).
    public var serialized: String {
        var out = ""
        write(to: &out, indent: nil, level: 0)
        return out
    }

    /// Indented JSON text for people (`--json` output of the CLI).
    public var pretty: String {
        var out = ""
        write(to: &out, indent: "  ", level: 0)
        return out
    }

    private func write(to out: inout String, indent: String?, level: Int) {
        switch self {
        case .null: out += "null"
        case let .bool(b): out += b ? "true" : "false"
        case let .int(i): out += String(i)
        case let .double(d): out += d.isFinite ? "\(d)" : "null"
        case let .string(s): Self.writeString(s, to: &out)
        case let .array(items):
            if items.isEmpty { out += "[]"; return }
            out += "["
            for (n, item) in items.enumerated() {
                if n > 0 { out += "," }
                if let indent { out += "\n" + String(repeating: indent, count: level + 1) }
                item.write(to: &out, indent: indent, level: level + 1)
            }
            if let indent { out += "\n" + String(repeating: indent, count: level) }
            out += "]"
        case let .object(members):
            if members.isEmpty { out += "{}"; return }
            out += "{"
            for (n, key) in members.keys.sorted().enumerated() {
                if n > 0 { out += "," }
                if let indent { out += "\n" + String(repeating: indent, count: level + 1) }
                Self.writeString(key, to: &out)
                out += indent == nil ? ":" : ": "
                members[key]!.write(to: &out, indent: indent, level: level + 1)
            }
            if let indent { out += "\n" + String(repeating: indent, count: level) }
            out += "}"
        }
    }

    private static func writeString(_ s: String, to out: inout String) {
        out += "\""
        for scalar in s.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            default:
                if scalar.value < 0x20 || scalar.value == 0x7F || scalar.value == 0x2028 || scalar.value == 0x2029 {
                    let hex = String(scalar.value, radix: 16)
                    out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
                } else {
                    out.unicodeScalars.append(scalar)
                }
            }
        }
        out += "\""
    }
}

extension JSONValue: Decodable {
    public init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        if container.decodeNil() { self = .null; return }
        if let value = try? container.decode(Bool.self) { self = .bool(value); return }
        if let value = try? container.decode(Int64.self) { self = .int(value); return }
        if let value = try? container.decode(Double.self) { self = .double(value); return }
        if let value = try? container.decode(String.self) { self = .string(value); return }
        if let value = try? container.decode([JSONValue].self) { self = .array(value); return }
        if let value = try? container.decode([String: JSONValue].self) { self = .object(value); return }
        throw DecodingError.dataCorruptedError(in: container, debugDescription: "not a JSON value")
    }
}

/// The error codes of the control protocol: JSON-RPC 2.0's own, then ScsiGate's application codes.
public enum ControlErrorCode {
    /// The request is not valid JSON.
    public static let parseError = -32700
    /// Not a JSON-RPC 2.0 request object (or larger than the limit).
    public static let invalidRequest = -32600
    /// No method of that name.
    public static let methodNotFound = -32601
    /// A parameter is missing, of the wrong type or out of range; the message names it.
    public static let invalidParams = -32602
    /// A bug on the gateway's side.
    public static let internalError = -32603
    /// The `controller` parameter names no controller of this gateway.
    public static let noSuchController = 1001
    /// No LUN at that address.
    public static let noSuchLUN = 1002
    /// A LUN already has that address (or the vhost-user-blk controller already has its disk).
    public static let lunExists = 1003
    /// The backing file or device does not exist (and `create` was not asked for).
    public static let fileMissing = 1004
    /// The backing file is locked by another LUN or another ScsiGate.
    public static let lockHeld = 1005
    /// A resize below the current size without `force`.
    public static let shrinkNeedsForce = 1006
    /// The back-end refused (open, resize) for another reason; the message has it.
    public static let backendFailed = 1007
    /// Not possible for this LUN (resize of a null LUN, making a read-only-opened LUN writable...).
    public static let unsupported = 1008
    /// `config.save` could not write the file.
    public static let saveFailed = 1009
    /// `config.reload` refused: the file is invalid or asks for a change that cannot be made live.
    public static let reloadRefused = 1010
}

/// A JSON-RPC error: code, one-line message and optional data (e.g. `{"field": "size"}`).
public struct RPCError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The code (`ControlErrorCode`).
    public var code: Int
    /// One line, naming the bad field or the refused change.
    public var message: String
    /// Extra structured detail.
    public var data: JSONValue?

    /// Creates an error.
    public init(code: Int, message: String, data: JSONValue? = nil) {
        self.code = code
        self.message = message
        self.data = data
    }

    /// An invalid-params error naming `field`.
    public static func invalidParams(_ field: String, _ message: String) -> RPCError {
        RPCError(code: ControlErrorCode.invalidParams, message: "invalid params: '\(field)': \(message)",
                 data: .object(["field": .string(field)]))
    }

    public var description: String { message }

    /// The error object of a response.
    var json: JSONValue {
        var members: [String: JSONValue] = ["code": .number(code), "message": .string(message)]
        if let data { members["data"] = data }
        return .object(members)
    }
}

/// Reads typed parameters out of a request's `params` object, reporting the first bad one by name.
public struct RPCParams: Sendable {
    /// The members (empty when the request had no params).
    public let members: [String: JSONValue]

    /// Wraps `params`: an object, or absent/null for no parameters.
    public init(_ params: JSONValue?) throws(RPCError) {
        switch params {
        case nil, .null?: members = [:]
        case let .object(o)?: members = o.filter { $0.value != .null }
        case let other?:
            throw RPCError(code: ControlErrorCode.invalidParams,
                           message: "invalid params: params must be an object with named members, found \(other.typeName)")
        }
    }

    /// Refuses members not in `allowed`.
    public func allowOnly(_ allowed: [String]) throws(RPCError) {
        for key in members.keys.sorted() where !allowed.contains(key) {
            throw .invalidParams(key, "unknown parameter; expected one of \(allowed.joined(separator: ", "))")
        }
    }

    /// Whether `key` is present (and not null).
    public func has(_ key: String) -> Bool { members[key] != nil }

    /// A string member.
    public func string(_ key: String, required: Bool = false) throws(RPCError) -> String? {
        guard let value = members[key] else {
            if required { throw .invalidParams(key, "required parameter is missing") }
            return nil
        }
        guard let string = value.stringValue else { throw .invalidParams(key, "expected a string, found \(value.typeName)") }
        if string.isEmpty { throw .invalidParams(key, "must not be empty") }
        return string
    }

    /// An integer member within `range`.
    public func int(_ key: String, required: Bool = false, range: ClosedRange<Int>? = nil) throws(RPCError) -> Int? {
        guard let value = members[key] else {
            if required { throw .invalidParams(key, "required parameter is missing") }
            return nil
        }
        guard let wide = value.intValue else { throw .invalidParams(key, "expected an integer, found \(value.typeName)") }
        guard let int = Int(exactly: wide), range.map({ $0.contains(int) }) ?? true else {
            let r = range!
            throw .invalidParams(key, "must be between \(r.lowerBound) and \(r.upperBound), found \(wide)")
        }
        return int
    }

    /// A Boolean member.
    public func bool(_ key: String, required: Bool = false) throws(RPCError) -> Bool? {
        guard let value = members[key] else {
            if required { throw .invalidParams(key, "required parameter is missing") }
            return nil
        }
        guard let bool = value.boolValue else {
            throw .invalidParams(key, "expected a boolean (true or false), found \(value.typeName)")
        }
        return bool
    }

    /// A size: integer bytes or a string with a unit (`"10GiB"`), as in the config.
    public func size(_ key: String, required: Bool = false) throws(RPCError) -> UInt64? {
        guard let value = members[key] else {
            if required { throw .invalidParams(key, "required parameter is missing") }
            return nil
        }
        switch value {
        case let .int(bytes):
            guard bytes > 0 else { throw .invalidParams(key, "must be greater than 0, found \(bytes)") }
            return UInt64(bytes)
        case let .string(text):
            switch ByteSize.parse(text) {
            case let .success(bytes):
                guard bytes > 0 else { throw .invalidParams(key, "must be greater than 0") }
                return bytes
            case let .failure(error): throw .invalidParams(key, error.message)
            }
        default:
            throw .invalidParams(key, "expected a size (integer bytes or a string such as \"10GiB\"), found \(value.typeName)")
        }
    }
}

/// Who is on the other end of a control connection (SO_PEERCRED), for the admin log.
public struct ControlPeer: Sendable, Equatable {
    /// Process id of the client (0 when unknown).
    public var pid: Int32
    /// User id of the client.
    public var uid: UInt32

    /// Creates a peer.
    public init(pid: Int32 = 0, uid: UInt32 = 0) {
        self.pid = pid
        self.uid = uid
    }
}

/// Turns request lines into response lines (JSON-RPC 2.0 framing, batches, notifications) and hands
/// each call to a method table.
public struct JSONRPCDispatcher: Sendable {
    /// Runs one method: name, params, peer; returns the result or an error.
    public typealias Method = @Sendable (_ params: RPCParams, _ peer: ControlPeer) throws(RPCError) -> JSONValue

    private let methods: [String: Method]

    /// Creates a dispatcher over `methods`.
    public init(methods: [String: Method]) { self.methods = methods }

    /// Method names, sorted.
    public var methodNames: [String] { methods.keys.sorted() }

    /// The response text (without newline) for one request line, or nil when nothing is to be sent
    /// (a notification, or a batch of notifications).
    public func respond(to line: some Collection<UInt8>, peer: ControlPeer) -> String? {
        guard let request = JSONValue.parse(line) else {
            return Self.errorResponse(id: .null, RPCError(code: ControlErrorCode.parseError, message: "parse error: the request is not valid JSON")).serialized
        }
        if case let .array(items) = request {
            if items.isEmpty {
                return Self.errorResponse(id: .null, RPCError(code: ControlErrorCode.invalidRequest, message: "invalid request: empty batch")).serialized
            }
            let responses = items.compactMap { respond(toRequest: $0, peer: peer) }
            return responses.isEmpty ? nil : JSONValue.array(responses).serialized
        }
        return respond(toRequest: request, peer: peer)?.serialized
    }

    private func respond(toRequest request: JSONValue, peer: ControlPeer) -> JSONValue? {
        guard case let .object(members) = request else {
            return Self.errorResponse(id: .null, RPCError(code: ControlErrorCode.invalidRequest,
                                                          message: "invalid request: expected a JSON-RPC 2.0 request object, found \(request.typeName)"))
        }
        let id = members["id"]
        var responseID = JSONValue.null
        if let id {
            switch id {
            case .string, .int, .null: responseID = id
            default:
                return Self.errorResponse(id: .null, RPCError(code: ControlErrorCode.invalidRequest,
                                                              message: "invalid request: 'id' must be a string, an integer or null"))
            }
        }
        guard members["jsonrpc"] == .string("2.0") else {
            return Self.errorResponse(id: responseID, RPCError(code: ControlErrorCode.invalidRequest,
                                                               message: "invalid request: 'jsonrpc' must be \"2.0\""))
        }
        guard let name = members["method"]?.stringValue else {
            return Self.errorResponse(id: responseID, RPCError(code: ControlErrorCode.invalidRequest,
                                                               message: "invalid request: 'method' must be a string"))
        }
        for key in members.keys where !["jsonrpc", "method", "params", "id"].contains(key) {
            return Self.errorResponse(id: responseID, RPCError(code: ControlErrorCode.invalidRequest,
                                                               message: "invalid request: unknown member '\(key)'"))
        }
        let result: Result<JSONValue, RPCError>
        if let method = methods[name] {
            do throws(RPCError) {
                let params = try RPCParams(members["params"])
                result = .success(try method(params, peer))
            } catch {
                result = .failure(error)
            }
        } else {
            result = .failure(RPCError(code: ControlErrorCode.methodNotFound,
                                       message: "method not found: '\(name)'; methods: \(methodNames.joined(separator: ", "))"))
        }
        guard id != nil else { return nil }  // a notification: no response
        switch result {
        case let .success(value): return .object(["jsonrpc": .string("2.0"), "id": responseID, "result": value])
        case let .failure(error): return Self.errorResponse(id: responseID, error)
        }
    }

    static func errorResponse(id: JSONValue, _ error: RPCError) -> JSONValue {
        .object(["jsonrpc": .string("2.0"), "id": id, "error": error.json])
    }
}

extension JSONValue: ExpressibleByStringLiteral, ExpressibleByIntegerLiteral, ExpressibleByBooleanLiteral,
    ExpressibleByArrayLiteral, ExpressibleByDictionaryLiteral, ExpressibleByNilLiteral, ExpressibleByFloatLiteral {
    public init(floatLiteral value: Double) { self = .double(value) }
    public init(stringLiteral value: String) { self = .string(value) }
    public init(integerLiteral value: Int64) { self = .int(value) }
    public init(booleanLiteral value: Bool) { self = .bool(value) }
    public init(arrayLiteral elements: JSONValue...) { self = .array(elements) }
    public init(dictionaryLiteral elements: (String, JSONValue)...) {
        self = .object(Dictionary(elements, uniquingKeysWith: { _, last in last }))
    }
    public init(nilLiteral: ()) { self = .null }
}
