import CSystem
#if canImport(Glibc)
import Glibc
#endif

/// The interrupt eventfds a vfio-user client installed with SET_IRQS, and their mask state.
///
/// INTx is level-triggered and auto-masked (as with kernel VFIO): a trigger masks the line until the
/// client sends UNMASK; if the device still asserts the line at UNMASK, it fires again.
/// MSI-X and MSI vectors are edge-triggered; a masked vector remembers a pending trigger and fires on UNMASK.
/// Owned by the server's event-loop thread.
public final class InterruptController: @unchecked Sendable {
    /// Number of MSI-X vectors the device offers.
    public let msixVectors: Int
    /// Number of MSI vectors the device offers (0: no MSI capability).
    public let msiVectors: Int

    private(set) var intxFD: Int32 = -1
    private(set) var intxMasked = false
    private(set) var intxLevel = false
    private(set) var msixFDs: [Int32]
    private var msixMasked: [Bool]
    private var msixPending: [Bool]
    private var msiFDs: [Int32]
    private var msiMasked: [Bool]
    private var msiPending: [Bool]
    /// Count of signals sent (for tests and stats).
    public private(set) var signalsSent = 0

    public init(msixVectors: Int, msiVectors: Int = 0) {
        self.msixVectors = msixVectors
        self.msiVectors = msiVectors
        msixFDs = Array(repeating: -1, count: msixVectors)
        msixMasked = Array(repeating: false, count: msixVectors)
        msixPending = Array(repeating: false, count: msixVectors)
        msiFDs = Array(repeating: -1, count: msiVectors)
        msiMasked = Array(repeating: false, count: msiVectors)
        msiPending = Array(repeating: false, count: msiVectors)
    }

    deinit { reset() }

    /// Closes every eventfd and clears masks.
    public func reset() {
        if intxFD >= 0 { close(intxFD) }
        intxFD = -1
        intxMasked = false
        intxLevel = false
        for i in 0..<msixVectors {
            if msixFDs[i] >= 0 { close(msixFDs[i]) }
            msixFDs[i] = -1
            msixMasked[i] = false
            msixPending[i] = false
        }
        for i in 0..<msiVectors {
            if msiFDs[i] >= 0 { close(msiFDs[i]) }
            msiFDs[i] = -1
            msiMasked[i] = false
            msiPending[i] = false
        }
    }

    /// Whether the client installed an MSI eventfd (the guest enabled MSI).
    public var msiActive: Bool {
        for fd in msiFDs where fd >= 0 { return true }
        return false
    }

    /// Fires MSI vector `vector` (or records it pending when masked).
    public func signalMSI(_ vector: Int) {
        guard vector >= 0 && vector < msiVectors else { return }
        if msiMasked[vector] { msiPending[vector] = true; return }
        let fd = msiFDs[vector]
        guard fd >= 0 else { return }
        _ = csys_eventfd_signal(fd, 1)
        signalsSent += 1
    }

    /// Whether the client installed at least one MSI-X eventfd (the guest enabled MSI-X).
    public var msixActive: Bool {
        for fd in msixFDs where fd >= 0 { return true }
        return false
    }

    /// The eventfd the client installed for `vector` of IRQ `index` (VfioPCIIRQ.intx/.msi/.msix), or -1. Owned
    /// by this controller (closed when the client replaces it): dup it to hand it to another thread.
    public func eventFD(index: Int, vector: Int) -> Int32 {
        switch index {
        case VfioPCIIRQ.intx: return vector == 0 ? intxFD : -1
        case VfioPCIIRQ.msix: return vector >= 0 && vector < msixVectors ? msixFDs[vector] : -1
        case VfioPCIIRQ.msi: return vector >= 0 && vector < msiVectors ? msiFDs[vector] : -1
        default: return -1
        }
    }

    /// Whether an INTx eventfd is installed.
    public var intxActive: Bool { intxFD >= 0 }

    /// Sets the INTx line level.
    public func setINTx(_ level: Bool) {
        intxLevel = level
        if level && !intxMasked && intxFD >= 0 {
            _ = csys_eventfd_signal(intxFD, 1)
            signalsSent += 1
            intxMasked = true
        }
    }

    /// Fires MSI-X vector `vector` (or records it pending when masked).
    public func signalMSIX(_ vector: Int) {
        guard vector >= 0 && vector < msixVectors else { return }
        if msixMasked[vector] { msixPending[vector] = true; return }
        let fd = msixFDs[vector]
        guard fd >= 0 else { return }
        _ = csys_eventfd_signal(fd, 1)
        signalsSent += 1
    }

    func count(for index: Int) -> Int {
        switch index {
        case VfioPCIIRQ.intx: return 1
        case VfioPCIIRQ.msix: return msixVectors
        case VfioPCIIRQ.msi: return msiVectors
        default: return 0
        }
    }

    func assign(index: Int, vector: Int, fd: Int32) {
        if index == VfioPCIIRQ.intx {
            if intxFD >= 0 { close(intxFD) }
            intxFD = fd
            intxMasked = false
            if intxLevel { setINTx(true) }
        } else if index == VfioPCIIRQ.msix {
            if msixFDs[vector] >= 0 { close(msixFDs[vector]) }
            msixFDs[vector] = fd
        } else if index == VfioPCIIRQ.msi {
            if msiFDs[vector] >= 0 { close(msiFDs[vector]) }
            msiFDs[vector] = fd
        } else if fd >= 0 {
            close(fd)
        }
    }

    func trigger(index: Int, vector: Int) {
        if index == VfioPCIIRQ.intx {
            if intxFD >= 0 { _ = csys_eventfd_signal(intxFD, 1); signalsSent += 1 }
        } else if index == VfioPCIIRQ.msix {
            signalMSIX(vector)
        } else if index == VfioPCIIRQ.msi {
            signalMSI(vector)
        }
    }

    func mask(index: Int, vector: Int) {
        if index == VfioPCIIRQ.intx { intxMasked = true } else if index == VfioPCIIRQ.msix { msixMasked[vector] = true }
        else if index == VfioPCIIRQ.msi { msiMasked[vector] = true }
    }

    func unmask(index: Int, vector: Int) {
        if index == VfioPCIIRQ.intx {
            intxMasked = false
            if intxLevel { setINTx(true) }
        } else if index == VfioPCIIRQ.msix {
            msixMasked[vector] = false
            if msixPending[vector] {
                msixPending[vector] = false
                signalMSIX(vector)
            }
        } else if index == VfioPCIIRQ.msi {
            msiMasked[vector] = false
            if msiPending[vector] {
                msiPending[vector] = false
                signalMSI(vector)
            }
        }
    }

    func disableAll(index: Int) {
        for v in 0..<count(for: index) {
            if index == VfioPCIIRQ.intx {
                if intxFD >= 0 { close(intxFD) }
                intxFD = -1
                intxMasked = false
            } else if index == VfioPCIIRQ.msix {
                if msixFDs[v] >= 0 { close(msixFDs[v]) }
                msixFDs[v] = -1
                msixMasked[v] = false
                msixPending[v] = false
            } else if index == VfioPCIIRQ.msi {
                if msiFDs[v] >= 0 { close(msiFDs[v]) }
                msiFDs[v] = -1
                msiMasked[v] = false
                msiPending[v] = false
            }
        }
    }
}

