// One VM booted from Node, shared by the checks that do not disturb each
// other: exec (streamed, exit codes, stdin, env, timeouts, aborts, 20 at
// once), files, the terminal, and what the CLI sees of it.
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { cli, cliJson, m, rejectsWith, scratch, until } from './helpers.mjs';

let vm;
// A host directory the shared VM gets a copy of.
const shared = scratch('mount');
writeFileSync(join(shared, 'hello.txt'), 'from the host\n');
// And one it shares live.
const live = scratch('live');
writeFileSync(join(live, 'host.txt'), 'host\n');

before(async () => {
  vm = await m.boot({ name: 'node-shared', memoryMib: 512, mount: { host: shared, guest: '/work/in' }, mountDiskUpperSizeBytes: 64 * 1024 * 1024, liveMounts: [{ host: live, guest: '/work/live' }] });
});

after(async () => {
  await vm?.kill();
});

test('boot gives a live handle that list() and the CLI both see', async () => {
  assert.equal(vm.name, 'node-shared');
  assert.equal(typeof vm.pid, 'number');
  const listed = (await m.list()).find((v) => v.name === 'node-shared');
  assert.equal(listed.state, 'running');
  assert.equal(listed.pid, vm.pid);
  assert.ok(vm.phases().some((p) => p.name === 'ready' || p.ms >= 0));
  const ls = cliJson('ls', '--json');
  const row = (Array.isArray(ls) ? ls : ls.vms).find((v) => v.name === 'node-shared');
  assert.equal(row.pid, vm.pid);
  const status = await vm.status();
  assert.equal(status.state, 'running');
});

test('mount: the guest gets a copy of the host directory, its writes stay in the guest', async () => {
  assert.equal((await vm.exec('cat /work/in/hello.txt')).stdout, 'from the host\n');
  await vm.exec('echo from the guest > /work/in/hello.txt && echo new > /work/in/new.txt');
  assert.equal(readFileSync(join(shared, 'hello.txt'), 'utf8'), 'from the host\n');
  writeFileSync(join(shared, 'later.txt'), 'later');
  assert.equal((await vm.exec('cat /work/in/hello.txt; ls /work/in')).stdout, 'from the guest\nhello.txt\nnew.txt\n');
});

test('liveMounts: host and guest see each other\'s changes', async () => {
  assert.equal((await vm.exec('cat /work/live/host.txt')).stdout, 'host\n');
  await vm.exec('echo guest > /work/live/guest.txt');
  assert.equal(readFileSync(join(live, 'guest.txt'), 'utf8'), 'guest\n');
  writeFileSync(join(live, 'later.txt'), 'later\n');
  await until(async () => (await vm.exec('cat /work/live/later.txt 2>/dev/null; true')).stdout === 'later\n', 10000, 'the host file in the guest');
  const row = (await m.list()).find((v) => v.name === 'node-shared');
  assert.equal(row.liveMounts[0].guest, '/work/live');
  await rejectsWith(m.boot({ liveMounts: [{ host: live }] }), 'BOOT_MOUNT_INVALID');
  await rejectsWith(m.boot({ liveMounts: { host: '/', guest: '/host' } }), 'MOUNT_PATH_ESCAPE');
});

test('memoryStats: the guest\'s view and the host\'s cost', async () => {
  const s = await vm.memoryStats();
  assert.equal(s.name, 'node-shared');
  assert.equal(s.ceilingBytes, 512 * 1024 * 1024);
  assert.ok(s.guest.totalBytes > 400 * 1024 * 1024 && s.guest.usedBytes > 0, JSON.stringify(s.guest));
  assert.ok(s.host.qemuPssBytes > 0 && s.host.supervisorPssBytes > 0, JSON.stringify(s.host));
});

