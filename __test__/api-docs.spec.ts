// The API reference is complete: TypeDoc (typedoc.json, as `npm run docs:api` runs it) reports
// no export without TSDoc and no public type it cannot link to, so an undocumented export fails
// the suite. `--emit none` checks without writing docs/api/.
import test from 'ava'
import { spawn } from 'node:child_process'
import { fileURLToPath } from 'node:url'

import type { MethodInfo } from '../dist/index.js'
import type * as native from '../index.js'

const root = fileURLToPath(new URL('..', import.meta.url))
const typedoc = fileURLToPath(new URL('../node_modules/typedoc/bin/typedoc', import.meta.url))

function run(args: string[]): Promise<{ code: number | null; output: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [typedoc, ...args], { cwd: root, stdio: ['ignore', 'pipe', 'pipe'] })
    let output = ''
    child.stdout.on('data', (d) => (output += d))
    child.stderr.on('data', (d) => (output += d))
    child.on('error', reject)
    child.on('close', (code) => resolve({ code, output }))
  })
}

test('TypeDoc documents every export without a warning', async (t) => {
  t.timeout(180_000)
  const { code, output } = await run(['--emit', 'none', '--treatWarningsAsErrors'])
  t.is(code, 0, `typedoc exited with ${code}:\n${output}`)
})

/** Whether two types are identical (not merely assignable either way). */
type Same<A, B> = (<T>() => T extends A ? 1 : 2) extends <T>() => T extends B ? 1 : 2 ? true : false

test('the documented MethodInfo is exactly the native registry type', (t) => {
  // Checked by `tsc -p __test__/tsconfig.json`: `false` is not assignable to `true`.
  const same: Same<MethodInfo, native.MethodInfo> = true
  t.true(same)
})
