import BlockIO
import CSystem
import PVSCSI
import SCSI
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// An in-memory disk shared by the test and the channel (the channel writes on the loop thread; the test
/// reads after a completion interrupt, which orders the accesses).
public final class MemoryDisk: @unchecked Sendable {
    public let blockSize: UInt64 = 512
    public let blocks: UInt64
    public let bytes: UnsafeMutableRawBufferPointer

    public init(blocks: UInt64) {
        self.blocks = blocks
        bytes = .allocate(byteCount: Int(blocks * 512), alignment: 4096)
        bytes.initializeMemory(as: UInt8.self, repeating: 0)
    }
    deinit { bytes.deallocate() }
}

/// A BlockChannel over a MemoryDisk that completes asynchronously through an eventfd, like libaio.
/// `hold` keeps completions back (to test aborts of in-flight I/O) until `release`.
public final class MemoryChannel: BlockChannel, @unchecked Sendable {
    public let disk: MemoryDisk
    public let completionFD: Int32
    public let hold = Atomic<Bool>(false)
    private var queued: [(UInt64, BlockResult)] = []
    private var ready: [(UInt64, BlockResult)] = []
    public let submitted = Atomic<Int>(0)
    public var failWith: Int32 = 0

    public init(disk: MemoryDisk) {
        self.disk = disk
        completionFD = csys_eventfd(0, 1)
    }
    deinit { Glibc.close(completionFD) }

    public func submit(_ request: BlockRequest, token: UInt64) -> Int32 {
        submitted.add(1, ordering: .relaxed)
        var result = BlockResult.success(request.length)
        let end = request.offset &+ request.length
        if failWith != 0 {
            result = .failure(failWith)
        } else if end > UInt64(disk.bytes.count) || end < request.offset {
            result = .failure(EIO)
        } else {
            let region = UnsafeMutableRawBufferPointer(rebasing: disk.bytes[Int(request.offset)..<Int(end)])
            switch request.operation {
            case .read: result = .success(UInt64(request.buffers.scatter(at: 0, from: UnsafeRawBufferPointer(region))))
            case .write: result = .success(UInt64(request.buffers.gather(from: 0, into: region)))
            case .flush: break
            case .discard, .writeZeroes: region.initializeMemory(as: UInt8.self, repeating: 0)
            }
        }
        queued.append((token, result))
        return 0
    }

    public func commit() {
        guard !hold.load(ordering: .acquiring), !queued.isEmpty else { return }
        ready += queued
        queued.removeAll()
        _ = csys_eventfd_signal(completionFD, 1)
    }

    /// Lets held completions through (call on the loop thread).
    public func release() {
        hold.store(false, ordering: .releasing)
        commit()
    }

    public func reap(_ handler: (UInt64, BlockResult) -> Void) -> Int {
        var v: UInt64 = 0
        _ = csys_eventfd_drain(completionFD, &v)
        let r = ready
        ready.removeAll()
        for (t, res) in r { handler(t, res) }
        return r.count
    }

    public var inFlight: Int { queued.count + ready.count }

    /// With `cancellable`, behaves like a remote back-end: `abort(token:)` / `resetLogicalUnit()` complete the
    /// held requests with ECANCELED (as the iSCSI channel after ABORT TASK / LUN RESET).
    public var cancellable = false
    public let aborted = Atomic<Int>(0)
    public let resets = Atomic<Int>(0)

    public func abort(token: UInt64) -> Bool {
        guard cancellable else { return false }
        aborted.add(1, ordering: .relaxed)
        if let i = queued.firstIndex(where: { $0.0 == token }) {
            queued.remove(at: i)
            ready.append((token, .failure(ECANCELED)))
            _ = csys_eventfd_signal(completionFD, 1)
        }
        return true
    }

    public func resetLogicalUnit() -> Bool {
        guard cancellable else { return false }
        resets.add(1, ordering: .relaxed)
        ready += queued.map { ($0.0, BlockResult.failure(ECANCELED)) }
        queued.removeAll()
        _ = csys_eventfd_signal(completionFD, 1)
        return true
    }

    public let closed = Atomic<Bool>(false)
    public func close() { closed.store(true, ordering: .releasing) }
}

/// A small command layer for the tests (the real one lives on branch `cmd`): INQUIRY, TEST UNIT READY,
/// READ CAPACITY(10), READ(10), WRITE(10); anything else is CHECK CONDITION / INVALID COMMAND OPERATION CODE.
/// With `useCore` it forwards to the real SCSI core (`SCSITarget.execute/resume`, branch `cmd`).
public final class TestCommandTarget: SCSICommandTarget, @unchecked Sendable {
    public let table: SCSITarget
    public let useCore: Bool

    public init(table: SCSITarget, useCore: Bool = false) {
        self.table = table
        self.useCore = useCore
    }

