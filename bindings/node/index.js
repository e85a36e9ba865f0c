'use strict';
// @machinen/runtime: Linux microVMs you can freeze, move, resume and fork.
//
// The native addon (native/machinen.node, built from the Rust library) does
// the work on its own threads; this file gives it the reference runtime's
// API shape: argv or shell strings, output callbacks, AbortSignal,
// camelCase results, and MachinenError.

const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');

const NATIVE_DIR = path.join(__dirname, 'native');

function loadNative() {
  const file = process.env.MACHINEN_NODE_ADDON || path.join(NATIVE_DIR, 'machinen.node');
  if (!fs.existsSync(file)) {
    throw new Error(
      `machinen: the native addon is missing (${file}); build it with \`npm run build\` in bindings/node`,
    );
  }
  return require(file);
}

const native = loadNative();
if (fs.existsSync(path.join(NATIVE_DIR, 'machinen-vmm'))) {
  native.setBinDir(NATIVE_DIR);
}

const ERROR_MARK = 'machinen-error:';
const ABORT_MARK = 'machinen-aborted';

/** Every error code, as a frozen object of string literals. */
const ErrorCode = Object.freeze(
  Object.fromEntries(native.errorCodes().map((c) => [c.code, c.code])),
);
const RETRYABLE = new Set(native.errorCodes().filter((c) => c.retryable).map((c) => c.code));

class MachinenError extends Error {
  /**
   * @param {string} code one of ErrorCode
   * @param {string} message what happened
   * @param {{hint?: string, retryable?: boolean, cause?: unknown, causes?: string[]}} [opts]
   */
  constructor(code, message, opts = {}) {
    super(message, opts.cause === undefined ? undefined : { cause: opts.cause });
    this.name = 'MachinenError';
    this.code = code;
    this.retryable = opts.retryable ?? RETRYABLE.has(code);
    this.hint = opts.hint ?? undefined;
    this.causes = opts.causes ?? [];
  }
}

function isMachinenError(err, code) {
  const ok =
    err instanceof MachinenError ||
    (err !== null &&
      typeof err === 'object' &&
      err.name === 'MachinenError' &&
      typeof err.code === 'string');
  return ok && (code === undefined || err.code === code);
}

/** The CLI's spelling: `error[CODE]: message`, its causes, its hint. */
function formatMachinenError(err) {
  const lines = [`error[${err.code}]: ${err.message}`];
  for (const c of err.causes ?? []) lines.push(`  caused by: ${c}`);
  if (err.hint) lines.push(`  hint: ${err.hint}`);
  return lines.join('\n');
}

function invalid(message, hint, code = ErrorCode.BOOT_ARGS_INVALID) {
  return new MachinenError(code, message, { hint });
}

// A native error into a MachinenError (or the abort reason).
function convert(err, signal) {
  const msg = err && typeof err.message === 'string' ? err.message : '';
  if (msg === ABORT_MARK) {
    return signal?.reason ?? new DOMException('This operation was aborted', 'AbortError');
  }
  if (msg.startsWith(ERROR_MARK)) {
    const e = JSON.parse(msg.slice(ERROR_MARK.length));
    const causes = Array.isArray(e.causes) ? e.causes : [];
    return new MachinenError(e.code, e.message, {
      hint: e.hint ?? undefined,
      retryable: e.retryable,
      causes,
      cause: causes.length ? new Error(causes.join(': ')) : undefined,
    });
  }
  return err;
}

// Run a native call that takes a cancellation id, wired to `signal`.
async function call(signal, fn) {
  if (!signal) {
    try {
      return await fn(undefined);
    } catch (e) {
      throw convert(e);
    }
  }
  if (signal.aborted) throw signal.reason;
  const id = native.newCancel();
  const onAbort = () => native.cancel(id);
  signal.addEventListener('abort', onAbort, { once: true });
  try {
    return await fn(id);
  } catch (e) {
    throw convert(e, signal);
  } finally {
    signal.removeEventListener('abort', onAbort);
    native.releaseCancel(id);
  }
}

// snake_case keys of the library's JSON into camelCase (maps of names,
// like `env`, keep their keys).
function camel(v) {
  if (Array.isArray(v)) return v.map(camel);
  if (v === null || typeof v !== 'object') return v;
  const out = {};
  for (const [k, val] of Object.entries(v)) {
    const key = k.replace(/_([a-z0-9])/g, (_, c) => c.toUpperCase());
    out[key] = k === 'env' || k === 'labels' ? val : camel(val);
  }
  return out;
}

