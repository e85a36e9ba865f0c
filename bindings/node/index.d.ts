// Type declarations of @machinen/runtime. The ErrorCode block is generated
// from the native addon (`npm run gen-dts`); test/api.test.mjs fails when
// this file and the binding disagree.

/// <reference types="node" />

// BEGIN GENERATED ERROR CODES
export declare const ErrorCode: {
  readonly BOOT_TIMEOUT: "BOOT_TIMEOUT";
  readonly BOOT_DETACHED_READINESS_FAILED: "BOOT_DETACHED_READINESS_FAILED";
  readonly BOOT_MEMORY_INVALID: "BOOT_MEMORY_INVALID";
  readonly BOOT_VMM_MISSING: "BOOT_VMM_MISSING";
  readonly BOOT_ENGINE_MISSING: "BOOT_ENGINE_MISSING";
  readonly BOOT_ENGINE_FAILED: "BOOT_ENGINE_FAILED";
  readonly BOOT_ARGS_INVALID: "BOOT_ARGS_INVALID";
  readonly BOOT_IMAGE_INVALID: "BOOT_IMAGE_INVALID";
  readonly BOOT_PORT_FORWARD_IN_USE: "BOOT_PORT_FORWARD_IN_USE";
  readonly BOOT_PORT_FORWARD_CONFLICT: "BOOT_PORT_FORWARD_CONFLICT";
  readonly BOOT_RAM_DIR_FULL: "BOOT_RAM_DIR_FULL";
  readonly PROVISION_BASE_NOT_FOUND: "PROVISION_BASE_NOT_FOUND";
  readonly PROVISION_KERNEL_NOT_FOUND: "PROVISION_KERNEL_NOT_FOUND";
  readonly PROVISION_ASSETS_DIR_INVALID: "PROVISION_ASSETS_DIR_INVALID";
  readonly PROVISION_ARGS_INVALID: "PROVISION_ARGS_INVALID";
  readonly PROVISION_STEP_FAILED: "PROVISION_STEP_FAILED";
  readonly PROVISION_COPY_FAILED: "PROVISION_COPY_FAILED";
  readonly PROVISION_EXPORT_FAILED: "PROVISION_EXPORT_FAILED";
  readonly PROVISION_OUTPUT_FAILED: "PROVISION_OUTPUT_FAILED";
  readonly INSTALL_TOOL_MISSING: "INSTALL_TOOL_MISSING";
  readonly INSTALL_FETCH_FAILED: "INSTALL_FETCH_FAILED";
  readonly INSTALL_ROOTFS_FAILED: "INSTALL_ROOTFS_FAILED";
  readonly CACHE_IMAGE_BUILD_FAILED: "CACHE_IMAGE_BUILD_FAILED";
  readonly CACHE_INITRAMFS_BUILD_FAILED: "CACHE_INITRAMFS_BUILD_FAILED";
  readonly EXEC_VSOCK_UNAVAILABLE: "EXEC_VSOCK_UNAVAILABLE";
  readonly EXEC_COMMAND_NOT_FOUND: "EXEC_COMMAND_NOT_FOUND";
  readonly EXEC_SPAWN_FAILED: "EXEC_SPAWN_FAILED";
  readonly EXEC_FAILED: "EXEC_FAILED";
  readonly PROTOCOL_ERROR: "PROTOCOL_ERROR";
  readonly PROTOCOL_VERSION_MISMATCH: "PROTOCOL_VERSION_MISMATCH";
  readonly PORT_FORWARD_REFUSED: "PORT_FORWARD_REFUSED";
  readonly FIXUP_FAILED: "FIXUP_FAILED";
  readonly REGISTRY_NAME_IN_USE: "REGISTRY_NAME_IN_USE";
  readonly REGISTRY_NAME_INVALID: "REGISTRY_NAME_INVALID";
  readonly REGISTRY_NOT_FOUND: "REGISTRY_NOT_FOUND";
  readonly REGISTRY_IO: "REGISTRY_IO";
  readonly CONTROL_PERMISSION_DENIED: "CONTROL_PERMISSION_DENIED";
  readonly STOP_TIMEOUT: "STOP_TIMEOUT";
  readonly STOP_FAILED: "STOP_FAILED";
  readonly GC_FAILED: "GC_FAILED";
  readonly SNAPSHOT_DUMP_FAILED: "SNAPSHOT_DUMP_FAILED";
  readonly SNAPSHOT_TIMEOUT: "SNAPSHOT_TIMEOUT";
  readonly SNAPSHOT_OUT_EXISTS: "SNAPSHOT_OUT_EXISTS";
  readonly SNAPSHOT_STATE_INVALID: "SNAPSHOT_STATE_INVALID";
  readonly RESTORE_BUNDLE_INVALID: "RESTORE_BUNDLE_INVALID";
  readonly RESTORE_BUNDLE_INCOMPATIBLE: "RESTORE_BUNDLE_INCOMPATIBLE";
  readonly RESTORE_IMAGE_MISMATCH: "RESTORE_IMAGE_MISMATCH";
  readonly BOOT_VMSTATE_RESEED_FAILED: "BOOT_VMSTATE_RESEED_FAILED";
  readonly FILES_PATH_INVALID: "FILES_PATH_INVALID";
  readonly FILES_NOT_FOUND: "FILES_NOT_FOUND";
  readonly FILES_PERMISSION_DENIED: "FILES_PERMISSION_DENIED";
  readonly FILES_IS_DIRECTORY: "FILES_IS_DIRECTORY";
  readonly FILES_NOT_A_DIRECTORY: "FILES_NOT_A_DIRECTORY";
  readonly FILES_NOT_REGULAR: "FILES_NOT_REGULAR";
  readonly FILES_NO_SPACE: "FILES_NO_SPACE";
  readonly FILES_IO: "FILES_IO";
  readonly FILES_TOO_LARGE: "FILES_TOO_LARGE";
  readonly FILES_HOST_DISK_RESERVE: "FILES_HOST_DISK_RESERVE";
  readonly SECRETS_INVALID: "SECRETS_INVALID";
  readonly SECRETS_FAILED: "SECRETS_FAILED";
  readonly INTERRUPTED: "INTERRUPTED";
  readonly IO: "IO";
  readonly EXEC_TIMEOUT: "EXEC_TIMEOUT";
  readonly FILES_PATH_ESCAPE: "FILES_PATH_ESCAPE";
  readonly FILES_EXISTS: "FILES_EXISTS";
  readonly BOOT_NESTED_VIRT_UNSUPPORTED: "BOOT_NESTED_VIRT_UNSUPPORTED";
  readonly MAIN_ALREADY_RUNNING: "MAIN_ALREADY_RUNNING";
  readonly MAIN_NOT_RUNNING: "MAIN_NOT_RUNNING";
  readonly WAIT_TIMEOUT: "WAIT_TIMEOUT";
  readonly EXEC_NONZERO_EXIT: "EXEC_NONZERO_EXIT";
  readonly BOOT_MOUNT_INVALID: "BOOT_MOUNT_INVALID";
  readonly BOOT_MOUNT_HOST_NOT_FOUND: "BOOT_MOUNT_HOST_NOT_FOUND";
  readonly MOUNT_PATH_INVALID: "MOUNT_PATH_INVALID";
  readonly FORK_MEMORY_BACKPRESSURE: "FORK_MEMORY_BACKPRESSURE";
  readonly BALLOON_UNAVAILABLE: "BALLOON_UNAVAILABLE";
  readonly BALLOON_TARGET_INVALID: "BALLOON_TARGET_INVALID";
  readonly MOUNT_PATH_ESCAPE: "MOUNT_PATH_ESCAPE";
  readonly BOOT_LIVE_MOUNT_OVERRIDE_UNKNOWN: "BOOT_LIVE_MOUNT_OVERRIDE_UNKNOWN";
  readonly IMAGE_INVALID: "IMAGE_INVALID";
  readonly IMAGE_PLATFORM_MISMATCH: "IMAGE_PLATFORM_MISMATCH";
  readonly IMAGE_PULL_FAILED: "IMAGE_PULL_FAILED";
  readonly BUNDLE_TRANSFER_FAILED: "BUNDLE_TRANSFER_FAILED";
  readonly NETWORK_POLICY_INVALID: "NETWORK_POLICY_INVALID";
  readonly NETWORK_UNAVAILABLE: "NETWORK_UNAVAILABLE";
  readonly SIGNAL_INVALID: "SIGNAL_INVALID";
  readonly CONTAINER_SPEC_INVALID: "CONTAINER_SPEC_INVALID";
  readonly CONTAINER_NOT_FOUND: "CONTAINER_NOT_FOUND";
  readonly IMAGE_PUSH_FAILED: "IMAGE_PUSH_FAILED";
  readonly BUILD_DOCKERFILE_INVALID: "BUILD_DOCKERFILE_INVALID";
  readonly BUILD_INSTRUCTION_UNSUPPORTED: "BUILD_INSTRUCTION_UNSUPPORTED";
  readonly BUILD_CONTEXT_INVALID: "BUILD_CONTEXT_INVALID";
  readonly PORTABLE_IMAGE_INVALID: "PORTABLE_IMAGE_INVALID";
  readonly BOOT_PORTABLE_UNSUPPORTED: "BOOT_PORTABLE_UNSUPPORTED";
  readonly SNAPSHOT_PORTABLE_UNSUPPORTED: "SNAPSHOT_PORTABLE_UNSUPPORTED";
  readonly SNAPSHOT_CRIU_UNAVAILABLE: "SNAPSHOT_CRIU_UNAVAILABLE";
};
// END GENERATED ERROR CODES
export type ErrorCode = (typeof ErrorCode)[keyof typeof ErrorCode];

