// The key-format conversions against sd-mecha 1.1.8 (scripts/golden/conversions.py): for each of the
// eight directions, a model holding every key of the source config, each a tiny tensor whose values
// encode the key, converts in memory to exactly the output keys of the golden mapping, and each
// output is the copy, concatenation, chunk, transpose or reshape of the inputs the mapping names.
// Each pair of directions also round-trips a model (A → B → A) byte for byte.
import test from 'ava'
import { readdirSync, readFileSync } from 'node:fs'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { gunzipSync } from 'node:zlib'

import { convert, merge, model, toFloat32, type Tensor } from '../dist/index.js'
import { tempDir, writeSafetensors, type TestTensor } from './helpers.ts'

const fixtures = fileURLToPath(new URL('./fixtures/golden/conversions/', import.meta.url))

type Op = 'copy' | 'concat' | 'chunk' | 'transpose' | 'reshape'

interface Entry {
  inputs: string[]
  op: Op
  /** chunk: which of `parts` equal row blocks of the input. */
  index?: number
  parts?: number
}

/** One `<from>__<to>.json.gz` (fields in scripts/golden/README.md). */
interface Direction {
  from: string
  to: string
  source: 'sd-mecha 1.1.8 merge' | 'sd-mecha 1.1.8 key functions + intent'
  /** Output key → how it is made, in the target config's order. */
  mapping: Record<string, Entry>
  /** Source-config keys no output uses. */
  dropped_inputs: string[]
  /** Output keys where the mapping is sd-mecha's intent, not what 1.1.8 does. */
  intent_fixes: string[]
  notes: string[]
  /** Names sd-mecha's key functions compute that are not in their config (sd-mecha skips them). */
  unresolved: { outputs: string[]; inputs: string[]; absent: string[] }[]
  /** Target-config keys no output is mapped to. */
  unmapped_outputs: string[]
  /** Every key of the source config, in order, with the config's shape. */
  source_shapes: Record<string, number[]>
}

const directions: Direction[] = readdirSync(fixtures)
  .filter((name) => name.endsWith('.json.gz'))
  .sort()
  .map((name) => JSON.parse(gunzipSync(readFileSync(join(fixtures, name))).toString('utf8')) as Direction)

const expectedDirections = [
  'sd1-kohya → sd1-ldm',
  'sd1-ldm → sd1-kohya',
  'sdxl-diffusers_unet_only → sdxl-sgm',
  'sdxl-kohya → sdxl-sgm',
  'sdxl-kohya_but_diffusers → sdxl-sgm',
  'sdxl-sgm → sdxl-diffusers_unet_only',
  'sdxl-sgm → sdxl-kohya',
  'sdxl-sgm → sdxl-kohya_but_diffusers',
]
const label = (d: Direction) => `${d.from} → ${d.to}`

/** Element k of the key with index i holds i + k/64 (exact in f32 for every config here). */
const FRACTION = 64

/**
 * The tiny shape of a source key: its config shape with every dimension clamped to 1…2 (2-D keys
 * stay 2-D so a transpose shows, 1×1 conv kernels keep their trailing 1s), except that a key the
 * mapping splits into `parts` row blocks gets two rows per block (CLIP-G `in_proj_*`: [6, 2] or [6]).
 */
function tinyShape(configShape: number[], chunkParts: number | undefined): number[] {
  const shape = configShape.map((d) => Math.max(1, Math.min(d, 2)))
  if (chunkParts !== undefined) shape[0] = 2 * chunkParts
  return shape
}

const count = (shape: number[]) => shape.reduce((a, b) => a * b, 1)

/** A model of every source key of `d`, and the tensors written, in source-config order. */
function sourceModel(d: Direction): { path: string; tensors: Record<string, TestTensor> } {
  const chunkParts = new Map<string, number>()
  for (const entry of Object.values(d.mapping)) {
    if (entry.op === 'chunk') chunkParts.set(entry.inputs[0], entry.parts!)
  }
  const tensors: Record<string, TestTensor> = {}
  Object.entries(d.source_shapes).forEach(([key, configShape], i) => {
    const shape = tinyShape(configShape, chunkParts.get(key))
    const values = Array.from({ length: count(shape) }, (_, k) => i + k / FRACTION)
    tensors[key] = { dtype: 'F32', shape, values }
  })
  const path = join(tempDir(), `${d.from}.safetensors`)
  writeSafetensors(path, tensors)
  return { path, tensors }
}