function checkKeys(opts, allowed, what) {
  if (opts === undefined || opts === null) return;
  if (typeof opts !== 'object') throw invalid(`${what} options must be an object`, 'pass an object, e.g. {}');
  for (const k of Object.keys(opts)) {
    if (opts[k] === undefined) continue;
    if (!allowed.includes(k)) {
      throw invalid(
        `${what}: option ${JSON.stringify(k)} is not supported`,
        `supported: ${allowed.join(', ')} (the package README lists the differences from the reference runtime)`,
      );
    }
  }
}

function toArgv(cmd) {
  if (typeof cmd === 'string') {
    if (cmd.length === 0) throw invalid('the command is empty', 'pass a shell string or an argv array');
    return ['/bin/sh', '-c', cmd];
  }
  if (Array.isArray(cmd) && cmd.length > 0 && cmd.every((a) => typeof a === 'string')) return cmd;
  throw invalid('the command must be a shell string or a non-empty array of strings', 'e.g. exec("ls -l /") or exec(["ls", "-l", "/"])');
}

function toEnv(env) {
  if (env === undefined || env === null) return undefined;
  const out = {};
  for (const [k, v] of Object.entries(env)) if (v !== undefined) out[k] = String(v);
  return out;
}

function toPorts(ports) {
  if (ports === undefined) return undefined;
  return ports.map((p) => {
    if (typeof p === 'string') return p;
    if (typeof p === 'number') return `${p}:${p}`;
    if (p && typeof p === 'object') {
      const host = p.hostPort ?? p.host ?? p.guestPort ?? p.guest;
      const guest = p.guestPort ?? p.guest;
      return `${p.hostAddr ? `${p.hostAddr}:` : ''}${host}:${guest}`;
    }
    throw invalid(`cannot read port forward ${JSON.stringify(p)}`, 'e.g. "8080:80", 8080 or {hostPort: 8080, guestPort: 80}');
  });
}

function ms(v, what) {
  if (v === undefined || v === null) return undefined;
  if (!Number.isFinite(v) || v < 0 || v > 0xffffffff) throw invalid(`${what} must be a number of milliseconds`, 'e.g. 30000');
  return Math.round(v);
}

const SIGNALS = os.constants.signals;

function signalNumber(sig) {
  if (typeof sig === 'number') return sig;
  const n = SIGNALS[sig] ?? SIGNALS[`SIG${sig}`];
  if (n === undefined) throw invalid(`unknown signal ${JSON.stringify(sig)}`, 'e.g. "SIGINT", "SIGTERM" or 2');
  return n;
}

const EXEC_KEYS = ['env', 'cwd', 'user', 'timeoutMs', 'stdin', 'onStdout', 'onStderr', 'signal', 'encoding'];

function execOpts(cmd, opts = {}) {
  checkKeys(opts, EXEC_KEYS, 'exec');
  return {
    argv: toArgv(cmd),
    env: toEnv(opts.env),
    cwd: opts.cwd,
    user: opts.user,
    timeoutMs: ms(opts.timeoutMs, 'timeoutMs'),
  };
}

function decode(buf, encoding) {
  return encoding === 'buffer' ? buf : buf.toString(encoding ?? 'utf8');
}

/** A running VM. */
class VmHandle {
  /** @param {any} inner the native handle */
  constructor(inner) {
    this._h = inner;
  }

  get name() {
    return this._h.name;
  }

  get id() {
    return this._h.id;
  }

  /** The supervisor's pid (what `machinen ls` shows as PID). */
  get pid() {
    return this._h.pid;
  }

  /** What `list()` shows of this VM, as of this handle's creation. */
  info() {
    return camel(this._h.info());
  }

  /** Where the boot, restore or fork spent its time. */
  phases() {
    return camel(this._h.phases());
  }

  /** The supervisor's live view: state, pids, the agent's version. */
  async status() {
    return call(undefined, () => this._h.status()).then(camel);
  }

  /** Capture process `pid` of the guest as a native process image in the new directory `out` (`machinen capture`): `{ dir, pid, threads, mappings, memoryBytes, killed, plan }`, where `plan` is how this host would restore it (`steps`) or why not (`refusals`, each `{ code, message }` with the image vocabulary's codes). The process goes on unless `kill`; `maxBytes` bounds the captured memory (default 1 GiB). Throws `SNAPSHOT_PORTABLE_UNSUPPORTED` for the agent or a process that is gone, `FILES_EXISTS` when `out` exists. */
  async criu(args) {
    if (!Array.isArray(args) || args.length === 0 || !args.every((a) => typeof a === 'string')) {
      throw invalid('criu needs CRIU\'s arguments as an array of strings', 'e.g. vm.criu(["dump", "-t", "214", "-D", "/var/tmp/ck"])');
    }
    return call(undefined, () => this._h.criu(args)).then(camel);
  }

