//! `machinen image check DIR` and `machinen image schema [DOCUMENT]`.

use machinen::procimage::format::{self, Arch, CheckOptions, PlanStep, SyscallPolicy};
use machinen::Result;

use crate::cli::{ImageAction, ImageArgs};
use crate::output::print_json;

fn policy(s: &str) -> SyscallPolicy {
    if s == "refuse" {
        SyscallPolicy::Refuse
    } else {
        SyscallPolicy::DeferTargetResume
    }
}

pub fn run(a: ImageArgs) -> Result<i32> {
    match a.action {
        ImageAction::Schema { document } => {
            let all = format::schema::schemas();
            let picked: Vec<_> = all
                .into_iter()
                .filter(|(n, _)| document.as_deref().is_none_or(|d| d == *n))
                .collect();
            let value = if picked.len() == 1 {
                picked
                    .into_iter()
                    .map(|(_, s)| s)
                    .next()
                    .unwrap_or_default()
            } else {
                serde_json::Value::Object(
                    picked
                        .into_iter()
                        .map(|(n, s)| (n.to_string(), s))
                        .collect(),
                )
            };
            crate::outln!(
                "{}",
                serde_json::to_string_pretty(&value).unwrap_or_default()
            );
            Ok(0)
        }
        ImageAction::Check {
            dir,
            target_arch,
            sleep_policy,
            poll_policy,
        } => {
            let opts = CheckOptions {
                target_arch: target_arch.as_deref().and_then(|t| t.parse::<Arch>().ok()),
                sleep_timer_policy: policy(&sleep_policy),
                poll_timeout_policy: policy(&poll_policy),
            };
            let plan = machinen::procimage::check(&dir, opts)?;
            if a.json {
                print_json(&plan);
                return Ok(if plan.restorable() {
                    0
                } else {
                    machinen::ErrorCode::BootPortableUnsupported.exit_code()
                });
            }
            crate::outln!(
                "{}: {} ({}), captured on {}, to restore on {}",
                dir.display(),
                plan.exe,
                plan.argv.join(" "),
                plan.source_arch,
                plan.target_arch
            );
            if !plan.restorable() {
                // The error lists every refusal (code: why).
                return Err(machinen::procimage::unsupported(&dir, &plan).into());
            }
            crate::outln!("restorable; the plan:");
            for s in &plan.steps {
                crate::outln!("  {}", describe(s));
            }
            Ok(0)
        }
    }
}

fn describe(s: &PlanStep) -> String {
    match s {
        PlanStep::MapCaptured {
            mapping,
            start,
            end,
            perms,
            memory_offset,
            size_bytes,
        } => {
            format!("map {start}-{end} {perms} ({mapping}): {size_bytes} captured bytes from offset {memory_offset}")
        }
        PlanStep::MapFile {
            mapping,
            start,
            end,
            perms,
            path,
            offset,
        } => {
            format!("map {start}-{end} {perms} ({mapping}): {path} at offset {offset}")
        }
        PlanStep::MapZeroed {
            mapping,
            start,
            end,
            perms,
        } => {
            format!("map {start}-{end} {perms} ({mapping}): zeroed")
        }
        PlanStep::Omit { mapping, reason } => format!("leave out {mapping}: {reason}"),
        PlanStep::InheritStdio { fds } => format!(
            "inherit descriptors {} from the restorer",
            fds.iter()
                .map(|f| f.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        PlanStep::SetRegisters { thread, arch } => {
            format!("load thread {thread}'s {arch} registers")
        }
        PlanStep::Continue { thread } => format!("thread {thread} goes on where it stopped"),
        PlanStep::ResumeWait {
            thread, syscall, ..
        } => {
            format!("thread {thread} enters {syscall} again with the time that was left")
        }
    }
}

/// `machinen capture TARGET PID -o DIR`.
pub async fn capture(a: crate::cli::CaptureArgs) -> Result<i32> {
    let max_bytes = match &a.max_bytes {
        None => None,
        Some(s) => Some(machinen::hostfile::parse_size(s).ok_or_else(|| {
            machinen::error::fail(
                machinen::ErrorCode::BootArgsInvalid,
                format!("--max-bytes {s:?} is not a size"),
            )
            .hint("bytes, or with a unit: 512M, 2G")
        })?),
    };
    let vm = machinen::vm::attach(&a.target).await?;
    let r = machinen::procimage::capture(
        &vm,
        a.pid,
        &a.out,
        machinen::procimage::CaptureOptions {
            kill: a.kill,
            max_bytes,
        },
    )
    .await?;
    if a.json {
        print_json(&r);
        return Ok(0);
    }
    crate::outln!(
        "captured process {} into {}: {} thread(s), {} mappings, {:.1} MiB of memory{}",
        r.pid,
        r.dir.display(),
        r.threads,
        r.mappings,
        r.memory_bytes as f64 / 1048576.0,
        if r.killed {
            "; the process was killed"
        } else {
            ""
        }
    );
    if r.plan.restorable() {
        crate::outln!(
            "restorable on {}: `machinen image check {}` shows the plan",
            r.plan.target_arch,
            r.dir.display()
        );
    } else {
        crate::outln!("not restorable here ({} refusals):", r.plan.refusals.len());
        for f in &r.plan.refusals {
            crate::outln!("  {:<36} {}", f.code.as_str(), f.message);
        }
    }
    Ok(0)
}

/// `machinen materialize TARGET DIR`: exits with the process's status.
pub async fn materialize(a: crate::cli::MaterializeArgs) -> Result<i32> {
    let vm = machinen::vm::attach(&a.target).await?;
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let status = machinen::procimage::materialize(&vm, &a.dir, &mut stdout, &mut stderr).await?;
    Ok(status.shell_code())
}

/// `machinen criu TARGET -- ARGS…`: exits with CRIU's status.
pub async fn criu(a: crate::cli::CriuArgs) -> Result<i32> {
    let paths = machinen::Paths::from_env()?;
    let vm = machinen::vm::attach(&a.target).await?;
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let status = machinen::criu::run(&vm, &paths, &a.args, &mut stdout, &mut stderr).await?;
    Ok(status.shell_code())
}
