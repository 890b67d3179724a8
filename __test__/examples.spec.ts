// Runs every file in examples/ as a user would (`node --import tsx examples/…`) on small
// generated models with real key layouts, and checks the values it prints or writes. A file in
// examples/ without a check below fails the suite.
import test, { type ExecutionContext } from 'ava'
import { execFile } from 'node:child_process'
import { existsSync, mkdirSync, readdirSync, readFileSync, statSync } from 'node:fs'
import { join, relative } from 'node:path'
import { promisify } from 'node:util'

import { configs, merge, model, toFloat32, writeRandomModel } from '../dist/index.js'
import {
  bf16Bits,
  bf16Value,
  f16Value,
  qwenTensors,
  randomValues,
  stored,
  tempDir,
  writeCheckpoint,
  writeSafetensors,
  type TestTensor,
} from './helpers.ts'

const root = join(import.meta.dirname, '..')
const examplesDir = join(root, 'examples')

function listExamples(dir: string): string[] {
  return readdirSync(dir).flatMap((name) => {
    const path = join(dir, name)
    if (statSync(path).isDirectory()) return listExamples(path)
    return name.endsWith('.mts') ? [relative(examplesDir, path)] : []
  })
}

// ---------------------------------------------------------------------------------------------
// Running examples: a few at a time (2 cores), from the repository root so `--import tsx` resolves.

const run = promisify(execFile)
let active = 0
const waiting: (() => void)[] = []
async function example(file: string, ...args: string[]): Promise<{ stdout: string; lines: Summary[] }> {
  while (active >= 3) await new Promise<void>((resolve) => waiting.push(resolve))
  active++
  try {
    const { stdout } = await run(process.execPath, ['--import', 'tsx', join(examplesDir, file), ...args], {
      cwd: root,
      maxBuffer: 64 << 20,
    })
    const lines = stdout
      .split('\n')
      .filter((l) => l.startsWith('{"key"'))
      .map((l): Summary => JSON.parse(l))
    return { stdout, lines }
  } finally {
    active--
    waiting.shift()?.()
  }
}

/** What the in-memory examples print for each `--show` key. */
interface Summary {
  key: string
  dtype: string
  shape: number[]
  mean: number
  rms: number
  first: number[]
}

// ---------------------------------------------------------------------------------------------
// Small models: a config's key names, every dimension capped at 3, known f32 values.

type Values = Map<string, number[]>

function layout(config: string, components: string[]) {
  return configs
    .keys(config)
    .filter((k) => components.includes(k.component) && (!k.optional || k.key.endsWith('position_ids')))
    .map((k) => ({ key: k.key, integer: k.dtype === 'I64', shape: (k.shape ?? []).map((d) => Math.min(d, 3)) }))
}
const sd1Layout = layout('sd1-ldm', ['clip_l', 'vae', 'diffuser'])
const sdxlLayout = layout('sdxl-sgm', ['clip_l', 'clip_g', 'vae', 'diffuser'])

const dir = tempDir()
function tinyModel(name: string, keys: typeof sd1Layout, seed: number, drop: string[] = []) {
  const path = join(dir, name)
  const tensors: Record<string, TestTensor> = {}
  const values: Values = new Map()
  keys.forEach(({ key, integer, shape }, i) => {
    if (drop.includes(key)) return
    const n = shape.reduce((a, b) => a * b, 1)
    const v = integer ? Array.from({ length: n }, (_, j) => j) : randomValues(seed * 7919 + i, n).map(Math.fround)
    tensors[key] = { dtype: integer ? 'I64' : 'F32', shape, values: v }
    values.set(key, v)
  })
  writeSafetensors(path, tensors)
  return { path, values }
}

const sd1 = Array.from({ length: 8 }, (_, i) => tinyModel(`sd1-${i}.safetensors`, sd1Layout, i + 1))
const [A, B, C] = sd1
const sdxl = Array.from({ length: 3 }, (_, i) => tinyModel(`sdxl-${i}.safetensors`, sdxlLayout, 100 + i))

/** Keys to look at: 2-D and 1-D keys of each component (≤ 9 values, so `first` holds them all). */
function pickKeys(keys: typeof sd1Layout) {
  const find = (prefix: string, dims: number) =>
    keys.find((k) => k.key.startsWith(prefix) && k.shape.length === dims && !k.integer)!.key
  return {
    unet2d: find('model.diffusion_model.', 2),
    unet1d: find('model.diffusion_model.', 1),
    vae1d: find('first_stage_model.', 1),
    position: keys.find((k) => k.integer)!.key,
  }
}
const k1 = {
  ...pickKeys(sd1Layout),
  clip2d: sd1Layout.find((k) => k.key.startsWith('cond_stage') && k.shape.length === 2)!.key,
}
const kx = {
  ...pickKeys(sdxlLayout),
  clipG2d: sdxlLayout.find((k) => k.key.startsWith('conditioner.embedders.1.') && k.shape.length === 2)!.key,
}
const floatKeys = (keys: typeof sd1Layout) => keys.filter((k) => !k.integer).map((k) => k.key)

// ---------------------------------------------------------------------------------------------
// LoRAs: an SD1 base whose two LoRA'd layers have their real shapes (a LoRA's difference takes the
// shape of the config's key), and kohya LoRA files (sd1-kohya_kohya_lora) for them.