export interface MachinenErrorOptions {
  hint?: string;
  retryable?: boolean;
  cause?: unknown;
  /** The chain of lower-level causes, outermost first. */
  causes?: string[];
}

/** Every error the package raises: a stable `code` and what to do (`hint`). */
export declare class MachinenError extends Error {
  constructor(code: ErrorCode, message: string, opts?: MachinenErrorOptions);
  readonly name: "MachinenError";
  readonly code: ErrorCode;
  /** Whether the same call may succeed if tried again unchanged. */
  readonly retryable: boolean;
  readonly hint?: string;
  readonly causes: string[];
  /** EXEC_NONZERO_EXIT only: the command's result. */
  exitCode?: number;
  stdout?: string | Buffer;
  stderr?: string | Buffer;
}

export declare function isMachinenError(err: unknown, code?: ErrorCode): err is MachinenError;
/** The CLI's rendering: `error[CODE]: message`, its causes, its hint. */
export declare function formatMachinenError(err: MachinenError): string;

/** `"[HOST_ADDR:]HOST_PORT:GUEST_PORT"`, a port (same on both sides), or an object. */
export type PortForwardSpec = string | number | { hostAddr?: string; hostPort?: number; guestPort: number };

/** `vm.balloon()`: how much of its ceiling the guest may use. */
export interface BalloonReport {
  ceilingBytes: number;
  /** The last target set through this VM's supervisor; null until one is (a restore keeps its source's). */
  targetBytes: number | null;
  /** What the guest has now. */
  actualBytes: number;
  /** The guest hands the pages it frees back to the host. */
  freePageReporting: boolean;
}

