// extractLora() and the extract_* interfaces: the LoRA of a difference with known singular values
// is its rank-r truncation, written in kohya's layout, and baking it back rebuilds the model.
import test from 'ava'
import { join } from 'node:path'

import {
  ConfigError,
  OptionError,
  bakeLoras,
  extractLora,
  merge,
  methods,
  toFloat32,
  type MergedModel,
} from '../dist/index.js'
import { randomValues, tempDir, writeSafetensors } from './helpers.ts'

// Real sdxl-kohya keys and shapes: a linear layer, a convolution and a text-encoder projection.
const LAYERS = [
  { key: 'unet.input_blocks.1.0.emb_layers.1.weight', shape: [320, 1280] },
  { key: 'unet.input_blocks.0.0.weight', shape: [320, 4, 3, 3] },
  { key: 'te1.text_model.encoder.layers.0.self_attn.q_proj.weight', shape: [768, 768] },
]
const SIGMAS = [8, 4, 2, 1]
const stem = (key: string) => `lora_${key.replace(/\.weight$/, '').replaceAll('.', '_')}`
const numel = (shape: number[]) => shape.reduce((a, b) => a * b, 1)

/** `count` orthonormal vectors of length `n` (Gram–Schmidt of deterministic random ones). */
function orthonormal(n: number, count: number, seed: number): Float64Array[] {
  const out: Float64Array[] = []
  for (let k = 0; k < count; k++) {
    const v = Float64Array.from(randomValues(seed + k, n))
    for (const u of out) {
      const dot = u.reduce((s, x, i) => s + x * v[i], 0)
      for (let i = 0; i < n; i++) v[i] -= dot * u[i]
    }
    const norm = Math.hypot(...v)
    out.push(v.map((x) => x / norm))
  }
  return out
}

/** Σ_{i<rank} σ_i·u_i·v_iᵀ for one layer (rows = shape[0], columns = the rest). */
function lowRank(u: Float64Array[], v: Float64Array[], rank: number): Float64Array {
  const [m, n] = [u[0].length, v[0].length]
  const out = new Float64Array(m * n)
  for (let k = 0; k < rank; k++)
    for (let i = 0; i < m; i++) for (let j = 0; j < n; j++) out[i * n + j] += SIGMAS[k] * u[k][i] * v[k][j]
  return out
}

/** A base and a tuned model whose differences have singular values SIGMAS; returns the paths and factors. */
function models() {
  const dir = tempDir()
  const factors = LAYERS.map(({ shape }, l) => {
    const [m, n] = [shape[0], numel(shape) / shape[0]]
    return { u: orthonormal(m, 4, 100 * l + 1), v: orthonormal(n, 4, 100 * l + 50) }
  })
  const base: Record<string, { dtype: 'F32'; shape: number[]; values: number[] }> = {}
  const tuned: typeof base = {}
  LAYERS.forEach(({ key, shape }, l) => {
    const b = randomValues(l + 7, numel(shape)).map(Math.fround)
    const d = lowRank(factors[l].u, factors[l].v, 4)
    base[key] = { dtype: 'F32', shape, values: b }
    // the delta is stored exactly: tuned − base in f64 is d up to one f32 rounding of tuned
    tuned[key] = { dtype: 'F32', shape, values: b.map((x, i) => Math.fround(x + d[i])) }
  })
  const paths = { base: join(dir, 'base.safetensors'), tuned: join(dir, 'tuned.safetensors'), dir }
  writeSafetensors(paths.base, base)
  writeSafetensors(paths.tuned, tuned)
  return { ...paths, factors, baseValues: base, tunedValues: tuned }
}

const values = (m: MergedModel, key: string) => {
  const t = m.get(key)
  if (!t) throw new Error(`no key ${key}; have ${[...m.keys()].join(', ')}`)
  return toFloat32(t)
}

/** max |a − b| over two equal-length arrays. */
const maxDiff = (a: ArrayLike<number>, b: ArrayLike<number>) => {
  let worst = 0
  for (let i = 0; i < a.length; i++) worst = Math.max(worst, Math.abs(a[i] - b[i]))
  return worst
}

function product(up: Float32Array, down: Float32Array, m: number, r: number, n: number): Float64Array {
  const out = new Float64Array(m * n)
  for (let i = 0; i < m; i++)
    for (let k = 0; k < r; k++) for (let j = 0; j < n; j++) out[i * n + j] += up[i * r + k] * down[k * n + j]
  return out
}