/** Two layers of sd1-ldm and the stems a kohya LoRA names them by (sd1-kohya's key, `.` → `_`). */
const loraLayers = {
  te: {
    stem: 'lora_te_text_model_encoder_layers_0_self_attn_q_proj',
    key: 'cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight',
    shape: [768, 768],
  },
  unet: {
    stem: 'lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q',
    key: 'model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight',
    shape: [320, 320],
  },
}
const loraBaseLayout = sd1Layout.map((k) => {
  const layer = Object.values(loraLayers).find((l) => l.key === k.key)
  return layer ? { ...k, shape: layer.shape } : k
})
const loraBase = tinyModel('lora-base.safetensors', loraBaseLayout, 60)

/**
 * A kohya LoRA file with `rank` factors and an alpha for each layer given, and the difference
 * sd-mecha bakes from it, per base key: alpha / rank · up @ down, in float64.
 */
function kohyaLora(
  name: string,
  layers: { layer: keyof typeof loraLayers; rank: number; alpha: number }[],
  seed: number,
) {
  const tensors: Record<string, TestTensor> = {}
  const deltas = new Map<string, Float64Array>()
  layers.forEach(({ layer, rank, alpha }, i) => {
    const { stem, key, shape } = loraLayers[layer]
    const [rows, cols] = shape
    const up = randomValues(seed * 31 + 2 * i, rows * rank).map(Math.fround)
    const down = randomValues(seed * 31 + 2 * i + 1, rank * cols).map(Math.fround)
    tensors[`${stem}.lora_up.weight`] = { dtype: 'F32', shape: [rows, rank], values: up }
    tensors[`${stem}.lora_down.weight`] = { dtype: 'F32', shape: [rank, cols], values: down }
    tensors[`${stem}.alpha`] = { dtype: 'F32', shape: [], values: [alpha] }
    const delta = new Float64Array(rows * cols)
    for (let r = 0; r < rows; r++)
      for (let k = 0; k < rank; k++)
        for (let c = 0; c < cols; c++) delta[r * cols + c] += (alpha / rank) * up[r * rank + k] * down[k * cols + c]
    deltas.set(key, delta)
  })
  const path = join(dir, name)
  writeSafetensors(path, tensors)
  return { path, deltas, tensorCount: Object.keys(tensors).length }
}
const loraA = kohyaLora(
  'lora-a.safetensors',
  [
    { layer: 'te', rank: 4, alpha: 2 },
    { layer: 'unet', rank: 2, alpha: 1 },
  ],
  1,
)
const loraB = kohyaLora('lora-b.safetensors', [{ layer: 'unet', rank: 2, alpha: 2 }], 2)

/** The base's values of `key` plus each LoRA's difference times its alpha. */
function baked(key: string, ...loras: [typeof loraA, number][]): number[] {
  return loraBase.values
    .get(key)!
    .map((x, i) => loras.reduce((s, [l, alpha]) => s + alpha * (l.deltas.get(key)?.[i] ?? 0), x))
}

// ---------------------------------------------------------------------------------------------
// Reading outputs without the library, and comparing values.

interface FileTensor {
  dtype: string
  shape: number[]
  values: number[]
}
function readSafetensors(path: string): { tensors: Map<string, FileTensor>; metadata: Record<string, string> } {
  const buf = readFileSync(path)
  const n = Number(buf.readBigUInt64LE(0))
  type Entry = { dtype: string; shape: number[]; data_offsets: [number, number] }
  const { __metadata__: metadata = {}, ...header }: { __metadata__?: Record<string, string> } & Record<string, Entry> =
    JSON.parse(buf.subarray(8, 8 + n).toString())
  const tensors = new Map<string, FileTensor>()
  for (const [name, info] of Object.entries<Entry>(header)) {
    const data = buf.subarray(8 + n + info.data_offsets[0], 8 + n + info.data_offsets[1])
    const values: number[] = []
    if (info.dtype === 'F16') for (let i = 0; i < data.length; i += 2) values.push(f16Value(data.readUInt16LE(i)))
    else if (info.dtype === 'F32') for (let i = 0; i < data.length; i += 4) values.push(data.readFloatLE(i))
    else if (info.dtype === 'I64') for (let i = 0; i < data.length; i += 8) values.push(Number(data.readBigInt64LE(i)))
    else throw new Error(`test reader: ${info.dtype}`)
    tensors.set(name, { dtype: info.dtype, shape: info.shape, values })
  }
  return { tensors, metadata }
}

/** Equal within what an f16 output allows. */
function close(t: ExecutionContext, actual: readonly number[], expected: readonly number[], what: string, tol = 2e-3) {
  t.is(actual.length, expected.length, `${what}: length`)
  const bad = expected.findIndex((e, i) => !(Math.abs(actual[i] - e) <= tol * Math.max(1, Math.abs(e))))
  t.is(bad, -1, `${what}: element ${bad} is ${actual[bad]}, expected ${expected[bad]}`)
}

const lerp = (a: number[], b: number[], alpha: number) => a.map((x, i) => x + alpha * (b[i] - x))
const sub = (a: number[], b: number[]) => a.map((x, i) => x - b[i])
const dot = (a: number[], b: number[]) => a.reduce((s, x, i) => s + x * b[i], 0)
/** sd-mecha's perpendicular_component(a, b): b minus its projection on a. */
const perpendicular = (a: number[], b: number[]) => {
  const k = dot(a, b) / dot(a, a)
  return b.map((x, i) => x - k * a[i])
}
const addPerp = (a: number[], b: number[], c: number[]) => {
  const p = perpendicular(sub(a, c), sub(b, c))
  return a.map((x, i) => x + p[i])
}
const f16 = (v: number[]) => v.map((x) => stored('F16', x))
const show = (keys: object) => Object.values(keys).flatMap((k: string) => ['--show', k])
const byKey = (lines: Summary[]) => new Map(lines.map((l) => [l.key, l]))
const out = (name: string) => join(dir, name)

