// @ts-check
// The quickstart from Node: bake the counter (examples/counter/counter.pl)
// into an image whose command it is, boot it as a service VM with a port
// forward, and watch its in-memory count survive a snapshot and a restore;
// a fork continues from the same value on its own.
//
//   cd examples/node && npm install && node quickstart.mjs
//
// Prints what it does; with --json, one JSON object per step instead.
import { readFile, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { boot, restore, provision, list, formatMachinenError, isMachinenError } from '@machinen/runtime';

const json = process.argv.includes('--json');
const port = Number(process.env.PORT ?? 3000);
const forkPort = Number(process.env.FORK_PORT ?? 3001);
const work = await mkdtemp(join(tmpdir(), 'machinen-quickstart-'));

/** @param {string} step @param {Record<string, unknown>} [data] */
function say(step, data = {}) {
  if (json) console.log(JSON.stringify({ step, ...data }));
  else console.log(`\n\x1b[1m${step}\x1b[0m`, Object.keys(data).length ? data : '');
}

/** GET the counter, retrying while it starts listening. @param {number} p */
async function count(p) {
  for (let i = 0; ; i++) {
    try {
      const r = await fetch(`http://127.0.0.1:${p}/`);
      return Number((await r.text()).trim());
    } catch (e) {
      if (i > 150) throw e;
      await new Promise((r) => setTimeout(r, 200));
    }
  }
}

/** @type {import('@machinen/runtime').VmHandle[]} */
const vms = [];
try {
  const script = await readFile(new URL('../counter/counter.pl', import.meta.url));
  const image = await provision({
    out: join(work, 'app.tar.gz'),
    cmd: ['perl', '/srv/counter.pl', '8080'],
    install: async (vm) => {
      await vm.writeFile('/srv/counter.pl', script, { mode: 0o755 });
      await vm.exec('perl -c /srv/counter.pl');
    },
  });
  say('provision', { image: image.path, sizeMiB: Math.round(image.size / 2 ** 20), ms: image.elapsedMs });

  const vm = await boot({ image: image.path, name: 'counter', memoryMib: 512, ports: [`${port}:8080`] });
  vms.push(vm);
  say('boot', { name: vm.name, pid: vm.pid });
  say('count', { vm: 'counter', value: await count(port) });
  say('count', { vm: 'counter', value: await count(port) });

  const snap = await vm.snapshot({ outDir: join(work, 'counter.snap'), leaveRunning: false });
  vms.pop();
  say('snapshot', { outDir: snap.outDir, pausedMs: snap.pausedMs, MiB: Math.round(snap.diskBytes / 2 ** 20) });

  const back = await restore({ snapDir: snap.outDir, name: 'counter', ports: [`${port}:8080`], ownRam: true });
  vms.push(back);
  say('restore', { name: back.name });
  say('count', { vm: 'counter', value: await count(port) });

  const fork = await back.fork({ name: 'counter-b', ports: [`${forkPort}:8080`] });
  vms.push(fork);
  say('fork', { name: fork.name, forkedFrom: fork.info().forkedFrom });
  say('count', { vm: 'counter-b', value: await count(forkPort) });
  say('count', { vm: 'counter', value: await count(port) });
  say('list', { vms: (await list()).map((v) => `${v.name} ${v.state}`) });
} catch (e) {
  console.error(isMachinenError(e) ? formatMachinenError(e) : e);
  process.exitCode = 1;
} finally {
  for (const vm of vms) await vm.kill().catch(() => {});
  await rm(work, { recursive: true, force: true });
}