/** `vm.setBalloon()`. */
export interface BalloonOutcome extends BalloonReport {
  name: string;
  /** Whether the guest reached the target within the wait. */
  settled: boolean;
  elapsedMs: number;
}

/**
 * An egress policy. A rule is an address, a CIDR block or a domain
 * (`*.example.com`: every name below it), optionally with `:PORT` or
 * `:LOW-HIGH` (IPv6 with a port in brackets: `[fd00::/8]:53`). A
 * destination matching a deny rule is refused; else one matching an allow
 * rule passes; else `egress` decides. Domain rules work through the VM's
 * resolver (names the policy refuses do not resolve). Enforced on the host.
 */
export interface NetPolicy {
  /** Default `"allow"`. */
  egress?: 'allow' | 'deny';
  allow?: string[];
  deny?: string[];
}

/**
 * A credential the guest never holds: `$name` in the guest is a placeholder;
 * the egress proxy (the guest's `HTTPS_PROXY`, trusting a per-VM CA) replaces
 * it with `value` in the headers of HTTPS requests to `hosts` only
 * (`*.DOMAIN`: every name below one). Bundles keep the placeholder, never the
 * value: restores and forks take it again. Needs `network: "nat"`.
 */
export interface EgressSecret {
  name: string;
  hosts: string | string[];
  value: string;
}

/** `vm.setNetwork()`: rules to add or remove, a new default, `clear` (drop every rule first). */
export interface NetPolicyChange {
  egress?: 'allow' | 'deny';
  allow?: string | string[];
  deny?: string | string[];
  remove?: string | string[];
  clear?: boolean;
}

