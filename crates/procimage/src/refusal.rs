//! The refusal vocabulary (version 1): why a capture, a check or a restore
//! cannot go on. The codes are the seed's, verbatim and in its order; a
//! refusal names one, says why in words, and may carry details.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The vocabulary's version (`vocabularyVersion` in every refusal list).
pub const VOCABULARY_VERSION: u32 = 1;

/// One reason a process image cannot be captured, checked or restored.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
pub enum RefusalCode {
    #[serde(rename = "active-syscall")]
    ActiveSyscall,
    #[serde(rename = "architecture-pair-unsupported")]
    ArchitecturePairUnsupported,
    #[serde(rename = "architecture-unsupported")]
    ArchitectureUnsupported,
    #[serde(rename = "blocking-syscall-state-unsupported")]
    BlockingSyscallStateUnsupported,
    #[serde(rename = "code-location-unknown")]
    CodeLocationUnknown,
    #[serde(rename = "fd-kind-unsupported")]
    FdKindUnsupported,
    #[serde(rename = "futex-state-unsupported")]
    FutexStateUnsupported,
    #[serde(rename = "inherited-stdio-policy-required")]
    InheritedStdioPolicyRequired,
    #[serde(rename = "kernel-state-unsupported")]
    KernelStateUnsupported,
    #[serde(rename = "mapping-ambiguous")]
    MappingAmbiguous,
    #[serde(rename = "mapping-permission-unsupported")]
    MappingPermissionUnsupported,
    #[serde(rename = "mapping-unreadable")]
    MappingUnreadable,
    #[serde(rename = "pointer-ambiguous")]
    PointerAmbiguous,
    #[serde(rename = "resource-kind-unsupported")]
    ResourceKindUnsupported,
    #[serde(rename = "non-stdio-kernel-state-unsupported")]
    NonStdioKernelStateUnsupported,
    #[serde(rename = "rseq-state-unsupported")]
    RseqStateUnsupported,
    #[serde(rename = "signal-frame-active")]
    SignalFrameActive,
    #[serde(rename = "signal-state-unsupported")]
    SignalStateUnsupported,
    #[serde(rename = "stdin-buffer-state-unsupported")]
    StdinBufferStateUnsupported,
    #[serde(rename = "syscall-argument-state-unsupported")]
    SyscallArgumentStateUnsupported,
    #[serde(rename = "syscall-restart-unsupported")]
    SyscallRestartUnsupported,
    #[serde(rename = "target-build-id-mismatch")]
    TargetBuildIdMismatch,
    #[serde(rename = "target-build-mismatch")]
    TargetBuildMismatch,
    #[serde(rename = "target-code-location-unresolved")]
    TargetCodeLocationUnresolved,
    #[serde(rename = "target-callee-saved-state-unsupported")]
    TargetCalleeSavedStateUnsupported,
    #[serde(rename = "target-caller-frame-unavailable")]
    TargetCallerFrameUnavailable,
    #[serde(rename = "target-code-rva-unmapped")]
    TargetCodeRvaUnmapped,
    #[serde(rename = "target-frame-layout-unsupported")]
    TargetFrameLayoutUnsupported,
    #[serde(rename = "target-frame-register-value-unavailable")]
    TargetFrameRegisterValueUnavailable,
    #[serde(rename = "target-module-bytes-missing")]
    TargetModuleBytesMissing,
    #[serde(rename = "target-module-file-missing")]
    TargetModuleFileMissing,
    #[serde(rename = "target-module-missing")]
    TargetModuleMissing,
    #[serde(rename = "target-module-not-executable")]
    TargetModuleNotExecutable,
    #[serde(rename = "target-module-range-unreadable")]
    TargetModuleRangeUnreadable,
    #[serde(rename = "target-ppoll-syscall-continuation-missing")]
    TargetPpollSyscallContinuationMissing,
    #[serde(rename = "target-ppoll-timeout-missing")]
    TargetPpollTimeoutMissing,
    #[serde(rename = "target-return-slot-unsupported")]
    TargetReturnSlotUnsupported,
    #[serde(rename = "target-resume-execution-unavailable")]
    TargetResumeExecutionUnavailable,
    #[serde(rename = "target-resume-fault-invalid-code-landing")]
    TargetResumeFaultInvalidCodeLanding,
    #[serde(rename = "target-resume-fault-outside-target-bytes")]
    TargetResumeFaultOutsideTargetBytes,
    #[serde(rename = "target-resume-fault-privileged-instruction")]
    TargetResumeFaultPrivilegedInstruction,
    #[serde(rename = "target-resume-fault-signal-unsupported")]
    TargetResumeFaultSignalUnsupported,
    #[serde(rename = "target-resume-fault-timeout")]
    TargetResumeFaultTimeout,
    #[serde(rename = "target-resume-fault-unmodeled-memory")]
    TargetResumeFaultUnmodeledMemory,
    #[serde(rename = "target-semantic-continuation-missing")]
    TargetSemanticContinuationMissing,
    #[serde(rename = "target-sleep-remaining-time-missing")]
    TargetSleepRemainingTimeMissing,
    #[serde(rename = "target-sleep-signal-restart-unsupported")]
    TargetSleepSignalRestartUnsupported,
    #[serde(rename = "target-sleep-syscall-continuation-missing")]
    TargetSleepSyscallContinuationMissing,
    #[serde(rename = "target-synthetic-signal-restart-unsupported")]
    TargetSyntheticSignalRestartUnsupported,
    #[serde(rename = "target-synthetic-syscall-return-unmodeled")]
    TargetSyntheticSyscallReturnUnmodeled,
    #[serde(rename = "thread-state-unsupported")]
    ThreadStateUnsupported,
    #[serde(rename = "tls-state-unsupported")]
    TlsStateUnsupported,
    #[serde(rename = "return-slot-unreadable")]
    ReturnSlotUnreadable,
    #[serde(rename = "target-unwind-mismatch")]
    TargetUnwindMismatch,
    #[serde(rename = "unwind-fde-missing")]
    UnwindFdeMissing,
    #[serde(rename = "unwind-metadata-missing")]
    UnwindMetadataMissing,
    #[serde(rename = "unwind-rule-unsupported")]
    UnwindRuleUnsupported,
    #[serde(rename = "vdso-policy-unsupported")]
    VdsoPolicyUnsupported,
}

