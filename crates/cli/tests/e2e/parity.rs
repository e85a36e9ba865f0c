//! Reference-CLI parity: `exec --timeout`, `stop --dry-run`, `boot
//! --disk-size`, `boot --nested`, `restore` into an interactive shell,
//! `gc -n`, `feedback`.

use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use super::Env;

fn err_text(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Command lines of the guest's processes, one a line.
fn guest_cmdlines(env: &Env, vm: &str) -> String {
    let scan = r#"for p in /proc/[0-9]*; do tr '\0' ' ' < $p/cmdline 2>/dev/null; echo; done"#;
    env.run_ok(&["exec", vm, "--", "sh", "-c", scan])
}

/// One VM for the checks that do not disturb each other: exec --timeout
/// (plain, --json, a shell's whole process group), stop --dry-run, then a
/// snapshot restored into an interactive shell.
#[test]
fn exec_timeout_stop_dry_run_and_restore_shell() {
    let env = Env::new();
    env.run_ok(&["boot", "--name", "par", "--detached"]);

    // The command is killed in the guest; exit 124 like timeout(1). It
    // returns long before the command would have ended by itself.
    let t0 = Instant::now();
    let out = env.run(&["exec", "--timeout", "1", "par", "--", "sleep", "10"]);
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "returned before sleep 10 ended"
    );
    assert_eq!(out.status.code(), Some(124), "{}", err_text(&out));
    let err = err_text(&out);
    assert!(
        err.contains("EXEC_TIMEOUT") && err.contains("killed"),
        "{err}"
    );
    assert!(err.contains("hint:") && err.contains("--timeout"), "{err}");
    let ps = guest_cmdlines(&env, "par");
    assert!(
        !ps.lines().any(|l| l.trim_end() == "sleep 10"),
        "no `sleep 10` left in the guest:\n{ps}"
    );

    // A shell's children go with it (the whole process group), and output
    // written before the kill is passed on.
    let out = env.run(&[
        "exec",
        "--timeout",
        "1.5",
        "par",
        "--",
        "sh",
        "-c",
        "echo started; sleep 31 & sleep 32; echo never",
    ]);
    assert_eq!(out.status.code(), Some(124));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("started") && !stdout.contains("never"),
        "{stdout}"
    );
    let ps = guest_cmdlines(&env, "par");
    assert!(
        !ps.lines()
            .any(|l| l.starts_with("sleep 31") || l.starts_with("sleep 32")),
        "{ps}"
    );

    // --json: the error object carries the code.
    let out = env.run(&[
        "exec",
        "--json",
        "--timeout",
        "1",
        "par",
        "--",
        "sleep",
        "10",
    ]);
    assert_eq!(out.status.code(), Some(124));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["error"]["code"], "EXEC_TIMEOUT");
    // A command within its limit is untouched.
    assert_eq!(
        env.run_ok(&["exec", "--timeout", "60", "par", "--", "echo", "ok"])
            .trim(),
        "ok"
    );
    // --pty is the tty flag's other name (the parser accepts it with --timeout).
    let out = env.run(&["exec", "--pty", "--timeout", "30", "par", "--", "true"]);
    assert_eq!(out.status.code(), Some(0), "{}", err_text(&out));

    // stop --dry-run says what it would do and stops nothing.
    let out = env.run_ok(&["stop", "--dry-run", "par"]);
    assert!(
        out.contains("would stop par") && out.contains("nothing was stopped"),
        "{out}"
    );
    let v = env.json(&["stop", "-n", "--force", "--json", "par"]);
    assert_eq!(
        (v["dry_run"].as_bool(), v["how"].as_str()),
        (Some(true), Some("force"))
    );
    assert_eq!(
        env.run_ok(&["exec", "par", "--", "echo", "alive"]).trim(),
        "alive"
    );
    let ls = env.json(&["ls", "--json"]);
    assert_eq!(ls[0]["name"], "par");
    assert_eq!(ls[0]["state"], "running");

    // restore (and fork) without --detached or a command: an interactive
    // shell in the new VM (here fed from a pipe), which stops with it.
    env.run_ok(&[
        "exec",
        "par",
        "--",
        "sh",
        "-c",
        "echo remembered > /root/mark",
    ]);
    let shell = |args: &[&str], input: &[u8]| {
        let mut child = env
            .cmd(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input)
            .expect("feed the shell");
        child.wait_with_output().expect("wait")
    };
    let out = shell(
        &["fork", "par", "--new-name", "forked"],
        b"cat /root/mark; echo fork-$((6*7)); exit 3\n",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{stdout}\n{}", err_text(&out));
    assert!(
        stdout.contains("remembered") && stdout.contains("fork-42"),
        "{stdout}"
    );
    super::wait_until(
        "the fork to stop with its shell",
        Duration::from_secs(20),
        || {
            env.json_quiet(&["ls", "--json"])
                .as_array()
                .is_some_and(|a| a.len() == 1 && a[0]["name"] == "par")
        },
    );
    let work = tempfile::tempdir().expect("tmp");
    let snap = work.path().join("par.snap");
    env.run_ok(&["snapshot", "par", snap.to_str().expect("path")]);
    let out = shell(
        &["restore", snap.to_str().expect("path"), "--name", "shell"],
        b"cat /root/mark; echo in-$((6*7)); exit 5\n",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(5), "{stdout}\n{}", err_text(&out));
    assert!(
        stdout.contains("remembered") && stdout.contains("in-42"),
        "{stdout}"
    );
    assert!(
        err_text(&out).contains("opening a shell"),
        "{}",
        err_text(&out)
    );
    super::wait_until("the shell's VM to stop", Duration::from_secs(20), || {
        env.json_quiet(&["ls", "--json"])
            .as_array()
            .is_none_or(|a| a.is_empty())
    });
    // --json cannot go with an interactive shell.
    let out = env.run(&["restore", snap.to_str().expect("path"), "--json"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn boot_disk_size_is_what_df_shows() {
    let env = Env::new();
    let out = env.run_ok(&[
        "boot",
        "--disk-size",
        "8G",
        "--",
        "df",
        "-B1",
        "--output=size",
        "/",
    ]);
    let bytes: u64 = out
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("df output: {out}"));
    let gib = bytes as f64 / (1u64 << 30) as f64;
    assert!((7.0..=8.5).contains(&gib), "df / shows {gib:.2} GiB");

    // Smaller than the image, or no size at all: refused before booting.
    let out = env.run(&["boot", "--disk-size", "100M", "--", "true"]);
    assert_eq!(out.status.code(), Some(2), "{}", err_text(&out));
    assert!(
        err_text(&out).contains("smaller than the image"),
        "{}",
        err_text(&out)
    );
    let out = env.run(&["boot", "--disk-size", "lots", "--", "true"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn nested_is_refused_naming_what_the_host_lacks_and_feedback_stays_local() {
    let env = Env::new();
    // No usable KVM where these tests run (TCG): always refused.
    let out = env.run(&["boot", "--nested", "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    let err = err_text(&out);
    assert!(
        err.contains("BOOT_NESTED_VIRT_UNSUPPORTED") && err.contains("lacks"),
        "{err}"
    );
    assert!(env.vm_dirs().is_empty(), "nothing was started");
    // gc -n is gc --dry-run.
    assert!(env.run_ok(&["gc", "-n"]).contains("nothing to clean up"));

    let home = tempfile::tempdir().expect("home");
    let run = |args: &[&str]| {
        env.cmd(args)
            .env("MACHINEN_HOME", home.path())
            .stdin(Stdio::null())
            .output()
            .expect("feedback")
    };
    assert!(run(&["feedback", "cp -r is handy"]).status.success());
    assert!(run(&["feedback", "second note"]).status.success());
    let list = run(&["feedback", "--list", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&list.stdout).expect("json");
    let notes = v.as_array().expect("array");
    assert_eq!(notes.len(), 2);
    assert_eq!(notes[0]["text"], "cp -r is handy");
    assert!(notes[1]["time"].as_str().is_some_and(|t| t.ends_with('Z')));
    let file = std::fs::read_to_string(home.path().join("feedback.jsonl")).expect("file");
    assert_eq!(file.lines().count(), 2);
}