test('extractLora writes each layer as the rank-r truncation of its difference, in kohya keys and shapes', async (t) => {
  const m = models()
  const lora = await merge(extractLora(m.base, m.tuned, { rank: 2, approximate: false }), { outputDtype: 'f32' })
  t.deepEqual(
    [...lora.keys()].sort(),
    LAYERS.flatMap(({ key }) => ['alpha', 'lora_down.weight', 'lora_up.weight'].map((s) => `${stem(key)}.${s}`)).sort(),
  )
  LAYERS.forEach(({ key, shape }, l) => {
    const [rows, cols] = [shape[0], numel(shape) / shape[0]]
    const up = lora.get(`${stem(key)}.lora_up.weight`)!
    const down = lora.get(`${stem(key)}.lora_down.weight`)!
    // kohya's layout: a convolution's up keeps its kernel dimensions as 1s (LoCon)
    t.deepEqual(up.shape, shape.length === 4 ? [rows, 2, 1, 1] : [rows, 2], key)
    t.deepEqual(down.shape, [2, ...shape.slice(1)], key)
    t.deepEqual(Array.from(values(lora, `${stem(key)}.alpha`)), [2], 'alpha = rank: the bake scales by 1')
    const approx = product(toFloat32(up), toFloat32(down), rows, 2, cols)
    const want = lowRank(m.factors[l].u, m.factors[l].v, 2)
    t.true(maxDiff(approx, want) < 2e-5, `${key}: up·down is the rank-2 truncation (${maxDiff(approx, want)})`)
    // the singular values are split evenly: each up column has norm √σ
    const u = toFloat32(up)
    for (let k = 0; k < 2; k++) {
      const norm = Math.hypot(...Array.from({ length: rows }, (_, i) => u[i * 2 + k]))
      t.true(Math.abs(norm - Math.sqrt(SIGMAS[k])) < 1e-4, `${key}: column ${k} norm ${norm}`)
    }
  })
})

test('baking an extracted LoRA back into the base rebuilds the tuned model up to the rank', async (t) => {
  const m = models()
  const file = join(m.dir, 'lora.safetensors')
  await merge(extractLora(m.base, m.tuned, { rank: 4, approximate: false }), { output: file, outputDtype: 'f32' })
  const baked = await merge(bakeLoras(m.base, [file]), { outputDtype: 'f32' })
  for (const { key } of LAYERS) {
    const d = maxDiff(values(baked, key), m.tunedValues[key].values)
    t.true(d < 5e-5, `${key}: rank 4 holds the whole difference (${d})`)
  }
  // at rank 1 the bake gives base + σ₁·u₁·v₁ᵀ
  const file1 = join(m.dir, 'lora1.safetensors')
  await merge(extractLora(m.base, m.tuned, { rank: 1, approximate: false }), { output: file1, outputDtype: 'f32' })
  const baked1 = await merge(bakeLoras(m.base, [file1]), { outputDtype: 'f32' })
  LAYERS.forEach(({ key }, l) => {
    const want = lowRank(m.factors[l].u, m.factors[l].v, 1).map((x, i) => x + m.baseValues[key].values[i])
    t.true(maxDiff(values(baked1, key), want) < 5e-5, key)
  })
})

test('the randomised SVD is exact for a difference of lower rank, repeatable by seed, and chooses a seed when none is given', async (t) => {
  const m = models()
  const run = (seed?: number) =>
    merge(extractLora(m.base, m.tuned, { rank: 4, seed }), { outputDtype: 'f32' }).then((lora) => lora)
  const [a, b, chosen] = await Promise.all([run(7), run(7), run(undefined)])
  LAYERS.forEach(({ key, shape }, l) => {
    const [rows, cols] = [shape[0], numel(shape) / shape[0]]
    const up = values(a, `${stem(key)}.lora_up.weight`)
    t.deepEqual(up, values(b, `${stem(key)}.lora_up.weight`), 'same seed, same bytes')
    const approx = product(up, values(a, `${stem(key)}.lora_down.weight`), rows, 4, cols)
    t.true(maxDiff(approx, lowRank(m.factors[l].u, m.factors[l].v, 4)) < 5e-5, key)
  })
  t.is(chosen.report.seeds.length, 1)
  t.is(chosen.report.seeds[0].param, 'approximate_basis_seed')
})