  async captureProcess(pid, out, opts = {}) {
    checkKeys(opts, ['kill', 'maxBytes'], 'captureProcess');
    if (!Number.isInteger(pid) || pid < 1) throw invalid('captureProcess needs a guest pid', 'e.g. vm.captureProcess(214, "./proc.img")');
    if (typeof out !== 'string') throw invalid('captureProcess needs a destination directory', 'e.g. vm.captureProcess(214, "./proc.img")');
    return call(undefined, () => this._h.captureProcess(pid, out, opts.kill === true, opts.maxBytes ?? null)).then(camel);
  }

  /** Memory: `ceilingBytes`, the guest's view (`guest`: totalBytes, availableBytes, usedBytes, cachedBytes, freeBytes; null if its agent did not answer) and the host's cost (`host`: qemuRssBytes, qemuPssBytes, supervisorPssBytes, ramFile, ramFileBytes). */
  async memoryStats() {
    return call(undefined, () => this._h.memoryStats()).then(camel);
  }

  /** The balloon: `ceilingBytes`, `targetBytes` (null until set), `actualBytes` (what the guest has now), `freePageReporting`. Throws `BALLOON_UNAVAILABLE` for a restore that maps its bundle's RAM privately. */
  async balloon() {
    return call(undefined, () => this._h.balloon()).then(camel);
  }

  /** The egress policy (`policy`: `egress`, `allow`, `deny`) and the traffic so far (`counters`: bytesOut, bytesIn, packetsOut, packetsIn, connections, dnsAnswered, dnsRefused, refused, refusedBy [{ proto, destination, rule, count, lastMs }]). Throws `NETWORK_UNAVAILABLE` for a VM booted with `network: "none"` or `"nat-host"`. */
  async network() {
    return call(undefined, () => this._h.network()).then(camel);
  }

  /** Change the egress policy while the VM runs: `{ allow, deny, remove, egress, clear }` (rules as strings, e.g. `"*.example.com:443"`). Applies to the next packet of every connection; resolves to what `network()` returns. */
  async setNetwork(change = {}) {
    checkKeys(change, ['allow', 'deny', 'remove', 'egress', 'clear'], 'setNetwork');
    const list = (v) => (v === undefined ? undefined : Array.isArray(v) ? v.map(String) : [String(v)]);
    const o = { allow: list(change.allow), deny: list(change.deny), remove: list(change.remove), egress: change.egress, clear: change.clear };
    return call(undefined, () => this._h.setNetwork(o)).then(camel);
  }

  /** Let the guest use `bytes` of its ceiling (`'max'`: all of it); waits up to `opts.waitMs` (default 30 s, 0: not at all) for it to get there. Resolves to the balloon plus `settled` and `elapsedMs`. */
  async setBalloon(bytes, opts = {}) {
    const ceiling = this.info().memoryMib * 1024 * 1024;
    const target = bytes === 'max' ? ceiling : bytes;
    const waitMs = opts.waitMs ?? 30000;
    return call(undefined, () => this._h.setBalloon(target, waitMs)).then(camel);
  }

  /** Run a command; the result whatever its exit code. */
  async execRaw(cmd, opts = {}) {
    const o = execOpts(cmd, opts);
    if (!opts.onStdout && !opts.onStderr && opts.stdin === undefined) {
      const r = await call(opts.signal, (id) => this._h.exec(o, id));
      return {
        exitCode: r.exitCode,
        signal: r.signal ?? undefined,
        stdout: decode(r.stdout, opts.encoding),
        stderr: decode(r.stderr, opts.encoding),
      };
    }
    return this._stream(o, opts);
  }

  /** Run a command; throws EXEC_NONZERO_EXIT unless it exits 0. */
  async exec(cmd, opts = {}) {
    const r = await this.execRaw(cmd, opts);
    if (r.exitCode !== 0) {
      const shown = typeof cmd === 'string' ? cmd : cmd.join(' ');
      const err = new MachinenError(
        ErrorCode.EXEC_NONZERO_EXIT,
        `${JSON.stringify(shown)} exited with ${r.exitCode}`,
        { hint: 'use execRaw() to get the result of a command that may fail' },
      );
      err.exitCode = r.exitCode;
      err.stdout = r.stdout;
      err.stderr = r.stderr;
      throw err;
    }
    return r;
  }

