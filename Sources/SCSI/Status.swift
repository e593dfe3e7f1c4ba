/// SAM-5 status codes returned with a completed command.
public enum SCSIStatus: UInt8, Sendable {
    case good = 0x00
    case checkCondition = 0x02
    case conditionMet = 0x04
    case busy = 0x08
    case reservationConflict = 0x18
    case taskSetFull = 0x28
    case acaActive = 0x30
    case taskAborted = 0x40
}

/// SPC-4 sense keys.
public enum SenseKey: UInt8, Sendable {
    case noSense = 0x0
    case recoveredError = 0x1
    case notReady = 0x2
    case mediumError = 0x3
    case hardwareError = 0x4
    case illegalRequest = 0x5
    case unitAttention = 0x6
    case dataProtect = 0x7
    case blankCheck = 0x8
    case vendorSpecific = 0x9
    case copyAborted = 0xA
    case abortedCommand = 0xB
    case volumeOverflow = 0xD
    case miscompare = 0xE
}

/// An additional sense code and qualifier pair (ASC/ASCQ).
public struct AdditionalSense: Hashable, Sendable {
    public var code: UInt8
    public var qualifier: UInt8

    public init(_ code: UInt8, _ qualifier: UInt8) {
        self.code = code
        self.qualifier = qualifier
    }

    public static let noAdditionalSense = AdditionalSense(0x00, 0x00)
    public static let unrecoveredReadError = AdditionalSense(0x11, 0x00)
    public static let writeError = AdditionalSense(0x0C, 0x00)
    public static let logicalUnitNotReadyCauseNotReportable = AdditionalSense(0x04, 0x00)
    public static let logicalUnitNotReadyManualIntervention = AdditionalSense(0x04, 0x03)
    public static let invalidCommandOperationCode = AdditionalSense(0x20, 0x00)
    public static let lbaOutOfRange = AdditionalSense(0x21, 0x00)
    public static let invalidFieldInCDB = AdditionalSense(0x24, 0x00)
    public static let logicalUnitNotSupported = AdditionalSense(0x25, 0x00)
    public static let invalidFieldInParameterList = AdditionalSense(0x26, 0x00)
    public static let parameterListLengthError = AdditionalSense(0x1A, 0x00)
    public static let parameterNotSupported = AdditionalSense(0x26, 0x01)
    public static let parameterValueInvalid = AdditionalSense(0x26, 0x02)
    public static let savingParametersNotSupported = AdditionalSense(0x39, 0x00)
    public static let writeProtected = AdditionalSense(0x27, 0x00)
    public static let spaceAllocationFailedWriteProtect = AdditionalSense(0x27, 0x07)
    public static let powerOnResetOrBusDeviceReset = AdditionalSense(0x29, 0x00)
    public static let powerOnOccurred = AdditionalSense(0x29, 0x01)
    public static let busResetOccurred = AdditionalSense(0x29, 0x02)
    public static let busDeviceResetFunctionOccurred = AdditionalSense(0x29, 0x03)
    public static let iTNexusLossOccurred = AdditionalSense(0x29, 0x07)
    public static let modeParametersChanged = AdditionalSense(0x2A, 0x01)
    public static let reservationsPreempted = AdditionalSense(0x2A, 0x03)
    public static let reservationsReleased = AdditionalSense(0x2A, 0x04)
    public static let registrationsPreempted = AdditionalSense(0x2A, 0x05)
    public static let capacityDataHasChanged = AdditionalSense(0x2A, 0x09)
    public static let commandsClearedByAnotherInitiator = AdditionalSense(0x2F, 0x00)
    public static let reportedLUNsDataHasChanged = AdditionalSense(0x3F, 0x0E)
    public static let inquiryDataHasChanged = AdditionalSense(0x3F, 0x03)
    public static let miscompareDuringVerify = AdditionalSense(0x1D, 0x00)
    public static let internalTargetFailure = AdditionalSense(0x44, 0x00)
    public static let insufficientRegistrationResources = AdditionalSense(0x55, 0x04)
    public static let invalidMessageError = AdditionalSense(0x49, 0x00)
    public static let overlappedCommandsAttempted = AdditionalSense(0x4E, 0x00)
    public static let mediumRemovalPrevented = AdditionalSense(0x53, 0x02)
    public static let invalidReleaseOfPersistentReservation = AdditionalSense(0x26, 0x04)
}
