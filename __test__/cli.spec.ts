import test from 'ava'
import { spawnSync } from 'node:child_process'
import { existsSync, readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'

import { configs, inspect, merge, model, toFloat32, weightedSum } from '../dist/index.js'
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

test('mecha merge --fallback-model takes the keys the recipe cannot produce from that model', (t) => {
  const { dir, recipe } = setup()
  const extra = join(dir, 'extra.safetensors')
  writeSafetensors(extra, {
    w: { dtype: 'F16', shape: [2, 2], values: [9, 9, 9, 9] },
    bias: { dtype: 'F16', shape: [2], values: [1, 2] },
  })
  const out = join(dir, 'out.safetensors')
  const r = mecha('merge', recipe, '-o', out, '--fallback-model', extra, '--json')
  t.is(r.status, 0, r.stderr)
  t.is(JSON.parse(r.stdout).keysWritten, 2)
  const info = inspect(out)
  t.deepEqual(info.tensors.map((x) => x.name).sort(), ['bias', 'w'])
  t.regex(info.metadata['mecha_recipe'], /merge "fallback"/)
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

test('mecha info shows the inferred config and how much of each component the file holds', (t) => {
  const dir = tempDir()
  const path = join(dir, 'text-encoder-only.safetensors')
  // sd1-ldm's whole CLIP-L text encoder (tiny shapes: inference reads names only), one VAE key
  // and a key no config lists
  const tensors: Parameters<typeof writeSafetensors>[1] = {}
  const keys = configs.keys('sd1-ldm')
  for (const k of keys.filter((k) => k.component === 'clip_l'))
    tensors[k.key] = { dtype: 'F16', shape: [1], values: [0] }
  tensors[keys.find((k) => k.component === 'vae')!.key] = { dtype: 'F16', shape: [1], values: [0] }
  tensors['not.a.config.key'] = { dtype: 'F16', shape: [1], values: [0] }
  writeSafetensors(path, tensors)
  const r = mecha('info', path)
  t.is(r.status, 0, r.stderr)
  t.regex(r.stdout, /config: sd1-ldm\n/)
  t.regex(r.stdout, /clip_l +197\/197 keys\n/)
  t.regex(r.stdout, /vae +1\/248 keys \(247 missing\)\n/)
  t.regex(r.stdout, /ema +0\/688 keys \(688 missing, 688 of them optional\)\n/)
  t.regex(r.stdout, /1 keys are not in the config\n/)
  t.true(r.stdout.endsWith('\n'))
  const json = JSON.parse(mecha('info', path, '--json').stdout)
  t.is(json.config, 'sd1-ldm')
  t.deepEqual(
    json.components.find((c: { name: string }) => c.name === 'diffuser'),
    { name: 'diffuser', present: 0, total: 686, optionalMissing: 0 },
  )
  t.is(json.keysOutsideConfig, 1)

  const { a } = setup()
  t.regex(mecha('info', a).stdout, /config: none of the known configs matches these keys/)
})

test("mecha help <command> and <command> --help print that command's options", (t) => {
  for (const command of ['merge', 'plan', 'serialize', 'info']) {
    const help = mecha('help', command)
    t.is(help.status, 0, help.stderr)
    t.regex(help.stdout, new RegExp(`^Usage: mecha ${command} `))
    t.true(help.stdout.endsWith('\n'))
    t.is(mecha(command, '--help').stdout, help.stdout)
    t.is(mecha(command, '-h').stdout, help.stdout)
  }
  t.regex(mecha('help', 'merge').stdout, /--output-dtype <dtype>/)
  t.regex(mecha('help', 'info').stdout, /--keys/)
  t.regex(mecha('help').stdout, /mecha help <command>/)
  const wrong = mecha('help', 'merg')
  t.is(wrong.status, 2)
  t.regex(wrong.stderr, /unknown command "merg"; did you mean "merge"\?/)
})

test('mecha serialize takes the JSON recipes merge takes, and its file ends with a newline', (t) => {
  const { dir, a, recipe } = setup()
  const printed = mecha('serialize', recipe)
  t.is(printed.status, 0, printed.stderr)
  t.regex(printed.stdout, /^version 0\.1\.0\n/)
  t.regex(printed.stdout, /merge_space="weight"/)
  const out = join(dir, 'out.mecha')
  t.is(mecha('serialize', recipe, '-o', out).status, 0)
  t.is(readFileSync(out, 'utf8'), printed.stdout)
  // a recipe whose result is a delta serializes too; --strict-merge-space still narrows
  const delta = join(dir, 'delta.json')
  writeFileSync(
    delta,
    JSON.stringify({ nodes: [{ model: a }, { model: a }, { merge: 'subtract', args: [{ node: 0 }, { node: 1 }] }] }),
  )
  const d = mecha('serialize', delta)
  t.is(d.status, 0, d.stderr)
  t.regex(d.stdout, /merge "subtract"/)
  const refused = mecha('serialize', delta, '--strict-merge-space', 'weight')
  t.is(refused.status, 1)
  t.regex(refused.stderr, /MergeSpaceError/)
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