/// Every code, in the seed's order.
pub const REFUSAL_CODES: [RefusalCode; 58] = [
    RefusalCode::ActiveSyscall,
    RefusalCode::ArchitecturePairUnsupported,
    RefusalCode::ArchitectureUnsupported,
    RefusalCode::BlockingSyscallStateUnsupported,
    RefusalCode::CodeLocationUnknown,
    RefusalCode::FdKindUnsupported,
    RefusalCode::FutexStateUnsupported,
    RefusalCode::InheritedStdioPolicyRequired,
    RefusalCode::KernelStateUnsupported,
    RefusalCode::MappingAmbiguous,
    RefusalCode::MappingPermissionUnsupported,
    RefusalCode::MappingUnreadable,
    RefusalCode::PointerAmbiguous,
    RefusalCode::ResourceKindUnsupported,
    RefusalCode::NonStdioKernelStateUnsupported,
    RefusalCode::RseqStateUnsupported,
    RefusalCode::SignalFrameActive,
    RefusalCode::SignalStateUnsupported,
    RefusalCode::StdinBufferStateUnsupported,
    RefusalCode::SyscallArgumentStateUnsupported,
    RefusalCode::SyscallRestartUnsupported,
    RefusalCode::TargetBuildIdMismatch,
    RefusalCode::TargetBuildMismatch,
    RefusalCode::TargetCodeLocationUnresolved,
    RefusalCode::TargetCalleeSavedStateUnsupported,
    RefusalCode::TargetCallerFrameUnavailable,
    RefusalCode::TargetCodeRvaUnmapped,
    RefusalCode::TargetFrameLayoutUnsupported,
    RefusalCode::TargetFrameRegisterValueUnavailable,
    RefusalCode::TargetModuleBytesMissing,
    RefusalCode::TargetModuleFileMissing,
    RefusalCode::TargetModuleMissing,
    RefusalCode::TargetModuleNotExecutable,
    RefusalCode::TargetModuleRangeUnreadable,
    RefusalCode::TargetPpollSyscallContinuationMissing,
    RefusalCode::TargetPpollTimeoutMissing,
    RefusalCode::TargetReturnSlotUnsupported,
    RefusalCode::TargetResumeExecutionUnavailable,
    RefusalCode::TargetResumeFaultInvalidCodeLanding,
    RefusalCode::TargetResumeFaultOutsideTargetBytes,
    RefusalCode::TargetResumeFaultPrivilegedInstruction,
    RefusalCode::TargetResumeFaultSignalUnsupported,
    RefusalCode::TargetResumeFaultTimeout,
    RefusalCode::TargetResumeFaultUnmodeledMemory,
    RefusalCode::TargetSemanticContinuationMissing,
    RefusalCode::TargetSleepRemainingTimeMissing,
    RefusalCode::TargetSleepSignalRestartUnsupported,
    RefusalCode::TargetSleepSyscallContinuationMissing,
    RefusalCode::TargetSyntheticSignalRestartUnsupported,
    RefusalCode::TargetSyntheticSyscallReturnUnmodeled,
    RefusalCode::ThreadStateUnsupported,
    RefusalCode::TlsStateUnsupported,
    RefusalCode::ReturnSlotUnreadable,
    RefusalCode::TargetUnwindMismatch,
    RefusalCode::UnwindFdeMissing,
    RefusalCode::UnwindMetadataMissing,
    RefusalCode::UnwindRuleUnsupported,
    RefusalCode::VdsoPolicyUnsupported,
];