/** `vm.network()`: the policy in force and the traffic since the VM (re)started. */
export interface NetReport {
  policy: { egress: 'allow' | 'deny'; allow?: string[]; deny?: string[] };
  counters: {
    bytesOut: number;
    bytesIn: number;
    packetsOut: number;
    packetsIn: number;
    /** TCP connections and UDP flows let through. */
    connections: number;
    dnsAnswered: number;
    dnsRefused: number;
    /** Attempts refused, in all. */
    refused: number;
    /** The most frequent kinds of refused attempts. */
    refusedBy?: { proto: 'tcp' | 'udp' | 'icmp' | 'ip' | 'dns'; destination: string; rule: string; count: number; lastMs: number }[];
  };
}

/** `vm.memoryStats()`. */
export interface MemoryStats {
  name: string;
  ceilingBytes: number;
  guest: { totalBytes: number; availableBytes: number; usedBytes: number; cachedBytes: number; freeBytes: number } | null;
  host: {
    qemuRssBytes: number | null;
    qemuPssBytes: number | null;
    supervisorPssBytes: number | null;
    /** The VM's RAM file (booted VMs, own-RAM restores) and how much of it is allocated. */
    ramFile: string | null;
    ramFileBytes: number | null;
    /** A copy-on-write restore's RAM: resident pages still read from the bundle (`sharedBytes` of them mapped by siblings too) and pages it wrote. */
    bundleRam: { path: string; fileBackedBytes: number; sharedBytes: number; privateBytes: number } | null;
  };
  /** The balloon; null for a VM without one (a restore mapping its bundle's RAM privately). */
  balloon: BalloonReport | null;
}

/** A host directory and where the guest sees its copy. */
export interface MountSpec {
  host: string;
  guest: string;
}

/**
 * A host directory shared with the running VM at `guest` (virtio-fs): the
 * guest's writes reach the host at once, the host's show in the guest
 * within a second. `readonly` refuses guest writes (EROFS); on a restore
 * or fork, leaving it out keeps the recorded mode.
 */
export interface LiveMountSpec {
  host: string;
  guest: string;
  readonly?: boolean;
}

export interface BootOptions {
  /** Rootfs tarball (e.g. from `provision()`); the installed Debian base when omitted. */
  image?: string;
  /** The VM's main command: a shell string or argv. Its output goes to the VM's log and `wait()` reports its exit. */
  cmd?: string | string[];
  /** Unique among live VMs; generated when omitted. */
  name?: string;
  /** The guest's hostname (default: the name's last segment); `BOOT_ARGS_INVALID` when not RFC 1123. */
  hostname?: string;
  /** Guest RAM ceiling in MiB (default `min(host RAM / 2, 4096)`, at least 512). */
  memoryMib?: number;
  cpus?: number;
  /** The CPU model the guest sees (QEMU's `-cpu`: `"Nehalem"`, `"qemu64,+ssse3"`); default: the accelerator's own (`max` under TCG). */
  cpuModel?: string;
  /** `"nat"` (default: outbound, not the host's loopback), `"nat-host"` (the host's loopback too) or `"none"` (no network device; exec, files and port forwards still work). */
  network?: "nat" | "nat-host" | "none";
  /** Keep running after this process exits (reattach with `attach()`). */
  detached?: boolean;
  bootTimeoutMs?: number;
  /** `"kvm"`, `"hvf"` or `"tcg"`; probed when omitted. */
  accel?: string;
  debug?: boolean;
  ports?: PortForwardSpec[];
  /** Installed in the guest's tmpfs under /run/machinen/secrets, never on a disk. */
  secrets?: Record<string, string>;
  /** Root disk size: bytes or with a unit (`"4G"`). */
  diskSize?: number | string;
  nested?: boolean;
  /** Environment and working directory of the main command. */
  env?: Record<string, string | number | boolean | undefined>;
  cwd?: string;
  /** Keep the VM running after its main command exited. */
  keepAliveOnExit?: boolean;
  /** Who the main command runs as (`"NAME"`, `"UID"`, `"NAME:GROUP"`, `"UID:GID"`). */
  user?: string;
  /**
   * Host directories copied into the VM at boot (up to 8): the guest may
   * change its copy, the host never sees those changes, and snapshots,
   * restores and forks keep the guest's copy. `guest` is absolute.
   */
  mount?: MountSpec | MountSpec[];
  /** Room for the guest's writes to its `mount` copies, all together (default 1 GiB, sparse). */
  mountDiskUpperSizeBytes?: number;
  /** `false`: no balloon (memory the guest frees stays the host's; `setBalloon` refuses). Default true. */
  balloon?: boolean;
  /**
   * Host directories shared live (up to 8; needs virtiofsd). The guest acts
   * as the user running this process (as root: the directory's owner);
   * snapshots, restores and forks keep the shares. `MOUNT_PATH_ESCAPE` for
   * `/` or machinen's own directories.
   */
  liveMounts?: LiveMountSpec | LiveMountSpec[];
  /** What the guest may reach (needs `network: "nat"`, the default; `BOOT_ARGS_INVALID` otherwise). */
  netPolicy?: NetPolicy;
  /** Credentials the guest never holds (`SECRETS_INVALID` for a bad one). */
  egressSecrets?: EgressSecret[];
  signal?: AbortSignal;
  /** Accepted for compatibility and ignored: phases are in `vm.phases()`. */
  onLog?: (evt: unknown) => void;
}