test('captureProcess and checkProcessImage: a sleeping process is restorable, threads are refused', async () => {
  const pid = Number((await vm.exec("setsid sleep 600 </dev/null >/dev/null 2>&1 & echo $!")).stdout.trim());
  await until(async () => (await vm.exec(`tr '\\0' ' ' < /proc/${pid}/cmdline`)).stdout.startsWith('sleep 600'), 20000, 'sleep to start');
  const dir = join(scratch('capture'), 'sleep.img');
  const c = await vm.captureProcess(pid, dir);
  assert.equal(c.threads, 1);
  assert.ok(c.memoryBytes > 4096);
  assert.deepEqual(c.plan.refusals, []);
  assert.equal(c.plan.steps.at(-1).action, 'resume-wait');
  assert.equal((await m.checkProcessImage(dir)).refusals.length, 0);
  const arm = await m.checkProcessImage(dir, { targetArch: 'arm64' });
  assert.equal(arm.refusals[0].code, 'architecture-pair-unsupported');
  await rejectsWith(m.checkProcessImage(join(dir, 'native-memory.bin')), 'PORTABLE_IMAGE_INVALID');
  await rejectsWith(vm.captureProcess(pid, dir), 'FILES_EXISTS');
  await rejectsWith(vm.captureProcess(1, join(dir, '..', 'agent.img')), 'SNAPSHOT_PORTABLE_UNSUPPORTED');
  const killed = await vm.captureProcess(pid, join(dir, '..', 'killed.img'), { kill: true });
  assert.equal(killed.killed, true);
  await until(async () => (await vm.exec(`test -e /proc/${pid}; echo $?`)).stdout.trim() === '1', 20000, 'the process to end');
});

test('criu: a process dumped in the guest comes back with its memory', async () => {
  assert.match((await vm.criu(['check'])).stdout, /Looks good/);
  const pid = Number((await vm.exec("setsid sh -c 'i=0; while true; do i=$((i+1)); echo $i > /tmp/node-count; sleep 0.2; done' </dev/null >/dev/null 2>&1 & echo $!")).stdout.trim());
  const count = async () => Number((await vm.exec('cat /tmp/node-count 2>/dev/null || echo 0')).stdout.trim());
  await until(async () => (await count()) >= 10, 30000, 'the count to reach 10');
  await vm.exec('rm -rf /var/tmp/node-ck && mkdir -p /var/tmp/node-ck');
  const dump = await vm.criu(['dump', '-t', String(pid), '-D', '/var/tmp/node-ck']);
  assert.equal(dump.exitCode, 0, dump.stderr);
  const at = await count();
  await vm.exec('echo 0 > /tmp/node-count');
  const restore = await vm.criu(['restore', '-D', '/var/tmp/node-ck', '-d']);
  assert.equal(restore.exitCode, 0, restore.stderr);
  await until(async () => (await count()) > at, 30000, 'the restored count to go on');
  await vm.exec(`kill ${pid}; rm -rf /var/tmp/node-ck /tmp/node-count`);
  const bad = await vm.criu(['dump', '-t', '999999', '-D', '/var/tmp']);
  assert.equal(bad.exitCode, 1);
  assert.match(bad.stderr, /999999|Error/);
  await assert.rejects(() => vm.criu('check'), /array of strings/);
});

test('balloon: the guest keeps less of its ceiling, then all of it again', async () => {
  const mib = 1024 * 1024;
  const before = await vm.balloon();
  assert.equal(before.ceilingBytes, 512 * mib);
  assert.equal(before.freePageReporting, true);
  const total = async () => Number((await vm.exec('grep MemTotal /proc/meminfo')).stdout.split(/\s+/)[1]) * 1024;
  const small = await vm.setBalloon(200 * mib);
  assert.ok(small.settled, JSON.stringify(small));
  assert.equal(small.targetBytes, 200 * mib);
  assert.ok(await total() < 200 * mib);
  assert.equal((await vm.memoryStats()).balloon.actualBytes, small.actualBytes);
  await rejectsWith(vm.setBalloon(64 * mib), 'BALLOON_TARGET_INVALID');
  const full = await vm.setBalloon('max');
  assert.ok(full.settled && full.actualBytes === 512 * mib, JSON.stringify(full));
  assert.ok(await total() > 400 * mib);
});