  async _stream(o, opts) {
    const { signal } = opts;
    if (signal?.aborted) throw signal.reason;
    let s;
    try {
      s = await this._h.execStart(o);
    } catch (e) {
      throw convert(e);
    }
    const onAbort = () => s.abort();
    signal?.addEventListener('abort', onAbort, { once: true });
    const out = [];
    const err = [];
    let exit = null;
    try {
      const feed = (async () => {
        if (opts.stdin !== undefined) {
          const data = Buffer.isBuffer(opts.stdin) ? opts.stdin : Buffer.from(String(opts.stdin));
          for (let i = 0; i < data.length; i += 65536) await s.write(data.subarray(i, i + 65536));
        }
        await s.end();
      })();
      for (;;) {
        const ev = await s.next();
        if (ev === null) break;
        if (ev.kind === 'stdout') {
          out.push(ev.data);
          opts.onStdout?.(ev.data);
        } else if (ev.kind === 'stderr') {
          err.push(ev.data);
          opts.onStderr?.(ev.data);
        } else if (ev.kind === 'exit') {
          exit = ev;
        }
      }
      await feed;
    } catch (e) {
      // A throwing callback (or a failed write) gives the command up.
      s.abort();
      throw convert(e, signal);
    } finally {
      signal?.removeEventListener('abort', onAbort);
    }
    if (signal?.aborted) throw signal.reason;
    if (exit === null) {
      throw new MachinenError(ErrorCode.EXEC_VSOCK_UNAVAILABLE, 'the command ended without an exit status', {
        hint: 'the VM may have stopped; list() shows live VMs',
      });
    }
    return {
      exitCode: exit.exitCode,
      signal: exit.signal ?? undefined,
      stdout: decode(Buffer.concat(out), opts.encoding),
      stderr: decode(Buffer.concat(err), opts.encoding),
    };
  }

  /**
   * A command on a terminal. Returns at once with a handle: write(),
   * resize(), signal(), eof(), and `result`, a promise of its exit (with
   * the output, unless `onData` took it).
   */
  async execPty(cmd, opts = {}) {
    checkKeys(opts, ['env', 'cwd', 'rows', 'cols', 'onData', 'signal'], 'execPty');
    const o = execOpts(cmd, { env: opts.env, cwd: opts.cwd });
    let p;
    try {
      p = await this._h.execPty(o, opts.rows ?? 24, opts.cols ?? 80);
    } catch (e) {
      throw convert(e);
    }
    const chunks = [];
    const onAbort = () => p.signal(SIGNALS.SIGKILL).catch(() => {});
    opts.signal?.addEventListener('abort', onAbort, { once: true });
    const result = (async () => {
      try {
        for (;;) {
          const ev = await p.next();
          if (ev === null) break;
          if (ev.kind === 'output') {
            if (opts.onData) opts.onData(ev.data);
            else chunks.push(ev.data);
          } else if (ev.kind === 'exit') {
            return { exitCode: ev.exitCode, signal: ev.signal ?? undefined, output: Buffer.concat(chunks) };
          }
        }
        throw new MachinenError(ErrorCode.EXEC_VSOCK_UNAVAILABLE, 'the terminal closed without an exit status');
      } catch (e) {
        throw convert(e, opts.signal);
      } finally {
        opts.signal?.removeEventListener('abort', onAbort);
      }
    })();
    // Handled here too, so that a terminal nobody awaits cannot end the
    // process with an unhandled rejection; awaiting it still throws.
    result.catch(() => {});
    const wrap = (f) => f.catch((e) => Promise.reject(convert(e)));
    return {
      pid: p.pid,
      write: (data) => wrap(p.write(Buffer.isBuffer(data) ? data : Buffer.from(String(data)))),
      resize: (rows, cols) => wrap(p.resize(rows, cols)),
      signal: (sig) => wrap(p.signal(signalNumber(sig))),
      eof: () => wrap(p.eof()),
      result,
    };
  }

  /** Write a guest file (replaced atomically unless `append`). */
  async writeFile(guestPath, contents, opts = {}) {
    checkKeys(opts, ['mode', 'append'], 'writeFile');
    const data = Buffer.isBuffer(contents) ? contents : Buffer.from(contents instanceof Uint8Array ? contents : String(contents));
    await call(undefined, () => this._h.writeFile(guestPath, data, opts.mode, opts.append));
  }

