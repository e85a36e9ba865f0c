//! `machinen build`: a Dockerfile baked into a machinen image.
//!
//! The Dockerfile is read and checked whole before anything boots
//! ([`dockerfile`]); its FROM image is resolved (a registry reference, an
//! OCI layout, a Docker archive, a rootfs tarball, or `machinen:base`, the
//! installed Debian base) and its settings are the starting point; every
//! instruction is then evaluated against them into a plan: RUN, COPY/ADD
//! and WORKDIR become steps with the environment, working directory and
//! user in force at that line; ENV, ARG, USER, CMD, ENTRYPOINT, EXPOSE and
//! LABEL shape the image's config. The plan runs as a
//! [`provision`](crate::provision) install hook in one real VM, and the
//! VM's root disk becomes the image with the final config baked in.
//!
//! A build whose inputs are all unchanged (base image, instructions after
//! substitution, the bytes of every file COPY and ADD read) is served from
//! the build cache without booting a VM; `no_cache` builds anyway.

pub(crate) mod context;
pub mod dockerfile;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use machinen_proto::timeouts;
use serde::Serialize;

use self::context::{Context, Entry};
use self::dockerfile::{invalid, one_word, pairs, unsupported, words, Instruction, Vars};
use crate::assets::fsutil;
use crate::error::{fail, ErrorCode, Failure, Result};
use crate::paths::Paths;
use crate::progress::ProgressMode;
use crate::provision::copy::{tar_into_guest, Attrs};
use crate::provision::{normalize_port, ImageConfig, ProvisionError, ProvisionOptions};
use crate::vm::{ExecOptions, Vm};

/// `FROM machinen:base`: the installed Debian base image.
pub const BASE: &str = "machinen:base";
/// Bumped when the same inputs would build something else.
const CACHE_FORMAT: &str = "machinen-build-1";

/// Where a step's own output goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StepOutput {
    /// stdout to stdout, stderr to stderr.
    #[default]
    Inherit,
    /// Both to stderr (stdout carries a machine-readable result).
    Stderr,
    /// Nowhere (a failing step still reports its status).
    Discard,
}

/// Options for [`build`].
#[derive(Debug)]
pub struct BuildOptions {
    /// The build context (COPY/ADD read from it).
    pub context: PathBuf,
    /// The Dockerfile; `None`: `Dockerfile` in the context.
    pub dockerfile: Option<PathBuf>,
    /// The rootfs tarball to write (`.tar.gz`), replaced atomically.
    pub out: PathBuf,
    /// `--build-arg NAME=VALUE`: values for ARG instructions.
    pub build_args: Vec<(String, String)>,
    /// Build even when the cache has this build's result.
    pub no_cache: bool,
    /// The build VM's memory (MiB), vCPUs, network and boot timeout.
    pub memory_mib: Option<u32>,
    pub cpus: u32,
    pub network: crate::spec::NetworkMode,
    pub boot_timeout: Duration,
    pub progress: ProgressMode,
    pub step_output: StepOutput,
    /// Print `==> [i/n] line N: INSTRUCTION …` on stderr before each step.
    pub show_steps: bool,
    pub on_phase: crate::phases::OnPhase,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            context: PathBuf::from("."),
            dockerfile: None,
            out: PathBuf::new(),
            build_args: Vec::new(),
            no_cache: false,
            memory_mib: None,
            cpus: 1,
            network: crate::spec::NetworkMode::default(),
            boot_timeout: timeouts::BOOT,
            progress: ProgressMode::Auto,
            step_output: StepOutput::Inherit,
            show_steps: false,
            on_phase: Default::default(),
        }
    }
}