test('exec: output, exit codes, signals, EXEC_NONZERO_EXIT', async () => {
  const r = await vm.exec('echo out; echo err >&2');
  assert.deepEqual(r, { exitCode: 0, signal: undefined, stdout: 'out\n', stderr: 'err\n' });
  assert.equal((await vm.execRaw(['sh', '-c', 'exit 3'])).exitCode, 3);
  const killed = await vm.execRaw('kill -9 $$');
  assert.equal(killed.exitCode, 137);
  assert.equal(killed.signal, 9);
  const e = await rejectsWith(vm.exec('echo partial; exit 4'), 'EXEC_NONZERO_EXIT');
  assert.equal(e.message, '"echo partial; exit 4" exited with 4');
  assert.equal(e.exitCode, 4);
  assert.equal(e.stdout, 'partial\n');
  await rejectsWith(vm.exec(['/no/such/program']), 'EXEC_COMMAND_NOT_FOUND');
  const bin = await vm.exec(['printf', '\\377\\000'], { encoding: 'buffer' });
  assert.deepEqual([...bin.stdout], [255, 0]);
});

test('exec: as another user', async () => {
  assert.equal((await vm.exec('id -u; echo $HOME', { user: 'nobody' })).stdout, '65534\n/nonexistent\n');
  assert.equal((await vm.exec('id -u', { user: '1234:5678' })).stdout, '1234\n');
  await rejectsWith(vm.exec('true', { user: 'no body' }), 'BOOT_ARGS_INVALID');
});

test('exec: env, cwd, stdin', async () => {
  const r = await vm.exec('echo $GREETING from $PWD', { env: { GREETING: 'hi' }, cwd: '/tmp' });
  assert.equal(r.stdout, 'hi from /tmp\n');
  const data = randomBytes(300_000);
  const sum = await vm.exec('sha256sum | cut -d" " -f1', { stdin: data });
  assert.equal(sum.stdout.trim(), createHash('sha256').update(data).digest('hex'));
});

test('exec: output streams to the callbacks as it comes, in order', async () => {
  const seen = [];
  const t0 = Date.now();
  const times = [];
  const r = await vm.exec('for i in 1 2 3; do echo $i; echo e$i >&2; sleep 0.5; done', {
    onStdout: (c) => {
      seen.push(`out:${c}`);
      times.push(Date.now() - t0);
    },
    onStderr: (c) => seen.push(`err:${c}`),
  });
  assert.equal(r.stdout, '1\n2\n3\n');
  assert.equal(r.stderr, 'e1\ne2\ne3\n');
  assert.deepEqual(
    seen.filter((s) => s.startsWith('out:')).join(''),
    'out:1\nout:2\nout:3\n',
  );
  // The first chunk arrived long before the command ended (streamed, not
  // collected): at least one later chunk came in a separate callback.
  assert.ok(times.length >= 2, `got ${times.length} stdout chunks`);
});

test('exec: a timeout kills the command (EXEC_TIMEOUT)', async () => {
  await rejectsWith(vm.exec('sleep 30', { timeoutMs: 1000 }), 'EXEC_TIMEOUT');
  const left = await vm.execRaw('pgrep -x sleep');
  assert.equal(left.stdout, '');
});

test('exec: an AbortSignal gives up the command and the guest kills it', async () => {
  for (const streamed of [false, true]) {
    const ac = new AbortController();
    const p = vm.exec('echo started; sleep 300', streamed ? { signal: ac.signal, onStdout: () => ac.abort() } : { signal: ac.signal });
    if (!streamed) setTimeout(() => ac.abort(), 1500);
    await assert.rejects(p, (e) => e.name === 'AbortError');
    await until(async () => (await vm.execRaw('pgrep -x sleep')).stdout === '', 20_000, 'the aborted sleep to end');
  }
});

test('20 concurrent execs from one process', async () => {
  const rs = await Promise.all(
    Array.from({ length: 20 }, (_, i) => vm.exec(`echo ${i}; echo ${i * 2} >&2; exit $(( ${i} % 3 ))`).catch((e) => e)),
  );
  rs.forEach((r, i) => {
    if (i % 3 === 0) {
      assert.equal(r.stdout, `${i}\n`);
      assert.equal(r.stderr, `${i * 2}\n`);
    } else {
      assert.ok(m.isMachinenError(r, 'EXEC_NONZERO_EXIT'));
      assert.equal(r.exitCode, i % 3);
      assert.equal(r.stdout, `${i}\n`);
    }
  });
});

