//! File transfers must not stall the other work of a VM: the agent runs on
//! one async thread, and a large `cp` that wrote, read or flushed on it froze
//! every exec and port forward in the same VM until it finished.

use std::process::Stdio;
use std::time::{Duration, Instant};

use super::{pseudo_random, Env};

/// One `exec -- true` round trip, CLI start to exit.
fn exec_true(env: &Env, vm: &str) -> Duration {
    let t = Instant::now();
    let out = env
        .cmd(&["exec", vm, "--", "true"])
        .stdin(Stdio::null())
        .output()
        .expect("run machinen exec");
    let d = t.elapsed();
    assert!(
        out.status.success(),
        "exec -- true failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    d
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Round trips measured while `cp` (spawned with `args`) runs; at least
/// `MIN_BUSY` of them, all started before the copy ended.
fn busy_round_trips(env: &Env, vm: &str, args: &[&str]) -> Vec<Duration> {
    const MIN_BUSY: usize = 3;
    let mut cp = env
        .cmd(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn cp");
    let started = Instant::now();
    let mut samples = Vec::new();
    let status = loop {
        if let Some(st) = cp.try_wait().expect("wait cp") {
            break st;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "machinen {args:?} still running after 600 s"
        );
        samples.push(exec_true(env, vm));
    };
    assert!(status.success(), "machinen {args:?} failed: {status}");
    eprintln!(
        "{args:?}: {:.1} s, {} round trips during it",
        started.elapsed().as_secs_f64(),
        samples.len()
    );
    assert!(
        samples.len() >= MIN_BUSY,
        "the copy ended after {} round trips; too quick to measure anything",
        samples.len()
    );
    samples
}

#[test]
fn a_200_mib_cp_does_not_stall_concurrent_execs() {
    // Medians of several round trips on both sides keep a loaded 2-core TCG
    // host's noise from deciding the outcome. The bound is 3x, not 2x: the
    // host's two cores also run the guest's vCPU, the cp client and the
    // supervisor relaying 200 MiB, which alone cost up to ~2.3x here with
    // the agent off the hot path; an agent that does the file I/O on its
    // runtime thread measured 7.7x for a copy out.
    const IDLE_SAMPLES: usize = 9;
    const MAX_RATIO: f64 = 3.0;
    const SIZE: usize = 200 * 1024 * 1024;

    let env = Env::new();
    env.json(&["boot", "--name", "busy", "--detached", "--json"]);
    let dir = tempfile::tempdir().expect("tmp");
    let src = dir.path().join("big.bin");
    std::fs::write(&src, pseudo_random(SIZE, 0x5eed_b10c_u64)).expect("write");
    let src = src.to_str().expect("utf8").to_owned();
    let back = dir.path().join("back.bin");
    let back = back.to_str().expect("utf8").to_owned();

    // The first exec pays for cold caches in the guest; leave it out. The
    // idle baseline is taken before and after the copies, so a change in the
    // host's load from other work shifts both sides alike.
    exec_true(&env, "busy");
    let mut idle: Vec<Duration> = (0..IDLE_SAMPLES).map(|_| exec_true(&env, "busy")).collect();

    let into = busy_round_trips(&env, "busy", &["cp", &src, "busy:/var/tmp/big.bin"]);
    let out_of = busy_round_trips(&env, "busy", &["cp", "busy:/var/tmp/big.bin", &back]);
    assert_eq!(
        std::fs::metadata(&back).expect("copied back").len(),
        SIZE as u64
    );

    env.run_ok(&["exec", "busy", "--", "rm", "/var/tmp/big.bin"]);
    idle.extend((0..IDLE_SAMPLES).map(|_| exec_true(&env, "busy")));
    let idle = median(idle);
    let (m_in, m_out) = (median(into.clone()), median(out_of.clone()));
    let ratio = |d: Duration| d.as_secs_f64() / idle.as_secs_f64();
    eprintln!(
        "exec -- true median: idle {:.0} ms; during cp in {:.0} ms ({:.2}x, max {:.0} ms); \
         during cp out {:.0} ms ({:.2}x, max {:.0} ms)",
        idle.as_secs_f64() * 1e3,
        m_in.as_secs_f64() * 1e3,
        ratio(m_in),
        into.iter().max().expect("samples").as_secs_f64() * 1e3,
        m_out.as_secs_f64() * 1e3,
        ratio(m_out),
        out_of.iter().max().expect("samples").as_secs_f64() * 1e3,
    );
    assert!(
        ratio(m_in) < MAX_RATIO,
        "a cp into the VM stalls its execs: median {m_in:?} vs {idle:?} idle"
    );
    assert!(
        ratio(m_out) < MAX_RATIO,
        "a cp out of the VM stalls its execs: median {m_out:?} vs {idle:?} idle"
    );
    env.run_ok(&["stop", "busy"]);
}
