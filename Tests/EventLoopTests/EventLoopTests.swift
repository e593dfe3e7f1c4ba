import CSystem
import EventLoop
import Synchronization
import Testing
#if canImport(Glibc)
import Glibc
#endif

@Suite struct EventLoopTests {
    @Test func eventfdHandlerRunsAndStopReturns() throws {
        let loop = try EventLoop(name: "test-loop", pollBudgetNanoseconds: 0)
        let fd = csys_eventfd(0, 1)
        defer { close(fd) }
        let seen = Atomic<Int>(0)
        try loop.register(fd: fd) { events in
            #expect(events.contains(.readable))
            var v: UInt64 = 0
            _ = csys_eventfd_drain(fd, &v)
            seen.add(Int(v), ordering: .relaxed)
            loop.stop()
        }
        _ = csys_eventfd_signal(fd, 3)
        loop.run()
        let total = seen.load(ordering: .relaxed)
        #expect(total == 3)
    }

    @Test func executeRunsOnLoopAndPollersSpin() throws {
        let loop = try EventLoop(name: "test-loop2", pollBudgetNanoseconds: 1_000_000)
        var polls = 0
        var sleeps = 0
        loop.addPoller(RingPoller(poll: {
            polls += 1
            return polls < 100
        }, prepareToSleep: {
            sleeps += 1
            return true
        }))
        let ran = Atomic<Bool>(false)
        loop.execute {
            ran.store(true, ordering: .relaxed)
        }
        let thread = Thread_spawn { loop.run() }
        usleep(50_000)
        loop.stop()
        Thread_join(thread)
        let didRun = ran.load(ordering: .relaxed)
        #expect(didRun)
        #expect(polls >= 100)
        #expect(sleeps >= 1)
    }
}

/// Minimal pthread wrapper for tests.
private final class Box: @unchecked Sendable { let body: () -> Void; init(_ b: @escaping () -> Void) { body = b } }
private func Thread_spawn(_ body: @escaping () -> Void) -> pthread_t {
    var t = pthread_t()
    let box = Unmanaged.passRetained(Box(body)).toOpaque()
    pthread_create(&t, nil, { arg in
        let b = Unmanaged<Box>.fromOpaque(arg!).takeRetainedValue()
        b.body()
        return nil
    }, box)
    return t
}
private func Thread_join(_ t: pthread_t) { pthread_join(t, nil) }
