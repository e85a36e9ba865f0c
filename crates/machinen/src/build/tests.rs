use super::*;

fn ctx(files: &[&str]) -> (tempfile::TempDir, Context) {
    let d = tempfile::tempdir().expect("tmp");
    for f in files {
        let p = d.path().join(f);
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::write(&p, f.as_bytes()).expect("write");
    }
    let c = Context::open(d.path()).expect("open");
    (d, c)
}

fn args(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn plan_of(
    text: &str,
    base: &ImageConfig,
    ba: &[(&str, &str)],
    c: &Context,
) -> Result<(Plan, String), Failure> {
    let ins = dockerfile::parse(text)?;
    let mut key = blake3::Hasher::new();
    let p = plan(&ins, base, &args(ba), c, &mut key)?;
    Ok((p, key.finalize().to_hex().to_string()))
}

fn base() -> ImageConfig {
    ImageConfig {
        cmd: Some(vec!["python3".into()]),
        env: [(
            "PATH".to_string(),
            "/usr/local/bin:/usr/bin:/bin".to_string(),
        )]
        .into_iter()
        .collect(),
        exposed_ports: vec!["5000/tcp".into()],
        ..ImageConfig::default()
    }
}

#[test]
fn from_takes_args_declared_before_it_and_refuses_what_it_cannot_build() {
    let ins =
        dockerfile::parse("ARG TAG=3.12\nARG REG\nFROM $REG/python:${TAG} AS app\nRUN true\n")
            .expect("parse");
    assert_eq!(from_of(&ins, &args(&[])).expect("from").0, "/python:3.12");
    assert_eq!(
        from_of(&ins, &args(&[("REG", "127.0.0.1:5000"), ("TAG", "3.13")]))
            .expect("from")
            .0,
        "127.0.0.1:5000/python:3.13"
    );
    for (text, code, line) in [
        ("FROM scratch\n", ErrorCode::BuildInstructionUnsupported, 1),
        (
            "FROM a\nRUN x\nFROM b\n",
            ErrorCode::BuildInstructionUnsupported,
            3,
        ),
        ("RUN x\nFROM a\n", ErrorCode::BuildDockerfileInvalid, 1),
        (
            "FROM --platform=linux/arm64 a\n",
            ErrorCode::BuildInstructionUnsupported,
            1,
        ),
        ("ARG X\n", ErrorCode::BuildDockerfileInvalid, 1),
        ("FROM $EMPTY\n", ErrorCode::BuildDockerfileInvalid, 1),
    ] {
        let e = check(text).expect_err("refused");
        assert_eq!(e.code, code, "{text:?}: {}", e.message);
        assert!(
            e.message.contains(&format!("line {line}")),
            "{text:?}: {}",
            e.message
        );
    }
}

#[test]
fn config_follows_dockers_rules() {
    let (_d, c) = ctx(&["app/main.py"]);
    let text = "FROM x\n\
                ARG MODE=dev\n\
                ENV APP_HOME=/srv/app LEVEL=$MODE\n\
                WORKDIR $APP_HOME\n\
                WORKDIR sub/../run\n\
                LABEL org.example.team=\"sand box\" version=1\n\
                EXPOSE 8080 53/udp 8080/tcp\n\
                USER 1000:1000\n\
                ENTRYPOINT [\"python3\", \"-u\"]\n";
    let (p, _) = plan_of(text, &base(), &[("MODE", "prod")], &c).expect("plan");
    let cfg = &p.config;
    assert_eq!(cfg.env["APP_HOME"], "/srv/app");
    assert_eq!(cfg.env["LEVEL"], "prod");
    assert_eq!(
        cfg.env["PATH"], "/usr/local/bin:/usr/bin:/bin",
        "the base's env stays"
    );
    assert!(!cfg.env.contains_key("MODE"), "build args are not baked");
    assert_eq!(cfg.cwd.as_deref(), Some("/srv/app/run"));
    assert_eq!(cfg.labels["org.example.team"], "sand box");
    assert_eq!(cfg.exposed_ports, ["5000/tcp", "8080/tcp", "53/udp"]);
    assert_eq!(cfg.user.as_deref(), Some("1000:1000"));
    // ENTRYPOINT without CMD drops the base's CMD.
    assert_eq!(
        cfg.entrypoint.as_deref(),
        Some(&["python3".to_string(), "-u".into()][..])
    );
    assert_eq!(
        cfg.cmd.as_deref(),
        Some(&["python3".to_string(), "-u".into()][..])
    );
    assert_eq!(p.steps.len(), 2, "two WORKDIRs");
    // CMD in shell form; without ENTRYPOINT the base's entrypoint stays.
    let (p, _) = plan_of("FROM x\nCMD echo $HOME\n", &base(), &[], &c).expect("plan");
    assert_eq!(
        p.config.cmd.as_deref(),
        Some(&["/bin/sh".to_string(), "-c".into(), "echo $HOME".into()][..])
    );
    // Nothing set: the base's command stays.
    let (p, _) = plan_of("FROM x\nRUN true\n", &base(), &[], &c).expect("plan");
    assert_eq!(p.config.cmd.as_deref(), Some(&["python3".to_string()][..]));
    assert_eq!(p.config.user, None);
    let (p, _) = plan_of("FROM x\nUSER root\n", &base(), &[("UNUSED", "1")], &c).expect("plan");
    assert_eq!(p.config.user, None);
    assert_eq!(p.unused_build_args, ["UNUSED"]);
}

#[test]
fn run_steps_see_env_args_cwd_and_user_of_their_line() {
    let (_d, c) = ctx(&[]);
    let text =
        "FROM x\nARG V=1\nRUN echo a\nENV V=2\nWORKDIR /w\nUSER nobody\nRUN [\"id\", \"-u\"]\n";
    let (p, _) = plan_of(text, &base(), &[], &c).expect("plan");
    let runs: Vec<&ExecOptions> = p
        .steps
        .iter()
        .filter_map(|s| match &s.action {
            Action::Run { exec } => Some(exec),
            _ => None,
        })
        .collect();
    let env = |e: &ExecOptions, k: &str| e.env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    assert_eq!(runs[0].argv, ["/bin/sh", "-c", "echo a"]);
    assert_eq!(env(runs[0], "V").as_deref(), Some("1"));
    assert_eq!(
        env(runs[0], "DEBIAN_FRONTEND").as_deref(),
        Some("noninteractive")
    );
    assert_eq!(
        (runs[0].cwd.as_deref(), runs[0].user.as_deref()),
        (None, None)
    );
    assert_eq!(runs[1].argv, ["id", "-u"]);
    assert_eq!(env(runs[1], "V").as_deref(), Some("2"), "ENV wins over ARG");
    assert_eq!(
        (runs[1].cwd.as_deref(), runs[1].user.as_deref()),
        (Some("/w"), Some("nobody"))
    );
}

#[test]
fn copy_and_add_resolve_sources_and_destinations() {
    let (_d, c) = ctx(&["src/a.py", "src/b.py", "README"]);
    let (p, _) = plan_of(
        "FROM x\nWORKDIR /app\nCOPY src/*.py ./\nCOPY --chown=1:2 --chmod=640 README docs/\n",
        &base(),
        &[],
        &c,
    )
    .expect("plan");
    match &p.steps[1].action {
        Action::Copy { sources, dest, .. } => {
            assert_eq!(dest, "/app/");
            assert_eq!(sources.len(), 2);
        }
        a => panic!("{a:?}"),
    }
    match &p.steps[2].action {
        Action::Copy {
            dest, chown, chmod, ..
        } => {
            assert_eq!(dest, "/app/docs/");
            assert_eq!((chown.as_deref(), *chmod), (Some("1:2"), Some(0o640)));
        }
        a => panic!("{a:?}"),
    }
    for (text, code) in [
        (
            "FROM x\nCOPY src/a.py src/b.py /one\n",
            ErrorCode::BuildDockerfileInvalid,
        ),
        (
            "FROM x\nCOPY ../etc/passwd /x\n",
            ErrorCode::BuildContextInvalid,
        ),
        ("FROM x\nCOPY missing /x\n", ErrorCode::BuildContextInvalid),
        (
            "FROM x\nCOPY --from=build /a /b\n",
            ErrorCode::BuildInstructionUnsupported,
        ),
        (
            "FROM x\nADD https://example.invalid/x /x\n",
            ErrorCode::BuildInstructionUnsupported,
        ),
        (
            "FROM x\nRUN --mount=type=cache,target=/x true\n",
            ErrorCode::BuildInstructionUnsupported,
        ),
        (
            "FROM x\nCOPY --chmod=999 README /x\n",
            ErrorCode::BuildDockerfileInvalid,
        ),
        ("FROM x\nEXPOSE http\n", ErrorCode::BuildDockerfileInvalid),
        ("FROM x\nUSER a:b:c\n", ErrorCode::BuildDockerfileInvalid),
        ("FROM x\nENV 1BAD=x\n", ErrorCode::BuildDockerfileInvalid),
    ] {
        let e = plan_of(text, &base(), &[], &c).expect_err("refused");
        assert_eq!(e.code, code, "{text:?}: {}", e.message);
        assert!(
            e.message.contains("line 2") || code == ErrorCode::BuildDockerfileInvalid,
            "{text:?}: {}",
            e.message
        );
    }
}

#[test]
fn add_unpacks_local_archives_and_copies_other_files() {
    let (d, c) = ctx(&["plain.txt"]);
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(2);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, "inner.txt", &b"hi"[..])
        .expect("append");
    let raw = b.into_inner().expect("tar");
    fs::write(d.path().join("a.tar"), &raw).expect("tar");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &raw).expect("gz");
    fs::write(d.path().join("a.tgz"), gz.finish().expect("gz")).expect("tgz");
    let (p, _) = plan_of(
        "FROM x\nADD a.tar a.tgz plain.txt /opt/\n",
        &base(),
        &[],
        &c,
    )
    .expect("plan");
    let kinds: Vec<String> = p
        .steps
        .iter()
        .map(|s| match &s.action {
            Action::Extract { flag, dest, .. } => format!("extract {flag:?} {dest}"),
            Action::Copy { dest, .. } => format!("copy {dest}"),
            a => format!("{a:?}"),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "extract None /opt",
            "extract Some(\"-z\") /opt",
            "copy /opt/"
        ]
    );
}

