//! `machinen mux [TARGET]`: one terminal for many VMs (see
//! [`machinen::sandboxes::Supervisor`]).

use machinen::Result;

use crate::cli::MuxArgs;

pub async fn run(a: MuxArgs) -> Result<i32> {
    let shell = super::attach::shell_argv(a.shell.as_deref());
    let mut sup = machinen::sandboxes::Supervisor::new(shell);
    sup.run(a.target.as_deref()).await
}
