// The counter quickstart driven entirely from JS (examples/node): provision
// with an install hook, boot the image as a service VM, snapshot, restore,
// fork; the count held in the guest's memory tells what really happened.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { test } from 'node:test';
import { m, rejectsWith, repoDir, scratch } from './helpers.mjs';

function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

test('the quickstart example: provision, boot, snapshot, restore, fork', { timeout: 900_000 }, async () => {
  const dir = join(repoDir, 'examples', 'node');
  execFileSync('npm', ['install', '--offline', '--no-audit', '--no-fund'], { cwd: dir, stdio: 'pipe' });
  const [port, forkPort] = [await freePort(), await freePort()];
  const out = execFileSync(process.execPath, ['quickstart.mjs', '--json'], {
    cwd: dir,
    encoding: 'utf8',
    env: { ...process.env, PORT: String(port), FORK_PORT: String(forkPort) },
    timeout: 840_000,
  });
  const steps = out.trim().split('\n').map((l) => JSON.parse(l));
  const counts = steps.filter((s) => s.step === 'count').map((s) => `${s.vm}=${s.value}`);
  // Two requests before the snapshot; the restored VM continues at 3; the
  // fork starts from the source's memory (4) and the source counts on its
  // own (also 4: each saw one request since the fork).
  assert.deepEqual(counts, ['counter=1', 'counter=2', 'counter=3', 'counter-b=4', 'counter=4']);
  const fork = steps.find((s) => s.step === 'fork');
  assert.equal(fork.name, 'counter-b');
  assert.equal(fork.forkedFrom, 'counter');
  assert.deepEqual(steps.find((s) => s.step === 'list').vms.sort(), ['counter running', 'counter-b running']);
  // The example stopped everything it started.
  assert.deepEqual(await m.list(), []);
});

test('provision: a throwing install hook fails the bake with it as the cause', { timeout: 300_000 }, async () => {
  const work = scratch('prov');
  const boom = new Error('the hook gave up');
  let sawVm = null;
  const e = await rejectsWith(
    m.provision({
      out: join(work, 'never.tar.gz'),
      install: async (vm) => {
        sawVm = vm.name;
        assert.equal((await vm.exec('echo in the install vm')).stdout, 'in the install vm\n');
        throw boom;
      },
    }),
    'PROVISION_STEP_FAILED',
  );
  assert.ok(sawVm);
  assert.equal(e.cause, boom);
  assert.match(e.message, /the hook gave up/);
  assert.deepEqual(await m.list(), []);
});

test('provision: an AbortSignal stops the bake, no image, no VM left', { timeout: 300_000 }, async () => {
  const { existsSync } = await import('node:fs');
  const work = scratch('prov');
  const ac = new AbortController();
  const out = join(work, 'never.tar.gz');
  const p = m.provision({
    out,
    signal: ac.signal,
    install: async (vm) => {
      ac.abort();
      await vm.exec('sleep 2');
    },
  });
  await assert.rejects(p, (e) => e.name === 'AbortError');
  assert.ok(!existsSync(out));
  const end = Date.now() + 60_000;
  while ((await m.list()).length && Date.now() < end) await new Promise((r) => setTimeout(r, 250));
  assert.deepEqual(await m.list(), []);
});

test('build: a Dockerfile baked from JS, its settings inspected and run; refusals by code', { timeout: 300_000 }, async () => {
  const { writeFileSync, mkdirSync } = await import('node:fs');
  const work = scratch('build');
  mkdirSync(join(work, 'app'));
  writeFileSync(join(work, 'app', 'hello.sh'), 'echo "hello from $(pwd) as $MODE, $GREETING"\n');
  writeFileSync(
    join(work, 'Dockerfile'),
    'FROM machinen:base\nARG GREETING=hi\nENV MODE=prod\nWORKDIR /srv\nCOPY app/ ./\nRUN echo "$GREETING" > greeting\nLABEL team=sandbox\nEXPOSE 8080\nCMD ["sh", "-c", "GREETING=$(cat greeting) sh hello.sh"]\n',
  );
  const out = join(work, 'app.tar.gz');
  // noCache: an earlier run of this test left the same build in the cache.
  const r = await m.build({ context: work, out, buildArgs: { GREETING: 'yo' }, network: 'none', noCache: true });
  assert.equal(r.cached, false);
  assert.equal(r.steps, 3);
  assert.deepEqual(r.config.exposedPorts, ['8080/tcp']);
  assert.deepEqual(r.config.labels, { team: 'sandbox' });
  const again = await m.build({ context: work, out: join(work, 'again.tar.gz'), buildArgs: { GREETING: 'yo' } });
  assert.equal(again.cached, true);
  assert.equal(again.sha256, r.sha256);
  const info = await m.inspectImage(out);
  assert.equal(info.config.cwd, '/srv');
  assert.equal(info.config.env.MODE, 'prod');
  assert.equal(info.source, null);
  const vm = await m.boot({ image: out, detached: true });
  try {
    const res = await vm.exec(info.config.cmd, { env: info.config.env, cwd: info.config.cwd });
    assert.equal(res.stdout, 'hello from /srv as prod, yo\n');
  } finally {
    await vm.kill();
  }
  writeFileSync(join(work, 'Bad.Dockerfile'), 'FROM machinen:base\nHEALTHCHECK CMD true\n');
  const e = await rejectsWith(m.build({ context: work, dockerfile: join(work, 'Bad.Dockerfile'), out }), 'BUILD_INSTRUCTION_UNSUPPORTED');
  assert.match(e.message, /line 2/);
  assert.deepEqual(await m.list(), []);
});
