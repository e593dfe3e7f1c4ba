/// What a task management function asks of the front-end, with its effects on logical-unit state
/// (unit attentions, SPC-2 reservations) already applied by `SCSITarget.planTaskManagement`.
///
/// Front-ends own the task sets (one per queue group), so the plan only names the tasks to abort.
/// A front-end with one task set does:
/// ```
/// let plan = target.planTaskManagement(function, nexus: nexus, lun: lun)
/// let outcome = plan.apply(to: &taskSet)          // marks tasks aborted, answers queries
/// target.finishTaskManagement(plan, outcome)      // UA for other initiators' cleared commands
/// taskSet.takeAborted { slot in /* send TASK ABORTED for slot */ }
/// send(plan.response(queryMatched: outcome.queryMatched))
/// ```
/// With several task sets, call `apply(to:)` on each (on its own thread), merge the outcomes with
/// `TaskManagementOutcome.merge`, then finish and respond once. Tasks in the back-end complete later:
/// `TaskSet.complete(slot:)` answers `.aborted` for them.
public struct TaskManagementPlan: Sendable, Equatable {
    /// What the front-end must look up in its task sets.
    public enum Query: Sendable, Equatable {
        case none
        /// QUERY TASK / QUERY TASK SET: FUNCTION SUCCEEDED when a live, not aborted task is in the scope.
        case tasks(TaskScope)
    }

    /// The function and where it came from.
    public var function: TaskManagementFunction
    public var nexus: ITNexus
    public var lun: LogicalUnitNumber?
    /// Mark the tasks in these scopes aborted, in every task set that may hold them.
    public var abortScopes: [TaskScope]
    /// The response when `query` is `.none`, and the response when a query found nothing.
    public var response: TaskManagementResponse
    public var query: Query
    /// Established (on `lun`) for each other nexus whose tasks this function aborted:
    /// COMMANDS CLEARED BY ANOTHER INITIATOR for CLEAR TASK SET (TST = 0, TAS = 0).
    public var unitAttentionForOthersAborted: AdditionalSense?
    /// QUERY ASYNCHRONOUS EVENT: the pending unit attention, if any (FUNCTION SUCCEEDED then).
    public var pendingUnitAttention: AdditionalSense?

    public init(function: TaskManagementFunction, nexus: ITNexus, lun: LogicalUnitNumber?,
                abortScopes: [TaskScope] = [], response: TaskManagementResponse = .functionComplete,
                query: Query = .none, unitAttentionForOthersAborted: AdditionalSense? = nil,
                pendingUnitAttention: AdditionalSense? = nil) {
        self.function = function
        self.nexus = nexus
        self.lun = lun
        self.abortScopes = abortScopes
        self.response = response
        self.query = query
        self.unitAttentionForOthersAborted = unitAttentionForOthersAborted
        self.pendingUnitAttention = pendingUnitAttention
    }

    /// Decides the plan for `function` from `nexus` addressed to `lun`. `unit` is the addressed logical
    /// unit (nil when absent); `allUnits` every unit of the target (for I_T NEXUS RESET). Applies the
    /// logical-unit side effects: LOGICAL UNIT RESET releases the SPC-2 reservation and establishes
    /// BUS DEVICE RESET FUNCTION OCCURRED for every nexus; I_T NEXUS RESET releases SPC-2 reservations
    /// held through `nexus` and establishes I_T NEXUS LOSS OCCURRED for it on every unit.
    public static func make(_ function: TaskManagementFunction, nexus: ITNexus, lun: LogicalUnitNumber?,
                            unit: LogicalUnit?, allUnits: [LogicalUnit]) -> TaskManagementPlan {
        var plan = TaskManagementPlan(function: function, nexus: nexus, lun: lun)
        if function == .itNexusReset {
            for u in allUnits {
                u.reservations.nexusLost(nexus)
                u.unitAttentions.establish(.iTNexusLossOccurred, for: .only(nexus))
            }
            plan.abortScopes = [TaskScope(nexus: nexus, lun: nil, tag: nil)]
            return plan
        }
        guard let lun, let unit else {
            plan.response = .incorrectLUN
            return plan
        }
        switch function {
        case .abortTask(let tag):
            plan.abortScopes = [TaskScope(nexus: nexus, lun: lun, tag: tag)]
        case .abortTaskSet:
            plan.abortScopes = [TaskScope(nexus: nexus, lun: lun, tag: nil)]
        case .clearTaskSet:
            // TST = 000b: one task set per logical unit, shared by every nexus.
            plan.abortScopes = [TaskScope(nexus: nil, lun: lun, tag: nil)]
            plan.unitAttentionForOthersAborted = .commandsClearedByAnotherInitiator
        case .logicalUnitReset:
            plan.abortScopes = [TaskScope(nexus: nil, lun: lun, tag: nil)]
            unit.reservations.resetSPC2Reservation()
            unit.unitAttentions.establish(.busDeviceResetFunctionOccurred, for: .all)
        case .queryTask(let tag):
            plan.query = .tasks(TaskScope(nexus: nexus, lun: lun, tag: tag))
        case .queryTaskSet:
            plan.query = .tasks(TaskScope(nexus: nexus, lun: lun, tag: nil))
        case .queryAsyncEvent:
            plan.pendingUnitAttention = unit.unitAttentions.peekNext(for: nexus)
            plan.response = plan.pendingUnitAttention == nil ? .functionComplete : .functionSucceeded
        case .clearACA:
            plan.response = .functionRejected  // NACA is not supported (NormACA = 0)
        case .itNexusReset:
            break  // handled above
        }
        return plan
    }

