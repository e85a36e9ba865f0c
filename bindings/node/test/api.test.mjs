// The package's surface without a running VM: exports against the
// declarations, error codes against the library, errors per family.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { m, pkgDir, rejectsWith, scratch } from './helpers.mjs';

const dts = readFileSync(join(pkgDir, 'index.d.ts'), 'utf8');

test('ErrorCode is frozen, complete, and the same in index.d.ts', () => {
  assert.ok(Object.isFrozen(m.ErrorCode));
  for (const [k, v] of Object.entries(m.ErrorCode)) assert.equal(k, v);
  for (const c of ['REGISTRY_NOT_FOUND', 'RESTORE_BUNDLE_INVALID', 'EXEC_NONZERO_EXIT', 'EXEC_TIMEOUT', 'BOOT_IMAGE_INVALID']) {
    assert.equal(m.ErrorCode[c], c);
  }
  const declared = [...dts.matchAll(/^ {2}readonly ([A-Z0-9_]+): "([A-Z0-9_]+)";$/gm)].map((x) => {
    assert.equal(x[1], x[2]);
    return x[1];
  });
  assert.deepEqual(declared, Object.keys(m.ErrorCode), 'index.d.ts drifted: run `npm run gen-dts`');
});

test('every export is declared and every declaration exported', () => {
  const declared = new Set(
    [...dts.matchAll(/^export declare (?:function|const|class) (\w+)/gm)].map((x) => x[1]),
  );
  assert.deepEqual([...declared].sort(), Object.keys(m).sort());
  // The handle's methods, both ways.
  const body = dts.slice(dts.indexOf('export declare class VmHandle'));
  const cls = body.slice(0, body.indexOf('\n}\n'));
  const declaredMethods = new Set([...cls.matchAll(/^ {2}(\w+)\(/gm)].map((x) => x[1]));
  const methods = Object.getOwnPropertyNames(m.VmHandle.prototype).filter(
    (n) => n !== 'constructor' && !n.startsWith('_') && typeof Object.getOwnPropertyDescriptor(m.VmHandle.prototype, n).value === 'function',
  );
  assert.deepEqual([...declaredMethods].sort(), methods.sort());
  const getters = Object.getOwnPropertyNames(m.VmHandle.prototype).filter((n) => Object.getOwnPropertyDescriptor(m.VmHandle.prototype, n).get);
  for (const g of getters) assert.match(cls, new RegExp(`readonly ${g}:`));
});

test('the declarations type-check, with the example', { skip: !existsSync(join(pkgDir, 'node_modules', 'typescript')) && 'npm install first' }, () => {
  execFileSync('npm', ['install', '--offline', '--no-audit', '--no-fund'], { cwd: join(pkgDir, '..', '..', 'examples', 'node'), stdio: 'pipe' });
  execFileSync(process.execPath, [join(pkgDir, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', join(pkgDir, 'tsconfig.json')], {
    stdio: 'pipe',
  });
});

test('MachinenError, isMachinenError, formatMachinenError', () => {
  const e = new m.MachinenError(m.ErrorCode.EXEC_TIMEOUT, 'too slow', { hint: 'raise it', cause: new Error('x') });
  assert.ok(e instanceof Error);
  assert.equal(e.name, 'MachinenError');
  assert.equal(e.retryable, false);
  assert.ok(m.isMachinenError(e));
  assert.ok(m.isMachinenError(e, 'EXEC_TIMEOUT'));
  assert.ok(!m.isMachinenError(e, 'IO'));
  assert.ok(!m.isMachinenError(new Error('plain')));
  assert.equal(m.formatMachinenError(e), 'error[EXEC_TIMEOUT]: too slow\n  hint: raise it');
  assert.equal(e.cause.message, 'x');
  assert.equal(new m.MachinenError('EXEC_VSOCK_UNAVAILABLE', 'gone').retryable, true);
});

test('a missing VM: REGISTRY_NOT_FOUND with a hint', async () => {
  const e = await rejectsWith(m.attach({ name: 'no-such-vm' }), 'REGISTRY_NOT_FOUND');
  assert.match(e.message, /no-such-vm/);
  assert.ok(e.hint);
  await rejectsWith(m.attach({ pid: 999999 }), 'REGISTRY_NOT_FOUND');
});

test('a bad image: refused before any VM starts', async () => {
  const dir = scratch('img');
  const bogus = join(dir, 'not-an-image.tar.gz');
  writeFileSync(bogus, 'this is not a tarball');
  const e = await rejectsWith(m.boot({ image: bogus }), 'BOOT_IMAGE_INVALID');
  assert.ok(e.hint || e.causes.length);
  await rejectsWith(m.boot({ image: join(dir, 'missing.tar.gz') }), 'BOOT_IMAGE_INVALID');
  assert.deepEqual(await m.list(), []);
});

test('a corrupt bundle: RESTORE_BUNDLE_INVALID', async () => {
  const dir = scratch('bundle');
  await rejectsWith(m.restore({ snapDir: join(dir, 'missing') }), 'RESTORE_BUNDLE_INVALID');
  const bad = join(dir, 'bad');
  mkdirSync(bad);
  writeFileSync(join(bad, 'meta.json'), '{"this": "is not a bundle"');
  await rejectsWith(m.restore({ snapDir: bad }), 'RESTORE_BUNDLE_INVALID');
  assert.deepEqual(await m.list(), []);
});

test('bad options are refused with what is supported', async () => {
  const e = await rejectsWith(m.boot({ memoryMB: 512 }), 'BOOT_ARGS_INVALID');
  assert.match(e.hint, /memoryMib/);
  await rejectsWith(m.boot({ memoryMib: 1 }), 'BOOT_MEMORY_INVALID');
  await rejectsWith(m.boot({ network: 'wifi' }), 'BOOT_ARGS_INVALID');
  await rejectsWith(m.boot({ ports: ['not-a-port'] }), 'BOOT_ARGS_INVALID');
  await rejectsWith(m.restore({}), 'RESTORE_BUNDLE_INVALID');
  await rejectsWith(m.provision({}), 'PROVISION_ARGS_INVALID');
  await rejectsWith(m.attach({}), 'BOOT_ARGS_INVALID');
  await rejectsWith(m.boot({ mount: { host: 1 } }), 'BOOT_MOUNT_INVALID');
  await rejectsWith(m.boot({ mount: { host: '/nonexistent/machinen', guest: '/x' } }), 'BOOT_MOUNT_HOST_NOT_FOUND');
  await rejectsWith(m.boot({ mount: [{ host: pkgDir, guest: 'relative' }] }), 'MOUNT_PATH_INVALID');
  await rejectsWith(m.boot({ mount: { host: pkgDir, guest: '/x' }, mountDiskUpperSizeBytes: 1.5 }), 'BOOT_MOUNT_INVALID');
  await rejectsWith(m.restore({ snapDir: pkgDir, freeMemoryThreshold: 'lots' }), 'BOOT_ARGS_INVALID');
  assert.deepEqual(await m.list(), []);
});

test('an aborted boot rejects with the signal reason and leaves no VM', async () => {
  const ac = new AbortController();
  ac.abort(new Error('changed my mind'));
  await assert.rejects(m.boot({ signal: ac.signal }), /changed my mind/);
  const ac2 = new AbortController();
  const p = m.boot({ name: 'aborted-boot', signal: ac2.signal });
  setTimeout(() => ac2.abort(), 300);
  await assert.rejects(p, (e) => e.name === 'AbortError');
  // The foreground VM being started stops with its launcher's pipe.
  const end = Date.now() + 60_000;
  while ((await m.list()).some((v) => v.name === 'aborted-boot') && Date.now() < end) {
    await new Promise((r) => setTimeout(r, 250));
  }
  assert.deepEqual((await m.list()).filter((v) => v.name === 'aborted-boot'), []);
});

test('runGc reports in camelCase', async () => {
  const r = await m.runGc({ dryRun: true });
  assert.equal(r.dryRun, true);
  assert.ok(Array.isArray(r.removed));
  assert.equal(typeof r.bytes, 'number');
});