test('a LoKr extraction is the nearest Kronecker product, which the bake rebuilds exactly', async (t) => {
  const m = models()
  const [{ key, shape }] = LAYERS
  // the factor shapes depend on the layer's shape and the ratio only
  const probe = await merge(extractLora(m.base, m.tuned, { algorithm: 'lokr' }), { outputDtype: 'f32' })
  const w1 = probe.get(`${stem(key)}.lokr_w1`)!
  const w2 = probe.get(`${stem(key)}.lokr_w2`)!
  const [[m1, n1], [m2, n2]] = [w1.shape, w2.shape]
  t.is(m1 * m2, shape[0])
  t.is(n1 * n2, shape[1])
  t.false(probe.has(`${stem(key)}.alpha`), 'LoKr halves carry no alpha')
  // tuned = base + a ⊗ b
  const a = randomValues(3, m1 * n1)
  const b = randomValues(4, m2 * n2)
  const base = m.baseValues[key].values
  const tuned = base.map((x, idx) => {
    const [i, j] = [Math.floor(idx / shape[1]), idx % shape[1]]
    return Math.fround(x + a[Math.floor(i / m2) * n1 + Math.floor(j / n2)] * b[(i % m2) * n2 + (j % n2)])
  })
  const dir = tempDir()
  const [basePath, tunedPath, file] = ['base', 'tuned', 'lokr'].map((n) => join(dir, `${n}.safetensors`))
  writeSafetensors(basePath, { [key]: { dtype: 'F32', shape, values: base } })
  writeSafetensors(tunedPath, { [key]: { dtype: 'F32', shape, values: tuned } })
  await merge(extractLora(basePath, tunedPath, { algorithm: 'lokr', naming: 'lycoris' }), {
    output: file,
    outputDtype: 'f32',
  })
  const baked = await merge(bakeLoras(basePath, [file]), { outputDtype: 'f32' })
  t.true(maxDiff(values(baked, key), tuned) < 1e-5)
})

test('rankRatio gives each layer round(min(rows, columns) · ratio) as its rank, leaving out layers it rounds to 0', async (t) => {
  const m = models()
  const lora = await merge(extractLora(m.base, m.tuned, { rankRatio: 0.01, approximate: false }), {
    outputDtype: 'f32',
  })
  // [320, 1280]: round(3.2) = 3; [768, 768]: round(7.68) = 8; the conv, [320, 4·3·3]: round(0.36) = 0
  const [linear, conv, te] = LAYERS.map(({ key }) => stem(key))
  t.deepEqual(lora.get(`${linear}.lora_up.weight`)?.shape, [320, 3])
  t.deepEqual(Array.from(values(lora, `${linear}.alpha`)), [3])
  t.deepEqual(lora.get(`${te}.lora_down.weight`)?.shape, [8, 768])
  t.false(lora.has(`${conv}.lora_up.weight`))
  t.is(lora.size, 6)
  t.throws(() => extractLora(m.base, m.tuned, { rank: 4, rankRatio: 0.5 }), {
    instanceOf: OptionError,
    message: 'extractLora: give rank or rankRatio, not both',
  })
})

test('extractLora refuses bad options with an OptionError, and models without a kohya layout with a ConfigError', (t) => {
  const cases: [() => unknown, RegExp][] = [
    [
      () => extractLora('a.safetensors', 'b.safetensors', { rank: 0 }),
      /^extractLora: rank must be an integer ≥ 1, got 0$/,
    ],
    [() => extractLora('a.safetensors', 'b.safetensors', { rank: 2.5 }), /rank must be an integer/],
    [
      () => extractLora('a.safetensors', 'b.safetensors', { algorithm: 'loha' as 'lora' }),
      /^extractLora: algorithm must be "lora" or "lokr", got "loha"$/,
    ],
    [
      () => extractLora('a.safetensors', 'b.safetensors', { rnak: 4 } as object),
      /unknown option "rnak"; did you mean "rank"\?/,
    ],
    [() => extractLora('a.safetensors', 'b.safetensors', { config: 'sdxl-sgm' }), /config must be one of sdxl-kohya/],
    [
      () => extractLora('a.safetensors', 'b.safetensors', { kroneckerRatio: 2 }),
      /kroneckerRatio must be a number from 0 to 1/,
    ],
    [() => extractLora('', 'b.safetensors'), /^extractLora: base must be a safetensors path/],
    [
      () => extractLora('a.safetensors', 'b.safetensors', { rankRatio: -0.1 }),
      /rankRatio must be a number from 0 to 1/,
    ],
  ]
  for (const [call, message] of cases) t.regex(t.throws(call, { instanceOf: OptionError })!.message, message)
  const dir = tempDir()
  const other = join(dir, 'other.safetensors')
  writeSafetensors(other, { 'some.weight': { dtype: 'F32', shape: [2, 2], values: [1, 2, 3, 4] } })
  const error = t.throws(() => extractLora(other, other), { instanceOf: ConfigError })
  t.regex(error!.message, /no kohya layout/)
})

test('the extract interfaces are listed with their implementations, one per LoRA config', (t) => {
  const all = methods.list()
  const extract = all.find((m) => m.id === 'extract_kohya_lora')!
  t.true(extract.isInterface)
  t.deepEqual(
    extract.params.map((p) => p.name),
    ['base', 'rank', 'use_approximate_basis', 'approximate_basis_iters', 'approximate_basis_seed'],
  )
  const implementations = all.filter((m) => m.implements === 'extract_kohya_lora').map((m) => m.id)
  t.deepEqual(implementations.sort(), [
    "extract_lora_'sd1-kohya_kohya_lora'",
    "extract_lora_'sdxl-kohya_but_diffusers_kohya_lora'",
    "extract_lora_'sdxl-kohya_kohya_lora'",
  ])
})