  /** Read a guest file: a Buffer, or a string with `encoding`. */
  async readFile(guestPath, opts = {}) {
    checkKeys(opts, ['encoding'], 'readFile');
    const buf = await call(undefined, () => this._h.readFile(guestPath));
    return opts.encoding ? buf.toString(opts.encoding) : buf;
  }

  /**
   * Write a snapshot bundle to `outDir`. The VM keeps running (as with the
   * reference's vmstate engine) unless `leaveRunning: false`. A VM that has
   * a checkpoint (or was restored from a bundle still in place) gets a
   * delta over it unless `full: true`. `engine: "criu"` (default:
   * `$MACHINEN_SNAPSHOT_ENGINE`, else `"vmstate"`) writes the VM's process
   * tree (the main command, or `pid`'s) and disk instead, which `restore`
   * resumes in a fresh VM of the same image; it stops the VM unless
   * `leaveRunning: true`.
   */
  async snapshot(opts) {
    checkKeys(opts, ['outDir', 'leaveRunning', 'full', 'timeoutMs', 'engine', 'pid', 'signal', 'onLog'], 'snapshot');
    if (!opts || typeof opts.outDir !== 'string') throw invalid('snapshot needs outDir', 'e.g. vm.snapshot({ outDir: "./snap" })');
    const engine = opts.engine ?? (process.env.MACHINEN_SNAPSHOT_ENGINE || 'vmstate');
    if (engine === 'portable') {
      throw invalid('the portable engine captures one process', 'vm.capture(pid, out), then materialize', ErrorCode.SNAPSHOT_PORTABLE_UNSUPPORTED);
    }
    if (engine !== 'vmstate' && engine !== 'criu') throw invalid(`engine ${JSON.stringify(engine)} is not "vmstate" or "criu"`, 'e.g. vm.snapshot({ outDir: "./snap", engine: "criu" })');
    if (opts.pid !== undefined && (engine !== 'criu' || !Number.isInteger(opts.pid) || opts.pid < 1)) {
      throw invalid('pid names the process tree of a criu snapshot (a positive integer)', 'e.g. vm.snapshot({ outDir: "./snap", engine: "criu", pid: 84 })');
    }
    const started = Date.now();
    if (engine === 'criu') {
      if (opts.full !== undefined) throw invalid('full is for vmstate snapshots: a criu bundle is always self-contained', 'drop full');
      const keepCriu = opts.leaveRunning ?? false;
      const r = camel(
        await call(opts.signal, (id) => this._h.snapshotCriu(opts.outDir, keepCriu, opts.pid, ms(opts.timeoutMs, 'timeoutMs'), id)),
      );
      return { ...r, outDir: r.out };
    }
    const keep = opts.leaveRunning ?? true;
    const r = camel(
      await call(opts.signal, (id) => this._h.snapshot(opts.outDir, keep, ms(opts.timeoutMs, 'timeoutMs'), id, opts.full === true)),
    );
    return { ...r, outDir: r.out, elapsedMs: r.elapsedMs ?? Date.now() - started };
  }

  /** A sibling VM sharing this one's past; this one keeps running. */
  async fork(opts = {}) {
    checkKeys(opts, ['name', 'outDir', 'detached', 'ports', 'ownRam', 'tcpKeep', 'freeMemoryThreshold', 'liveMounts', 'netPolicy', 'egressSecrets', 'signal', 'onLog'], 'fork');
    const o = {
      name: opts.name,
      outDir: opts.outDir,
      detached: opts.detached,
      ports: toPorts(opts.ports),
      ownRam: opts.ownRam,
      tcpKeep: opts.tcpKeep,
      freeMemoryThreshold: toThreshold(opts.freeMemoryThreshold),
      liveMounts: toLiveMounts(opts.liveMounts),
      netPolicy: toNetPolicy(opts.netPolicy),
      egressSecrets: toEgressSecrets(opts.egressSecrets),
    };
    return new VmHandle(await call(opts.signal, (id) => this._h.fork(o, id)));
  }

  /** Stop the VM at once (`graceful: true`: let the guest power off first). */
  async kill(opts = {}) {
    checkKeys(opts, ['graceful', 'timeoutMs'], 'kill');
    return camel(await call(undefined, () => this._h.kill(!opts.graceful, ms(opts.timeoutMs, 'timeoutMs'))));
  }

  /** Let the VM outlive this process; `attach({ name })` finds it again. */
  async detach() {
    await call(undefined, () => this._h.detach());
  }

  /**
   * Wait until the VM's main command exits (or the VM stops):
   * `{ reason: "exited" | "stopped" | "crashed", exitCode, ... }`.
   */
  async wait(opts = {}) {
    checkKeys(opts, ['timeoutMs', 'signal'], 'wait');
    return camel(await call(opts.signal, (id) => this._h.wait(ms(opts.timeoutMs, 'timeoutMs'), id)));
  }
}

