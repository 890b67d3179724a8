// Runs every suite (cargo tests, then ava, then the smoke test under Node, Bun and Deno) and ends
// with one line CI can read: "N passed, N failed".
import { spawnSync } from 'node:child_process'
import { fileURLToPath } from 'node:url'

import { runtimeCommand } from './runtimes.mjs'

function run(cmd, args, options = {}) {
  const r = spawnSync(cmd, args, {
    encoding: 'utf8',
    stdio: ['inherit', 'pipe', 'pipe'],
    maxBuffer: 1 << 28,
    ...options,
  })
  process.stdout.write(r.stdout ?? '')
  process.stderr.write(r.stderr ?? '')
  if (r.error) console.error(`${cmd}: ${r.error.message}`) // did not start, or timed out
  return { out: `${r.stdout ?? ''}\n${r.stderr ?? ''}`, status: r.status ?? 1 }
}

/** TAP-style lines: `ok N - …` and `not ok N - …` at the start of a line. */
function tapCounts(out) {
  return { ok: [...out.matchAll(/^ok \d+/gm)].length, notOk: [...out.matchAll(/^not ok \d+/gm)].length }
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
const avaCounts = tapCounts(ava.out)
passed += avaCounts.ok
failed += avaCounts.notOk
if (ava.status !== 0 && avaCounts.notOk === 0) failed += 1 // crashed before reporting

// The smoke test of the built package under each runtime; Bun and Deno are the devDependencies
// of those names (scripts/runtimes.mjs finds their executables).
const smoke = fileURLToPath(new URL('../__test__/runtimes/smoke.mjs', import.meta.url))
for (const runtime of ['node', 'bun', 'deno']) {
  let command
  try {
    command = runtimeCommand(runtime, smoke)
  } catch (error) {
    console.log(`# smoke test under ${runtime}: cannot run it: ${error.message}`)
    failed += 1
    continue
  }
  console.log(`# smoke test under ${runtime} ${command.version}: ${command.cmd} ${command.args.join(' ')}`)
  const r = run(command.cmd, command.args, { timeout: 300_000 })
  const { ok, notOk } = tapCounts(r.out)
  passed += ok
  failed += notOk
  // Did not start, crashed before reporting a failure, or reported nothing: one failure.
  if (notOk === 0 && (r.status !== 0 || ok === 0)) failed += 1
}

console.log(`${passed} passed, ${failed} failed`)
process.exit(failed ? 1 : 0)