/// What [`build`] made.
#[derive(Debug, Clone, Serialize)]
pub struct BuildResult {
    pub path: PathBuf,
    pub sha256: String,
    pub size: u64,
    /// The image's config: CMD/ENTRYPOINT, ENV, WORKDIR, USER, EXPOSE, LABEL.
    pub config: ImageConfig,
    /// What FROM named, and the tarball it resolved to.
    pub from: String,
    pub base: PathBuf,
    /// Steps that ran in the VM (RUN, COPY, ADD, WORKDIR).
    pub steps: usize,
    /// Served from the build cache (no VM booted).
    pub cached: bool,
    /// The cache key (BLAKE3 of every input).
    pub key: String,
    /// `--build-arg` names no ARG declared (Docker warns about them too).
    pub unused_build_args: Vec<String>,
    pub elapsed_ms: u64,
}

/// A step of the plan.
#[derive(Debug, Clone)]
enum Action {
    Run {
        exec: ExecOptions,
    },
    Workdir {
        path: String,
    },
    Copy {
        /// Per source: what to copy and whether it is a directory.
        sources: Vec<(Vec<Entry>, bool)>,
        dest: String,
        chown: Option<String>,
        chmod: Option<u32>,
    },
    Extract {
        archive: PathBuf,
        flag: Option<&'static str>,
        dest: String,
    },
}

#[derive(Debug, Clone)]
struct Step {
    line: usize,
    /// The instruction as written (for headers and errors).
    text: String,
    action: Action,
}

/// The evaluated Dockerfile.
#[derive(Debug)]
struct Plan {
    steps: Vec<Step>,
    config: ImageConfig,
    unused_build_args: Vec<String>,
}

/// FROM's image, with the build args before it substituted.
fn from_of(
    ins: &[Instruction],
    build_args: &BTreeMap<String, String>,
) -> Result<(String, usize), Failure> {
    let mut global = Vars::new();
    for (i, x) in ins.iter().enumerate() {
        match x.keyword.as_str() {
            "ARG" => {
                for (k, v) in arg_decl(x, &global)? {
                    let v = build_args.get(&k).cloned().or(v).unwrap_or_default();
                    global.insert(k, v);
                }
            }
            "FROM" => {
                if let Some((f, _)) = x.flags.first() {
                    return Err(unsupported(x.line, format!("FROM --{f}")));
                }
                let w = words(&x.args, &global, x.line)?;
                let image = match w.as_slice() {
                    [image] => image.clone(),
                    [image, as_, _name] if as_.eq_ignore_ascii_case("as") => image.clone(),
                    _ => {
                        return Err(invalid(
                            x.line,
                            format!("FROM {:?} is not IMAGE [AS NAME]", x.args),
                        ))
                    }
                };
                if image.is_empty() {
                    return Err(invalid(x.line, "FROM names no image (an empty build arg?)"));
                }
                if image == "scratch" {
                    return Err(unsupported(x.line, "FROM scratch: steps run in a VM booted from the FROM image, which needs a shell and tar; start from an image that has them (e.g. machinen:base)"));
                }
                if let Some(second) = ins[i + 1..].iter().find(|y| y.keyword == "FROM") {
                    return Err(unsupported(
                        second.line,
                        "a second FROM (multi-stage builds)",
                    ));
                }
                return Ok((image, i));
            }
            k => {
                return Err(invalid(
                    x.line,
                    format!("{k} before FROM (only ARG may come first)"),
                ))
            }
        }
    }
    Err(invalid(1, "there is no FROM"))
}

/// `ARG NAME[=DEFAULT] …`: names with their defaults.
fn arg_decl(x: &Instruction, vars: &Vars) -> Result<Vec<(String, Option<String>)>, Failure> {
    let mut out = Vec::new();
    for w in words(&x.args, vars, x.line)? {
        let (k, v) = match w.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (w, None),
        };
        if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(invalid(x.line, format!("ARG {k:?} is not a name")));
        }
        out.push((k, v));
    }
    Ok(out)
}