test('writeFile and readFile: binary data, modes, append', async () => {
  const all = Buffer.from(Array.from({ length: 256 }, (_, i) => i));
  await vm.writeFile('/tmp/node/all.bin', all);
  assert.deepEqual(await vm.readFile('/tmp/node/all.bin'), all);
  const big = randomBytes(3 << 20);
  await vm.writeFile('/tmp/node/big.bin', big, { mode: 0o600 });
  const inGuest = await vm.exec('sha256sum /tmp/node/big.bin; stat -c %a /tmp/node/big.bin');
  const [sum, mode] = inGuest.stdout.trim().split('\n');
  assert.equal(sum.split(' ')[0], createHash('sha256').update(big).digest('hex'));
  assert.equal(mode, '600');
  assert.ok((await vm.readFile('/tmp/node/big.bin')).equals(big));
  await vm.writeFile('/tmp/node/log.txt', 'a\n');
  await vm.writeFile('/tmp/node/log.txt', 'b\n', { append: true });
  assert.equal(await vm.readFile('/tmp/node/log.txt', { encoding: 'utf8' }), 'a\nb\n');
  await rejectsWith(vm.readFile('/tmp/node/missing'), 'FILES_NOT_FOUND');
  await rejectsWith(vm.writeFile('relative/path', 'x'), 'FILES_PATH_INVALID');
});

test('execPty: a terminal with input, size and signals', async () => {
  const chunks = [];
  const pty = await vm.execPty('stty size; tty; read line; echo "got $line"; sleep 100', {
    rows: 30,
    cols: 100,
    onData: (c) => chunks.push(c),
  });
  assert.ok(pty.pid > 0);
  await until(() => Buffer.concat(chunks).toString().includes('/dev/pts'), 20_000, 'the tty line');
  assert.match(Buffer.concat(chunks).toString(), /30 100/);
  await pty.write('hello\n');
  await until(() => Buffer.concat(chunks).toString().includes('got hello'), 20_000, 'the echo');
  await pty.resize(40, 120);
  await pty.signal('SIGTERM');
  const r = await pty.result;
  assert.equal(r.exitCode, 143);
});

test('attach from another handle, and a VM the CLI booted', async () => {
  const again = await m.attach({ name: 'node-shared' });
  assert.equal((await again.exec('echo attached')).stdout, 'attached\n');
  const byPid = await m.attach({ pid: vm.pid });
  assert.equal(byPid.name, 'node-shared');

  const booted = cli('boot', '--name', 'from-cli', '--memory', '256', '--detached');
  assert.equal(booted.status, 0, booted.stderr);
  try {
    assert.ok((await m.list()).some((v) => v.name === 'from-cli'));
    const other = await m.attach({ name: 'from-cli' });
    assert.equal((await other.exec('hostname')).exitCode, 0);
    await other.kill();
    assert.ok(!(await m.list()).some((v) => v.name === 'from-cli'));
  } finally {
    cli('stop', '--force', 'from-cli');
  }
});

test('detach: a VM booted from Node outlives its process; without detach it does not', async () => {
  const { execFileSync } = await import('node:child_process');
  const { join } = await import('node:path');
  const { pkgDir } = await import('./helpers.mjs');
  const script = (detach) => `
    const m = require(${JSON.stringify(join(pkgDir, 'index.js'))});
    (async () => {
      const vm = await m.boot({ name: ${JSON.stringify(detach ? 'node-detached' : 'node-fg')}, memoryMib: 256 });
      await vm.exec('echo alive > /tmp/mark');
      ${detach ? 'await vm.detach();' : ''}
      console.log(vm.pid);
    })().catch((e) => { console.error(e); process.exit(1); });`;
  try {
    const pid = Number(execFileSync(process.execPath, ['-e', script(true)], { encoding: 'utf8' }).trim());
    const row = cliJson('ls', '--json');
    const found = (Array.isArray(row) ? row : row.vms).find((v) => v.name === 'node-detached');
    assert.equal(found?.pid, pid);
    const back = await m.attach({ name: 'node-detached' });
    assert.equal(await back.readFile('/tmp/mark', { encoding: 'utf8' }), 'alive\n');
    const stopped = cli('stop', 'node-detached');
    assert.equal(stopped.status, 0, stopped.stderr);

    // The same without detach(): the VM stops with the process.
    execFileSync(process.execPath, ['-e', script(false)], { encoding: 'utf8' });
    await until(async () => !(await m.list()).some((v) => v.name === 'node-fg'), 60_000, 'the foreground VM to stop');
  } finally {
    cli('stop', '--force', 'node-detached');
    cli('stop', '--force', 'node-fg');
  }
});

