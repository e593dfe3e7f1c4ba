/// Counters of one channel's connection history (for the admin CLI and tests).
public struct ISCSIChannelStatistics: Sendable, Equatable {
    /// Successful logins (first one included).
    public var logins: UInt64 = 0
    /// Sessions lost after being online.
    public var connectionLosses: UInt64 = 0
    /// Commands sent again on a new session after the previous one was lost.
    public var commandsResubmitted: UInt64 = 0
    /// Extra commands sent for transfers above the remote's maximum transfer length.
    public var splitParts: UInt64 = 0
    /// Commands retried after a remote UNIT ATTENTION.
    public var unitAttentionsRetried: UInt64 = 0
    /// Commands retried after BUSY, TASK SET FULL, TASK ABORTED, NOT READY (becoming ready) or ABORTED COMMAND.
    public var busyRetries: UInt64 = 0
    /// Requests completed with ETIMEDOUT.
    public var timeouts: UInt64 = 0
    /// Geometry re-reads after CAPACITY DATA HAS CHANGED.
    public var capacityChanges: UInt64 = 0
    /// ABORT TASK / LUN RESET answers received from the remote.
    public var taskManagementResponses: UInt64 = 0
}