const BOOT_KEYS = [
  'image', 'cmd', 'name', 'hostname', 'memoryMib', 'cpus', 'network', 'detached', 'bootTimeoutMs', 'accel', 'debug',
  'ports', 'secrets', 'diskSize', 'nested', 'env', 'cwd', 'keepAliveOnExit', 'signal', 'onLog',
  'mount', 'mountDiskUpperSizeBytes', 'balloon', 'liveMounts', 'user', 'netPolicy', 'egressSecrets', 'cpuModel',
];

/** `netPolicy`: `{ egress?: "allow" | "deny", allow?: string[], deny?: string[] }`. */
function toNetPolicy(p) {
  if (p === undefined) return undefined;
  if (!p || typeof p !== 'object' || Array.isArray(p)) {
    throw invalid('netPolicy is { egress, allow, deny }', 'e.g. netPolicy: { egress: "deny", allow: ["*.packages.example:443"] }', ErrorCode.NETWORK_POLICY_INVALID);
  }
  checkKeys(p, ['egress', 'allow', 'deny'], 'netPolicy');
  const list = (v) => (v === undefined ? undefined : Array.isArray(v) ? v.map(String) : [String(v)]);
  return { egress: p.egress, allow: list(p.allow), deny: list(p.deny) };
}

/** `egressSecrets`: `[{ name, hosts: string | string[], value }]`. */
function toEgressSecrets(s) {
  if (s === undefined) return undefined;
  const hint = 'e.g. egressSecrets: [{ name: "API_KEY", hosts: "api.example.com", value: process.env.API_KEY }]';
  if (!Array.isArray(s)) throw invalid('egressSecrets is a list of { name, hosts, value }', hint, ErrorCode.SECRETS_INVALID);
  return s.map((e) => {
    if (!e || typeof e !== 'object') throw invalid('an egress secret is { name, hosts, value }', hint, ErrorCode.SECRETS_INVALID);
    checkKeys(e, ['name', 'hosts', 'value'], 'egressSecrets[]');
    if (typeof e.name !== 'string' || typeof e.value !== 'string') {
      throw invalid('an egress secret needs a string name and value', hint, ErrorCode.SECRETS_INVALID);
    }
    const hosts = Array.isArray(e.hosts) ? e.hosts.map(String) : e.hosts === undefined ? [] : [String(e.hosts)];
    return { name: e.name, hosts, value: e.value };
  });
}

/** `freeMemoryThreshold`: `"1%"`, `"512M"` or a number of bytes. */
function toThreshold(t) {
  if (t === undefined) return undefined;
  if (typeof t === 'number' && Number.isInteger(t) && t >= 0) return String(t);
  if (typeof t === 'string') return t;
  throw invalid('freeMemoryThreshold is "N%", a size such as "512M", or a whole number of bytes', 'e.g. freeMemoryThreshold: "1%" (0 turns the check off)');
}

/** `mount`: one `{ host, guest }` or a list of them. */
function toMounts(m) {
  if (m === undefined) return undefined;
  const list = Array.isArray(m) ? m : [m];
  return list.map((x) => {
    if (!x || typeof x.host !== 'string' || typeof x.guest !== 'string') {
      throw invalid('mount entries are { host, guest } (two strings)', 'e.g. mount: { host: "./src", guest: "/work/src" }', ErrorCode.BOOT_MOUNT_INVALID);
    }
    return { host: x.host, guest: x.guest };
  });
}

/** `liveMounts`: one `{ host, guest, readonly? }` or a list of them. */
function toLiveMounts(m) {
  if (m === undefined) return undefined;
  const list = Array.isArray(m) ? m : [m];
  return list.map((x) => {
    const ro = x?.readonly ?? x?.readOnly;
    if (!x || typeof x.host !== 'string' || typeof x.guest !== 'string' || (ro !== undefined && typeof ro !== 'boolean')) {
      throw invalid('liveMounts entries are { host, guest, readonly? } (two strings and a boolean)', 'e.g. liveMounts: [{ host: "./src", guest: "/work", readonly: false }]', ErrorCode.BOOT_MOUNT_INVALID);
    }
    return { host: x.host, guest: x.guest, readonly: ro };
  });
}

