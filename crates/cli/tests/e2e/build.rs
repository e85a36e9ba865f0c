//! `machinen build` from Dockerfiles on real VMs, and what becomes of the
//! image: `images inspect`, `images push` to a local registry (Debian's
//! `docker-registry`, read back by `skopeo`, not by our code), boot of the
//! pushed reference.

use std::path::Path;
use std::process::Command;

use super::oci::{run, Registry};
use super::Env;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8")
}

fn write(dir: &Path, name: &str, text: &str) {
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    std::fs::write(p, text).expect("write");
}

const DOCKERFILE: &str = r#"# syntax=docker/dockerfile:1
ARG BASE=machinen:base
FROM ${BASE}
ARG GREETING=hello
LABEL org.example.team="sand box"
ENV APP_HOME=/srv/app \
    MODE=prod
WORKDIR $APP_HOME
COPY app/ ./
COPY . /ctx/
ADD bundle.tar /opt/bundle/
RUN useradd -u 1000 -m builder && echo "$GREETING from $MODE" > built.txt
COPY --chown=builder --chmod=600 notes.txt /home/builder/
USER builder
RUN id -un > $HOME/whoami.txt
EXPOSE 8080 53/udp
CMD ["sh", "-c", "echo $MODE; pwd; id -un; cat built.txt; ls -A /ctx | tr '\\n' ' '; echo; stat -c '%U %a' /home/builder/notes.txt; cat /home/builder/whoami.txt /opt/bundle/inner.txt; echo ${GREETING:-no build args at run time}"]
"#;

/// What the image's command prints (see CMD above).
const EXPECTED: &str = "prod\n/srv/app\nbuilder\nhi from prod\n.dockerignore Dockerfile app bundle.tar notes.txt \nbuilder 600\nbuilder\ninside the archive\nno build args at run time\n";