/// Guest path `p` against the working directory `cwd`, cleaned; a
/// trailing `/` is kept (it means "into this directory").
fn guest_path(cwd: &str, p: &str) -> String {
    let joined = if p.starts_with('/') {
        p.to_string()
    } else {
        format!("{}/{p}", cwd.trim_end_matches('/'))
    };
    let mut parts: Vec<&str> = Vec::new();
    for c in joined.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    let mut out = format!("/{}", parts.join("/"));
    if (p.ends_with('/') || p.ends_with("/.")) && out != "/" {
        out.push('/');
    }
    out
}

/// The compression flag GNU tar needs for `path`, when it is an archive ADD
/// unpacks (by its first bytes, as Docker decides); `None` when it is not.
fn archive_kind(path: &Path) -> io::Result<Option<Option<&'static str>>> {
    let mut head = [0u8; 512];
    let mut f = fs::File::open(path)?;
    let mut n = 0;
    while n < head.len() {
        let k = f.read(&mut head[n..])?;
        if k == 0 {
            break;
        }
        n += k;
    }
    let h = &head[..n];
    Ok(if h.starts_with(&[0x1f, 0x8b]) {
        Some(Some("-z"))
    } else if h.starts_with(b"BZh") {
        Some(Some("-j"))
    } else if h.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Some(Some("-J"))
    } else if n >= 262 && &h[257..262] == b"ustar" {
        Some(None)
    } else {
        None
    })
}