/** Boot a VM (the installed Debian base unless `image`). */
async function boot(opts = {}) {
  checkKeys(opts, BOOT_KEYS, 'boot');
  const o = {
    image: opts.image,
    cmd: opts.cmd === undefined ? undefined : toArgv(opts.cmd),
    name: opts.name,
    hostname: opts.hostname,
    memoryMib: opts.memoryMib,
    cpus: opts.cpus,
    cpuModel: opts.cpuModel,
    network: opts.network,
    detached: opts.detached,
    bootTimeoutMs: ms(opts.bootTimeoutMs, 'bootTimeoutMs'),
    accel: opts.accel,
    debug: opts.debug,
    ports: toPorts(opts.ports),
    secrets: toEnv(opts.secrets),
    diskSize: opts.diskSize === undefined ? undefined : String(opts.diskSize),
    nested: opts.nested,
    env: toEnv(opts.env),
    cwd: opts.cwd,
    user: opts.user,
    keepAliveOnExit: opts.keepAliveOnExit,
    mounts: toMounts(opts.mount),
    mountUpperSize: opts.mountDiskUpperSizeBytes,
    balloon: opts.balloon,
    liveMounts: toLiveMounts(opts.liveMounts),
    netPolicy: toNetPolicy(opts.netPolicy),
    egressSecrets: toEgressSecrets(opts.egressSecrets),
  };
  return new VmHandle(await call(opts.signal, (id) => native.boot(o, id)));
}

/** A live VM by `name` or supervisor `pid`, started by any process. */
async function attach(opts) {
  if (typeof opts === 'string') opts = { name: opts };
  checkKeys(opts, ['name', 'pid'], 'attach');
  const target = opts?.name ?? (opts?.pid === undefined ? undefined : String(opts.pid));
  if (!target) throw invalid('attach needs a name or a pid', 'e.g. attach({ name: "web" })');
  return new VmHandle(await call(undefined, () => native.attach(target)));
}

/** Live VMs (`{ all: true }`: and those that crashed, until runGc()). */
async function list(opts = {}) {
  checkKeys(opts, ['all'], 'list');
  return camel(await call(undefined, () => native.list(!!opts.all)));
}

/** Restore a snapshot bundle into a new VM. */
async function restore(opts) {
  checkKeys(opts, ['snapDir', 'name', 'image', 'ports', 'detached', 'bootTimeoutMs', 'resetTcp', 'verify', 'ownRam', 'freeMemoryThreshold', 'liveMounts', 'netPolicy', 'egressSecrets', 'memoryMib', 'cpus', 'cpuModel', 'signal', 'onLog'], 'restore');
  if (!opts || typeof opts.snapDir !== 'string') throw invalid('restore needs snapDir', 'e.g. restore({ snapDir: "./snap" })', ErrorCode.RESTORE_BUNDLE_INVALID);
  const o = {
    bundle: opts.snapDir,
    name: opts.name,
    image: opts.image,
    ports: toPorts(opts.ports),
    detached: opts.detached,
    bootTimeoutMs: ms(opts.bootTimeoutMs, 'bootTimeoutMs'),
    resetTcp: opts.resetTcp,
    verify: opts.verify,
    ownRam: opts.ownRam,
    freeMemoryThreshold: toThreshold(opts.freeMemoryThreshold),
    liveMounts: toLiveMounts(opts.liveMounts),
    netPolicy: toNetPolicy(opts.netPolicy),
    egressSecrets: toEgressSecrets(opts.egressSecrets),
    memoryMib: opts.memoryMib,
    cpus: opts.cpus,
    cpuModel: opts.cpuModel,
  };
  return new VmHandle(await call(opts.signal, (id) => native.restore(o, id)));
}

/**
 * Bake an image: boot `base`, run `install(vm)` against the live VM, and
 * export its root filesystem to `out` (a .tar.gz).
 */
