// Runs every suite (cargo tests, then ava) and ends with one line CI can read:
// "N passed, N failed".
import { spawnSync } from 'node:child_process'
import { fileURLToPath } from 'node:url'

function run(cmd, args) {
  const r = spawnSync(cmd, args, { encoding: 'utf8', stdio: ['inherit', 'pipe', 'pipe'], maxBuffer: 1 << 28 })
  process.stdout.write(r.stdout ?? '')
  process.stderr.write(r.stderr ?? '')
  return { out: `${r.stdout ?? ''}\n${r.stderr ?? ''}`, status: r.status ?? 1 }
}

let passed = 0
let failed = 0

const cargo = run('cargo', ['test', '--workspace', '--release'])
for (const m of cargo.out.matchAll(/test result: \w+\. (\d+) passed; (\d+) failed/g)) {
  passed += Number(m[1])
  failed += Number(m[2])
}
if (cargo.status !== 0 && !/test result: FAILED/.test(cargo.out)) failed += 1 // did not build or run

// ava's entry point run with this node (not `npx`, which is a .cmd file on Windows).
const avaCli = fileURLToPath(new URL('../node_modules/ava/entrypoints/cli.mjs', import.meta.url))
const ava = run(process.execPath, [avaCli, '--tap'])
const ok = [...ava.out.matchAll(/^ok \d+/gm)].length
const notOk = [...ava.out.matchAll(/^not ok \d+/gm)].length
passed += ok
failed += notOk
if (ava.status !== 0 && notOk === 0) failed += 1 // crashed before reporting

console.log(`${passed} passed, ${failed} failed`)
process.exit(failed ? 1 : 0)
