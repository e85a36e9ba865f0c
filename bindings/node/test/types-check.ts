// Compiled by `tsc --noEmit` (test/api.test.mjs): the declarations accept
// what the README shows and reject what they must.
import {
  boot,
  attach,
  list,
  restore,
  provision,
  runGc,
  ErrorCode,
  MachinenError,
  isMachinenError,
  formatMachinenError,
  type VmHandle,
  type ExecResult,
} from '@machinen/runtime';

async function main(): Promise<void> {
  const vm: VmHandle = await boot({ name: 'web', memoryMib: 512, ports: ['3000:80', 8080], env: { A: 1 } });
  const r: ExecResult = await vm.exec('echo hi', { onStdout: (c: Buffer) => void c.length, timeoutMs: 1000 });
  const code: number = r.exitCode;
  const b: ExecResult<Buffer> = await vm.execRaw(['cat', '/etc/os-release'], { encoding: 'buffer' });
  const buf: Buffer = b.stdout;
  const text: string = await vm.readFile('/etc/hostname', { encoding: 'utf8' });
  const raw: Buffer = await vm.readFile('/etc/hostname');
  await vm.writeFile('/tmp/x', Buffer.from([1, 2]), { mode: 0o600 });
  const pty = await vm.execPty('sh', { rows: 24, cols: 80 });
  await pty.write('exit\n');
  await pty.signal('SIGINT');
  const { exitCode } = await pty.result;
  const snap = await vm.snapshot({ outDir: '/tmp/s', leaveRunning: true, signal: AbortSignal.timeout(1000) });
  const paused: number = snap.pausedMs;
  const bal = await vm.setBalloon(256 * 1024 * 1024, { waitMs: 5000 });
  const settled: boolean = bal.settled && (await vm.balloon()).actualBytes > 0;
  await vm.setBalloon('max');
  const ballooned: number | undefined = (await vm.memoryStats()).balloon?.actualBytes;
  const f: VmHandle = await vm.fork({ name: 'b' });
  const w = await f.wait({ timeoutMs: 10 });
  if (w.reason === 'crashed') void w.cause.length;
  await f.kill({ graceful: true });
  await vm.detach();
  const again = await attach({ name: 'web' });
  const r2 = await restore({ snapDir: snap.outDir, ownRam: true });
  const vms = await list({ all: true });
  const st: string = vms[0].state;
  const img = await provision({ out: '/tmp/a.tar.gz', install: async (v) => void (await v.exec('true')) });
  const sha: string = img.sha256;
  const gc = await runGc({ dryRun: true });
  const e = new MachinenError(ErrorCode.EXEC_TIMEOUT, 'x');
  if (isMachinenError(e, 'EXEC_TIMEOUT')) console.log(formatMachinenError(e), e.retryable, e.hint);
  void [code, buf, text, raw, exitCode, paused, settled, ballooned, again, r2, st, sha, gc];
  // @ts-expect-error: not an error code
  isMachinenError(e, 'NOT_A_CODE');
  // @ts-expect-error: snapshot needs outDir
  await vm.snapshot({});
  // @ts-expect-error: memoryMB is not an option
  await boot({ memoryMB: 512 });
}
void main;