#[test]
fn the_cache_key_follows_every_input() {
    let (d, c) = ctx(&["f"]);
    let text = "FROM x\nARG A=1\nCOPY f /f\nRUN echo $A\n";
    let k = |ba: &[(&str, &str)]| plan_of(text, &base(), ba, &c).expect("plan").1;
    let k0 = k(&[]);
    assert_eq!(k0, k(&[]), "stable");
    assert_ne!(k0, k(&[("A", "2")]), "a build arg");
    fs::write(d.path().join("f"), b"other").expect("write");
    assert_ne!(k0, k(&[]), "a copied file");
    let other = plan_of(
        "FROM x\nARG A=1\nCOPY f /f\nRUN echo $A \n",
        &base(),
        &[],
        &c,
    )
    .expect("plan")
    .1;
    let mut b2 = base();
    b2.env.insert("X".into(), "y".into());
    assert_ne!(
        other,
        plan_of(text, &b2, &[], &c).expect("plan").1,
        "the base's config"
    );
}

#[test]
fn guest_paths_join_and_clean() {
    assert_eq!(guest_path("/", "app"), "/app");
    assert_eq!(guest_path("/srv", "./a/../b/"), "/srv/b/");
    assert_eq!(guest_path("/srv", "."), "/srv");
    assert_eq!(guest_path("/srv", "/abs"), "/abs");
    assert_eq!(guest_path("/", "../.."), "/");
}