/// Evaluate the instructions after FROM against the base's config.
fn plan(
    ins: &[Instruction],
    base: &ImageConfig,
    build_args: &BTreeMap<String, String>,
    ctx: &Context,
    key: &mut blake3::Hasher,
) -> Result<Plan, Failure> {
    let mut config = base.clone();
    let mut args = Vars::new();
    let mut declared: BTreeSet<String> = BTreeSet::new();
    // Global ARG defaults are visible again when re-declared after FROM.
    let mut global = Vars::new();
    let mut cmd_set: Option<Vec<String>> = None;
    let mut entrypoint_set = false;
    let base_args: Vec<String> = match (&base.entrypoint, &base.cmd) {
        (Some(ep), Some(c)) if c.starts_with(ep) => c[ep.len()..].to_vec(),
        (None, Some(c)) => c.clone(),
        _ => Vec::new(),
    };
    let mut steps = Vec::new();
    let (_, from_at) = from_of(ins, build_args)?;
    for x in &ins[..from_at] {
        for (k, v) in arg_decl(x, &global)? {
            declared.insert(k.clone());
            global.insert(
                k.clone(),
                build_args.get(&k).cloned().or(v).unwrap_or_default(),
            );
        }
    }
    for x in &ins[from_at + 1..] {
        // Substitution sees the build args in scope and the environment
        // (which wins on a clash).
        let vars: Vars = args
            .iter()
            .chain(config.env.iter())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let text = format!("{} {}", x.keyword, x.args);
        key.update(text.as_bytes());
        match x.keyword.as_str() {
            "ARG" => {
                for (k, v) in arg_decl(x, &vars)? {
                    declared.insert(k.clone());
                    let v = build_args
                        .get(&k)
                        .cloned()
                        .or(v)
                        .or_else(|| global.get(&k).cloned())
                        .unwrap_or_default();
                    args.insert(k, v);
                }
            }
            "ENV" => {
                for (k, v) in pairs(&x.args, &vars, x.line, "ENV")? {
                    config.env.insert(k, v);
                }
            }
            "LABEL" => {
                for (k, v) in pairs(&x.args, &vars, x.line, "LABEL")? {
                    config.labels.insert(k, v);
                }
            }
            "WORKDIR" => {
                let w = one_word(&x.args, &vars, x.line, "WORKDIR")?;
                let cwd = guest_path(config.cwd.as_deref().unwrap_or("/"), &w);
                let cwd = cwd.trim_end_matches('/').to_string();
                let cwd = if cwd.is_empty() { "/".to_string() } else { cwd };
                config.cwd = Some(cwd.clone());
                steps.push(Step {
                    line: x.line,
                    text,
                    action: Action::Workdir { path: cwd },
                });
            }
            "USER" => {
                let u = one_word(&x.args, &vars, x.line, "USER")?;
                crate::vm::check_user(&u)
                    .map_err(|e| invalid(x.line, format!("USER {u:?}: {}", e.message)))?;
                config.user = match u.as_str() {
                    "root" | "0" | "root:root" | "0:0" => None,
                    _ => Some(u),
                };
            }
            "EXPOSE" => {
                for p in words(&x.args, &vars, x.line)? {
                    let n = normalize_port(&p).ok_or_else(|| {
                        invalid(x.line, format!("EXPOSE {p:?} is not PORT[/tcp|/udp|/sctp]"))
                    })?;
                    if !config.exposed_ports.contains(&n) {
                        config.exposed_ports.push(n);
                    }
                }
            }
            "CMD" | "ENTRYPOINT" => {
                let argv = match x.json_form() {
                    Some(v) => v,
                    None => vec!["/bin/sh".into(), "-c".into(), x.args.clone()],
                };
                if x.keyword == "CMD" {
                    cmd_set = Some(argv);
                } else {
                    config.entrypoint = (!argv.is_empty()).then_some(argv);
                    entrypoint_set = true;
                }
            }
            "RUN" => {
                if let Some((f, _)) = x.flags.first() {
                    return Err(unsupported(x.line, format!("RUN --{f}")));
                }
                if x.args.trim().is_empty() {
                    return Err(invalid(x.line, "RUN needs a command"));
                }
                let argv = match x.json_form() {
                    Some(v) if !v.is_empty() => v,
                    Some(_) => return Err(invalid(x.line, "RUN [] runs nothing")),
                    None => vec!["/bin/sh".into(), "-c".into(), x.args.clone()],
                };
                // RUN sees the build args as environment too; ENV wins.
                let mut env: BTreeMap<String, String> = args.clone();
                env.extend(config.env.clone());
                // As `provision` does: package installs must not wait for
                // answers nobody can give.
                env.entry("DEBIAN_FRONTEND".into())
                    .or_insert_with(|| "noninteractive".into());
                steps.push(Step {
                    line: x.line,
                    text,
                    action: Action::Run {
                        exec: ExecOptions {
                            argv,
                            env: env.into_iter().collect(),
                            cwd: config.cwd.clone(),
                            user: config.user.clone(),
                            rlimits: Vec::new(),
                        },
                    },
                });
                // Values of build args are inputs of the step.
                key.update(format!("{:?}", args).as_bytes());
            }
            "COPY" | "ADD" => {
                let mut chown = None;
                let mut chmod = None;
                for (f, v) in &x.flags {
                    match f.as_str() {
                        "chown" => chown = Some(one_word(v, &vars, x.line, "--chown")?),
                        "chmod" => {
                            chmod = Some(
                                u32::from_str_radix(v, 8)
                                    .ok()
                                    .filter(|m| *m <= 0o7777)
                                    .ok_or_else(|| {
                                        invalid(x.line, format!("--chmod={v} is not an octal mode"))
                                    })?,
                            )
                        }
                        "link" => {}
                        "from" => {
                            return Err(unsupported(
                                x.line,
                                format!("{} --from (multi-stage builds)", x.keyword),
                            ))
                        }
                        f => return Err(unsupported(x.line, format!("{} --{f}", x.keyword))),
                    }
                }
                let mut w = match x.json_form() {
                    Some(v) => v,
                    None => words(&x.args, &vars, x.line)?,
                };
                if w.len() < 2 {
                    return Err(invalid(x.line, format!("{} needs SOURCE… DEST", x.keyword)));
                }
                let dest_raw = w.pop().unwrap_or_default();
                let cwd = config.cwd.clone().unwrap_or_else(|| "/".into());
                let mut dest = guest_path(&cwd, &dest_raw);
                let mut sources: Vec<PathBuf> = Vec::new();
                for s in &w {
                    if x.keyword == "ADD" && s.contains("://") {
                        return Err(unsupported(
                            x.line,
                            format!("ADD of a URL ({s}); download it with RUN curl/wget, or COPY a local file"),
                        ));
                    }
                    sources.extend(ctx.expand(s, x.line)?);
                }
                if sources.len() > 1 && !dest.ends_with('/') {
                    if dest_raw == "." || dest_raw.ends_with("/.") {
                        dest.push('/');
                    } else {
                        return Err(invalid(
                            x.line,
                            format!("{} of several sources needs a destination directory ending in /, not {dest_raw:?}", x.keyword),
                        ));
                    }
                }
                let mut copy_sources = Vec::new();
                for rel in &sources {
                    let abs = ctx.root.join(rel);
                    let is_dir = fs::metadata(&abs).map(|m| m.is_dir()).unwrap_or(false);
                    if x.keyword == "ADD" && !is_dir {
                        let kind = archive_kind(&abs).map_err(|e| {
                            invalid(x.line, format!("cannot read {}", rel.display())).source(e)
                        })?;
                        if let Some(flag) = kind {
                            key.update(rel.as_os_str().as_encoded_bytes());
                            let entries = ctx.entries(rel, "", x.line)?;
                            context::digest(&entries, key).map_err(|e| {
                                invalid(x.line, format!("reading {}", rel.display())).source(e)
                            })?;
                            steps.push(Step {
                                line: x.line,
                                text: text.clone(),
                                action: Action::Extract {
                                    archive: entries[0].path.clone(),
                                    flag,
                                    dest: dest.trim_end_matches('/').to_string(),
                                },
                            });
                            continue;
                        }
                    }
                    let name = rel
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    let entries = ctx.entries(rel, &name, x.line)?;
                    context::digest(&entries, key).map_err(|e| {
                        invalid(x.line, format!("reading {}", rel.display())).source(e)
                    })?;
                    copy_sources.push((entries, is_dir));
                }
                if !copy_sources.is_empty() {
                    steps.push(Step {
                        line: x.line,
                        text,
                        action: Action::Copy {
                            sources: copy_sources,
                            dest,
                            chown,
                            chmod,
                        },
                    });
                }
            }
            "FROM" => return Err(unsupported(x.line, "a second FROM (multi-stage builds)")),
            k => return Err(invalid(x.line, format!("unexpected {k}"))),
        }
    }
    // Docker's rule: an ENTRYPOINT set here drops the base's CMD unless
    // this Dockerfile sets one too.
    let run_args = match (&cmd_set, entrypoint_set) {
        (Some(c), _) => c.clone(),
        (None, true) => Vec::new(),
        (None, false) => base_args,
    };
    let full: Vec<String> = config
        .entrypoint
        .iter()
        .flatten()
        .cloned()
        .chain(run_args)
        .collect();
    config.cmd = (!full.is_empty()).then_some(full);
    config.validate().map_err(|e| {
        fail(
            ErrorCode::BuildDockerfileInvalid,
            format!("the image's settings are not valid: {}", e.message),
        )
        .hint("check ENV names, WORKDIR and USER")
    })?;
    let unused_build_args = build_args
        .keys()
        .filter(|k| !declared.contains(*k))
        .cloned()
        .collect();
    key.update(&config.to_json());
    Ok(Plan {
        steps,
        config,
        unused_build_args,
    })
}