impl RefusalCode {
    /// The code as written in documents and printed (`active-syscall`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalCode::ActiveSyscall => "active-syscall",
            RefusalCode::ArchitecturePairUnsupported => "architecture-pair-unsupported",
            RefusalCode::ArchitectureUnsupported => "architecture-unsupported",
            RefusalCode::BlockingSyscallStateUnsupported => "blocking-syscall-state-unsupported",
            RefusalCode::CodeLocationUnknown => "code-location-unknown",
            RefusalCode::FdKindUnsupported => "fd-kind-unsupported",
            RefusalCode::FutexStateUnsupported => "futex-state-unsupported",
            RefusalCode::InheritedStdioPolicyRequired => "inherited-stdio-policy-required",
            RefusalCode::KernelStateUnsupported => "kernel-state-unsupported",
            RefusalCode::MappingAmbiguous => "mapping-ambiguous",
            RefusalCode::MappingPermissionUnsupported => "mapping-permission-unsupported",
            RefusalCode::MappingUnreadable => "mapping-unreadable",
            RefusalCode::PointerAmbiguous => "pointer-ambiguous",
            RefusalCode::ResourceKindUnsupported => "resource-kind-unsupported",
            RefusalCode::NonStdioKernelStateUnsupported => "non-stdio-kernel-state-unsupported",
            RefusalCode::RseqStateUnsupported => "rseq-state-unsupported",
            RefusalCode::SignalFrameActive => "signal-frame-active",
            RefusalCode::SignalStateUnsupported => "signal-state-unsupported",
            RefusalCode::StdinBufferStateUnsupported => "stdin-buffer-state-unsupported",
            RefusalCode::SyscallArgumentStateUnsupported => "syscall-argument-state-unsupported",
            RefusalCode::SyscallRestartUnsupported => "syscall-restart-unsupported",
            RefusalCode::TargetBuildIdMismatch => "target-build-id-mismatch",
            RefusalCode::TargetBuildMismatch => "target-build-mismatch",
            RefusalCode::TargetCodeLocationUnresolved => "target-code-location-unresolved",
            RefusalCode::TargetCalleeSavedStateUnsupported => {
                "target-callee-saved-state-unsupported"
            }
            RefusalCode::TargetCallerFrameUnavailable => "target-caller-frame-unavailable",
            RefusalCode::TargetCodeRvaUnmapped => "target-code-rva-unmapped",
            RefusalCode::TargetFrameLayoutUnsupported => "target-frame-layout-unsupported",
            RefusalCode::TargetFrameRegisterValueUnavailable => {
                "target-frame-register-value-unavailable"
            }
            RefusalCode::TargetModuleBytesMissing => "target-module-bytes-missing",
            RefusalCode::TargetModuleFileMissing => "target-module-file-missing",
            RefusalCode::TargetModuleMissing => "target-module-missing",
            RefusalCode::TargetModuleNotExecutable => "target-module-not-executable",
            RefusalCode::TargetModuleRangeUnreadable => "target-module-range-unreadable",
            RefusalCode::TargetPpollSyscallContinuationMissing => {
                "target-ppoll-syscall-continuation-missing"
            }
            RefusalCode::TargetPpollTimeoutMissing => "target-ppoll-timeout-missing",
            RefusalCode::TargetReturnSlotUnsupported => "target-return-slot-unsupported",
            RefusalCode::TargetResumeExecutionUnavailable => "target-resume-execution-unavailable",
            RefusalCode::TargetResumeFaultInvalidCodeLanding => {
                "target-resume-fault-invalid-code-landing"
            }
            RefusalCode::TargetResumeFaultOutsideTargetBytes => {
                "target-resume-fault-outside-target-bytes"
            }
            RefusalCode::TargetResumeFaultPrivilegedInstruction => {
                "target-resume-fault-privileged-instruction"
            }
            RefusalCode::TargetResumeFaultSignalUnsupported => {
                "target-resume-fault-signal-unsupported"
            }
            RefusalCode::TargetResumeFaultTimeout => "target-resume-fault-timeout",
            RefusalCode::TargetResumeFaultUnmodeledMemory => "target-resume-fault-unmodeled-memory",
            RefusalCode::TargetSemanticContinuationMissing => {
                "target-semantic-continuation-missing"
            }
            RefusalCode::TargetSleepRemainingTimeMissing => "target-sleep-remaining-time-missing",
            RefusalCode::TargetSleepSignalRestartUnsupported => {
                "target-sleep-signal-restart-unsupported"
            }
            RefusalCode::TargetSleepSyscallContinuationMissing => {
                "target-sleep-syscall-continuation-missing"
            }
            RefusalCode::TargetSyntheticSignalRestartUnsupported => {
                "target-synthetic-signal-restart-unsupported"
            }
            RefusalCode::TargetSyntheticSyscallReturnUnmodeled => {
                "target-synthetic-syscall-return-unmodeled"
            }
            RefusalCode::ThreadStateUnsupported => "thread-state-unsupported",
            RefusalCode::TlsStateUnsupported => "tls-state-unsupported",
            RefusalCode::ReturnSlotUnreadable => "return-slot-unreadable",
            RefusalCode::TargetUnwindMismatch => "target-unwind-mismatch",
            RefusalCode::UnwindFdeMissing => "unwind-fde-missing",
            RefusalCode::UnwindMetadataMissing => "unwind-metadata-missing",
            RefusalCode::UnwindRuleUnsupported => "unwind-rule-unsupported",
            RefusalCode::VdsoPolicyUnsupported => "vdso-policy-unsupported",
        }
    }
}

