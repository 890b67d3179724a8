// In-memory models: sd-mecha's `model(state_dict)` and `literal(tensor)`.
import test from 'ava'
import { spawnSync } from 'node:child_process'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'

import {
  RecipeError,
  ShapeError,
  StateDictNode,
  addDifference,
  configs,
  inspect,
  literal,
  merge,
  model,
  plan,
  serialize,
  toFloat32,
  weightedSum,
  type Tensor,
} from '../dist/index.js'
import { f16Bits, tempDir, writeSafetensors } from './helpers.ts'

const f32 = (shape: number[], ...values: number[]): Tensor => ({ dtype: 'F32', shape, data: new Float32Array(values) })

function files() {
  const dir = tempDir()
  const a = join(dir, 'a.safetensors')
  writeSafetensors(a, {
    w: { dtype: 'F32', shape: [2], values: [0, 4] },
    v: { dtype: 'F32', shape: [2, 2], values: [1, 2, 3, 4] },
  })
  return { dir, a }
}

test('model(stateDict) merges with files: objects, Maps and merge results', async (t) => {
  const { a } = files()
  const memory = model({ w: f32([2], 4, 8), v: f32([2, 2], 5, 6, 7, 8) })
  t.true(memory instanceof StateDictNode)
  const out = await merge(weightedSum(model(a), memory, { alpha: 0.25 }), { outputDtype: 'f32' })
  t.deepEqual([...toFloat32(out.get('w')!)], [1, 5])
  t.deepEqual([...toFloat32(out.get('v')!)], [2, 3, 4, 5])

  // a merge result is a state dict: merged again without touching the disk
  const again = await merge(addDifference(model(out), model(a), memory, { alpha: 1 }), { outputDtype: 'f32' })
  t.deepEqual([...toFloat32(again.get('w')!)], [1 + 0 - 4, 5 + 4 - 8])

  // f16 data as raw bits, in a Map
  const half: Tensor = { dtype: 'F16', shape: [2], data: new Uint16Array([f16Bits(2), f16Bits(-2)]) }
  const fromMap = await merge(weightedSum(model(new Map([['w', half]])), model(a)), { outputDtype: 'f32' })
  t.deepEqual([...toFloat32(fromMap.get('w')!)], [1, 1])
})

test('an in-memory model is inferred like a file, and its keys are in the plan', (t) => {
  const keys = configs.keys('sd1-ldm').filter((k) => k.component === 'clip_l')
  const dict: Record<string, Tensor> = {}
  for (const k of keys) dict[k.key] = f32([1], 1)
  const node = model(dict)
  const report = plan(weightedSum(node, node))
  t.is(report.config, 'sd1-ldm')
  t.is(report.inputs.length, 1)
  t.is(report.inputs[0].path, node.label)
  t.regex(node.label, /^<in-memory model \d+>$/)
  t.is(model(dict, { config: 'sd1-ldm' }).config, 'sd1-ldm')
})

test('literal(tensor) gives one tensor to every key; a dict of tensors is per key', async (t) => {
  const dir = tempDir()
  const a = join(dir, 'a.safetensors')
  writeSafetensors(a, {
    w: { dtype: 'F32', shape: [2], values: [0, 4] },
    u: { dtype: 'F32', shape: [2], values: [2, 0] },
  })
  const half = await merge(weightedSum(model(a), literal(f32([2], 2, 2)), { alpha: 0.5 }), { outputDtype: 'f32' })
  t.deepEqual([...toFloat32(half.get('w')!)], [1, 3])
  t.deepEqual([...toFloat32(half.get('u')!)], [2, 1])
  const perKey = await merge(weightedSum(model(a), literal({ w: f32([2], 8, 8) }), { alpha: 0.5 }), {
    outputDtype: 'f32',
  })
  t.deepEqual([...toFloat32(perKey.get('w')!)], [4, 6])
  t.false(perKey.has('u'), 'the literal has no u, so neither has the result')
  t.throws(() => literal({ w: f32([2], 1, 2), alpha: 0.5 } as never), { message: /mixes tensors and other values/ })

  // shapes are not broadcast (torch would): the error names the key and both inputs
  const other = files()
  await t.throwsAsync(merge(weightedSum(model(other.a), literal(f32([2], 2, 2)))), {
    instanceOf: ShapeError,
    message: /shapes differ for key "v": .*a\.safetensors has \[2, 2\] but <in-memory model \d+> has \[2\]/,
  })
})

test('a recipe with in-memory tensors cannot be serialized; its output stores no recipe', async (t) => {
  const { dir, a } = files()
  const recipe = weightedSum(model(a), model({ w: f32([2], 4, 8) }))
  t.throws(() => serialize(recipe), { instanceOf: RecipeError, message: /in-memory model.*cannot record/ })
  const out = join(dir, 'out.safetensors')
  const report = await merge(recipe, { output: out })
  t.is(report.keysWritten, 1)
  t.false('mecha_recipe' in inspect(out).metadata)
  t.regex(report.recipe, /model "<in-memory model \d+>"/)
})

test('bad tensors are refused when the model is built, naming the key', (t) => {
  t.throws(() => model({ w: { dtype: 'F32', shape: [3], data: new Float32Array(2) } }), {
    message: /model: "w" holds 8 bytes, but F32 \[3\] needs 12/,
  })
  t.throws(() => model({ w: { dtype: 'F4', shape: [2], data: new Uint8Array(1) } }), {
    message: /"w" has dtype F4, which in-memory models do not take/,
  })
  t.throws(() => model(new Map()), { message: /the state dict has no tensors/ })
  t.throws(() => model({ w: 3 } as never), {
    message: /model\(\) takes a safetensors path \(a non-empty string\) or a state dict/,
  })
  t.throws(() => model({ w: f32([-1]) }), { message: /dimensions are non-negative integers/ })
})

test('the native copy of an in-memory model is freed when its node is garbage collected', (t) => {
  const entry = fileURLToPath(new URL('../dist/index.js', import.meta.url))
  const addon = fileURLToPath(new URL('../index.js', import.meta.url))
  const script = `
    const { model } = require(${JSON.stringify(entry)})
    const native = require(${JSON.stringify(addon)})
    const tensor = { dtype: 'F32', shape: [1024], data: new Float32Array(1024) }
    const before = native.memoryModelCount()
    let kept = model({ w: tensor })
    for (let i = 0; i < 50; i++) model({ w: tensor })
    const made = native.memoryModelCount() - before
    ;(async () => {
      for (let i = 0; i < 20 && native.memoryModelCount() - before > 1; i++) {
        global.gc()
        await new Promise((r) => setTimeout(r, 10))
      }
      console.log(JSON.stringify({ made, left: native.memoryModelCount() - before, kept: kept.id > 0 }))
    })()`
  const r = spawnSync(process.execPath, ['--expose-gc', '-e', script], { encoding: 'utf8' })
  t.is(r.status, 0, r.stderr)
  t.deepEqual(JSON.parse(r.stdout), { made: 51, left: 1, kept: true })
})