test('a service VM: its main command runs, wait() reports its exit', async () => {
  const svc = await m.boot({
    name: 'node-service',
    memoryMib: 256,
    cmd: 'echo "serving $MODE from $PWD"; sleep 1; exit 7',
    env: { MODE: 'test' },
    cwd: '/tmp',
  });
  try {
    const info = svc.info();
    assert.deepEqual(info.main?.argv, ['/bin/sh', '-c', 'echo "serving $MODE from $PWD"; sleep 1; exit 7']);
    const w = await svc.wait({ timeoutMs: 120_000 });
    assert.equal(w.reason, 'exited');
    assert.equal(w.exitCode, 7);
    const logs = cli('logs', 'node-service');
    assert.match(logs.stdout, /serving test from \/tmp/);
  } finally {
    await svc.kill().catch(() => {});
    cli('gc');
  }
});

test('snapshot engine criu: a service moves into a VM of another size and CPU model, its log goes on', async () => {
  const counts = (text) => [...text.matchAll(/^n=(\d+)$/gm)].map((x) => Number(x[1]));
  const svc = await m.boot({
    name: 'node-criu-src',
    memoryMib: 512,
    cpuModel: 'Nehalem',
    cmd: 'i=0; while true; do i=$((i+1)); echo n=$i; sleep 0.2; done',
  });
  let moved;
  try {
    await until(() => counts(cli('logs', 'node-criu-src').stdout).length >= 5, 60_000, 'the service to count');
    const out = join(scratch('criu'), 'bundle');
    await assert.rejects(() => svc.snapshot({ outDir: out, engine: 'bogus' }), /not "vmstate" or "criu"/);
    await assert.rejects(() => svc.snapshot({ outDir: out, pid: 5 }), /criu snapshot/);
    await rejectsWith(svc.snapshot({ outDir: out, engine: 'portable' }), 'SNAPSHOT_PORTABLE_UNSUPPORTED');
    const r = await svc.snapshot({ outDir: out, engine: 'criu' });
    assert.equal(r.engine, 'criu');
    assert.equal(r.outDir, out);
    assert.ok(r.pid > 1 && r.imagesBytes > 0, JSON.stringify(r));
    const logged = counts(cli('logs', 'node-criu-src').stdout);
    moved = await m.restore({ snapDir: out, name: 'node-criu-dst', memoryMib: 768, cpus: 2, cpuModel: 'max' });
    const cpu = await moved.exec('grep -m1 "model name" /proc/cpuinfo; nproc');
    assert.doesNotMatch(cpu.stdout, /Nehalem/);
    assert.match(cpu.stdout, /^2$/m);
    await until(() => counts(cli('logs', 'node-criu-dst').stdout).length > logged.length + 3, 60_000, 'the moved service to count on');
    const all = counts(cli('logs', 'node-criu-dst').stdout);
    assert.deepEqual(all, all.map((_, i) => i + 1), 'every count once, in order');
  } finally {
    await moved?.kill().catch(() => {});
    await svc.kill().catch(() => {});
    cli('gc');
  }
});

