import BlockIO
import Foundation
@testable import ISCSIBackend
import TestSupport
import Testing

/// ABORT TASK and LUN RESET mapped onto the remote target (tgtd).
@Suite(.serialized, .enabled(if: TgtTarget.availability.ok, "tgtd cannot be started on this machine (see stderr)"))
struct ISCSITaskManagementTests {
    func online(_ target: TgtTarget) throws -> (ISCSIChannel, ChannelDriver) {
        let config = try ISCSIBackendConfig(url: target.url, initiatorName: testInitiator,
                                            reconnectBackoff: ISCSIReconnectBackoff(initialMilliseconds: 50, maximumMilliseconds: 300))
        let backend = try ISCSIBackend.open(config: config)
        let channel = try backend.makeChannel()
        let driver = ChannelDriver(channel)
        #expect(driver.waitOnline(seconds: 5))
        return (channel, driver)
    }

    @Test func abortingAnUnsentRequestCancelsItLocally() throws {
        let target = try TgtTarget(sizeMiB: 4)
        let (channel, driver) = try online(target)
        let b = TestBuffers(length: 4096, pieces: 1)
        b.bytes = [UInt8](repeating: 0x11, count: 4096)
        #expect(channel.submit(BlockRequest(operation: .write, offset: 0, length: 4096, buffers: b.list), token: 5) == 0)
        #expect(channel.abort(token: 5))
        #expect(!channel.abort(token: 6))
        driver.pump(seconds: 1) { driver.results[5] != nil }
        #expect(driver.results[5]?.0 == .failure(ECANCELED))
        #expect(channel.statistics.taskManagementResponses == 0) // nothing was sent
        #expect(target.readBacking(offset: 0, count: 4096) == [UInt8](repeating: 0, count: 4096))
    }

    @Test func abortTaskOfAFrozenCommandReachesTheRemote() throws {
        let target = try TgtTarget(sizeMiB: 4)
        let (channel, driver) = try online(target)
        let b = TestBuffers(length: 4096, pieces: 1)
        b.bytes = [UInt8](repeating: 0x22, count: 4096)
        #expect(target.signal(SIGSTOP))
        #expect(channel.submit(BlockRequest(operation: .write, offset: 8192, length: 4096, buffers: b.list), token: 1) == 0)
        driver.pump(seconds: 0.2) { false }
        #expect(channel.inFlight == 1)
        #expect(channel.abort(token: 1))
        #expect(channel.pendingTaskManagement == 1)
        #expect(target.signal(SIGCONT))
        driver.pump(seconds: 5) { driver.results[1] != nil && channel.pendingTaskManagement == 0 }
        #expect(channel.statistics.taskManagementResponses == 1)
        #expect(channel.lastTaskManagementResponse >= 0)
        // Either the write finished before the abort (then it is really in the file) or it was aborted.
        let result = driver.results[1]?.0
        if result == .success(4096) {
            #expect(target.readBacking(offset: 8192, count: 4096) == [UInt8](repeating: 0x22, count: 4096))
        } else {
            #expect(result == .failure(ECANCELED))
        }
        // The session keeps working.
        #expect(driver.perform(BlockRequest(operation: .read, offset: 0, length: 4096, buffers: b.list), token: 2) == .success(4096))
    }

    @Test func lunResetCompletesEverythingAndSessionContinues() throws {
        let target = try TgtTarget(sizeMiB: 8)
        let (channel, driver) = try online(target)
        let buffers = (0..<16).map { i -> TestBuffers in
            let b = TestBuffers(length: 16384, pieces: 2)
            b.bytes = TestBuffers.pattern(16384, seed: UInt8(i))
            return b
        }
        for (i, b) in buffers.enumerated() {
            #expect(channel.submit(BlockRequest(operation: .write, offset: UInt64(i * 16384), length: 16384, buffers: b.list),
                                   token: UInt64(i)) == 0)
        }
        channel.commit()
        #expect(channel.resetLUN() == 0)
        driver.pump(seconds: 5) { driver.results.count == 16 && channel.pendingTaskManagement == 0 }
        #expect(driver.results.count == 16)
        #expect(channel.statistics.taskManagementResponses == 1)
        #expect(channel.lastTaskManagementResponse == 0)
        for i in 0..<16 {
            let r = driver.results[UInt64(i)]?.0
            #expect(r == .success(16384) || r == .failure(ECANCELED))
            if r == .success(16384) {
                #expect(target.readBacking(offset: i * 16384, count: 16384) == TestBuffers.pattern(16384, seed: UInt8(i)))
            }
        }
        #expect(channel.inFlight == 0)
        // After the reset (and its UNIT ATTENTION, retried transparently) I/O works.
        let b = TestBuffers(length: 4096, pieces: 1)
        b.bytes = [UInt8](repeating: 0x33, count: 4096)
        #expect(driver.perform(BlockRequest(operation: .write, offset: 1 << 20, length: 4096, buffers: b.list), token: 100) == .success(4096))
        #expect(target.readBacking(offset: 1 << 20, count: 4096) == [UInt8](repeating: 0x33, count: 4096))
    }
}
