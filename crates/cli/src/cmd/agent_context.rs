//! `machinen agent-context`: every command, flag and exit code as one
//! versioned JSON document, generated from the same clap definitions the
//! parser uses (so it cannot drift from `--help`; a test checks).

use clap::CommandFactory;
use machinen::error::ALL;
use serde_json::{json, Value};

use crate::cli::Cli;

/// Bumped on any incompatible change to the document's shape.
pub const SCHEMA_VERSION: u32 = 1;

fn arg_json(a: &clap::Arg) -> Value {
    let action = a.get_action();
    let takes_value = action.takes_values();
    let repeatable = matches!(action, clap::ArgAction::Append | clap::ArgAction::Count);
    let possible: Vec<String> = a
        .get_possible_values()
        .iter()
        .filter(|p| !p.is_hide_set())
        .map(|p| p.get_name().to_string())
        .collect();
    json!({
        "id": a.get_id().as_str(),
        "long": a.get_long().map(|l| format!("--{l}")),
        "short": a.get_short().map(|s| format!("-{s}")),
        "aliases": a.get_visible_aliases().unwrap_or_default().iter().map(|s| format!("--{s}")).collect::<Vec<_>>(),
        "positional": a.is_positional(),
        "trailing": a.is_last_set(),
        "value_name": a.get_value_names().and_then(|v| v.first()).map(|s| s.to_string()),
        "takes_value": takes_value,
        "optional_value": a.get_num_args().is_some_and(|n| n.min_values() == 0 && n.max_values() > 0),
        "required": a.is_required_set(),
        "repeatable": repeatable,
        "default": a.get_default_values().iter().map(|v| v.to_string_lossy().into_owned()).collect::<Vec<_>>(),
        "possible_values": possible,
        "help": a.get_help().map(|h| h.to_string()),
    })
}

fn command_json(c: &clap::Command, path: &[String]) -> Value {
    let mut path = path.to_vec();
    path.push(c.get_name().to_string());
    let mut c2 = c.clone();
    let usage = c2.render_usage().to_string();
    let usage = usage.trim_start_matches("Usage: ").to_string();
    let args: Vec<Value> = c
        .get_arguments()
        .filter(|a| !a.is_hide_set())
        .map(arg_json)
        .collect();
    let subs: Vec<Value> = c
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .map(|s| command_json(s, &path))
        .collect();
    json!({
        "name": c.get_name(),
        "path": path.join(" "),
        "about": c.get_about().map(|s| s.to_string()),
        "aliases": c.get_visible_aliases().collect::<Vec<_>>(),
        "usage": usage,
        "args": args,
        "examples": c.get_after_help().map(|s| s.to_string()),
        "subcommands": subs,
    })
}

/// The document.
pub fn context() -> Value {
    let mut root = Cli::command();
    root.build();
    let commands: Vec<Value> = root
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
        .map(|s| command_json(s, &["machinen".to_string()]))
        .collect();
    let codes: Vec<Value> = ALL
        .iter()
        .map(|c| json!({ "code": c.as_str(), "exit_code": c.exit_code(), "retryable": c.retryable() }))
        .collect();
    json!({
        "schema": "machinen.agent-context",
        "schema_version": SCHEMA_VERSION,
        "machinen_version": env!("CARGO_PKG_VERSION"),
        "protocol_version": machinen_proto::PROTOCOL_VERSION,
        "about": root.get_about().map(|s| s.to_string()),
        "usage": "machinen <COMMAND> [OPTIONS] [-- CMD...]",
        "conventions": {
            "target": "a VM name (path-shaped names like a/b/c are allowed) or the supervisor pid shown by `ls`",
            "json": "data-returning commands take --json: one JSON value on stdout; on failure {\"error\":{\"code\",\"message\",\"causes\",\"hint\",\"retryable\"}} on stdout",
            "errors": "without --json, errors are printed on stderr as `error[CODE]: message` with `caused by:` and `hint:` lines",
            "trailing_command": "the command to run in the guest follows `--`",
        },
        "global_args": root.get_arguments().filter(|a| !a.is_hide_set()).map(arg_json).collect::<Vec<_>>(),
        "commands": commands,
        "exit_codes": {
            "passthrough": "exec, boot -- CMD, attach and repl exit with the guest command's status (128+N when killed by signal N)",
            "fixed": [
                { "exit_code": 0, "meaning": "success" },
                { "exit_code": 2, "meaning": "bad arguments (usage errors and the codes listed with exit_code 2)" },
                { "exit_code": 124, "meaning": "exec --timeout expired: the guest command was killed (EXEC_TIMEOUT), as timeout(1)" },
                { "exit_code": 125, "meaning": "machinen itself failed (see the error code)" },
                { "exit_code": 126, "meaning": "the guest command cannot be run" },
                { "exit_code": 127, "meaning": "the guest command was not found" },
            ],
            "codes": codes,
        },
        "environment": machinen_proto::env::user_vars()
            .map(|v| json!({
                "name": v.name,
                "default": machinen_proto::env::plain(v.default),
                "meaning": machinen_proto::env::plain(v.meaning),
            }))
            .collect::<Vec<_>>(),
    })
}

