#!/usr/bin/env node
// Exec round-trip of `true`: from Node through this package, and from the
// Rust library (`machinen-bench --exec-rtt-of`), against the same VM, in
// interleaved rounds of one run. Prints medians and the Node/Rust ratio
// and writes target/bench/node-exec.json.
//
//   node bench/exec-rtt.mjs [--rounds 5] [--reps 30] [--bench PATH]
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { performance } from 'node:perf_hooks';
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
const { boot } = require('../index.js');
const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, '..', '..', '..');

const arg = (name, dflt) => {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? process.argv[i + 1] : dflt;
};
const rounds = Number(arg('rounds', 5));
const reps = Number(arg('reps', 30));
const bench =
  arg('bench') ??
  ['release', 'debug'].map((p) => join(root, 'target', p, 'machinen-bench')).find((p) => existsSync(p));
if (!bench) throw new Error('machinen-bench not found: cargo build --release -p machinen-bench, or pass --bench');

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};
const pct = (xs, p) => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor(p * xs.length))];

const vm = await boot({ name: `bench-node-${process.pid}`, memoryMib: 512 });
try {
  await vm.exec(['true']);
  const nodeLat = [];
  const rustLat = [];
  const runNode = async () => {
    for (let i = 0; i < reps; i++) {
      const t = performance.now();
      const r = await vm.execRaw(['true']);
      nodeLat.push(performance.now() - t);
      if (r.exitCode !== 0) throw new Error(`true exited ${r.exitCode}`);
    }
  };
  const runRust = () => {
    const out = execFileSync(bench, ['--exec-rtt-of', vm.name, '--reps', String(reps)], { encoding: 'utf8' });
    rustLat.push(...JSON.parse(out));
  };
  for (let r = 0; r < rounds; r++) {
    if (r % 2 === 0) {
      await runNode();
      runRust();
    } else {
      runRust();
      await runNode();
    }
  }
  // 20 concurrent execs from one process, wall time per batch.
  const batches = [];
  for (let r = 0; r < rounds; r++) {
    const t = performance.now();
    await Promise.all(Array.from({ length: 20 }, () => vm.execRaw(['true'])));
    batches.push(performance.now() - t);
  }
  const report = {
    reps_per_round: reps,
    rounds,
    node_ms: { median: median(nodeLat), p90: pct(nodeLat, 0.9) },
    rust_ms: { median: median(rustLat), p90: pct(rustLat, 0.9) },
    ratio_node_over_rust: median(nodeLat) / median(rustLat),
    concurrent20_batch_ms: { median: median(batches) },
  };
  const f = (x) => x.toFixed(2);
  console.log(`exec round-trip of \`true\`, ${rounds} interleaved rounds × ${reps}:`);
  console.log(`  Node (this package)   median ${f(report.node_ms.median)} ms  p90 ${f(report.node_ms.p90)} ms`);
  console.log(`  Rust (the library)    median ${f(report.rust_ms.median)} ms  p90 ${f(report.rust_ms.p90)} ms`);
  console.log(`  ratio Node/Rust       ${f(report.ratio_node_over_rust)}`);
  console.log(`  20 concurrent execs   median ${f(report.concurrent20_batch_ms.median)} ms per batch`);
  const out = join(root, 'target', 'bench');
  mkdirSync(out, { recursive: true });
  writeFileSync(join(out, 'node-exec.json'), JSON.stringify(report, null, 2));
} finally {
  await vm.kill();
}
