import Backends
import BlockIO

/// The counters of one LUN, summed over its queues.
public struct LUNStatisticsRow: Sendable {
    /// Controller name.
    public var controller: String
    /// Guest target.
    public var target: Int
    /// Guest LUN.
    public var lun: Int
    /// Capacity in bytes.
    public var capacityBytes: UInt64
    /// The counters.
    public var counters: IOStatisticsSnapshot
    /// QoS throttling and out-of-space holds of the LUN (`LUNPolicy`).
    public var policy = LUNPolicySnapshot()
}

/// The counters of one queue of a controller, summed over its LUNs (removed LUNs included).
public struct QueueStatisticsRow: Sendable {
    /// Controller name.
    public var controller: String
    /// Queue index (as the front-end numbers its request queues).
    public var queue: Int
    /// The counters.
    public var counters: IOStatisticsSnapshot
}

/// A read-side view of every counter of a gateway: per LUN and per queue. Collected by the control
/// thread from the front-ends' counter blocks without stopping them.
public struct GatewayStatistics: Sendable {
    /// One row per online LUN, by controller then address.
    public var luns: [LUNStatisticsRow]
    /// One row per controller queue.
    public var queues: [QueueStatisticsRow]

    /// Collects the counters of `gateway` (only `controller`'s when given).
    public static func collect(_ gateway: Gateway, controller name: String? = nil) -> GatewayStatistics {
        var luns: [LUNStatisticsRow] = []
        var queues: [QueueStatisticsRow] = []
        for runtime in gateway.controllers where name == nil || runtime.config.name == name {
            let controller = runtime.config.name
            var perQueue = gateway.retiredQueueStatistics(controller)
            let queueCount = runtime.statisticsQueueCount
            while perQueue.count < queueCount { perQueue.append(IOStatisticsSnapshot()) }
            for unit in runtime.target.logicalUnits {
                guard let entry = runtime.backend(of: unit) else { continue }
                var total = IOStatisticsSnapshot()
                for queue in 0..<entry.statistics.queueCount {
                    let snapshot = entry.statistics.snapshot(queue: queue)
                    total.add(snapshot)
                    if queue < perQueue.count { perQueue[queue].add(snapshot) }
                }
                luns.append(LUNStatisticsRow(controller: controller, target: entry.config.target, lun: entry.config.lun,
                                             capacityBytes: unit.blockCount * UInt64(unit.blockSize), counters: total,
                                             policy: entry.policy.snapshot))
            }
            for (queue, counters) in perQueue.enumerated() {
                queues.append(QueueStatisticsRow(controller: controller, queue: queue, counters: counters))
            }
        }
        luns.sort { ($0.controller, $0.target, $0.lun) < ($1.controller, $1.target, $1.lun) }
        return GatewayStatistics(luns: luns, queues: queues)
    }

    /// The `stats.get` result.
    public var json: JSONValue {
        .object([
            "luns": .array(luns.map { row in
                var members = Self.json(row.counters).objectValue!
                members["controller"] = .string(row.controller)
                members["target"] = .number(row.target)
                members["lun"] = .number(row.lun)
                members["size"] = .count(row.capacityBytes)
                let p = row.policy
                members["throttled"] = .count(p.throttledRequests)
                members["throttled_ns"] = .count(p.throttledNanoseconds)
                members["space_held_writes"] = .count(p.spaceHeldWrites)
                members["space_resumed_writes"] = .count(p.spaceResumedWrites)
                members["space_failed_writes"] = .count(p.spaceFailedWrites)
                members["space_held_now"] = .number(p.spaceHeldNow)
                return .object(members)
            }),
            "queues": .array(queues.map { row in
                var members = Self.json(row.counters).objectValue!
                members["controller"] = .string(row.controller)
                members["queue"] = .number(row.queue)
                return .object(members)
            }),
        ])
    }

    /// One counter set as JSON.
    public static func json(_ c: IOStatisticsSnapshot) -> JSONValue {
        var bySenseKey: [String: JSONValue] = [:]
        for key in 0..<16 where c.errors(senseKey: key) > 0 {
            bySenseKey[SenseKeyName.name(key)] = .count(c.errors(senseKey: key))
        }
        var buckets: [JSONValue] = []
        for i in 0..<LatencyHistogram.bucketCount where c.latencyBucket(i) > 0 {
            let bound: JSONValue = LatencyHistogram.upperBoundNanos(i).map { .count($0) } ?? .string("+Inf")
            buckets.append(.object(["le_ns": bound, "count": .count(c.latencyBucket(i))]))
        }
        var latency: [String: JSONValue] = ["sum_ns": .count(c.latencySumNanos), "buckets": .array(buckets)]
        if let p50 = c.latencyQuantileNanos(0.5) { latency["p50_ns"] = .count(p50) }
        if let p99 = c.latencyQuantileNanos(0.99) { latency["p99_ns"] = .count(p99) }
        return .object([
            "commands": .count(c.commands), "in_flight": .number(c.inFlight),
            "reads": .count(c.commands(.read)), "writes": .count(c.commands(.write)),
            "flushes": .count(c.commands(.flush)), "discards": .count(c.commands(.discard)),
            "others": .count(c.commands(.other)),
            "read_bytes": .count(c.readBytes), "write_bytes": .count(c.writeBytes),
            "errors": .count(c.errors), "errors_by_sense_key": .object(bySenseKey),
            "busy": .count(c.busy), "reservation_conflicts": .count(c.reservationConflicts),
            "task_set_full": .count(c.taskSetFull), "task_aborted": .count(c.taskAborted),
            "latency": .object(latency),
        ])
    }
}