export interface AttachOptions {
  name?: string;
  pid?: number;
}

export interface RestoreOptions {
  /**
   * Snapshot bundle directory written by `vm.snapshot()`, or a registry
   * reference (`HOST[:PORT]/REPO:TAG`) a bundle was pushed to with
   * `machinen push`: pulled into the cache first.
   */
  snapDir: string;
  /** CRIU bundles only (a vmstate bundle refuses them with `RESTORE_BUNDLE_INCOMPATIBLE`): the new VM's memory ceiling and CPUs (default: the source's) and CPU model (default: the accelerator's own; it must have the features of the one the tree was dumped on). */
  memoryMib?: number;
  cpus?: number;
  cpuModel?: string;
  name?: string;
  /** The rootfs tarball, when not where the bundle recorded it (its sha256 must match). */
  image?: string;
  ports?: PortForwardSpec[];
  detached?: boolean;
  bootTimeoutMs?: number;
  /** Reset TCP connections inherited from the snapshot. */
  resetTcp?: boolean;
  /** Check every file of the bundle first (default true). */
  verify?: boolean;
  /** Give the VM its own copy of the RAM (cheaper snapshots and forks of it later). */
  ownRam?: boolean;
  /** Refuse (FORK_MEMORY_BACKPRESSURE) when the host would keep less memory available: `"1%"` (default), `"512M"`, bytes; 0 turns the check off. */
  freeMemoryThreshold?: string | number;
  /** Serve the snapshot's live mounts at these guest paths from other host directories (`BOOT_LIVE_MOUNT_OVERRIDE_UNKNOWN` for a guest path it has none at). */
  liveMounts?: LiveMountSpec | LiveMountSpec[];
  /** Replace the bundle's egress policy (default: the one it was snapshotted with). */
  netPolicy?: NetPolicy;
  /** Values for the bundle's egress secrets (a bundle never holds them; without, requests that need one are refused). */
  egressSecrets?: EgressSecret[];
  signal?: AbortSignal;
  onLog?: (evt: unknown) => void;
}

export interface ForkOptions {
  name?: string;
  /** Keep the intermediate bundle here (default: a temporary directory, removed). */
  outDir?: string;
  detached?: boolean;
  ports?: PortForwardSpec[];
  ownRam?: boolean;
  /** Refuse (FORK_MEMORY_BACKPRESSURE) when the host would keep less memory available: `"1%"` (default), `"512M"`, bytes; 0 turns the check off. */
  freeMemoryThreshold?: string | number;
  /** Keep TCP connections inherited from the source. */
  tcpKeep?: boolean;
  /** Serve the fork's live mounts at these guest paths from other host directories (default: the source's). */
  liveMounts?: LiveMountSpec | LiveMountSpec[];
  /** The fork's egress policy (default: the source's, as it is now). */
  netPolicy?: NetPolicy;
  /** Values for the source's egress secrets (the fork does not inherit them). */
  egressSecrets?: EgressSecret[];
  signal?: AbortSignal;
  onLog?: (evt: unknown) => void;
}

export interface ExecOptions {
  env?: Record<string, string | number | boolean | undefined>;
  /** Absolute guest path. */
  cwd?: string;
  /** Run as this user instead of root: `"NAME"`, `"UID"`, `"NAME:GROUP"`, `"UID:GID"` (the guest's /etc/passwd and /etc/group). */
  user?: string;
  /** The command's process group is killed after this long: `EXEC_TIMEOUT`. */
  timeoutMs?: number;
  /** Bytes for the command's stdin (closed after them; no stdin otherwise). */
  stdin?: string | Buffer;
  onStdout?: (chunk: Buffer) => void;
  onStderr?: (chunk: Buffer) => void;
  /** Aborting kills the command and rejects with the signal's reason. */
  signal?: AbortSignal;
  /** `"buffer"` for Buffers; a text encoding otherwise (default utf8). */
  encoding?: BufferEncoding | "buffer";
}

