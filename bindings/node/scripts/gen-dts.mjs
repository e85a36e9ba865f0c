#!/usr/bin/env node
// Rewrite the ErrorCode block of index.d.ts from the native addon's list.
import { readFileSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const require = createRequire(import.meta.url);
const pkg = join(dirname(fileURLToPath(import.meta.url)), '..');
const { ErrorCode } = require(join(pkg, 'index.js'));
const file = join(pkg, 'index.d.ts');
const text = readFileSync(file, 'utf8');
const begin = '// BEGIN GENERATED ERROR CODES\n';
const end = '// END GENERATED ERROR CODES\n';
const a = text.indexOf(begin);
const b = text.indexOf(end);
if (a < 0 || b < a) throw new Error('index.d.ts lacks the generated-block markers');
const body =
  'export declare const ErrorCode: {\n' +
  Object.keys(ErrorCode)
    .map((c) => `  readonly ${c}: "${c}";\n`)
    .join('') +
  '};\n';
writeFileSync(file, text.slice(0, a + begin.length) + body + text.slice(b));
console.log(`index.d.ts: ${Object.keys(ErrorCode).length} error codes`);