/// Resolve FROM's image to a tarball (relative paths against the context).
fn resolve_from(paths: &Paths, image: &str, ctx: &Path, progress: ProgressMode) -> Result<PathBuf> {
    if image == BASE {
        return Ok(crate::assets::resolve(paths)?.rootfs);
    }
    let rebase = |p: &str| -> String {
        if Path::new(p).is_absolute() {
            p.to_string()
        } else {
            ctx.join(p).to_string_lossy().into_owned()
        }
    };
    let named = if let Some(rest) = image.strip_prefix("oci:") {
        format!("oci:{}", rebase(rest))
    } else if let Some(rest) = image.strip_prefix("docker-archive:") {
        format!("docker-archive:{}", rebase(rest))
    } else if crate::oci::registry::reference_in(Path::new(image)).is_none()
        || ctx.join(image).exists()
    {
        rebase(image)
    } else {
        image.to_string()
    };
    let named = PathBuf::from(named);
    if crate::oci::Source::parse(&named).is_none()
        && crate::oci::registry::reference_in(&named).is_none()
        && !named.exists()
    {
        return Err(ProvisionError::BaseNotFound { path: named }.into());
    }
    Ok(crate::oci::resolve(paths, &named, progress)?)
}

fn cache_dir(paths: &Paths) -> PathBuf {
    paths.cache.join("builds")
}