export interface ExecResult<T = string> {
  /** The exit code, or 128 + N when killed by signal N. */
  exitCode: number;
  signal?: number;
  stdout: T;
  stderr: T;
}

export interface ExecPtyOptions {
  env?: Record<string, string | number | boolean | undefined>;
  cwd?: string;
  rows?: number;
  cols?: number;
  /** Terminal output as it comes; without it, `result.output` collects it. */
  onData?: (chunk: Buffer) => void;
  /** Aborting sends SIGKILL to the command. */
  signal?: AbortSignal;
}

export interface ExecPtyHandle {
  /** The command's pid in the guest. */
  pid: number;
  write(data: string | Buffer): Promise<void>;
  resize(rows: number, cols: number): Promise<void>;
  signal(sig: NodeJS.Signals | number): Promise<void>;
  /** End of input (^D). */
  eof(): Promise<void>;
  result: Promise<{ exitCode: number; signal?: number; output: Buffer }>;
}

export interface WriteFileOptions {
  /** Permission bits, e.g. 0o755 (default: keep an existing file's, else 0o644). */
  mode?: number;
  /** Append instead of replacing; a replacement is atomic. */
  append?: boolean;
}

export type SnapshotEngine = "criu" | "vmstate" | "portable";

export interface SnapshotOptions {
  /** Where to write the bundle; must not exist. */
  outDir: string;
  /** `false`: the VM stops once the bundle is complete. Default true (vmstate), false (criu: with true the tree is restored in place and runs on). */
  leaveRunning?: boolean;
  /**
   * What the bundle holds (default: `$MACHINEN_SNAPSHOT_ENGINE`, else
   * `"vmstate"`): the whole VM, or with `"criu"` the VM's process tree (the
   * main command, or `pid`'s) dumped with CRIU plus its disk, which
   * `restore()` resumes in a fresh VM of the same image on another
   * accelerator, CPU model, memory size or CPU count. CRIU's refusals are
   * `SNAPSHOT_DUMP_FAILED` naming the process and reason. `"portable"`
   * throws `SNAPSHOT_PORTABLE_UNSUPPORTED` (use `vm.capture()`).
   */
  engine?: SnapshotEngine;
  /** criu only: the root of the tree to dump (a guest pid). */
  pid?: number;
  /**
   * A self-contained bundle. Default: a VM that has a checkpoint (or was
   * restored from a bundle that is still in place, unchanged) gets a delta
   * holding only the disk blocks and RAM pages changed since; its restore
   * needs the whole chain (`RESTORE_BUNDLE_INVALID` names a missing or
   * altered parent).
   */
  full?: boolean;
  timeoutMs?: number;
  signal?: AbortSignal;
  onLog?: (evt: unknown) => void;
}

export interface Phase {
  name: string;
  /** End of the phase, ms since the operation started. */
  atMs: number;
  ms: number;
}

export interface SnapshotResult {
  outDir: string;
  /** Time from the call to the complete bundle. */
  elapsedMs: number;
  /** How long the guest was paused. */
  pausedMs: number;
  bytes: number;
  diskBytes: number;
  /** vmstate only. */
  phases?: Phase[];
  /** criu only: `"criu"`, the dumped tree's root and name, the CRIU images' bytes. */
  engine?: "criu";
  pid?: number;
  comm?: string;
  imagesBytes?: number;
}

export interface VmInfo {
  name: string;
  id: string;
  /** The supervisor's pid. */
  pid: number;
  qemuPid: number | null;
  state: "starting" | "running" | "snapshotting" | "stopping" | "stopped" | "crashed" | "exited" | "recovering" | "unhealthy" | (string & {});
  reason?: string;
  image: string | null;
  ports: { hostAddr: string; hostPort: number; guestPort: number }[];
  forkedFrom: string | null;
  memoryMib: number;
  cpus: number;
  accel: string;
  createdAtMs: number;
  uptimeMs: number;
  controlSocket: string;
  consoleLog: string | null;
  cause: string | null;
  main?: { argv: string[]; [k: string]: unknown };
  /** How it reaches the network; absent for VMs started by older versions. */
  network?: "nat" | "nat-host" | "none";
  /** What a live VM costs the host (as `memoryStats().host`), in `list()`. */
  hostMemory?: MemoryStats["host"];
}