    /// A plan that aborts the tasks of `nexuses` on `lun` (PREEMPT AND ABORT, from `ReservationEffects`).
    public static func preemptAndAbort(_ effects: ReservationEffects, lun: LogicalUnitNumber,
                                       from nexus: ITNexus) -> TaskManagementPlan {
        TaskManagementPlan(function: .abortTaskSet, nexus: nexus, lun: lun, abortScopes: effects.abortScopes(on: lun))
    }

    /// Marks the plan's tasks aborted in `tasks` and answers its query there.
    public func apply(to tasks: inout TaskSet) -> TaskManagementOutcome {
        var outcome = TaskManagementOutcome()
        var others: [ITNexus] = []
        for scope in abortScopes {
            outcome.abortedCount += tasks.markAborted(scope) { other in
                if other != nexus && !others.contains(other) { others.append(other) }
            }
        }
        outcome.otherNexusesAborted = others
        if case .tasks(let scope) = query { outcome.queryMatched = tasks.contains(scope) }
        return outcome
    }

    /// The service response, given whether the query (if any) matched in some task set.
    public func response(queryMatched: Bool) -> TaskManagementResponse {
        if case .tasks = query, response == .functionComplete {
            return queryMatched ? .functionSucceeded : .functionComplete
        }
        return response
    }

    /// QUERY ASYNCHRONOUS EVENT's ADDITIONAL RESPONSE INFORMATION (SAM-5 7.x): sense key, ASC, ASCQ of the
    /// pending unit attention (UADE DEPTH 00b, not reported); zeros when none.
    public var additionalResponseInformation: (UInt8, UInt8, UInt8) {
        guard let ua = pendingUnitAttention else { return (0, 0, 0) }
        return (SenseKey.unitAttention.rawValue, ua.code, ua.qualifier)
    }
}

/// What applying a `TaskManagementPlan` to task sets found.
public struct TaskManagementOutcome: Sendable, Equatable {
    /// Tasks newly marked aborted.
    public var abortedCount = 0
    /// Nexuses other than the TMF's own whose tasks were aborted.
    public var otherNexusesAborted: [ITNexus] = []
    /// Whether the plan's query found a live task.
    public var queryMatched = false

    public init() {}

    /// Combines the outcomes of several task sets.
    public mutating func merge(_ other: TaskManagementOutcome) {
        abortedCount += other.abortedCount
        for n in other.otherNexusesAborted where !otherNexusesAborted.contains(n) { otherNexusesAborted.append(n) }
        queryMatched = queryMatched || other.queryMatched
    }
}

extension SCSITarget {
    /// Decides a task management function received from `nexus` for `lun` (nil when the front-end could
    /// not decode the LUN) and applies its logical-unit side effects; see `TaskManagementPlan`.
    public func planTaskManagement(_ function: TaskManagementFunction, nexus: ITNexus,
                                   lun: LogicalUnitNumber?) -> TaskManagementPlan {
        let unit = lun.flatMap { logicalUnit($0) }
        let all = function == .itNexusReset ? lunNumbers.compactMap { logicalUnit($0) } : []
        return TaskManagementPlan.make(function, nexus: nexus, lun: lun, unit: unit, allUnits: all)
    }

    /// Finishes a plan once every task set applied it: establishes the plan's unit attention for the other
    /// nexuses whose tasks were aborted.
    public func finishTaskManagement(_ plan: TaskManagementPlan, _ outcome: TaskManagementOutcome) {
        guard let ua = plan.unitAttentionForOthersAborted, let lun = plan.lun, let unit = logicalUnit(lun) else { return }
        TaskManagementPlan.finish(plan, outcome, unit: unit, ua: ua)
    }
}

extension TaskManagementPlan {
    /// `SCSITarget.finishTaskManagement` for a known unit.
    public static func finish(_ plan: TaskManagementPlan, _ outcome: TaskManagementOutcome, unit: LogicalUnit) {
        guard let ua = plan.unitAttentionForOthersAborted else { return }
        finish(plan, outcome, unit: unit, ua: ua)
    }

    fileprivate static func finish(_ plan: TaskManagementPlan, _ outcome: TaskManagementOutcome,
                                   unit: LogicalUnit, ua: AdditionalSense) {
        for other in outcome.otherNexusesAborted where other != plan.nexus {
            unit.unitAttentions.establish(ua, for: .only(other))
        }
    }
}
