import test from 'ava'
import { join } from 'node:path'

import {
  addDifference,
  cast,
  fallback,
  merge,
  model,
  nAverage,
  subtract,
  toFloat32,
  weightedSum,
  type RecipeInput,
} from '../dist/index.js'
import { randomValues, stored, tempDir, writeSafetensors, type Dtype } from './helpers.ts'

const SHAPE = [33, 257] // several chunks with the small chunk size below, and unaligned tails
const N = SHAPE[0] * SHAPE[1]

interface Inputs {
  dir: string
  paths: Record<'a' | 'b' | 'c', string>
  /** The values as stored in the files. */
  v: Record<'a' | 'b' | 'c', number[]>
}

function inputs(dtype: Dtype): Inputs {
  const dir = tempDir()
  const paths = { a: join(dir, 'a.safetensors'), b: join(dir, 'b.safetensors'), c: join(dir, 'c.safetensors') }
  const v = {} as Inputs['v']
  ;(['a', 'b', 'c'] as const).forEach((name, i) => {
    const values = randomValues(i + 7, N)
    v[name] = values.map((x) => stored(dtype, x))
    writeSafetensors(paths[name], {
      'unet.weight': { dtype, shape: SHAPE, values },
      position_ids: { dtype: 'I64', shape: [1, 77], values: Array.from({ length: 77 }, (_, k) => k) },
    })
  })
  return { dir, paths, v }
}

const cases: {
  name: string
  recipe: (m: Record<'a' | 'b' | 'c', ReturnType<typeof model>>) => RecipeInput
  expected: (a: number, b: number, c: number) => number
  strictMergeSpace?: null
}[] = [
  { name: 'weighted_sum', recipe: (m) => weightedSum(m.a, m.b, { alpha: 0.3 }), expected: (a, b) => a + 0.3 * (b - a) },
  {
    name: 'add_difference of subtract',
    recipe: (m) => addDifference(m.a, subtract(m.b, m.c), { alpha: 0.7 }),
    expected: (a, b, c) => a + 0.7 * (b - c),
  },
  { name: 'subtract (delta result)', recipe: (m) => m.a.sub(m.b), expected: (a, b) => a - b, strictMergeSpace: null },
  {
    name: 'scale via mul',
    recipe: (m) => m.a.sub(m.c).mul(0.25),
    expected: (a, _b, c) => 0.25 * (a - c),
    strictMergeSpace: null,
  },
  { name: 'n_average', recipe: (m) => nAverage([m.a, m.b, m.c]), expected: (a, b, c) => (a + b + c) / 3 },
  { name: 'add operator', recipe: (m) => m.a.add(m.b.sub(m.c)), expected: (a, b, c) => a + (b - c) },
]