export interface StopReport {
  name: string;
  pid: number;
  /** True when the supervisor had to be killed. */
  killed: boolean;
  elapsedMs: number;
}

export type WaitResult =
  | { reason: "exited"; exitCode: number; status: { code: number | null; signal: number | null } }
  | { reason: "stopped"; exitCode: number }
  | { reason: "crashed"; exitCode: number; cause: string };

export declare class VmHandle {
  private constructor();
  readonly name: string;
  readonly id: string;
  /** The supervisor's pid (what `machinen ls` shows). */
  readonly pid: number;
  info(): VmInfo;
  phases(): Phase[];
  status(): Promise<{ state: string; supervisorPid: number; qemuPid: number | null; [k: string]: unknown }>;
  /** The VM's memory: its ceiling, the guest's view (null when its agent did not answer) and what it costs the host. */
  memoryStats(): Promise<MemoryStats>;
  /** Capture process `pid` of the guest as a native process image in `out` (a new directory). */
  captureProcess(pid: number, out: string, opts?: { kill?: boolean; maxBytes?: number }): Promise<ProcessCapture>;
  /**
   * Run CRIU in the guest (`machinen criu`; needs `machinen install --criu`):
   * e.g. `["dump", "-t", "214", "-D", "/var/tmp/ck"]`. CRIU's failures are its
   * exit code and stderr; `SNAPSHOT_CRIU_UNAVAILABLE` when CRIU is not installed.
   */
  criu(args: string[]): Promise<ExecResult>;
  /** Throws `BALLOON_UNAVAILABLE` for a restore mapping its bundle's RAM privately. */
  balloon(): Promise<BalloonReport>;
  /** `bytes` between 128 MiB and the ceiling (`BALLOON_TARGET_INVALID`), or `'max'`. */
  setBalloon(bytes: number | 'max', opts?: { waitMs?: number }): Promise<BalloonOutcome>;
  /** The egress policy and traffic; `NETWORK_UNAVAILABLE` for `network: "none"` or `"nat-host"`. */
  network(): Promise<NetReport>;
  /** Change the egress policy (applies to the next packet of every connection); `NETWORK_POLICY_INVALID` for a bad rule or removing one the policy lacks. */
  setNetwork(change: NetPolicyChange): Promise<NetReport>;
  /** Throws `EXEC_NONZERO_EXIT` unless the command exits 0. */
  exec(cmd: string | string[], opts: ExecOptions & { encoding: "buffer" }): Promise<ExecResult<Buffer>>;
  exec(cmd: string | string[], opts?: ExecOptions): Promise<ExecResult>;
  /** The result whatever the exit code. */
  execRaw(cmd: string | string[], opts: ExecOptions & { encoding: "buffer" }): Promise<ExecResult<Buffer>>;
  execRaw(cmd: string | string[], opts?: ExecOptions): Promise<ExecResult>;
  execPty(cmd: string | string[], opts?: ExecPtyOptions): Promise<ExecPtyHandle>;
  writeFile(guestPath: string, contents: Buffer | Uint8Array | string, opts?: WriteFileOptions): Promise<void>;
  readFile(guestPath: string): Promise<Buffer>;
  readFile(guestPath: string, opts: { encoding: BufferEncoding }): Promise<string>;
  snapshot(opts: SnapshotOptions): Promise<SnapshotResult>;
  fork(opts?: ForkOptions): Promise<VmHandle>;
  /** Stop the VM at once; `graceful: true` lets the guest power off first. */
  kill(opts?: { graceful?: boolean; timeoutMs?: number }): Promise<StopReport>;
  /** Let the VM outlive this process; `attach({ name })` finds it again. */
  detach(): Promise<void>;
  /** Until the main command exits (or the VM ends). */
  wait(opts?: { timeoutMs?: number; signal?: AbortSignal }): Promise<WaitResult>;
}

export interface ProvisionOptions {
  /** Rootfs tarball to start from; the installed Debian base when omitted. */
  base?: string;
  /** Where to write the image (.tar.gz); replaced atomically. */
  out: string;
  /** Runs against the live install VM; a throw fails the bake (`PROVISION_STEP_FAILED`, with it as `cause`). */
  install?: (vm: VmHandle) => Promise<void>;
  /** Default command baked into the image. */
  cmd?: string | string[];
  env?: Record<string, string | number | boolean | undefined>;
  cwd?: string;
  memoryMib?: number;
  cpus?: number;
  network?: "nat" | "nat-host";
  bootTimeoutMs?: number;
  /** Aborting stops the install VM and writes no image. */
  signal?: AbortSignal;
  onLog?: (evt: unknown) => void;
}

