import BlockIO
import Foundation
import Glibc
import TestSupport
import Testing
@testable import Backends

/// `FileBackend.allocationStatus(offset:length:)`: data and hole extents of a sparse file.
@Suite struct FileAllocationStatusTests {
    @Test func reportsHolesAndDataExtents() throws {
        let dir = TemporaryDirectory()
        let path = dir.file("sparse.img")
        let backend = try FileBackend(spec: BackendSpec(kind: .file, path: path, size: 1 << 20, create: true))
        let fd = open(path, O_WRONLY)
        #expect(fd >= 0)
        let data = [UInt8](repeating: 0x5A, count: 8192)
        #expect(data.withUnsafeBytes { pwrite(fd, $0.baseAddress, 8192, 65536) } == 8192)
        #expect(fsync(fd) == 0)
        _ = close(fd)
        let size: UInt64 = 1 << 20
        #expect(backend.allocationStatus(offset: 0, length: size) == AllocationExtent(state: .deallocated, length: 65536))
        #expect(backend.allocationStatus(offset: 0, length: 4096) == AllocationExtent(state: .deallocated, length: 4096))
        #expect(backend.allocationStatus(offset: 65536, length: size - 65536) == AllocationExtent(state: .mapped, length: 8192))
        #expect(backend.allocationStatus(offset: 66048, length: 512) == AllocationExtent(state: .mapped, length: 512))
        #expect(backend.allocationStatus(offset: 73728, length: size - 73728)
                == AllocationExtent(state: .deallocated, length: size - 73728))
        #expect(backend.allocationStatus(offset: size, length: 512) == nil)
        #expect(backend.allocationStatus(offset: 0, length: 0) == nil)
        backend.close()
        #expect(backend.allocationStatus(offset: 0, length: 512) == nil)
    }
}
