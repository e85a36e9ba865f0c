//! Typed request/reply pairs: each one-shot request and the one answer it
//! expects, so a caller gets the reply's own type and every "that is not
//! the answer to this request" case is decided here, once, instead of at
//! every call site. (Streaming operations — exec, file transfers, port
//! forwards — answer with more than one frame and are not exchanges.)

use crate::netpolicy::{NetReport, PolicyChange};
use crate::{
    BalloonReport, CriuDumpRequest, CriuDumped, CriuRestoreRequest, FixupReport, FixupRequest,
    Request, Response, Secret, SnapshotReport, SnapshotRequest, VmStatus,
};

/// A request whose answer is one [`Response`] of a known kind.
pub trait Exchange {
    /// What the answer carries.
    type Reply;
    /// What the caller is doing, for error messages ("asking for status").
    const WHAT: &'static str;
    fn request(self) -> Request;
    /// The reply, or the response back when it answers something else.
    fn reply(response: Response) -> Result<Self::Reply, Response>;
}

macro_rules! exchange {
    ($(#[$doc:meta])* $name:ident => $req:expr, $what:literal, $pat:pat => $reply:ty = $val:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone)]
        pub struct $name;
        exchange!(@impl $name, self, $req, $what, $pat => $reply = $val);
    };
    ($(#[$doc:meta])* $name:ident { $($field:ident : $ty:ty),* } => $req:expr, $what:literal,
     $pat:pat => $reply:ty = $val:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone)]
        pub struct $name { $(pub $field: $ty),* }
        exchange!(@impl $name { $($field),* }, self, $req, $what, $pat => $reply = $val);
    };
    (@impl $name:ident $({ $($field:ident),* })?, $self:ident, $req:expr, $what:literal,
     $pat:pat => $reply:ty = $val:expr) => {
        impl Exchange for $name {
            type Reply = $reply;
            const WHAT: &'static str = $what;
            fn request($self) -> Request {
                $(let $name { $($field),* } = $self;)?
                $req
            }
            fn reply(response: Response) -> Result<$reply, Response> {
                match response {
                    $pat => Ok($val),
                    other => Err(other),
                }
            }
        }
    };
}

exchange!(
    /// Send a signal to the VM's main command: its guest pid.
    SignalMain { signal: i32, group: bool } => Request::SignalMain { signal, group },
    "signalling the main command",
    Response::MainSignalled { pid } => u32 = pid
);
exchange!(
    /// Liveness probe.
    Ping => Request::Ping, "probing", Response::Pong => () = ()
);
exchange!(
    /// The supervisor's view of its VM.
    GetStatus => Request::Status, "asking for status", Response::Status(s) => VmStatus = s
);
exchange!(
    /// Shut the VM down; answered at once, the stop goes on after.
    Stop { force: bool } => Request::Stop { force }, "asking the VM to stop",
    Response::Stopping => () = ()
);
exchange!(
    /// Install secrets in the guest: how many, and where.
    SetSecrets { secrets: Vec<Secret> } => Request::Secrets { secrets }, "installing secrets",
    Response::SecretsSet { count, dir } => (u32, String) = (count, dir)
);
exchange!(
    /// Wipe every secret in the guest: how many went.
    WipeSecrets => Request::WipeSecrets, "wiping secrets",
    Response::SecretsWiped { count } => u32 = count
);
exchange!(
    /// Flush guest filesystems.
    Quiesce => Request::Quiesce, "flushing guest filesystems", Response::Quiesced => () = ()
);
exchange!(
    /// Repair the guest after a restore.
    Fixup { req: FixupRequest } => Request::Fixup(req), "repairing the guest after a restore",
    Response::FixedUp(r) => FixupReport = r
);
exchange!(
    /// Write a snapshot bundle.
    Snapshot { req: SnapshotRequest } => Request::Snapshot(req), "taking a snapshot",
    Response::Snapshotted(r) => SnapshotReport = r
);
exchange!(
    /// Read, or with a target set, the balloon.
    Balloon { target_bytes: Option<u64> } => Request::Balloon { target_bytes },
    "asking for the balloon", Response::Balloon(r) => BalloonReport = r
);
exchange!(
    /// Read, or with a change apply, the egress policy.
    Network { change: Option<PolicyChange> } => Request::Network { change },
    "asking for the network policy", Response::Network(r) => NetReport = *r
);
exchange!(
    /// Hand the supervisor the values of the VM's egress secrets.
    SetEgressSecrets { secrets: Vec<Secret> } => Request::EgressSecrets { secrets },
    "handing over egress secrets", Response::EgressSecretsSet { count } => u32 = count
);
exchange!(
    /// Dump a process tree with CRIU in the guest.
    CriuDump { req: CriuDumpRequest } => Request::CriuDump(req),
    "dumping the process tree with CRIU", Response::CriuDumped(r) => CriuDumped = r
);
exchange!(
    /// Restore a process tree with CRIU in the guest: its root's pid.
    CriuRestore { req: CriuRestoreRequest } => Request::CriuRestore(req),
    "restoring the process tree with CRIU", Response::CriuRestored { pid } => u32 = pid
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_matched_to_their_requests() {
        assert!(matches!(GetStatus.request(), Request::Status));
        assert!(matches!(
            Stop { force: true }.request(),
            Request::Stop { force: true }
        ));
        assert_eq!(
            WipeSecrets::reply(Response::SecretsWiped { count: 3 }),
            Ok(3)
        );
        assert_eq!(
            SetSecrets::reply(Response::SecretsSet {
                count: 1,
                dir: "/d".into()
            }),
            Ok((1, "/d".to_string()))
        );
        // Another request's answer comes back, for the caller to report.
        assert_eq!(GetStatus::reply(Response::Pong), Err(Response::Pong));
        assert_eq!(Ping::reply(Response::Stopping), Err(Response::Stopping));
        assert_eq!(Stop::reply(Response::Stopping), Ok(()));
        // A boxed answer comes out unboxed.
        let report = NetReport {
            policy: Default::default(),
            counters: Default::default(),
        };
        assert_eq!(
            Network::reply(Response::Network(Box::new(report.clone()))),
            Ok(report)
        );
        assert!(matches!(
            Network { change: None }.request(),
            Request::Network { change: None }
        ));
    }
}