for (const dtype of ['F16', 'BF16', 'F32'] as const) {
  const io = inputs(dtype)
  const nodes = { a: model(io.paths.a), b: model(io.paths.b), c: model(io.paths.c) }
  for (const c of cases) {
    test(`${c.name} equals a hand computation for ${dtype} inputs`, async (t) => {
      const result = await merge(c.recipe(nodes), {
        outputDtype: 'f32',
        strictMergeSpace: c.strictMergeSpace,
        chunkElements: 1000,
      })
      const w = result.get('unet.weight')!
      t.is(w.dtype, 'F32')
      t.deepEqual(w.shape, SHAPE)
      const got = toFloat32(w)
      let worst = 0
      for (let i = 0; i < N; i++) {
        const want = c.expected(io.v.a[i], io.v.b[i], io.v.c[i])
        worst = Math.max(worst, Math.abs(got[i] - want))
      }
      t.true(worst < 2e-6, `max abs error ${worst}`)
      // Integer tensors keep their dtype; the same math applies to them.
      const ids = result.get('position_ids')!
      t.is(ids.dtype, 'I64')
      const wantIds = Array.from({ length: 77 }, (_, k) => Math.round(c.expected(k, k, k)))
      t.deepEqual(Array.from(ids.data as BigInt64Array, Number), wantIds)
    })
  }

  test(`default output is f16, rounded from the exact result, for ${dtype} inputs`, async (t) => {
    const result = await merge(weightedSum(nodes.a, nodes.b, { alpha: 0.6 }))
    const w = result.get('unet.weight')!
    t.is(w.dtype, 'F16')
    const got = toFloat32(w)
    for (let i = 0; i < N; i += 7) {
      const exact = io.v.a[i] + 0.6 * (io.v.b[i] - io.v.a[i])
      t.true(Math.abs(got[i] - stored('F16', exact)) <= Math.abs(exact) * 2 ** -10, `element ${i}`)
    }
  })

  test(`cast and fallback for ${dtype} inputs`, async (t) => {
    const partial = join(io.dir, 'partial.safetensors')
    writeSafetensors(partial, { 'other.bias': { dtype: 'F32', shape: [3], values: [1, 2, 3] } })
    const result = await merge(cast(fallback(model(partial), nodes.a), { dtype: 'bfloat16' }), { outputDtype: 'f32' })
    t.deepEqual(Array.from(toFloat32(result.get('other.bias')!)), [1, 2, 3])
    const got = toFloat32(result.get('unet.weight')!)
    for (let i = 0; i < N; i += 5) t.is(got[i], stored('BF16', io.v.a[i]))
  })
}

test('f64 merge precision and bf16 output', async (t) => {
  const io = inputs('F32')
  const result = await merge(weightedSum(model(io.paths.a), model(io.paths.b), { alpha: 0.3 }), {
    mergeDtype: 'f64',
    outputDtype: 'bf16',
  })
  const w = result.get('unet.weight')!
  t.is(w.dtype, 'BF16')
  const got = toFloat32(w)
  for (let i = 0; i < N; i += 11) t.is(got[i], stored('BF16', io.v.a[i] + 0.3 * (io.v.b[i] - io.v.a[i])))
})

test('the same recipe gives bit-identical files for any thread count', async (t) => {
  const io = inputs('F16')
  const recipe = addDifference(
    weightedSum(model(io.paths.a), model(io.paths.b), { alpha: 0.45 }),
    model(io.paths.c).sub(model(io.paths.a)),
  )
  const { readFileSync } = await import('node:fs')
  const outputs: Buffer[] = []
  for (const threads of [1, 2, 4]) {
    const output = join(io.dir, `out-${threads}.safetensors`)
    await merge(recipe, { output, threads, chunkElements: 512 + threads })
    outputs.push(readFileSync(output))
  }
  t.true(outputs[0].equals(outputs[1]) && outputs[1].equals(outputs[2]))
})

test('output dtypes accept safetensors and torch names, fp8 included', async (t) => {
  const io = inputs('F32')
  const recipe = weightedSum(model(io.paths.a), model(io.paths.b), { alpha: 0.5 })
  for (const [name, dtype] of [
    ['f8_e4m3', 'F8_E4M3'],
    ['float8_e5m2', 'F8_E5M2'],
    ['bfloat16', 'BF16'],
    ['float16', 'F16'],
    ['float64', 'F64'],
  ] as const) {
    const result = await merge(recipe, { outputDtype: name })
    const w = result.get('unet.weight')!
    t.is(w.dtype, dtype, name)
    t.is(w.data.byteLength, N * { F8_E4M3: 1, F8_E5M2: 1, BF16: 2, F16: 2, F64: 8 }[dtype])
  }
  // fp8 values are the nearest representable ones (checked on exact powers of two).
  const dir = tempDir()
  const p = join(dir, 'pow2.safetensors')
  writeSafetensors(p, { w: { dtype: 'F32', shape: [4], values: [1, 0.5, -2, 0.25] } })
  const fp8 = await merge(cast(model(p), { dtype: 'float32' }), { outputDtype: 'f8_e4m3' })
  t.deepEqual(Array.from(fp8.get('w')!.data as Uint8Array), [0x38, 0x30, 0xc0, 0x28])
})