impl std::fmt::Display for RefusalCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seed's list, as its `nativeProcessImageRefusalCodes` declares it.
    const SEED: &str = r#""active-syscall", "architecture-pair-unsupported", "architecture-unsupported", "blocking-syscall-state-unsupported", "code-location-unknown", "fd-kind-unsupported", "futex-state-unsupported", "inherited-stdio-policy-required", "kernel-state-unsupported", "mapping-ambiguous", "mapping-permission-unsupported", "mapping-unreadable", "pointer-ambiguous", "resource-kind-unsupported", "non-stdio-kernel-state-unsupported", "rseq-state-unsupported", "signal-frame-active", "signal-state-unsupported", "stdin-buffer-state-unsupported", "syscall-argument-state-unsupported", "syscall-restart-unsupported", "target-build-id-mismatch", "target-build-mismatch", "target-code-location-unresolved", "target-callee-saved-state-unsupported", "target-caller-frame-unavailable", "target-code-rva-unmapped", "target-frame-layout-unsupported", "target-frame-register-value-unavailable", "target-module-bytes-missing", "target-module-file-missing", "target-module-missing", "target-module-not-executable", "target-module-range-unreadable", "target-ppoll-syscall-continuation-missing", "target-ppoll-timeout-missing", "target-return-slot-unsupported", "target-resume-execution-unavailable", "target-resume-fault-invalid-code-landing", "target-resume-fault-outside-target-bytes", "target-resume-fault-privileged-instruction", "target-resume-fault-signal-unsupported", "target-resume-fault-timeout", "target-resume-fault-unmodeled-memory", "target-semantic-continuation-missing", "target-sleep-remaining-time-missing", "target-sleep-signal-restart-unsupported", "target-sleep-syscall-continuation-missing", "target-synthetic-signal-restart-unsupported", "target-synthetic-syscall-return-unmodeled", "thread-state-unsupported", "tls-state-unsupported", "return-slot-unreadable", "target-unwind-mismatch", "unwind-fde-missing", "unwind-metadata-missing", "unwind-rule-unsupported", "vdso-policy-unsupported""#;

    #[test]
    fn the_vocabulary_is_the_seeds_verbatim_and_in_order() {
        let seed: Vec<String> = serde_json::from_str(&format!("[{SEED}]")).expect("seed list");
        let ours: Vec<&str> = REFUSAL_CODES.iter().map(|c| c.as_str()).collect();
        assert_eq!(ours, seed);
        for c in REFUSAL_CODES {
            let json = serde_json::to_string(&c).expect("serialize");
            assert_eq!(json, format!("\"{c}\""));
            assert_eq!(
                serde_json::from_str::<RefusalCode>(&json).expect("parse"),
                c
            );
        }
        assert!(serde_json::from_str::<RefusalCode>("\"no-such-code\"").is_err());
    }
}