/// One scenario over one build context: a Dockerfile whose ENV, WORKDIR,
/// USER, CMD, EXPOSE and LABEL hold in the guest and in `images inspect`;
/// .dockerignore, COPY --chown/--chmod, ADD of a tar; a rebuild from the
/// cache; refusals before anything boots; a failing RUN's status; a second
/// Dockerfile built FROM the first (ENTRYPOINT replaces its CMD); the
/// image pushed to a registry, inspected there by skopeo and booted back.
#[test]
fn a_dockerfile_builds_an_image_that_is_inspected_pushed_and_booted() {
    let env = Env::new();
    let dir = tempfile::tempdir().expect("tmp");
    let ctx = dir.path().join("ctx");
    write(&ctx, "Dockerfile", DOCKERFILE);
    write(&ctx, "app/main.sh", "echo main\n");
    write(&ctx, "notes.txt", "notes\n");
    write(&ctx, "secret/key", "must not be copied\n");
    write(&ctx, "debug.log", "must not be copied\n");
    write(&ctx, ".dockerignore", "secret\n*.log\n");
    let inner = dir.path().join("inner");
    write(&inner, "inner.txt", "inside the archive\n");
    run(Command::new("tar")
        .arg("-C")
        .arg(&inner)
        .arg("-cf")
        .arg(ctx.join("bundle.tar"))
        .arg("inner.txt"));
    let out = dir.path().join("app.tar.gz");

    // --no-cache: an earlier run of this test left the same build in the
    // (shared) build cache.
    let built = env.json(&[
        "build",
        "--no-cache",
        "-t",
        s(&out),
        "--build-arg",
        "GREETING=hi",
        "--network",
        "none",
        "--json",
        s(&ctx),
    ]);
    assert_eq!(built["cached"], false, "{built}");
    assert_eq!(built["steps"], 7, "{built}");
    assert_eq!(
        built["config"]["exposed_ports"],
        serde_json::json!(["8080/tcp", "53/udp"])
    );
    assert_eq!(built["config"]["user"], "builder");
    assert_eq!(env.run_ok(&["boot", s(&out)]), EXPECTED);
    // --env still overrides a baked key at boot.
    let o = env.run_ok(&["boot", "--env", "MODE=dev", s(&out)]);
    assert!(o.starts_with("dev\n/srv/app\nbuilder\n"), "{o}");
    let inspected = env.json(&["images", "inspect", s(&out), "--json"]);
    assert_eq!(
        inspected["config"]["labels"]["org.example.team"],
        "sand box"
    );
    assert_eq!(inspected["config"]["cwd"], "/srv/app");
    assert_eq!(inspected["config"]["env"]["MODE"], "prod");
    let human = env.run_ok(&["images", "inspect", s(&out)]);
    assert!(human.contains("ports       8080/tcp 53/udp"), "{human}");

    // Nothing changed: from the cache, no VM; --no-cache builds again.
    let again = dir.path().join("again.tar.gz");
    let cached = env.json(&[
        "build",
        "-t",
        s(&again),
        "--build-arg",
        "GREETING=hi",
        "--json",
        s(&ctx),
    ]);
    assert_eq!(cached["cached"], true, "{cached}");
    assert_eq!(cached["sha256"], built["sha256"]);
    // A changed input is a new build (a value no earlier run used).
    let greeting = format!(
        "GREETING=yo{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_nanos()
    );
    let other = env.json(&[
        "build",
        "-t",
        s(&again),
        "--build-arg",
        &greeting,
        "--network",
        "none",
        "--json",
        s(&ctx),
    ]);
    assert_eq!(other["cached"], false);
    let want = format!("{} from prod\n", &greeting["GREETING=".len()..]);
    assert!(env.run_ok(&["boot", s(&again)]).contains(&want));

    // Refused before anything boots, naming the line.
    let refuse = |text: &str, code: &str, line: &str, exit: i32| {
        let df = dir.path().join("Bad.Dockerfile");
        std::fs::write(&df, text).expect("write");
        let o = env.run(&[
            "build",
            "-f",
            s(&df),
            "-t",
            s(&dir.path().join("bad.tar.gz")),
            s(&ctx),
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(exit), "{text}: {err}");
        assert!(err.contains(code) && err.contains(line), "{text}: {err}");
        assert!(!dir.path().join("bad.tar.gz").exists());
    };
    refuse(
        "FROM machinen:base\nRUN true\nVOLUME /data\n",
        "BUILD_INSTRUCTION_UNSUPPORTED",
        "line 3",
        2,
    );
    refuse(
        "FROM machinen:base\nCOPY ../inner/inner.txt /x\n",
        "BUILD_CONTEXT_INVALID",
        "line 2",
        2,
    );
    refuse(
        "FROM machinen:base\nCOPY secret/key /x\n",
        "BUILD_CONTEXT_INVALID",
        "line 2",
        2,
    );
    refuse(
        "FROM machinen:base AS a\nRUN true\nFROM machinen:base\n",
        "BUILD_INSTRUCTION_UNSUPPORTED",
        "line 3",
        2,
    );
    // A failing RUN: its status, its line, no image.
    refuse(
        "FROM machinen:base\nENV X=1\nRUN echo failing >&2; exit 3\n",
        "PROVISION_STEP_FAILED",
        "line 3",
        3,
    );

    // Layering: FROM the first image (a path from the context); its
    // settings are inherited, ENTRYPOINT without CMD drops its CMD.
    std::fs::copy(&out, ctx.join("first.tar.gz")).expect("copy");
    let df2 = dir.path().join("Second.Dockerfile");
    std::fs::write(
        &df2,
        "FROM ./first.tar.gz\nUSER root\nRUN echo layered > /layer.txt\nENTRYPOINT [\"cat\"]\n",
    )
    .expect("write");
    let second = dir.path().join("second.tar.gz");
    env.run_ok(&[
        "build",
        "-f",
        s(&df2),
        "-t",
        s(&second),
        "--network",
        "none",
        s(&ctx),
    ]);
    assert_eq!(
        env.run_ok(&["boot", s(&second), "--", "/layer.txt", "built.txt"]),
        "layered\nhi from prod\n"
    );
    let i2 = env.json(&["images", "inspect", s(&second), "--json"]);
    assert_eq!(i2["config"]["cmd"], serde_json::json!(["cat"]));
    assert_eq!(i2["config"]["cwd"], "/srv/app");
    assert!(i2["config"].get("user").is_none(), "{i2}");

    // Pushed to a registry as a container image.
    let reg = Registry::start(dir.path());
    let reference = format!("{}/team/built:1", reg.addr);
    let pushed = env.json(&[
        "images",
        "push",
        s(&out),
        &reference,
        "--insecure-registry",
        &reg.addr,
        "--json",
    ]);
    assert_eq!(pushed["uploaded_blobs"], 2, "{pushed}");
    let digest = pushed["digest"].as_str().expect("digest").to_string();
    let cfg = Command::new("skopeo")
        .args([
            "inspect",
            "--tls-verify=false",
            "--config",
            &format!("docker://{reference}"),
        ])
        .output()
        .expect("skopeo");
    assert!(
        cfg.status.success(),
        "{}",
        String::from_utf8_lossy(&cfg.stderr)
    );
    let cfg: serde_json::Value = serde_json::from_slice(&cfg.stdout).expect("json");
    let c = &cfg["config"];
    assert!(c["ExposedPorts"].get("8080/tcp").is_some(), "{cfg}");
    assert!(c["ExposedPorts"].get("53/udp").is_some(), "{cfg}");
    assert_eq!(c["User"], "builder");
    assert_eq!(c["WorkingDir"], "/srv/app");
    assert_eq!(c["Labels"]["org.example.team"], "sand box");
    assert!(
        c["Env"]
            .as_array()
            .expect("env")
            .iter()
            .any(|e| e == "MODE=prod"),
        "{cfg}"
    );
    let manifest = Command::new("skopeo")
        .args([
            "inspect",
            "--tls-verify=false",
            "--format",
            "{{.Digest}}",
            &format!("docker://{reference}"),
        ])
        .output()
        .expect("skopeo");
    assert_eq!(String::from_utf8_lossy(&manifest.stdout).trim(), digest);
    // Unchanged: nothing uploaded again.
    let again = env.json(&[
        "images",
        "push",
        s(&out),
        &reference,
        "--insecure-registry",
        &reg.addr,
        "--json",
    ]);
    assert_eq!(again["uploaded_blobs"], 0, "{again}");
    // The pushed reference boots as any registry image, its ports read
    // from the image config.
    assert_eq!(
        env.run_ok(&["boot", "--insecure-registry", &reg.addr, &reference]),
        EXPECTED
    );
    let ri = env.json(&["images", "inspect", &reference, "--json"]);
    assert_eq!(
        ri["config"]["exposed_ports"],
        serde_json::json!(["53/udp", "8080/tcp"])
    );
    assert_eq!(ri["source"], reference.as_str());
    // Over HTTPS (the default) this registry cannot be pushed to.
    let o = env.run(&[
        "images",
        "push",
        s(&out),
        &format!("{}/team/built:2", reg.addr),
    ]);
    assert_eq!(o.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&o.stderr).contains("IMAGE_PUSH_FAILED"));
    env.run_ok(&["images", "rm", &reference]);
}