async function provision(opts) {
  checkKeys(opts, ['base', 'out', 'install', 'cmd', 'env', 'cwd', 'memoryMib', 'cpus', 'network', 'bootTimeoutMs', 'signal', 'onLog'], 'provision');
  if (!opts || typeof opts.out !== 'string') {
    throw invalid('provision needs out', 'e.g. provision({ out: "./image.tar.gz" })', ErrorCode.PROVISION_ARGS_INVALID);
  }
  const o = {
    base: opts.base,
    out: opts.out,
    cmd: opts.cmd === undefined ? undefined : toArgv(opts.cmd),
    env: toEnv(opts.env),
    cwd: opts.cwd,
    memoryMib: opts.memoryMib,
    cpus: opts.cpus,
    network: opts.network,
    bootTimeoutMs: ms(opts.bootTimeoutMs, 'bootTimeoutMs'),
  };
  const { signal } = opts;
  if (signal?.aborted) throw signal.reason;
  const p = await call(undefined, () => native.provisionStart(o, typeof opts.install === 'function'));
  const onAbort = () => p.abort();
  signal?.addEventListener('abort', onAbort, { once: true });
  let hookError;
  try {
    if (typeof opts.install === 'function') {
      const vm = await call(undefined, () => p.installVm());
      if (vm !== null && !signal?.aborted) {
        try {
          await opts.install(new VmHandle(vm));
          p.installDone(null);
        } catch (e) {
          hookError = e;
          p.installDone(e instanceof Error ? e.message : String(e));
        }
      }
    }
    try {
      return camel(await p.result());
    } catch (e) {
      const err = convert(e, signal);
      if (hookError !== undefined && isMachinenError(err)) {
        throw new MachinenError(err.code, err.message, { hint: err.hint, causes: err.causes, cause: hookError });
      }
      throw err;
    }
  } finally {
    signal?.removeEventListener('abort', onAbort);
  }
}

/**
 * Bake a Dockerfile into a rootfs tarball (`machinen build`): every RUN,
 * COPY, ADD and WORKDIR runs in one real VM; unchanged inputs come from
 * the build cache.
 */
async function build(opts) {
  checkKeys(opts, ['context', 'dockerfile', 'out', 'buildArgs', 'noCache', 'memoryMib', 'cpus', 'network', 'bootTimeoutMs', 'signal'], 'build');
  if (!opts || typeof opts.out !== 'string') {
    throw invalid('build needs out', 'e.g. build({ context: ".", out: "./image.tar.gz" })', ErrorCode.BUILD_DOCKERFILE_INVALID);
  }
  const o = {
    context: opts.context ?? '.',
    dockerfile: opts.dockerfile,
    out: opts.out,
    buildArgs: opts.buildArgs === undefined ? undefined : toEnv(opts.buildArgs),
    noCache: opts.noCache,
    memoryMib: opts.memoryMib,
    cpus: opts.cpus,
    network: opts.network,
    bootTimeoutMs: ms(opts.bootTimeoutMs, 'bootTimeoutMs'),
  };
  return camel(await call(opts.signal, (id) => native.build(o, id)));
}

/** An image's settings (command, env, cwd, user, exposed ports, labels) and origin. */
/** How this host (or `targetArch`) would restore the native process image in `dir`: `{ sourceArch, targetArch, exe, argv, steps, refusals }` (`machinen image check --json`); refusals are data. Throws `PORTABLE_IMAGE_INVALID` (naming every problem) for documents that are missing, malformed or inconsistent. */
async function checkProcessImage(dir, opts = {}) {
  checkKeys(opts, ['targetArch'], 'checkProcessImage');
  if (typeof dir !== 'string') throw invalid('checkProcessImage needs a directory', 'e.g. checkProcessImage("./proc.img")');
  return call(undefined, () => native.checkProcessImage(dir, opts.targetArch ?? null));
}

async function inspectImage(image) {
  if (typeof image !== 'string') throw invalid('inspectImage needs an image', 'e.g. inspectImage("./app.tar.gz")', ErrorCode.BOOT_ARGS_INVALID);
  return camel(await call(undefined, () => native.inspectImage(image)));
}

/** Push an image to a registry (HOST[:PORT]/REPO[:TAG]) as a container image. */
async function pushImage(image, reference) {
  if (typeof image !== 'string' || typeof reference !== 'string') {
    throw invalid('pushImage needs an image and a reference', 'e.g. pushImage("./app.tar.gz", "registry.example:5000/team/app:1")', ErrorCode.IMAGE_PUSH_FAILED);
  }
  return camel(await call(undefined, () => native.pushImage(image, reference)));
}

/** Clean up after VMs that crashed or whose supervisor died. */
async function runGc(opts = {}) {
  checkKeys(opts, ['dryRun'], 'runGc');
  return camel(await call(undefined, () => native.runGc(!!opts.dryRun)));
}

exports.boot = boot;
exports.attach = attach;
exports.list = list;
exports.restore = restore;
exports.provision = provision;
exports.build = build;
exports.inspectImage = inspectImage;
exports.checkProcessImage = checkProcessImage;
exports.pushImage = pushImage;
exports.runGc = runGc;
exports.VmHandle = VmHandle;
exports.ErrorCode = ErrorCode;
exports.MachinenError = MachinenError;
exports.isMachinenError = isMachinenError;
exports.formatMachinenError = formatMachinenError;
exports.version = native.version();