test('network: a policy set on the running VM refuses at once, is counted, and shows in ls', async () => {
  const open = await vm.network();
  assert.equal(open.policy.egress, 'allow');
  const r = await vm.setNetwork({ deny: '198.51.100.0/24:80' });
  assert.deepEqual(r.policy.deny, ['198.51.100.0/24:80']);
  // A reset from the filter, not a timeout (nothing answers at that address).
  const out = await vm.execRaw(['bash', '-c', 'exec 3<>/dev/tcp/198.51.100.7/80']);
  assert.match(out.stderr, /Connection refused/);
  const n = await vm.network();
  assert.ok(
    n.counters.refusedBy.some((k) => k.proto === 'tcp' && k.destination === '198.51.100.7:80' && k.rule === 'deny 198.51.100.0/24:80'),
    JSON.stringify(n.counters),
  );
  assert.deepEqual(cliJson('ls', '--json').find((v) => v.name === 'node-shared').net_policy.deny, ['198.51.100.0/24:80']);
  await rejectsWith(vm.setNetwork({ remove: '192.0.2.99' }), 'NETWORK_POLICY_INVALID');
  await rejectsWith(vm.setNetwork({ allow: 'not a rule' }), 'NETWORK_POLICY_INVALID');
  await rejectsWith(vm.setNetwork({ egress: 'maybe' }), 'NETWORK_POLICY_INVALID');
  const cleared = await vm.setNetwork({ clear: true });
  assert.equal(cleared.policy.deny, undefined);
  await rejectsWith(m.boot({ network: 'none', netPolicy: { egress: 'deny' } }), 'BOOT_ARGS_INVALID');
  await rejectsWith(m.boot({ netPolicy: { allow: ['10.0.0.0/33'] } }), 'NETWORK_POLICY_INVALID');
});

test('egress secrets: the guest holds a placeholder and the proxy variables; bad ones are refused', async () => {
  await rejectsWith(m.boot({ egressSecrets: [{ name: '1BAD', hosts: 'h.test', value: 'x' }] }), 'SECRETS_INVALID');
  await rejectsWith(m.boot({ egressSecrets: [{ name: 'K', hosts: 'h.test', value: 'a\r\nX: y' }] }), 'SECRETS_INVALID');
  await rejectsWith(m.boot({ network: 'none', egressSecrets: [{ name: 'K', hosts: 'h.test', value: 'v' }] }), 'BOOT_ARGS_INVALID');
  const s = await m.boot({
    name: 'node-egress',
    memoryMib: 256,
    egressSecrets: [{ name: 'API_KEY', hosts: ['api.example.test', '*.example.net'], value: 'sk-node-0451' }],
  });
  try {
    const env = (await s.execRaw('echo $API_KEY; echo $HTTPS_PROXY; test -s "$SSL_CERT_FILE" && echo trusted')).stdout.split('\n');
    assert.match(env[0], /^machinen-egress-api_key-[0-9a-f]{32}$/);
    assert.equal(env[1], 'http://127.0.0.1:17480');
    assert.equal(env[2], 'trusted');
  } finally {
    await s.kill();
  }
});

test('a throwing output callback gives the command up', async () => {
  const p = vm.exec('echo first; sleep 300', {
    onStdout: () => {
      throw new Error('callback broke');
    },
  });
  await assert.rejects(p, /callback broke/);
  await until(async () => (await vm.execRaw('pgrep -x sleep')).stdout === '', 20_000, 'the sleep to end');
});

test('snapshot: checkpoints of a running VM are deltas over the last one unless full', async () => {
  const dir = scratch('chain');
  const src = await m.boot({ name: 'node-chain', memoryMib: 256 });
  try {
    await src.exec('echo one > /root/step');
    await src.snapshot({ outDir: join(dir, 'c1') });
    await src.exec('echo two > /root/step; echo two > /dev/shm/step');
    await src.snapshot({ outDir: join(dir, 'c2') });
    await src.snapshot({ outDir: join(dir, 'c3'), full: true });
    const meta = (n) => JSON.parse(readFileSync(join(dir, n, 'meta.json'), 'utf8'));
    assert.equal(meta('c1').parent, undefined);
    assert.equal(meta('c2').parent.path, '../c1');
    assert.equal(meta('c2').ram_delta, true);
    assert.equal(meta('c3').parent, undefined);
    await rejectsWith(src.snapshot({ outDir: join(dir, 'c4'), fully: true }), 'BOOT_ARGS_INVALID');
  } finally {
    await src.kill().catch(() => {});
  }
  const r = await m.restore({ snapDir: join(dir, 'c2'), name: 'node-chain-r' });
  try {
    assert.equal((await r.exec('cat /root/step /dev/shm/step')).stdout, 'two\ntwo\n');
  } finally {
    await r.kill().catch(() => {});
  }
});
