//! machinen's errors as the gRPC statuses containerd understands: the code
//! picks containerd's error kind (not found, invalid argument, failed
//! precondition), the message starts with machinen's own code.

use containerd_shim_protos::ttrpc::{self, Code};
use machinen::ErrorCode;

/// A ttrpc error for a machinen error: `[CODE] message (hint: …)`.
pub fn from_machinen(e: &machinen::Error) -> ttrpc::Error {
    let mut msg = format!("[{}] {e}", e.code());
    for c in e.causes() {
        msg.push_str(": ");
        msg.push_str(&c);
    }
    if let Some(h) = e.hint() {
        msg.push_str(&format!(" (hint: {h})"));
    }
    ttrpc::Error::RpcStatus(ttrpc::get_status(grpc_code(e.code()), msg))
}

/// A ttrpc error for one of the shim's own refusals.
pub fn refuse(code: ErrorCode, msg: impl std::fmt::Display) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(
        grpc_code(code),
        format!("[{code}] {msg}"),
    ))
}

fn grpc_code(code: ErrorCode) -> Code {
    use ErrorCode::*;
    match code {
        ContainerNotFound | MainNotRunning | RegistryNotFound => Code::NOT_FOUND,
        ContainerSpecInvalid | SignalInvalid | BootArgsInvalid | BootMemoryInvalid
        | BalloonTargetInvalid | BootMountInvalid | MountPathInvalid | MountPathEscape => {
            Code::INVALID_ARGUMENT
        }
        SnapshotStateInvalid | BalloonUnavailable => Code::FAILED_PRECONDITION,
        RestoreBundleInvalid | RestoreBundleIncompatible | RestoreImageMismatch => {
            Code::INVALID_ARGUMENT
        }
        BootTimeout | SnapshotTimeout | StopTimeout | WaitTimeout => Code::DEADLINE_EXCEEDED,
        _ => Code::INTERNAL,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_carries_the_code_and_picks_the_grpc_kind() {
        let e: machinen::Error = machinen::error::fail(ErrorCode::MainNotRunning, "gone")
            .hint("start it")
            .into();
        match from_machinen(&e) {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), Code::NOT_FOUND);
                assert!(
                    s.message.starts_with("[MAIN_NOT_RUNNING] "),
                    "{}",
                    s.message
                );
                assert!(s.message.contains("hint: start it"), "{}", s.message);
            }
            other => panic!("{other:?}"),
        }
        match refuse(ErrorCode::ContainerSpecInvalid, "no args") {
            ttrpc::Error::RpcStatus(s) => assert_eq!(s.code(), Code::INVALID_ARGUMENT),
            other => panic!("{other:?}"),
        }
    }
}
