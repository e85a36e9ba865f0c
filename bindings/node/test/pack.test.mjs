// `npm pack` makes a package another project installs and uses: the addon,
// the supervisor, the guest agent and the CLI travel inside it.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { pkgDir, scratch } from './helpers.mjs';

test('npm pack → npm install in another project → boot from it', { timeout: 600_000 }, () => {
  const dest = scratch('pack');
  const [packed] = JSON.parse(
    execFileSync('npm', ['pack', '--json', '--pack-destination', dest], { cwd: pkgDir, encoding: 'utf8' }),
  );
  const files = packed.files.map((f) => f.path).sort();
  for (const f of ['index.js', 'index.d.ts', 'README.md', 'package.json', 'native/machinen.node', 'native/machinen-vmm', 'native/machinen-agent', 'native/machinen']) {
    assert.ok(files.includes(f), `${f} is not in the package: ${files.join(', ')}`);
  }
  assert.ok(!files.some((f) => f.startsWith('src/') || f.startsWith('test/')), files.join(', '));

  const app = scratch('app');
  writeFileSync(join(app, 'package.json'), JSON.stringify({ name: 'app', private: true, type: 'module' }));
  execFileSync('npm', ['install', '--offline', '--no-audit', '--no-fund', join(dest, packed.filename)], { cwd: app, stdio: 'pipe' });
  // Nothing of the repository on the way: the package's own binaries.
  const env = { ...process.env };
  for (const k of ['MACHINEN_VMM', 'MACHINEN_AGENT', 'MACHINEN_NODE_ADDON']) delete env[k];
  writeFileSync(
    join(app, 'main.js'),
    `import { boot, ErrorCode } from '@machinen/runtime';
     const vm = await boot({ memoryMib: 256 });
     try {
       const r = await vm.exec(['uname', '-s']);
       console.log(JSON.stringify({ out: r.stdout, code: ErrorCode.EXEC_TIMEOUT }));
     } finally {
       await vm.kill();
     }`,
  );
  const out = JSON.parse(execFileSync(process.execPath, ['main.js'], { cwd: app, env, encoding: 'utf8', timeout: 300_000 }));
  assert.deepEqual(out, { out: 'Linux\n', code: 'EXEC_TIMEOUT' });
  const version = execFileSync(join(app, 'node_modules', '.bin', 'machinen'), ['--version'], { encoding: 'utf8' });
  assert.match(version, /machinen/);
});
