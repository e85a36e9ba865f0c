#!/usr/bin/env node
// Build the native addon and gather what the package ships in native/:
// machinen.node (the addon), machinen-vmm (the per-VM supervisor),
// machinen-agent (the guest's /init, statically linked) and machinen (the
// CLI). `--debug` builds the host programs without optimisation.
import { execFileSync } from 'node:child_process';
import { copyFileSync, mkdirSync, chmodSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const pkg = join(here, '..');
const root = join(pkg, '..', '..');
const debug = process.argv.includes('--debug');
const profile = debug ? 'debug' : 'release';
const run = (cmd, args) => execFileSync(cmd, args, { cwd: root, stdio: 'inherit' });

run(join(root, 'scripts', 'build'), debug ? ['--debug'] : []);
run('cargo', ['build', ...(debug ? [] : ['--release']), '-p', 'machinen-node']);
const host = execFileSync('rustc', ['-vV'], { encoding: 'utf8' }).match(/^host: (.*)$/m)[1];
const out = join(pkg, 'native');
mkdirSync(out, { recursive: true });
const ship = [
  [join(root, 'target', profile, 'libmachinen_node.so'), 'machinen.node'],
  [join(root, 'target', profile, 'machinen-vmm'), 'machinen-vmm'],
  [join(root, 'target', profile, 'machinen'), 'machinen'],
  [join(root, 'target', host, 'release', 'machinen-agent'), 'machinen-agent'],
];
for (const [from, name] of ship) {
  copyFileSync(from, join(out, name));
  chmodSync(join(out, name), 0o755);
  // Debug info is most of a binary's size and no use to the package's
  // users (`npm pack` would ship hundreds of MiB).
  try {
    execFileSync('strip', ['--strip-debug', join(out, name)]);
  } catch {
    console.warn(`strip is not available: ${name} keeps its debug info`);
  }
}
console.log(`built ${out}: ${ship.map(([, n]) => n).join(', ')} (${profile})`);