// ---------------------------------------------------------------------------------------------

type Check = (t: ExecutionContext) => Promise<void>

/** A Qwen2-layout checkpoint of `shards` files (helpers' `qwenTensors`), and its values. */
function qwenCheckpoint(name: string, seed: number, shards: number) {
  const folder = join(dir, name)
  const tensors = qwenTensors(seed)
  writeCheckpoint(folder, tensors, shards)
  const values = new Map(Object.entries(tensors).map(([k, t]) => [k, t.values]))
  return { folder, values, count: values.size }
}

const checks: Record<string, Check> = {
  'readme.mts': async (t) => {
    const folder = join(dir, 'readme')
    mkdirSync(folder, { recursive: true })
    const [base, style, detail] = ['base', 'style', 'detail'].map(
      (name, i) => tinyModel(`readme/${name}.safetensors`, sd1Layout, 40 + i).values,
    )
    const { stdout } = await example('readme.mts', folder)
    const result = JSON.parse(stdout.trim().split('\n').at(-1)!)
    // addDifference(weightedSum(base, style, 0.4), detail, base, 0.5)
    const expected = (key: string) =>
      lerp(base.get(key)!, style.get(key)!, 0.4).map((x, i) => x + 0.5 * (detail.get(key)![i] - base.get(key)![i]))
    const merged = readSafetensors(join(folder, 'merged.safetensors'))
    for (const key of floatKeys(sd1Layout)) close(t, merged.tensors.get(key)!.values, expected(key), key)
    t.is(result.written, sd1Layout.length)
    t.is(result.inMemory, sd1Layout.length)
    const key = 'model.diffusion_model.out.2.bias'
    const clamp = (x: number) => Math.max(-1, Math.min(1, x))
    close(t, result.clamped, lerp(base.get(key)!, style.get(key)!, 0.5).map(clamp), 'clampedMix', 1e-6)
    t.deepEqual(result.fromMemory, merged.tensors.get(key)!.values, 'the in-memory result merged again')
    t.is(result.methodListed, 'clamped_mix')
    t.is(result.config, 'readme-pair')
    t.true(existsSync(join(folder, 'mbw.safetensors')))
  },
  'sd-mecha/basic_merge.mts': async (t) => {
    const r = await example('sd-mecha/basic_merge.mts', A.path, B.path, '--out', out('basic.safetensors'))
    t.regex(r.stdout, new RegExp(`^wrote ${sd1Layout.length} keys to `))
    const { tensors, metadata } = readSafetensors(out('basic.safetensors'))
    t.is(tensors.size, sd1Layout.length)
    for (const key of floatKeys(sd1Layout))
      close(t, tensors.get(key)!.values, lerp(A.values.get(key)!, B.values.get(key)!, 0.5), key)
    t.is(tensors.get(k1.position)!.dtype, 'I64')
    t.deepEqual(tensors.get(k1.position)!.values, A.values.get(k1.position))
    t.regex(metadata.mecha_recipe, /merge "weighted_sum" &0 &1 &\d+/)
  },

  'sd-mecha/in_memory_merge.mts': async (t) => {
    const r = await example('sd-mecha/in_memory_merge.mts', A.path, B.path, ...show(k1))
    t.regex(r.stdout, new RegExp(`^${sd1Layout.length} tensors in memory, 0 keys skipped`))
    const lines = byKey(r.lines)
    for (const key of [k1.unet2d, k1.unet1d, k1.vae1d, k1.clip2d]) {
      t.is(lines.get(key)!.dtype, 'F16')
      close(t, lines.get(key)!.first, lerp(A.values.get(key)!, B.values.get(key)!, 0.5), key)
    }
    t.is(lines.get(k1.position)!.dtype, 'I64')
  },

  'sd-mecha/add_perpendicular.mts': async (t) => {
    await example('sd-mecha/add_perpendicular.mts', A.path, B.path, C.path, '--out', out('perp.safetensors'))
    const { tensors } = readSafetensors(out('perp.safetensors'))
    t.is(tensors.size, sd1Layout.length)
    for (const key of floatKeys(sd1Layout)) {
      const [a, b, c] = [A, B, C].map((m) => m.values.get(key)!)
      close(t, tensors.get(key)!.values, addPerp(a, b, c), key)
    }
  },

  'sd-mecha/binomial_dropout_merge.mts': async (t) => {
    const keys = { unet2d: k1.unet2d, clip2d: k1.clip2d, vae1d: k1.vae1d, unet1d: k1.unet1d }
    const r = await example('sd-mecha/binomial_dropout_merge.mts', C.path, A.path, B.path, ...show(keys))
    t.regex(r.stdout, new RegExp(`^${sd1Layout.length} tensors in memory`))
    // Each element is the base plus alpha / (1 − p) = 5 times: nothing, one model's delta, or
    // the mean of both deltas (where both masks keep it).
    let unchanged = 0
    let total = 0
    for (const line of r.lines) {
      const [base, a, b] = [C, A, B].map((m) => m.values.get(line.key)!)
      line.first.forEach((x, i) => {
        const candidates = [0, a[i] - base[i], b[i] - base[i], (a[i] + b[i]) / 2 - base[i]].map((d) =>
          stored('F16', base[i] + 5 * d),
        )
        t.true(
          candidates.some((c) => Math.abs(c - x) <= 2e-3 * Math.max(1, Math.abs(c))),
          `${line.key}[${i}] = ${x}`,
        )
        total++
        if (Math.abs(x - stored('F16', base[i])) < 1e-6) unchanged++
      })
    }
    // P(both masks drop an element) = 0.81
    t.true(unchanged > 0 && unchanged < total, `${unchanged} of ${total} unchanged`)
    const again = await example('sd-mecha/binomial_dropout_merge.mts', C.path, A.path, B.path, ...show(keys))
    t.deepEqual(again.lines, r.lines, 'seed 0 reproduces the merge')
  },

  'sd-mecha/custom_merge_method.mts': async (t) => {
    const r = await example('sd-mecha/custom_merge_method.mts', A.path, B.path, '--out', out('custom.safetensors'))
    t.regex(r.stdout, new RegExp(`^wrote ${sd1Layout.length} keys to `))
    t.regex(r.stdout, /\["a","b","alpha","beta"\]/)
    t.regex(r.stdout, /merge "custom_sum" &0 &1 &\d+ beta=&\d+/)
    // out = 0.9·(0.4a + 0.6b) + 0.1·noise: the noise must look standard normal
    const { tensors } = readSafetensors(out('custom.safetensors'))
    const z: number[] = []
    for (const key of floatKeys(sd1Layout)) {
      const ws = lerp(A.values.get(key)!, B.values.get(key)!, 0.6)
      tensors.get(key)!.values.forEach((x, i) => z.push((x - 0.9 * ws[i]) / 0.1))
    }
    const mean = z.reduce((s, x) => s + x, 0) / z.length
    const sd = Math.sqrt(z.reduce((s, x) => s + (x - mean) ** 2, 0) / z.length)
    t.true(Math.abs(mean) < 0.05, `noise mean ${mean}`)
    t.true(Math.abs(sd - 1) < 0.05, `noise sd ${sd}`)
  },

  'sd-mecha/lora_merge.mts': async (t) => {
    const keys = [loraLayers.te.key, loraLayers.unet.key, k1.unet1d, k1.position]
    const r = await example('sd-mecha/lora_merge.mts', loraBase.path, loraA.path, ...show(keys))
    t.regex(r.stdout, new RegExp(`^${loraBaseLayout.length} tensors in memory, 0 keys skipped\n`))
    const lines = byKey(r.lines)
    for (const key of [loraLayers.te.key, loraLayers.unet.key]) {
      const line = lines.get(key)!
      const expected = baked(key, [loraA, 1])
      t.is(line.dtype, 'F16')
      t.deepEqual(line.shape, loraLayers[key === loraLayers.te.key ? 'te' : 'unet'].shape)
      close(t, line.first, expected.slice(0, 16), `${key} (base + alpha / rank · up @ down)`)
      const mean = expected.reduce((s, x) => s + x, 0) / expected.length
      t.true(Math.abs(line.mean - mean) < 1e-4, `${key} mean ${line.mean}, expected ${mean}`)
    }
    close(t, lines.get(k1.unet1d)!.first, f16(loraBase.values.get(k1.unet1d)!), `${k1.unet1d} (no LoRA layer)`)
    t.deepEqual(lines.get(k1.position)!.first, loraBase.values.get(k1.position)!.slice(0, 16))
  },

  'sd-mecha/n_average.mts': async (t) => {
    const five = sd1.slice(3, 8)
    const r = await example('sd-mecha/n_average.mts', ...five.map((m) => m.path), ...show(k1))
    t.regex(r.stdout, new RegExp(`^averaged 5 models: ${sd1Layout.length} tensors`))
    for (const key of [k1.unet2d, k1.unet1d, k1.vae1d, k1.clip2d]) {
      const mean = five[0].values.get(key)!.map((_, i) => five.reduce((s, m) => s + m.values.get(key)![i], 0) / 5)
      close(t, byKey(r.lines).get(key)!.first, mean, key)
    }
  },

  'sd-mecha/recipe_serialize.mts': async (t) => {
    const text = readFileSync(await serialized(), 'utf8')
    const lines = text.trimEnd().split('\n')
    t.is(lines[0], 'version 0.1.0')
    for (const m of [A, B, C]) t.true(lines.includes(`model "${m.path}" model_config="sd1-ldm" merge_space="weight"`))
    t.regex(text, /merge "weighted_sum" /)
    t.regex(text, /merge "perpendicular_component" /)
    t.regex(text, /merge "pick_component" &\d+ &\d+/)
    t.regex(text, /"diffuser"/)
    t.regex(lines.at(-1)!, /^merge "fallback" &\d+ &\d+$/)
  },

  'sd-mecha/recipe_deserialize.mts': async (t) => {
    const r = await example('sd-mecha/recipe_deserialize.mts', await serialized(), ...show(k1))
    const lines = byKey(r.lines)
    const [a, b, c] = [A, B, C]
    for (const key of [k1.unet2d, k1.unet1d])
      close(t, lines.get(key)!.first, lerp(a.values.get(key)!, b.values.get(key)!, 0.5), `${key} (UNet)`)
    for (const key of [k1.clip2d, k1.vae1d]) {
      const [va, vb, vc] = [a, b, c].map((m) => m.values.get(key)!)
      close(t, lines.get(key)!.first, addPerp(va, vb, vc), `${key} (add_perpendicular)`)
    }
  },

  'sd-mecha/rotate.mts': async (t) => {
    const r = await example('sd-mecha/rotate.mts', A.path, B.path, ...show(k1))
    const lines = byKey(r.lines)
    for (const key of [k1.unet2d, k1.clip2d]) {
      // a 3×3 key: rows centred, rotated (sum of squares kept), moved to b's column means
      const res = lines.get(key)!.first
      const [a, b] = [A, B].map((m) => m.values.get(key)!)
      const colMean = (v: number[]) => [0, 1, 2].map((j) => (v[j] + v[3 + j] + v[6 + j]) / 3)
      close(t, colMean(res), colMean(b), `${key} column means`, 5e-3)
      const centred = (v: number[]) => v.map((x, i) => x - colMean(v)[i % 3])
      const ss = (v: number[]) => dot(v, v)
      t.true(Math.abs(ss(centred(res)) - ss(centred(a))) < 1e-2, `${key} sum of squares`)
      t.true(Math.abs(ss(sub(res, b))) > 0, `${key} is not b`)
    }
    for (const key of [k1.unet1d, k1.vae1d]) close(t, lines.get(key)!.first, f16(A.values.get(key)!), key)
  },

  'sd-mecha/split_unet_text_encoder.mts': async (t) => {
    const [a, b, c] = sdxl
    const r = await example('sd-mecha/split_unet_text_encoder.mts', a.path, b.path, c.path, ...show(kx))
    // plus the CLIP layers pruned from these files (optional in sdxl-sgm), which its
    // missing-key handler fills with zeros
    const pruned = configs
      .keys('sdxl-sgm')
      .filter((k) =>
        /^conditioner\.embedders\.(0\.transformer\.text_model\.encoder\.layers\.11|1\.model\.transformer\.resblocks\.31)\./.test(
          k.key,
        ),
      )
      .filter((k) => !sdxlLayout.some((l) => l.key === k.key))
    t.is(pruned.length, 28)
    t.regex(r.stdout, new RegExp(`^${sdxlLayout.length + pruned.length} tensors in memory`))
    const lines = byKey(r.lines)
    for (const key of [kx.unet2d, kx.unet1d])
      close(t, lines.get(key)!.first, lerp(a.values.get(key)!, b.values.get(key)!, 0.5), `${key} (UNet)`)
    for (const key of [kx.clipG2d, kx.vae1d]) {
      const [va, vb, vc] = [a, b, c].map((m) => m.values.get(key)!)
      close(t, lines.get(key)!.first, addPerp(va, vb, vc), `${key} (add_perpendicular)`)
    }
  },

  'sd-mecha/ties_add_difference.mts': async (t) => {
    const base = sd1[0]
    const models = sd1.slice(1, 8) // seven models, as in sd-mecha's example
    const r = await example('sd-mecha/ties_add_difference.mts', base.path, ...models.map((m) => m.path), ...show(k1))
    for (const key of [k1.unet2d, k1.unet1d, k1.vae1d, k1.clip2d]) {
      const b = base.values.get(key)!
      const deltas = models.map((m) => sub(m.values.get(key)!, b))
      // TIES with k = 1: elect the sign of the sum of signs, average the deltas that agree
      const expected = b.map((x, i) => {
        const sign = Math.sign(deltas.reduce((s, d) => s + Math.sign(d[i]), 0))
        const agree = deltas.map((d) => d[i]).filter((d) => Math.sign(d) === sign)
        return x + 0.5 * (agree.length ? agree.reduce((s, d) => s + d, 0) / agree.length : 0)
      })
      close(t, byKey(r.lines).get(key)!.first, expected, key)
    }
  },

  'guide/getting-started.mts': async (t) => {
    const r = await example('guide/getting-started.mts', A.path, B.path, '--out', out('getting-started.safetensors'))
    t.regex(r.stdout, new RegExp(`^config sd1-ldm, ${sd1Layout.length} keys, 0 skipped, ~\\d+ output bytes\n`))
    t.regex(r.stdout, new RegExp(`\nwrote ${sd1Layout.length} keys in [\\d.]+ s \\(\\d+ progress updates\\)\n`))
    t.regex(r.stdout, /\nversion 0\.1\.0\n[^]*\nmerge "weighted_sum" &0 &1 &\d+\n/)
    const { tensors } = readSafetensors(out('getting-started.safetensors'))
    for (const key of floatKeys(sd1Layout))
      close(t, tensors.get(key)!.values, lerp(A.values.get(key)!, B.values.get(key)!, 0.3), key)
  },

  'guide/recipes-and-merge-spaces.mts': async (t) => {
    const keys = [k1.unet2d, k1.unet1d, k1.clip2d, k1.vae1d]
    const r = await example('guide/recipes-and-merge-spaces.mts', A.path, B.path, C.path, ...show(keys))
    t.regex(
      r.stdout,
      /^b\.sub\(base\) is a delta\nthe recipe is a weight\na\.add\(b\): MergeSpaceError\nround trip: true\nmixed: \d+ lines\n/,
    )
    for (const key of keys) {
      const [a, b, c] = [A, B, C].map((m) => m.values.get(key)!)
      close(
        t,
        byKey(r.lines).get(key)!.first,
        a.map((x, i) => x + 0.5 * (b[i] - c[i])),
        key,
        1e-6,
      )
    }
  },

  'guide/block-weights.mts': async (t) => {
    const r = await example('guide/block-weights.mts', A.path, B.path, '--out', out('mbw.safetensors'))
    t.regex(r.stdout, /^BASE IN00 IN01 .* IN11 M00 OUT00 .* OUT11\nwrote \d+ keys\n$/)
    const { tensors } = readSafetensors(out('mbw.safetensors'))
    // sd-mecha's SuperMerger mapping for SD1
    const alphaOf = (key: string): number | undefined => {
      const unet = key.match(/^model\.diffusion_model\.(input_blocks|output_blocks)\.(\d+)\./)
      if (unet) return unet[1] === 'input_blocks' ? Number(unet[2]) / 12 : 1 - Number(unet[2]) / 12
      if (key.startsWith('model.diffusion_model.middle_block.')) return 0.5
      if (key.startsWith('model.diffusion_model.out.')) return 1 - 11 / 12
      if (/^(cond_stage_model|first_stage_model|model\.diffusion_model\.time_embed)\./.test(key)) return 0
      return undefined
    }
    for (const key of floatKeys(sd1Layout)) {
      const alpha = alphaOf(key)
      if (alpha === undefined) return t.fail(`no block for ${key}`)
      close(t, tensors.get(key)!.values, lerp(A.values.get(key)!, B.values.get(key)!, alpha), key)
    }
  },

  'guide/custom-methods.mts': async (t) => {
    const keys = [k1.unet2d, k1.unet1d, k1.clip2d, k1.vae1d]
    const r = await example('guide/custom-methods.mts', A.path, B.path, ...show(keys))
    t.regex(
      r.stdout,
      /^\[\["a","Tensor",null\],\["b","Tensor",null\],\["alpha","Tensor",0\.5\],\["limit","float",1\]\]\n/,
    )
    t.regex(r.stdout, /\nmerge "clamped_mix" &0 &\d+ &\d+ &\d+\n/)
    for (const key of keys) {
      const [a, b] = [A, B].map((m) => m.values.get(key)!)
      const k = Math.sqrt(dot(a, a) / dot(b, b))
      const expected = a.map((x, i) => Math.max(-0.5, Math.min(0.5, x + 0.75 * (k * b[i] - x))))
      close(t, byKey(r.lines).get(key)!.first, expected, key, 1e-5)
    }
  },

  'guide/custom-configs.mts': async (t) => {
    const toy = (name: string, seed: number, headName: string) => {
      const shapes: Record<string, number[]> = {
        'enc.0.weight': [4, 4],
        'enc.0.bias': [4],
        [headName]: [2, 4],
        'head.bias': [2],
      }
      const tensors: Record<string, TestTensor> = {}
      Object.entries(shapes).forEach(([key, shape], i) => {
        const n = shape.reduce((x, y) => x * y, 1)
        tensors[key] = { dtype: 'F32', shape, values: randomValues(seed * 31 + i, n).map(Math.fround) }
      })
      writeSafetensors(out(name), tensors)
      return tensors
    }
    const a = toy('toy-a.safetensors', 1, 'head.weight')
    const b = toy('toy-b.safetensors', 2, 'classifier.weight') // the alias
    const r = await example(
      'guide/custom-configs.mts',
      out('toy-a.safetensors'),
      out('toy-b.safetensors'),
      '--out',
      out('toy.safetensors'),
    )
    t.is(
      r.stdout,
      [
        'registered toy-mlp: encoder, head',
        `${out('toy-a.safetensors')}: toy-mlp`,
        `${out('toy-b.safetensors')}: toy-mlp`,
        'wrote 4 keys',
        '',
      ].join('\n'),
    )
    const { tensors } = readSafetensors(out('toy.safetensors'))
    t.deepEqual([...tensors.keys()].sort(), ['enc.0.bias', 'enc.0.weight', 'head.bias', 'head.weight'])
    t.deepEqual(tensors.get('enc.0.weight')!.values, a['enc.0.weight'].values)
    t.deepEqual(tensors.get('enc.0.bias')!.values, a['enc.0.bias'].values)
    close(
      t,
      tensors.get('head.weight')!.values,
      lerp(a['head.weight'].values, b['classifier.weight'].values, 0.5),
      'head.weight',
      1e-6,
    )
    close(
      t,
      tensors.get('head.bias')!.values,
      lerp(a['head.bias'].values, b['head.bias'].values, 0.5),
      'head.bias',
      1e-6,
    )
  },

  'guide/llm-checkpoints.mts': async (t) => {
    const [a, b] = [qwenCheckpoint('qwen-a', 1, 2), qwenCheckpoint('qwen-b', 2, 3)]
    const merged = out('qwen-merged')
    const r = await example(
      'guide/llm-checkpoints.mts',
      a.folder,
      b.folder,
      '--out',
      merged,
      '--max-shard-size',
      '200B',
    )
    const lines = r.stdout.trimEnd().split('\n')
    const bytes = (c: typeof a) => [...c.values.values()].reduce((n, v) => n + 2 * v.length, 0)
    t.is(lines[0], `${a.folder}: ${a.count} tensors in 2 file(s), 2 layers, ${bytes(a)} bytes, config structural`)
    t.is(lines[1], `${b.folder}: ${b.count} tensors in 3 file(s), 2 layers, ${bytes(b)} bytes, config structural`)
    const written = readdirSync(merged).sort()
    t.true(written.length > 3)
    t.is(lines[2], `wrote ${a.count} keys to ${merged}: ${written.join(' ')}`)
    // the sharded output reads back as one model: (a + b) / 2, rounded to bf16
    const back = await merge(model(merged), { outputDtype: 'f32' })
    for (const [k, va] of a.values) {
      const expected = va.map((x, i) => bf16Value(bf16Bits(x + 0.5 * (b.values.get(k)![i] - x))))
      close(t, [...toFloat32(back.get(k)!)], expected, k, 8e-3) // one bf16 step at most
    }
  },

  'guide/lora.mts': async (t) => {
    const r = await example(
      'guide/lora.mts',
      loraBase.path,
      loraA.path,
      loraB.path,
      '--out',
      out('baked.safetensors'),
      '--lora',
      out('extracted.safetensors'),
    )
    const lines = r.stdout.trimEnd().split('\n')
    t.true(lines[0].split(' ').includes('sd1-kohya_kohya_lora'))
    t.true(lines[0].split(' ').includes('sdxl-kohya_lycoris_lora'))
    t.deepEqual(lines.slice(1), [
      `${loraA.path}: sd1-kohya_kohya_lora`,
      `one LoRA: config sd1-ldm, ${loraBaseLayout.length} keys`,
      `baked: ${loraBaseLayout.length} keys`,
      `as a delta: config structural, ${loraA.tensorCount} keys skipped`,
      `extracted: ${readSafetensors(out('extracted.safetensors')).tensors.size} keys`,
    ])
    // base + 0.8·lora-a + 0.5·lora-b, each lora alpha / rank · up @ down
    const { tensors } = readSafetensors(out('baked.safetensors'))
    t.is(tensors.size, loraBaseLayout.length)
    for (const key of floatKeys(loraBaseLayout))
      close(t, tensors.get(key)!.values, baked(key, [loraA, 0.8], [loraB, 0.5]), key)
    t.deepEqual(tensors.get(k1.position)!.values, loraBase.values.get(k1.position))
    // the extracted LoRA's layers hold the baked difference: alpha / rank · up @ down = baked − base
    // (the tiny model's other keys have shapes of their own, so it is checked per layer, not baked)
    const extracted = readSafetensors(out('extracted.safetensors')).tensors
    for (const { stem, key, shape } of Object.values(loraLayers)) {
      const [up, down, alpha] = ['lora_up.weight', 'lora_down.weight', 'alpha'].map((s) =>
        extracted.get(`${stem}.${s}`)!,
      )
      const rank = up.shape[1]
      t.true(rank <= 8, stem)
      const scale = alpha.values[0] / rank
      const product = Array.from({ length: shape[0] * shape[1] }, (_, idx) => {
        const [i, j] = [Math.floor(idx / shape[1]), idx % shape[1]]
        let sum = 0
        for (let k = 0; k < rank; k++) sum += up.values[i * rank + k] * down.values[k * shape[1] + j]
        return scale * sum
      })
      close(t, product, sub(tensors.get(key)!.values, loraBase.values.get(key)!), `${stem}: up @ down`)
    }
  },

  'guide/performance-and-memory.mts': async (t) => {
    // keys big enough (up to 32×32×3×3) to exceed a 1 KiB budget
    const specs = sd1Layout.map(({ key, integer }) => ({
      name: key,
      dtype: integer ? 'I64' : 'F32',
      shape: configs
        .keys('sd1-ldm')
        .find((k) => k.key === key)!
        .shape!.map((d) => Math.min(d, 32)),
    }))
    await Promise.all([1, 2].map((seed) => writeRandomModel(out(`perf-${seed}.safetensors`), specs, seed)))
    const r = await example('guide/performance-and-memory.mts', out('perf-1.safetensors'), out('perf-2.safetensors'))
    const lines = r.stdout.trimEnd().split('\n')
    const p: { budget: number; threads: number; working: number } = JSON.parse(lines[0])
    t.is(p.budget, 64 * 2 ** 20)
    t.is(p.threads, 2)
    t.true(p.working > 0)
    const alone = lines[1].match(/^budget 1 KiB: (\d+) of (\d+) keys ran alone$/)
    t.truthy(alone, lines[1])
    t.true(Number(alone![1]) > 0 && Number(alone![2]) === sd1Layout.length)
    const sweep = lines[2].match(/^rotate sweep, cache entries after each merge: (\d+) (\d+) (\d+)$/)
    t.truthy(sweep, lines[2])
    t.true(Number(sweep![1]) > 0)
    t.deepEqual([sweep![2], sweep![3]], [sweep![1], sweep![1]], 'the later merges decompose nothing new')
    t.is(lines[3], 'cached equals fresh: true')
    t.regex(lines[4], /^truncate_rank sweep: [1-9]\d* entries, [1-9]\d* bytes$/)
    t.is(lines[5], 'mergeMany: 3 outputs, inputs read once: true, same bytes as merge(): true')
  },

  'guide/embedding-in-an-app.mts': async (t) => {
    // 64 keys of 512×512 (16 MiB of f16 per model): long enough to cancel after the first key
    const specs = Array.from({ length: 64 }, (_, i) => ({ name: `layer.${i}.weight`, dtype: 'F16', shape: [512, 512] }))
    const other = specs.map((s, i) => (i === 5 ? { ...s, shape: [512, 256] } : s))
    await Promise.all([
      writeRandomModel(out('app-a.safetensors'), specs, 1),
      writeRandomModel(out('app-b.safetensors'), specs, 2),
      writeRandomModel(out('app-other.safetensors'), other, 3),
    ])
    const args = ['app-a', 'app-b', 'app-other'].map((n) => out(`${n}.safetensors`))
    const r = await example('guide/embedding-in-an-app.mts', ...args, '--out', out('app.safetensors'))
    const steps = r.stdout
      .trimEnd()
      .split('\n')
      .map((l): Record<string, unknown> => JSON.parse(l))
    t.is(steps.length, 7)
    const [progress, cancel, memory, held, shape, missing, option] = steps
    t.is(progress.keysWritten, 64)
    t.true(Number(progress.updates) >= 1)
    t.is(progress.monotonic, true)
    t.is(readSafetensors(out('app.safetensors')).tensors.size, 64)
    t.like(cancel, { error: 'AbortError', exists: false })
    t.true(Number(cancel.keysWhenCancelled) < 64)
    t.false(existsSync(out('app-cancelled.safetensors')))
    t.deepEqual(memory, {
      step: 'memory',
      size: 64,
      keysWritten: 64,
      firstKey: 'layer.0.weight',
      dtype: 'F32',
      shape: [512, 512],
    })
    // model(held) with held = 2 · merged: 0.5 · 2 · merged + 0.5 · a
    const a = readSafetensors(args[0]).tensors.get('layer.0.weight')!.values.slice(0, 4)
    const merged = held.merged as number[]
    t.is(held.size, 64)
    close(
      t,
      held.remerged as number[],
      merged.map((m, i) => m + 0.5 * a[i]),
      'merged again from memory',
      1e-6,
    )
    t.like(shape, { name: 'ShapeError', kind: 'shape', key: 'layer.5.weight' })
    t.like(missing, { name: 'SafetensorsError', kind: 'safetensors', file: `${args[0]}.missing` })
    t.like(option, { name: 'OptionError', kind: 'option' })
  },

  'guide/differences.mts': async (t) => {
    const dropped = k1.unet2d
    const partial = tinyModel('partial.safetensors', sd1Layout, 2, [dropped])
    const r = await example('guide/differences.mts', A.path, B.path, partial.path)
    const lines = r.stdout.trimEnd().split('\n')
    t.is(lines[0], 'dtypes in the result: F16 I64')
    t.deepEqual(
      lines.filter((l) => l.startsWith('skipped ')),
      [`skipped ${dropped}: missing from ${partial.path}`],
    )
    t.regex(lines.at(-2)!, /^chosen seed dropout\.seed = \d+$/)
    t.is(lines.at(-1), 'recorded: true')
  },
}

