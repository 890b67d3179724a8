// One read, many outputs: mergeMany() and `mecha sweep` write, for each recipe, the bytes merge()
// writes for it alone, reading the inputs they share once; a sweep that cannot complete leaves
// no output.
import test from 'ava'
import { spawnSync } from 'node:child_process'
import { existsSync, readFileSync, readdirSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'

import {
  AbortError,
  OptionError,
  OutputError,
  defineMergeMethod,
  inspect,
  merge,
  mergeMany,
  model,
  slerp,
  weightedSum,
} from '../dist/index.js'
import { qwenTensors, tempDir, writeSafetensors } from './helpers.ts'

const cli = fileURLToPath(new URL('../dist/cli.js', import.meta.url))
const mecha = (cwd: string, ...args: string[]) => spawnSync(process.execPath, [cli, ...args], { encoding: 'utf8', cwd })

function models() {
  const dir = tempDir()
  const [a, b] = ['a', 'b'].map((n) => join(dir, `${n}.safetensors`))
  writeSafetensors(a, qwenTensors(1))
  writeSafetensors(b, qwenTensors(2))
  return { dir, a, b }
}

const same = (x: string, y: string) => readFileSync(x).equals(readFileSync(y))

test('each output of mergeMany is the file merge() writes for its recipe alone, and the inputs are read once', async (t) => {
  const { dir, a, b } = models()
  const alphas = [0.2, 0.5, 0.8]
  // Streamed (weighted_sum, in small chunks) and computed whole (slerp).
  for (const build of [weightedSum, slerp]) {
    const recipe = (alpha: number) => build(model(a), model(b), { alpha })
    const alone = []
    for (const [i, alpha] of alphas.entries())
      alone.push(await merge(recipe(alpha), { output: join(dir, `alone-${i}.safetensors`), chunkElements: 512 }))
    const jobs = alphas.map((alpha, i) => ({ recipe: recipe(alpha), output: join(dir, `many-${i}.safetensors`) }))
    const reports = await mergeMany(jobs, { chunkElements: 512 })
    t.is(reports.length, 3)
    for (const [i, r] of reports.entries()) {
      t.true(same(join(dir, `alone-${i}.safetensors`), r.output!), `output ${i} differs from its merge alone`)
      t.is(r.recipe, alone[i].recipe)
      t.deepEqual(r.inputHashes, alone[i].inputHashes)
    }
    const read = reports.reduce((sum, r) => sum + r.bytesRead, 0)
    t.is(read, alone[0].bytesRead, 'the sweep reads each input byte once')
  }
})

test('JavaScript methods in a sweep see their own nodes (each its cache)', async (t) => {
  const { dir, a, b } = models()
  const seen = new Set<object>()
  const scaled = defineMergeMethod({
    id: 'test_sweep_scaled',
    inputs: [{ name: 'a' }, { name: 'factor', type: 'float', default: 1 }],
    elementwise: true,
    cacheFactory: () => ({}),
    fn: ({ a, factor }, context) => {
      seen.add(context.cache as object)
      return (a as Float32Array).map((v) => v * (factor as number))
    },
  })
  const reports = await mergeMany([
    { recipe: scaled(weightedSum(model(a), model(b)), { factor: 2 }), output: join(dir, 'x2.safetensors') },
    { recipe: scaled(weightedSum(model(a), model(b)), { factor: 3 }), output: join(dir, 'x3.safetensors') },
  ])
  t.is(seen.size, 2)
  await merge(scaled(weightedSum(model(a), model(b)), { factor: 3 }), { output: join(dir, 'alone.safetensors') })
  t.true(same(join(dir, 'alone.safetensors'), reports[1].output!))
})

test('a mergeMany that cannot complete leaves no output, and names the job', async (t) => {
  const { dir, a, b } = models()
  const before = readdirSync(dir).sort()
  const recipe = (alpha: number) => weightedSum(model(a), model(b), { alpha })
  // An output onto an input of another job.
  const onInput = await t.throwsAsync(
    mergeMany([
      { recipe: recipe(0.1), output: join(dir, 'fine.safetensors') },
      { recipe: weightedSum(model(a), model(a)), output: b },
    ]),
    { instanceOf: OutputError },
  )
  t.regex(onInput!.message, /^output 2 \(/)
  await t.throwsAsync(
    mergeMany([
      { recipe: recipe(0.1), output: join(dir, 'one.safetensors') },
      { recipe: recipe(0.2), output: join(dir, 'one.safetensors') },
    ]),
    { message: /outputs 1 and 2 are both/ },
  )
  // Cancelled: nothing appears.
  const controller = new AbortController()
  controller.abort()
  await t.throwsAsync(
    mergeMany([{ recipe: recipe(0.1), output: join(dir, 'c.safetensors') }], { signal: controller.signal }),
    {
      instanceOf: AbortError,
    },
  )
  // A progress callback that throws rejects the sweep with its error, and removes the outputs
  // even when they were complete.
  const thrown = mergeMany(
    [0.1, 0.2].map((alpha, i) => ({ recipe: recipe(alpha), output: join(dir, `p${i}.safetensors`) })),
    {
      onProgress: () => {
        throw new Error('stop here')
      },
      progressIntervalMs: 0,
      chunkElements: 64,
      threads: 1,
    },
  )
  await t.throwsAsync(thrown, { message: 'stop here' })
  t.deepEqual(readdirSync(dir).sort(), before)
  // Options each job gives, or that do not exist.
  await t.throwsAsync(
    mergeMany([{ recipe: recipe(0.1), output: join(dir, 'o.safetensors') }], { output: 'x' } as never),
    {
      instanceOf: OptionError,
      message: /unknown option "output"/,
    },
  )
  await t.throwsAsync(mergeMany([{ recipe: recipe(0.1), ouput: 'x' } as never]), { instanceOf: OptionError })
  await t.throwsAsync(mergeMany([]), { instanceOf: OptionError })
})

test('mecha sweep writes one output per value, each what mecha merge writes for that value', (t) => {
  const { dir } = models()
  const recipe = (alpha: string) =>
    `version 0.1.0\nmodel "a.safetensors"\nmodel "b.safetensors"\nmerge "weighted_sum" &0 &1 alpha=${alpha}\n`
  writeFileSync(join(dir, 'r.mecha'), recipe('0.5'))
  const r = mecha(dir, 'sweep', 'r.mecha', '--param', 'alpha=0.1:0.9:0.4', '-o', 'out-{alpha}.safetensors', '--json')
  t.is(r.status, 0, r.stderr)
  const reports = JSON.parse(r.stdout)
  t.deepEqual(
    reports.map((x: { output: string }) => x.output),
    ['out-0.1.safetensors', 'out-0.5.safetensors', 'out-0.9.safetensors'],
  )
  for (const alpha of ['0.1', '0.5', '0.9']) {
    writeFileSync(join(dir, 'one.mecha'), recipe(alpha))
    t.is(mecha(dir, 'merge', 'one.mecha', '-o', 'one.safetensors', '-q').status, 0)
    t.true(same(join(dir, 'one.safetensors'), join(dir, `out-${alpha}.safetensors`)), `alpha ${alpha}`)
    t.regex(inspect(join(dir, `out-${alpha}.safetensors`)).metadata.mecha_recipe, new RegExp(`=${alpha}\\b`))
  }
  // Two parameters: every combination (slerp's alpha, and the list form).
  writeFileSync(join(dir, 's.mecha'), recipe('0.5').replace('weighted_sum', 'slerp'))
  const two = mecha(dir, 'sweep', 's.mecha', '--param', 'alpha=0.25,0.75', '-o', 's-{alpha}.safetensors', '-q')
  t.is(two.status, 0, two.stderr)
  t.true(existsSync(join(dir, 's-0.25.safetensors')) && existsSync(join(dir, 's-0.75.safetensors')))
})

test('mecha sweep refuses what it cannot sweep, before reading anything', (t) => {
  const { dir } = models()
  writeFileSync(
    join(dir, 'r.mecha'),
    'version 0.1.0\nmodel "a.safetensors"\nmodel "b.safetensors"\nmerge "weighted_sum" &0 &1\n',
  )
  const before = readdirSync(dir).sort()
  const cases: [string[], RegExp][] = [
    [['--param', 'beta=0.1:0.9:0.2', '-o', 'o-{beta}.safetensors'], /no merge method in the recipe takes "beta"/],
    [['--param', 'alpha=0.1:0.9:0.2', '-o', 'o.safetensors'], /must hold \{alpha\}/],
    [['--param', 'alpha=0.9:0.1:0.2', '-o', 'o-{alpha}.safetensors'], /step must be positive and stop at least start/],
    [['--param', 'alpha', '-o', 'o-{alpha}.safetensors'], /use <name>=<values>/],
    [['-o', 'o-{alpha}.safetensors'], /sweep needs --param/],
  ]
  for (const [args, message] of cases) {
    const r = mecha(dir, 'sweep', 'r.mecha', ...args)
    t.is(r.status, 2, args.join(' '))
    t.regex(r.stderr, message)
  }
  t.deepEqual(readdirSync(dir).sort(), before)
})
