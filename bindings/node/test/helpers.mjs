// Shared by the tests: an isolated VM registry (so the tests neither see
// nor disturb the user's VMs), the package, and the CLI next to it.
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const pkgDir = join(dirname(fileURLToPath(import.meta.url)), '..');
export const repoDir = join(pkgDir, '..', '..');

// Short: the registry holds unix sockets, whose paths are limited.
if (!process.env.MACHINEN_REGISTRY_DIR) {
  process.env.MACHINEN_REGISTRY_DIR = mkdtempSync('/tmp/mnn-');
}

const require = createRequire(import.meta.url);
export const m = require(join(pkgDir, 'index.js'));

export const cliPath = [join(pkgDir, 'native', 'machinen'), join(repoDir, 'target', 'debug', 'machinen')].find((p) =>
  existsSync(p),
);

/** A scratch directory (`mnn-PREFIX-…` in the temp dir), removed when the
 * test file's process exits: bundles and images in them take hundreds of MiB. */
export function scratch(prefix) {
  const dir = mkdtempSync(join(tmpdir(), `mnn-${prefix}-`));
  process.on('exit', () => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** Run the CLI against the same registry; returns {status, stdout, stderr}. */
export function cli(...args) {
  const r = spawnSync(cliPath, args, { encoding: 'utf8', timeout: 180_000 });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

export function cliJson(...args) {
  return JSON.parse(execFileSync(cliPath, args, { encoding: 'utf8', timeout: 180_000 }));
}

/** Expect `p` to reject with a MachinenError of `code`; returns the error. */
export async function rejectsWith(p, code) {
  try {
    await p;
  } catch (e) {
    if (!m.isMachinenError(e, code)) {
      throw new Error(`expected ${code}, got ${e?.code ?? ''}: ${e?.stack ?? e}`);
    }
    return e;
  }
  throw new Error(`expected ${code}, but it succeeded`);
}

/** Poll `f` until it returns a truthy value (or throw after `ms`). */
export async function until(f, ms, what) {
  const end = Date.now() + ms;
  for (;;) {
    try {
      const v = await f();
      if (v) return v;
    } catch (e) {
      if (Date.now() > end) throw e;
    }
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}