export interface ProvisionResult {
  path: string;
  sha256: string;
  size: number;
  uncompressedSize: number;
  config: { version: number; cmd?: string[]; env: Record<string, string>; cwd?: string };
  base: string;
  elapsedMs: number;
  bootMs: number;
  installMs: number;
  exportMs: number;
  phases: Phase[];
}

export interface ImageConfig {
  version: number;
  cmd?: string[];
  entrypoint?: string[];
  env: Record<string, string>;
  cwd?: string;
  user?: string;
  exposedPorts?: string[];
  labels?: Record<string, string>;
}

export interface BuildOptions {
  /** The build context COPY and ADD read from (default "."). */
  context?: string;
  /** The Dockerfile (default: Dockerfile in the context). */
  dockerfile?: string;
  /** Where to write the image (.tar.gz); replaced atomically. */
  out: string;
  /** Values for ARG instructions. */
  buildArgs?: Record<string, string | number | boolean | undefined>;
  /** Build even when the build cache holds this build's result. */
  noCache?: boolean;
  memoryMib?: number;
  cpus?: number;
  network?: "nat" | "nat-host" | "none";
  bootTimeoutMs?: number;
  /** Aborting stops the build VM and writes no image. */
  signal?: AbortSignal;
}

export interface BuildResult {
  path: string;
  sha256: string;
  size: number;
  config: ImageConfig;
  /** What FROM named, and the tarball it resolved to. */
  from: string;
  base: string;
  /** Steps run in the VM (0 when served from the cache). */
  steps: number;
  cached: boolean;
  key: string;
  unusedBuildArgs: string[];
  elapsedMs: number;
}

export interface ImageInfo {
  image: string;
  /** The container image it came from; null for a rootfs tarball. */
  source: string | null;
  tarball: string;
  sizeBytes: number;
  config: ImageConfig;
}

export interface PushedImage {
  reference: string;
  digest: string;
  uploadedBlobs: number;
  uploadedBytes: number;
}

export interface GcResult {
  dryRun: boolean;
  removed: { id: string; name: string; reason: string; [k: string]: unknown }[];
  bytes: number;
}

export declare function boot(opts?: BootOptions): Promise<VmHandle>;
export declare function attach(opts: AttachOptions | string): Promise<VmHandle>;
export declare function list(opts?: { all?: boolean }): Promise<VmInfo[]>;
export declare function restore(opts: RestoreOptions): Promise<VmHandle>;
export declare function provision(opts: ProvisionOptions): Promise<ProvisionResult>;
/** Bake a Dockerfile (`machinen build`); rejects with BUILD_* codes naming the line, or PROVISION_STEP_FAILED. */
export declare function build(opts: BuildOptions): Promise<BuildResult>;
/** An image's settings and origin (`machinen images inspect`). */
export declare function inspectImage(image: string): Promise<ImageInfo>;
/** One reason a native process image cannot be restored: a code of the image vocabulary (`thread-state-unsupported`, …). */
export interface ProcessImageRefusal {
  code: string;
  message: string;
  detail?: Record<string, unknown>;
}
/** How a native process image would be restored (`steps`), or why not (`refusals`). */
export interface ProcessImagePlan {
  sourceArch: 'arm64' | 'amd64';
  targetArch: 'arm64' | 'amd64';
  exe: string;
  argv: string[];
  steps: Array<{ action: string; [key: string]: unknown }>;
  refusals: ProcessImageRefusal[];
}
/** `vm.captureProcess()`. */
export interface ProcessCapture {
  dir: string;
  pid: number;
  threads: number;
  mappings: number;
  memoryBytes: number;
  killed: boolean;
  plan: ProcessImagePlan;
}
/** How this host (or `targetArch`) would restore the native process image in `dir`. */
export declare function checkProcessImage(dir: string, opts?: { targetArch?: 'arm64' | 'amd64' }): Promise<ProcessImagePlan>;
/** Push an image to a registry as a container image (`machinen images push`); IMAGE_PUSH_FAILED when it cannot. */
export declare function pushImage(image: string, reference: string): Promise<PushedImage>;
export declare function runGc(opts?: { dryRun?: boolean }): Promise<GcResult>;
/** The package's (and the library's) version. */
export declare const version: string;