/// Copy `from` to `to` atomically.
fn copy_atomic(from: &Path, to: &Path) -> io::Result<()> {
    fsutil::write_atomic_with(to, |f| {
        io::copy(&mut fs::File::open(from)?, f)?;
        Ok(())
    })
}

/// Build the Dockerfile in `opts.context` into `opts.out`.
pub async fn build(opts: BuildOptions) -> Result<BuildResult> {
    let t0 = Instant::now();
    let paths = Paths::from_env()?;
    let dockerfile = opts
        .dockerfile
        .clone()
        .unwrap_or_else(|| opts.context.join("Dockerfile"));
    let text = {
        let mut s = String::new();
        fs::File::open(&dockerfile)
            .and_then(|f| {
                f.take(dockerfile::MAX_BYTES as u64 + 1)
                    .read_to_string(&mut s)
            })
            .map_err(|e| {
                fail(
                    ErrorCode::BuildDockerfileInvalid,
                    format!("cannot read {}", dockerfile.display()),
                )
                .source(e)
                .hint("name the Dockerfile with -f, or put one named Dockerfile in the context")
            })?;
        s
    };
    let ins = dockerfile::parse(&text)?;
    let build_args: BTreeMap<String, String> = opts.build_args.iter().cloned().collect();
    let (from, _) = from_of(&ins, &build_args)?;
    let ctx_dir = opts.context.clone();
    let (paths2, from2, progress) = (paths.clone(), from.clone(), opts.progress);
    let (base, base_sha, base_config, ctx) = crate::vm::blocking(move || {
        let ctx = Context::open(&ctx_dir)?;
        let base = resolve_from(&paths2, &from2, &ctx.root, progress)?;
        let sha = crate::image::tarball_sha256(&paths2, &base, progress)?;
        let config = crate::provision::config_of(&paths2, &base, progress)?.unwrap_or_default();
        Ok((base, sha, config, ctx))
    })
    .await?;
    let (plan, key) = {
        let ins = ins.clone();
        let build_args = build_args.clone();
        let base_sha = base_sha.clone();
        crate::vm::blocking(move || {
            let mut key = blake3::Hasher::new();
            key.update(CACHE_FORMAT.as_bytes());
            key.update(base_sha.as_bytes());
            let plan = plan(&ins, &base_config, &build_args, &ctx, &mut key)?;
            Ok((plan, key.finalize().to_hex().to_string()))
        })
        .await?
    };
    let cached_path = cache_dir(&paths).join(format!("{key}.tar.gz"));
    let finish = |path: PathBuf, cached: bool, steps: usize| -> Result<BuildResult> {
        let (sha256, size) = fsutil::sha256_file(&path).map_err(|e| {
            fail(
                ErrorCode::ProvisionOutputFailed,
                format!("cannot read {}", path.display()),
            )
            .source(e)
        })?;
        Ok(BuildResult {
            path,
            sha256,
            size,
            config: plan.config.clone(),
            from: from.clone(),
            base: base.clone(),
            steps,
            cached,
            key: key.clone(),
            unused_build_args: plan.unused_build_args.clone(),
            elapsed_ms: t0.elapsed().as_millis() as u64,
        })
    };
    if !opts.no_cache && cached_path.is_file() {
        let (from_p, to) = (cached_path.clone(), opts.out.clone());
        crate::vm::blocking(move || {
            copy_atomic(&from_p, &to).map_err(|e| {
                ProvisionError::Output {
                    action: "write",
                    path: to.clone(),
                    source: e,
                }
                .into()
            })
        })
        .await?;
        let step = opts.progress.step("Build cache");
        step.done(format!(
            "Build cache: {} steps unchanged, no VM booted",
            plan.steps.len()
        ));
        return finish(opts.out.clone(), true, 0);
    }
    let steps = plan.steps.clone();
    let n = steps.len();
    let (output, show) = (opts.step_output, opts.show_steps);
    let result = crate::provision::provision(ProvisionOptions {
        base: Some(base.clone()),
        out: opts.out.clone(),
        install: Some(Box::new(move |vm, _| {
            Box::pin(async move {
                for (i, s) in steps.iter().enumerate() {
                    if show {
                        eprintln!("==> [{}/{n}] line {}: {}", i + 1, s.line, headline(&s.text));
                    }
                    run(vm, s, output).await?;
                }
                Ok(())
            })
        })),
        config: Some(plan.config.clone()),
        memory_mib: opts.memory_mib,
        cpus: opts.cpus,
        network: opts.network,
        boot_timeout: opts.boot_timeout,
        progress: opts.progress,
        on_phase: opts.on_phase.clone(),
        ..Default::default()
    })
    .await?;
    // Kept for the next build with the same inputs; failing to keep it
    // costs a rebuild, not this build.
    let dir = cache_dir(&paths);
    let (out, cached_path2) = (result.path.clone(), cached_path.clone());
    let _ = crate::vm::blocking(move || {
        if let Err(e) = fs::create_dir_all(&dir).and_then(|()| copy_atomic(&out, &cached_path2)) {
            tracing::warn!(error = %e, "could not keep the build in the cache");
        }
        Ok(())
    })
    .await;
    finish(result.path, false, n)
}

