import test from 'ava'
import { spawnSync } from 'node:child_process'
import { existsSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'

import { inspect, merge, model, toFloat32, weightedSum } from '../dist/index.js'
import { tempDir, writeSafetensors } from './helpers.ts'

const cli = fileURLToPath(new URL('../dist/cli.js', import.meta.url))
const mecha = (...args: string[]) => spawnSync(process.execPath, [cli, ...args], { encoding: 'utf8' })

function setup() {
  const dir = tempDir()
  const a = join(dir, 'a.safetensors')
  const b = join(dir, 'b.safetensors')
  writeSafetensors(a, { w: { dtype: 'F16', shape: [2, 2], values: [0, 1, 2, 3] } }, { note: 'hello' })
  writeSafetensors(b, { w: { dtype: 'F16', shape: [2, 2], values: [4, 5, 6, 7] } })
  const recipe = join(dir, 'recipe.json')
  writeFileSync(
    recipe,
    JSON.stringify({
      nodes: [
        { model: a },
        { model: b },
        { merge: 'weighted_sum', args: [{ node: 0 }, { node: 1 }], kwargs: { alpha: 0.25 } },
      ],
    }),
  )
  return { dir, a, b, recipe }
}

test('mecha merge runs a JSON recipe and records it in the output', async (t) => {
  const { dir, a, b, recipe } = setup()
  const out = join(dir, 'out.safetensors')
  const r = mecha('merge', recipe, '-o', out, '--json')
  t.is(r.status, 0, r.stderr)
  const report = JSON.parse(r.stdout)
  t.is(report.keysWritten, 1)
  const info = inspect(out)
  t.regex(info.recipe!, /merge "weighted_sum" &0 &1 &4/)
  // Same result as the library call.
  const mem = await merge(weightedSum(model(a), model(b), { alpha: 0.25 }))
  t.deepEqual(Array.from(toFloat32(mem.get('w')!)), [1, 2, 3, 4])
})

test('mecha merge and plan take a memory budget (--memory 2M)', (t) => {
  const { dir, recipe } = setup()
  const planned = mecha('plan', recipe, '--memory', '2M', '--json')
  t.is(planned.status, 0, planned.stderr)
  const report = JSON.parse(planned.stdout)
  t.is(report.memoryBudget, 2 * 2 ** 20)
  t.true(report.estimatedPeakBytes > report.estimatedWorkingBytes)
  t.deepEqual(report.overBudget, [])
  const merged = mecha('merge', recipe, '-o', join(dir, 'budget.safetensors'), '--memory', '1.5G', '--json')
  t.is(merged.status, 0, merged.stderr)
  t.is(JSON.parse(merged.stdout).memoryBudget, 1.5 * 2 ** 30)
  const bad = mecha('merge', recipe, '-o', join(dir, 'bad.safetensors'), '--memory', 'lots')
  t.not(bad.status, 0)
  t.regex(bad.stderr, /--memory: "lots" is not a size/)
})

test('mecha info prints the header summary and metadata', (t) => {
  const { a } = setup()
  const r = mecha('info', a)
  t.is(r.status, 0, r.stderr)
  t.regex(r.stdout, /1 tensors/)
  t.regex(r.stdout, /F16×1/)
  t.regex(r.stdout, /note: hello/)
  const json = JSON.parse(mecha('info', a, '--json').stdout)
  t.is(json.tensors, 1)
})

test('mecha reports errors with their type and a non-zero exit', (t) => {
  const { dir, recipe } = setup()
  const out = join(dir, 'out.safetensors')
  const bad = mecha('info', join(dir, 'nope.safetensors'))
  t.is(bad.status, 1)
  t.regex(bad.stderr, /SafetensorsError: .*nope\.safetensors: file not found/)
  const usage = mecha('merge', recipe)
  t.is(usage.status, 2)
  t.regex(usage.stderr, /needs -o/)
  t.false(existsSync(out))
  const help = mecha('--help')
  t.is(help.status, 0)
  t.regex(help.stdout, /mecha merge <recipe\.mecha\|recipe\.json> -o <out\.safetensors>/)
})

test('user mistakes on the command line get a one-line message, never a stack trace', (t) => {
  const { dir, a, recipe } = setup()
  const out = join(dir, 'out.safetensors')
  const cases: [string[], RegExp, number][] = [
    [['merge', recipe, '-o', out, '--thread', '2'], /merge has no option --thread; did you mean --threads\?/, 2],
    [['merge', recipe, 'extra.mecha', '-o', out], /merge takes one recipe file, but was also given: extra\.mecha/, 2],
    [['merge', join(dir, 'missing.mecha'), '-o', out], /cannot read recipe .*missing\.mecha: no such file/, 2],
    [['merge', dir + '/', '-o', out], /cannot read recipe .*: it is a folder/, 2],
    [['info', a, '--keyz'], /info has no option --keyz; did you mean --keys\?/, 2],
    [['merg', recipe], /unknown command "merg"; did you mean "merge"\?/, 2],
    [['merge', recipe, '-o', out, '--threads', '100000'], /OptionError: merge: threads must be an integer from 0/, 1],
    [['merge', recipe, '-o', dir], /OutputError: cannot write .*: it is a folder/, 1],
  ]
  for (const [args, message, status] of cases) {
    const r = mecha(...args)
    t.is(r.status, status, `${args.join(' ')}: ${r.stderr}`)
    t.regex(r.stderr, message, args.join(' '))
    t.notRegex(r.stderr, /\n\s+at /, `no stack trace for ${args.join(' ')}`)
  }
  t.false(existsSync(out))
})