pub fn run() -> machinen::Result<i32> {
    match serde_json::to_string_pretty(&context()) {
        Ok(s) => crate::outln!("{s}"),
        Err(e) => {
            return Err(machinen::error::fail(
                machinen::ErrorCode::Io,
                "cannot encode the agent context",
            )
            .source(e)
            .into())
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every visible command and flag the parser knows is in the document,
    /// and is also in that command's `--help`.
    #[test]
    fn context_matches_the_parser_and_help() {
        let ctx = context();
        assert_eq!(ctx["schema_version"], SCHEMA_VERSION);
        let mut root = Cli::command();
        root.build();
        let top_help = root.render_long_help().to_string();
        let cmds = ctx["commands"].as_array().expect("commands");
        let visible: Vec<&clap::Command> = root
            .get_subcommands()
            .filter(|s| !s.is_hide_set() && s.get_name() != "help")
            .collect();
        assert_eq!(cmds.len(), visible.len());
        for sub in visible {
            let name = sub.get_name();
            assert!(top_help.contains(name), "{name} missing from --help");
            let doc = cmds
                .iter()
                .find(|c| c["name"] == name)
                .unwrap_or_else(|| panic!("{name} missing from agent-context"));
            let help = sub.clone().render_long_help().to_string();
            let doc_args = doc["args"].as_array().expect("args");
            for a in sub.get_arguments().filter(|a| !a.is_hide_set()) {
                let entry = doc_args
                    .iter()
                    .find(|d| d["id"] == a.get_id().as_str())
                    .unwrap_or_else(|| panic!("{name}: {} missing", a.get_id()));
                if let Some(l) = a.get_long() {
                    assert_eq!(entry["long"], format!("--{l}"));
                    assert!(
                        help.contains(&format!("--{l}")),
                        "{name}: --{l} not in --help"
                    );
                }
            }
            for alias in sub.get_visible_aliases() {
                assert!(doc["aliases"]
                    .as_array()
                    .expect("aliases")
                    .iter()
                    .any(|a| a == alias));
            }
        }
        let codes = ctx["exit_codes"]["codes"].as_array().expect("codes");
        assert_eq!(codes.len(), ALL.len());
        assert!(codes
            .iter()
            .any(|c| c["code"] == "EXEC_COMMAND_NOT_FOUND" && c["exit_code"] == 127));
        // The environment section is the list, and `--help` names it too.
        let vars = ctx["environment"].as_array().expect("environment");
        let listed: Vec<&str> = machinen_proto::env::user_vars().map(|v| v.name).collect();
        let documented: Vec<&str> = vars.iter().filter_map(|v| v["name"].as_str()).collect();
        assert_eq!(documented, listed);
        assert!(documented.contains(&machinen_proto::env::KERNEL_ARGS));
        for name in listed {
            assert!(top_help.contains(name), "{name} missing from --help");
        }
        assert!(
            !ctx.to_string().contains("__vm-names"),
            "hidden commands stay hidden"
        );
    }
}