/// The first line of an instruction, shortened for a header.
fn headline(text: &str) -> String {
    let one: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one.chars().count() > 100 {
        format!("{}…", one.chars().take(99).collect::<String>())
    } else {
        one
    }
}

async fn run(vm: &Vm, s: &Step, output: StepOutput) -> Result<()> {
    let failed = |status| -> crate::Error {
        ProvisionError::StepFailed {
            step: format!("Dockerfile line {}: {}", s.line, headline(&s.text)),
            status,
        }
        .into()
    };
    match &s.action {
        Action::Run { exec } => {
            type Sink = Box<dyn tokio::io::AsyncWrite + Unpin + Send>;
            let (mut out, mut err): (Sink, Sink) = match output {
                StepOutput::Inherit => {
                    (Box::new(tokio::io::stdout()), Box::new(tokio::io::stderr()))
                }
                StepOutput::Stderr => {
                    (Box::new(tokio::io::stderr()), Box::new(tokio::io::stderr()))
                }
                StepOutput::Discard => (Box::new(tokio::io::sink()), Box::new(tokio::io::sink())),
            };
            let status = vm
                .exec_stream(exec.clone(), tokio::io::empty(), &mut out, &mut err)
                .await?;
            if status.code != Some(0) {
                return Err(failed(status));
            }
        }
        Action::Workdir { path } => {
            let out = vm
                .exec(ExecOptions {
                    argv: vec!["mkdir".into(), "-p".into(), "--".into(), path.clone()],
                    ..Default::default()
                })
                .await?;
            if out.status.code != Some(0) {
                return Err(failed(out.status));
            }
        }
        Action::Copy {
            sources,
            dest,
            chown,
            chmod,
        } => {
            let (uid, gid) = match chown {
                Some(c) => owner(vm, c, s.line).await?,
                None => (0, 0),
            };
            let attrs = Attrs {
                uid,
                gid,
                mode: *chmod,
            };
            let dest_is_dir = if dest.ends_with('/') {
                true
            } else {
                vm.exec(ExecOptions {
                    argv: vec!["test".into(), "-d".into(), dest.clone()],
                    ..Default::default()
                })
                .await?
                .status
                .code
                    == Some(0)
            };
            for (entries, is_dir) in sources {
                let (dir, entries) = if *is_dir || dest_is_dir {
                    (dest.clone(), entries.clone())
                } else {
                    // A file becomes DEST: unpack beside it under its name.
                    let (d, name) = match dest.rsplit_once('/') {
                        Some(("", n)) => ("/".to_string(), n.to_string()),
                        Some((d, n)) => (d.to_string(), n.to_string()),
                        None => ("/".to_string(), dest.clone()),
                    };
                    let mut e = entries.clone();
                    if let Some(first) = e.first_mut() {
                        first.member = PathBuf::from(name);
                    }
                    (d, e)
                };
                let host = entries.first().map(|e| e.path.clone()).unwrap_or_default();
                let attrs = attrs.clone();
                tar_into_guest(vm, &dir, &[], &host, dest, move |w| {
                    context::write_tar(w, &entries, &attrs)
                })
                .await?;
            }
        }
        Action::Extract {
            archive,
            flag,
            dest,
        } => {
            let flags: Vec<&str> = flag.iter().copied().collect();
            let a = archive.clone();
            tar_into_guest(vm, dest, &flags, archive, dest, move |mut w| {
                io::copy(&mut fs::File::open(&a)?, &mut w)?;
                std::io::Write::flush(&mut w)
            })
            .await?;
        }
    }
    Ok(())
}

