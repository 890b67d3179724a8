// Reproducible outputs through the API and the CLI: input hashes in the report and the metadata,
// `verify()` / `mecha verify` replaying the recorded recipe, and a changed input named.
import test from 'ava'
import { spawnSync } from 'node:child_process'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'

import {
  OptionError,
  SafetensorsError,
  dropout,
  inspect,
  merge,
  model,
  serialize,
  toFloat32,
  verify,
  weightedSum,
} from '../dist/index.js'
import { qwenTensors, tempDir, writeSafetensors } from './helpers.ts'

const cli = fileURLToPath(new URL('../dist/cli.js', import.meta.url))
const mecha = (...args: string[]) => spawnSync(process.execPath, [cli, ...args], { encoding: 'utf8' })

function models() {
  const dir = tempDir()
  const [a, b, out] = ['a', 'b', 'merged'].map((n) => join(dir, `${n}.safetensors`))
  writeSafetensors(a, qwenTensors(1))
  writeSafetensors(b, qwenTensors(2))
  return { dir, a, b, out }
}

test('a merged file records its engine, options and input hashes, and verify reproduces it', async (t) => {
  const { a, b, out } = models()
  const report = await merge(weightedSum(model(a), model(b), { alpha: 0.3 }), { output: out, outputDtype: 'bf16' })
  t.deepEqual(
    report.inputHashes.map((h) => h.model),
    [a, b],
  )
  for (const h of report.inputHashes) t.regex(h.hash, /^[0-9a-f]{32}$/)
  t.not(report.inputHashes[0].hash, report.inputHashes[1].hash)
  const { metadata } = inspect(out)
  t.regex(metadata.mecha_engine, /^sd-mecha-node \d+\.\d+\.\d+/)
  t.deepEqual(JSON.parse(metadata.mecha_options), {
    merge_dtype: 'float32',
    output_dtype: 'BF16',
    omit_non_finite_inputs: true,
  })
  t.deepEqual(
    JSON.parse(metadata.mecha_inputs),
    report.inputHashes.map((h) => ({ model: h.model, 'xxh3-128': h.hash })),
  )
  // Another thread count or chunk size reads the same bytes: the same hashes.
  const again = await merge(weightedSum(model(a), model(b), { alpha: 0.3 }), {
    output: join(tempDir(), 'again.safetensors'),
    threads: 1,
    chunkElements: 7,
  })
  t.deepEqual(
    again.inputHashes.map((h) => h.hash),
    report.inputHashes.map((h) => h.hash),
  )

  const verified = await verify(out)
  t.true(verified.reproducible, verified.problems.join('; '))
  t.is(verified.keysCompared, report.keysWritten)
  t.deepEqual(verified.differingKeys, [])
  t.true(verified.inputs.every((i) => i.matches && i.recorded === i.found))
  t.is(verified.recordedEngine, metadata.mecha_engine)
})

test('a random merge replays from its recorded seed', async (t) => {
  const { a, b, out } = models()
  const report = await merge(dropout(model(a), model(b), { probability: 0.5, seed: null }), { output: out })
  t.is(report.seeds.length, 1)
  const verified = await verify(out)
  t.true(verified.reproducible, verified.problems.join('; '))
})

test('mecha verify names the input that changed on disk, and exits 1', async (t) => {
  const { a, b, out } = models()
  await merge(weightedSum(model(a), model(b), { alpha: 0.5 }), { output: out })
  const same = mecha('verify', out)
  t.is(same.status, 0, same.stderr)
  t.regex(same.stdout, /reproducible/)
  t.regex(same.stdout, /tensors: 23 of 23 identical/)

  const changed = qwenTensors(2)
  changed['model.norm.weight'].values[0] += 0.25
  writeSafetensors(b, changed)
  const r = mecha('verify', out)
  t.is(r.status, 1, r.stderr)
  t.regex(r.stdout, /NOT reproducible/)
  t.true(r.stdout.includes(`input ${b} (`) && r.stdout.includes('CHANGED'), r.stdout)
  t.true(r.stdout.includes(`input ${b} (${b}) has changed`), r.stdout)
  t.regex(r.stdout, /1 of 23 tensors differ from the merge's output: model\.norm\.weight/)
  const json = JSON.parse(mecha('verify', out, '--json').stdout)
  t.false(json.reproducible)
  t.deepEqual(
    json.inputs.filter((i: { matches: boolean }) => !i.matches).map((i: { model: string }) => i.model),
    [b],
  )
})

test('verify refuses what it cannot replay, with typed errors', async (t) => {
  const { a, b, out } = models()
  await merge(weightedSum(model(a), model(b), { alpha: 0.5 }), { output: out, embedRecipe: 'none' })
  await t.throwsAsync(verify(out), { instanceOf: SafetensorsError, message: /records no recipe/ })
  await t.throwsAsync(verify(a), { instanceOf: SafetensorsError, message: /records no recipe/ })
  await t.throwsAsync(verify(out, { thread: 2 } as never), { instanceOf: OptionError, message: /no option "thread"/ })
  const missing = mecha('verify', join(tempDir(), 'nope.safetensors'))
  t.is(missing.status, 1)
  t.regex(missing.stderr, /nope\.safetensors/)
})

test('a file that records only its recipe (as sd-mecha writes) is compared, its inputs reported unchecked', async (t) => {
  const { a, b, out } = models()
  const recipe = weightedSum(model(a), model(b), { alpha: 0.25 })
  const merged = await merge(recipe, { outputDtype: 'f32' })
  const tensors = Object.fromEntries(
    [...merged].map(([name, tensor]) => [
      name,
      { dtype: 'F32' as const, shape: tensor.shape, values: [...toFloat32(tensor)] },
    ]),
  )
  writeSafetensors(out, tensors, { mecha_recipe: serialize(recipe) })
  const verified = await verify(out)
  t.deepEqual(verified.differingKeys, [])
  t.is(verified.keysCompared, 23)
  t.false(verified.reproducible)
  t.is(verified.problems.length, 1)
  t.regex(verified.problems[0], /records no input hashes/)
  t.true(verified.inputs.every((i) => i.recorded === undefined && i.found !== undefined))
})