/** What `entry` makes of the source tensors (values in row-major order). */
function expected(entry: Entry, tensors: Record<string, TestTensor>): { shape: number[]; values: number[] } {
  const inputs = entry.inputs.map((key) => {
    const t = tensors[key]
    if (!t) throw new Error(`input ${key} is not a source-config key`)
    return t
  })
  const [first] = inputs
  switch (entry.op) {
    case 'copy':
      return { shape: first.shape, values: first.values }
    case 'concat': {
      // along dim 0: q, k, v rows one after the other (1-D biases give a flat [3n], as intended)
      const rows = inputs.reduce((n, t) => n + t.shape[0], 0)
      return { shape: [rows, ...first.shape.slice(1)], values: inputs.flatMap((t) => t.values) }
    }
    case 'chunk': {
      const rows = first.shape[0] / entry.parts!
      const size = first.values.length / entry.parts!
      return {
        shape: [rows, ...first.shape.slice(1)],
        values: first.values.slice(entry.index! * size, (entry.index! + 1) * size),
      }
    }
    case 'transpose': {
      const [r, c] = first.shape
      const values: number[] = []
      for (let j = 0; j < c; j++) for (let i = 0; i < r; i++) values.push(first.values[i * c + j])
      return { shape: [c, r], values }
    }
    case 'reshape':
      // SD1 VAE mid-attention weights: [n, n, 1, 1] (ldm) ↔ [n, n] (kohya)
      return {
        shape: first.shape.length === 4 ? first.shape.slice(0, 2) : [...first.shape, 1, 1],
        values: first.values,
      }
  }
}

const f32Bytes = (values: number[]) => Buffer.from(new Float32Array(values).buffer)
const bytesOf = (t: Tensor) => Buffer.from(t.data.buffer, t.data.byteOffset, t.data.byteLength)

test('the fixtures hold the eight conversion directions, each naming every source-config key once', (t) => {
  t.deepEqual(directions.map(label), expectedDirections)
  for (const d of directions) {
    const used = new Set(Object.values(d.mapping).flatMap((e) => e.inputs))
    const dropped = new Set(d.dropped_inputs)
    t.deepEqual(
      [...used].filter((k) => dropped.has(k)),
      [],
      `${label(d)}: a dropped input is used`,
    )
    t.deepEqual(
      [...used, ...dropped].sort(),
      Object.keys(d.source_shapes).sort(),
      `${label(d)}: inputs + dropped_inputs = the source config`,
    )
  }
})

for (const d of directions) {
  test(`convert ${label(d)} maps every key as sd-mecha does (${d.source})`, async (t) => {
    const { path, tensors } = sourceModel(d)
    const result = await merge(convert(model(path, { config: d.from }), d.to), { outputDtype: 'f32' })
    t.deepEqual([...result.keys()].sort(), Object.keys(d.mapping).sort(), 'output keys')
    // every key's problem in one assertion (ava reports only the first failing one)
    const problems: Record<string, string> = {}
    for (const [key, entry] of Object.entries(d.mapping)) {
      const got = result.get(key)
      if (!got) continue // reported by the key comparison above
      const want = expected(entry, tensors)
      const what = `${entry.op} of ${entry.inputs.join(', ')}${entry.op === 'chunk' ? ` [${entry.index}/${entry.parts}]` : ''}`
      if (got.dtype !== 'F32') problems[key] = `dtype ${got.dtype}, want F32 (${what})`
      else if (JSON.stringify(got.shape) !== JSON.stringify(want.shape))
        problems[key] = `shape [${got.shape}], want [${want.shape}] (${what})`
      else {
        const values = [...toFloat32(got)]
        if (JSON.stringify(values) !== JSON.stringify(want.values.map(Math.fround)))
          problems[key] = `values [${values.slice(0, 8)}], want [${want.values.slice(0, 8)}] (${what})`
      }
    }
    t.deepEqual(problems, {})
  })
}

// One round trip per pair of directions, from each side: A → B → A gives back, byte for byte, every
// key that both conversions carry.
const byLabel = new Map(directions.map((d) => [label(d), d]))
for (const d of directions) {
  const back = byLabel.get(`${d.to} → ${d.from}`)
  if (!back || d.from > d.to) continue
  test(`round trip ${d.from} ⇄ ${d.to} returns the same bytes`, async (t) => {
    for (const [there, again] of [
      [d, back],
      [back, d],
    ]) {
      const { path, tensors } = sourceModel(there)
      const recipe = convert(convert(model(path, { config: there.from }), there.to), there.from)
      const result = await merge(recipe, { outputDtype: 'f32' })
      // the keys of the way back whose inputs the way there produces
      const survivors = Object.keys(again.mapping).filter((key) =>
        again.mapping[key].inputs.every((input) => input in there.mapping),
      )
      t.deepEqual([...result.keys()].sort(), survivors.sort(), `${label(there)} → ${there.from}: keys`)
      const differ = [...result]
        .filter(([key, got]) => {
          const want = tensors[key]
          return (
            !want ||
            got.dtype !== 'F32' ||
            JSON.stringify(got.shape) !== JSON.stringify(want.shape) ||
            !bytesOf(got).equals(f32Bytes(want.values))
          )
        })
        .map(([key]) => key)
      t.deepEqual(differ, [], `${label(there)} → ${there.from}: keys that do not come back byte-identical`)
    }
  })
}