/** recipe_serialize.ts's output, written once for both recipe examples. */
let serializedOnce: Promise<string> | undefined
function serialized(): Promise<string> {
  serializedOnce ??= (async () => {
    const path = out('recipes/split.mecha')
    const r = await example('sd-mecha/recipe_serialize.mts', A.path, B.path, C.path, '--out', path)
    if (r.stdout.trim() !== readFileSync(path, 'utf8').trim()) throw new Error('printed text differs from the file')
    return path
  })()
  return serializedOnce
}

for (const file of listExamples(examplesDir).sort()) {
  test(`examples/${file}`, async (t) => {
    const check = checks[file]
    if (!check) return t.fail(`no check for examples/${file}: add one to __test__/examples.spec.ts`)
    await check(t)
  })
}

test('every check has its example', (t) => {
  const files = new Set(listExamples(examplesDir))
  t.deepEqual(
    Object.keys(checks).filter((f) => !files.has(f)),
    [],
  )
  t.true(existsSync(join(root, 'docs/guide/README.md')))
})

test('no example needs a type assertion (`as`) or `any`', (t) => {
  for (const file of listExamples(examplesDir)) {
    const code = readFileSync(join(examplesDir, file), 'utf8')
      .replace(/\/\*[^]*?\*\//g, '')
      .replace(/\/\/.*$/gm, '')
      .replace(/(['"`])(?:\\.|(?!\1)[^\\])*\1/g, '""')
    t.notRegex(code, /\bas\s+(?:const\b|unknown\b|any\b|[A-Z{[(])/, file)
    t.notRegex(code, /:\s*any\b/, file)
  }
})

test("the README's TypeScript samples are examples/readme.mts, which runs them", (t) => {
  const readme = readFileSync(join(root, 'README.md'), 'utf8')
  const example = readFileSync(join(examplesDir, 'readme.mts'), 'utf8')
  const samples = [...readme.matchAll(/```ts\n([^]*?)```/g)].map((m) => m[1])
  t.true(samples.length >= 2)
  for (const [i, sample] of samples.entries()) t.true(example.includes(sample), `README sample ${i + 1}`)
})

test('every TypeScript sample in docs/guide is an excerpt of the example file named before it', (t) => {
  const guide = join(root, 'docs/guide')
  let samples = 0
  for (const page of readdirSync(guide).filter((f) => f.endsWith('.md'))) {
    const text = readFileSync(join(guide, page), 'utf8')
    for (const m of text.matchAll(/```ts\n([^]*?)```/g)) {
      const named = [...text.slice(0, m.index).matchAll(/examples\/([\w/-]+\.mts)/g)].at(-1)?.[1]
      if (named === undefined) {
        t.fail(`${page}: a sample names no file in examples/ before it`)
        continue
      }
      t.true(
        readFileSync(join(examplesDir, named), 'utf8').includes(m[1]),
        `${page}: sample is not in examples/${named}`,
      )
      samples++
    }
  }
  t.true(samples >= 10)
})