    public func refresh(_ view: inout LUNMapView) { table.refresh(&view) }
    public func subscribe(_ handler: @escaping @Sendable (LUNEvent) -> Void) -> Int { table.subscribe(handler) }
    public func unsubscribe(_ token: Int) { table.unsubscribe(token) }
    public func planTaskManagement(_ function: TaskManagementFunction, nexus: ITNexus, lun: LogicalUnitNumber?) -> TaskManagementPlan {
        table.planTaskManagement(function, nexus: nexus, lun: lun)
    }
    public func finishTaskManagement(_ plan: TaskManagementPlan, _ outcome: TaskManagementOutcome) {
        table.finishTaskManagement(plan, outcome)
    }

    private func check(_ task: inout SCSITask, _ key: SenseKey, _ asc: AdditionalSense) -> TaskDisposition {
        task.status = .checkCondition
        _ = SenseData(key: key, asc).encode(.fixed, into: &task.sense)
        return .complete
    }

    public func execute(_ task: inout SCSITask, view: inout LUNMapView) -> TaskDisposition {
        if useCore { return table.execute(&task, view: &view) }
        guard let lun = task.lun, let unit = view.unit(lun) else {
            return check(&task, .illegalRequest, .logicalUnitNotSupported)
        }
        switch task.cdb.opcode {
        case 0x00:
            return .complete
        case 0x12:
            var data = [UInt8](repeating: 0x20, count: 36)
            data[0] = 0; data[1] = 0; data[2] = 6; data[3] = 2; data[4] = 31; data[5] = 0; data[6] = 0; data[7] = 2
            for (i, c) in unit.identity.vendor.utf8.prefix(8).enumerated() { data[8 + i] = c }
            for (i, c) in unit.identity.product.utf8.prefix(16).enumerated() { data[16 + i] = c }
            for (i, c) in unit.identity.revision.utf8.prefix(4).enumerated() { data[32 + i] = c }
            let allocation = Int(task.cdb.be16(3))
            let n = min(allocation, data.count)
            task.dataInLength = data.withUnsafeBytes { task.dataIn.scatter(at: 0, from: UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
            return .complete
        case 0x25:
            var data = [UInt8](repeating: 0, count: 8)
            let last = UInt32(truncatingIfNeeded: unit.blockCount - 1)
            for i in 0..<4 { data[i] = UInt8(truncatingIfNeeded: last >> (24 - 8 * UInt32(i))) }
            data[6] = 2
            task.dataInLength = data.withUnsafeBytes { task.dataIn.scatter(at: 0, from: $0) }
            return .complete
        case 0x28, 0x2A:
            let lba = UInt64(task.cdb.be32(2))
            let blocks = UInt64(task.cdb.be16(7))
            guard lba + blocks <= unit.blockCount else { return check(&task, .illegalRequest, .lbaOutOfRange) }
            let length = blocks * 512
            let isRead = task.cdb.opcode == 0x28
            let buffers = isRead ? task.dataIn : task.dataOut
            guard UInt64(buffers.totalLength) >= length else { return check(&task, .illegalRequest, .invalidFieldInCDB) }
            if blocks == 0 { return .complete }
            task.backendID = unit.backendID
            return .submit(BlockRequest(operation: isRead ? .read : .write, offset: lba * 512, length: length, buffers: buffers))
        default:
            return check(&task, .illegalRequest, .invalidCommandOperationCode)
        }
    }

    public func resume(_ task: inout SCSITask, with result: BlockResult) -> TaskDisposition {
        if useCore { return table.resume(&task, with: result) }
        guard result.succeeded else {
            return check(&task, .mediumError, task.cdb.opcode == 0x28 ? .unrecoveredReadError : .writeError)
        }
        if task.cdb.opcode == 0x28 { task.dataInLength = Int(result.bytesTransferred) } else { task.dataOutLength = Int(result.bytesTransferred) }
        task.status = .good
        return .complete
    }
}

/// Builds a LUN for the table.
public func makeUnit(_ number: Int, blocks: UInt64, backendID: Int) -> LogicalUnit {
    LogicalUnit(number: LogicalUnitNumber(number)!,
                identity: LogicalUnitIdentity(vendor: "SCSIGATE", product: "TEST-LUN-\(number)", revision: "0001",
                                              serial: "SN\(number)", naa: 0x5000_0000_0000_0000 | UInt64(number)),
                geometry: BlockGeometry(logicalBlockSize: 512, physicalBlockSize: 512, blockCount: blocks),
                backendID: backendID)
}

/// READ(10) and WRITE(10) CDBs.
public func read10(lba: UInt32, blocks: UInt16) -> [UInt8] {
    [0x28, 0, UInt8(lba >> 24), UInt8((lba >> 16) & 0xFF), UInt8((lba >> 8) & 0xFF), UInt8(lba & 0xFF), 0,
     UInt8(blocks >> 8), UInt8(blocks & 0xFF), 0]
}

public func write10(lba: UInt32, blocks: UInt16) -> [UInt8] {
    var c = read10(lba: lba, blocks: blocks)
    c[0] = 0x2A
    return c
}