/// `--chown=USER[:GROUP]` as ids, names looked up in the guest's
/// /etc/passwd and /etc/group (as Docker does in the image); without a
/// group, the group id is the user id.
async fn owner(vm: &Vm, spec: &str, line: usize) -> Result<(u32, u32)> {
    let (u, g) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    async fn lookup(vm: &Vm, file: &str, name: &str, line: usize) -> Result<u32> {
        if let Ok(n) = name.parse::<u32>() {
            return Ok(n);
        }
        let text = match vm.read_file(file).await {
            Ok((_, b)) => String::from_utf8_lossy(&b).into_owned(),
            Err(_) => String::new(),
        };
        text.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.len() >= 3 && f[0] == name).then(|| f[2].parse::<u32>().ok())?
            })
            .next()
            .ok_or_else(|| {
                invalid(
                    line,
                    format!("--chown: {name:?} is not in the image's {file}"),
                )
                .into()
            })
    }
    let uid = lookup(vm, "/etc/passwd", u, line).await?;
    let gid = match g {
        Some(g) => lookup(vm, "/etc/group", g, line).await?,
        None => uid,
    };
    Ok((uid, gid))
}

/// A Dockerfile's instructions checked without building: what `build`
/// refuses before booting (the FROM image is not resolved).
pub fn check(text: &str) -> std::result::Result<usize, Failure> {
    let ins = dockerfile::parse(text)?;
    from_of(&ins, &BTreeMap::new())?;
    Ok(ins.len())
}

/// Forget cached builds (`images prune`); bytes freed.
pub fn prune_cache(paths: &Paths) -> u64 {
    let mut freed = 0;
    for e in fs::read_dir(cache_dir(paths))
        .into_iter()
        .flatten()
        .flatten()
    {
        let size = e.metadata().map(|m| m.len()).unwrap_or(0);
        if fs::remove_file(e.path()).is_ok() {
            freed += size;
        }
    }
    freed
}

#[cfg(test)]
mod tests;
