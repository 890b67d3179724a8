// LoRA / LyCORIS bake against sd-mecha 1.1.8 (scripts/golden/lora.py): each case writes its base
// model (values from a formula, below), bakes the LoRA files of inputs/ into it with
// `addDifference(base, convert(lora, base), { alpha })`, and compares the merge with what sd-mecha
// wrote (or, for the `intent` cases where sd-mecha 1.1.8 is broken, with the script's hand
// computation); the recipe must serialize to sd-mecha's text. The fixture format is described in
// scripts/golden/README.md, "Golden results for LoRA / LyCORIS bake".
import test from 'ava'
import { copyFileSync, readdirSync, readFileSync, realpathSync, rmSync } from 'node:fs'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'

import {
  addDifference,
  convert,
  merge,
  model,
  serialize,
  toFloat32,
  type MergeOptions,
  type RecipeNode,
} from '../dist/index.js'
import { mismatches, readSafetensors } from './golden-fixtures.ts'
import { tempDir, writeSafetensors, type TestTensor } from './helpers.ts'

const fixtures = new URL('./fixtures/golden/lora/', import.meta.url)
const inputs = fileURLToPath(new URL('inputs/', fixtures))
const outputs = fileURLToPath(new URL('outputs/', fixtures))

type Json = null | boolean | number | string | Json[] | { [key: string]: Json }

interface Case {
  id: string
  description: string
  /** The Python that built sd-mecha's recipe (documentation only). */
  python: string
  /** sd-mecha's text (what its `merge` embeds), `{dir}` for the folder of the files; null when it failed. */
  text: string | null
  /** sd-mecha's error building the recipe (`"Class: first line"`), for error cases. */
  error: string | null
  /** The base model: its tensors (F32) hold value[i] = (((i + offset)·7919) % 1009) / 1009 − 0.5. */
  base: { file: string; config: string; tensors: Record<string, { shape: number[]; offset: number }> }
  /** LoRA files of inputs/, baked in this order, each `r = addDifference(r, convert(lora, base), { alpha })`. */
  bake: { lora: string; alpha: number }[]
  /** sd_mecha.merge() keyword options besides the dtypes (Python names). */
  options: Record<string, Json>
  /** File under outputs/; null for error cases. */
  output: string | null
  keys: string[] | null
  /** Full shapes of the output keys (the stored tensors are cut to rows). */
  shapes: Record<string, number[]> | null
  /** Stored tensors hold their first `rows` rows (dim 0)… */
  rows: number | null
  /** …or, for the keys listed here, these [start, end) row blocks, concatenated. */
  row_ranges: Record<string, [number, number][]> | null
  /** |x − y| ≤ max(tolerance·|y|, atol). */
  tolerance: number
  atol: number
  /** The expected output is the script's hand computation: sd-mecha 1.1.8 gets this case wrong. */
  intent?: boolean
  why?: string
  sd_mecha?: { error?: string; result?: string; warnings?: string[] }
  warnings?: string[]
  /** LoRA keys that match no base key: the merge report must list each as skipped. */
  unmatched_keys?: string[]
  /** The bake must fail with an error naming each of these configs. */
  error_must_name?: string[]
}

const cases: Case[] = JSON.parse(readFileSync(new URL('cases.json', fixtures), 'utf8'))

/** sd_mecha.merge() keyword options → MergeOptions. */
const optionNames: Record<string, keyof MergeOptions> = {
  omit_non_finite_inputs: 'omitNonFiniteInputs',
  check_finite_output: 'checkFiniteOutput',
  strict_merge_space: 'strictMergeSpace',
}

function mergeOptions(c: Case): MergeOptions & { output?: undefined } {
  const options: Record<string, unknown> = { mergeDtype: 'f32', outputDtype: 'f32' }
  for (const [name, value] of Object.entries(c.options)) {
    const tsName = optionNames[name]
    if (!tsName) throw new Error(`${c.id}: no MergeOptions name for sd_mecha.merge(${name}=...)`)
    options[tsName] = value
  }
  return options as MergeOptions & { output?: undefined }
}

/** The base tensor of a key: value[i] = (((i + offset)·7919) % 1009) / 1009 − 0.5 (F32). */
function baseTensor(shape: number[], offset: number): TestTensor {
  const n = shape.reduce((a, b) => a * b, 1)
  return {
    dtype: 'F32',
    shape,
    values: Array.from({ length: n }, (_, i) => (((i + offset) * 7919) % 1009) / 1009 - 0.5),
  }
}

/** A fresh folder with the case's base file and copies of its LoRA files (`{dir}` of its text). */
function caseFolder(c: Case): string {
  const dir = realpathSync(tempDir())
  const tensors: Record<string, TestTensor> = {}
  for (const [key, { shape, offset }] of Object.entries(c.base.tensors)) tensors[key] = baseTensor(shape, offset)
  writeSafetensors(join(dir, c.base.file), tensors)
  for (const step of c.bake) copyFileSync(join(inputs, step.lora), join(dir, step.lora))
  return dir
}

/** The bake with the TypeScript API: `r = addDifference(r, convert(lora, base), { alpha })` for each step. */
function bakeRecipe(c: Case, dir: string): RecipeNode {
  const base = model(join(dir, c.base.file))
  let recipe: RecipeNode = base
  for (const step of c.bake)
    recipe = addDifference(recipe, convert(model(join(dir, step.lora)), base), { alpha: step.alpha })
  return recipe
}

/**
 * Keys the port adds and sd-mecha 1.1.8 never writes: a result in sdxl-sgm gets the keys its
 * missing-key handler is written for (CLIP-L `position_ids` and layer 11, CLIP-G resblock 31),
 * which the small base files lack (docs/differences.md, "sdxl-sgm's missing-key handler fills what
 * it is written for"). They are left out of the comparison.
 */
function filledByHandler(config: string, key: string): boolean {
  return (
    config === 'sdxl-sgm' &&
    (key === 'conditioner.embedders.0.transformer.text_model.embeddings.position_ids' ||
      key.startsWith('conditioner.embedders.0.transformer.text_model.encoder.layers.11.') ||
      key.startsWith('conditioner.embedders.1.model.transformer.resblocks.31.'))
  )
}

const withDir = (text: string, dir: string) => text.replaceAll('{dir}', dir.replace(/\\/g, '\\\\').replace(/"/g, '\\"'))

/** The row blocks of a tensor stored in the fixture, concatenated (a 0-D tensor is kept whole). */
function cutRows(values: Float32Array, shape: number[], ranges: [number, number][]): Float32Array {
  if (shape.length === 0) return values
  const row = shape.slice(1).reduce((a, b) => a * b, 1)
  const out = new Float32Array(ranges.reduce((n, [a, b]) => n + (b - a) * row, 0))
  let at = 0
  for (const [a, b] of ranges) {
    out.set(values.subarray(a * row, b * row), at)
    at += (b - a) * row
  }
  return out
}

test('the fixtures cover the LoRA algorithms and the failure cases', (t) => {
  t.true(cases.length >= 20)
  const used = new Set(cases.flatMap((c) => c.bake.map((s) => s.lora)))
  t.deepEqual(
    readdirSync(inputs).filter((f) => !used.has(f)),
    [],
    'every input file is baked by some case',
  )
  for (const id of [
    'lora_linear_alpha',
    'lora_linear_no_alpha',
    'lora_conv3x3',
    'locon_tucker_alpha',
    'lokr_full',
    'lokr_alpha_inf',
    'lycoris_prefix',
    'sd1_kohya',
    'sdxl_realistic',
    'two_loras',
    'loha_linear',
    'loha_tucker_conv',
    'lokr_tucker_conv',
    'error_sd1_lora_into_sdxl',
    'unmatched_key',
  ])
    t.true(
      cases.some((c) => c.id === id),
      id,
    )
  t.true(cases.some((c) => c.intent))
  t.true(cases.some((c) => c.error_must_name))
})

for (const c of cases) {
  if (c.text !== null) {
    test(`recipe text matches sd-mecha: lora/${c.id}`, (t) => {
      const dir = caseFolder(c)
      t.teardown(() => rmSync(dir, { recursive: true, force: true }))
      t.is(serialize(bakeRecipe(c, dir)), withDir(c.text!, dir))
    })
  }

  if (c.error_must_name) {
    const names = c.error_must_name
    test(`bake is refused: lora/${c.id}`, async (t) => {
      const dir = caseFolder(c)
      t.teardown(() => rmSync(dir, { recursive: true, force: true }))
      // convert() may refuse at once, or merge() when it runs the recipe
      const error = await t.throwsAsync(async () => {
        await merge(bakeRecipe(c, dir), mergeOptions(c))
      })
      for (const name of names)
        t.true(error?.message.includes(name), `the error names ${name} (sd-mecha: ${c.error}); got: ${error?.message}`)
    })
    continue
  }

  // A deliberate difference (docs/differences.md): an infinite LoKr alpha means "scale 1", so
  // omitting non-finite inputs does not drop the module; the port gives the result sd-mecha gives
  // with omit_non_finite_inputs=False.
  const portOutput = c.id === 'lokr_alpha_inf_default' ? 'lokr_alpha_inf.safetensors' : c.output!
  const kind = c.intent ? 'matches the intent (sd-mecha 1.1.8 is wrong here)' : 'matches sd-mecha'
  test(`bake ${kind}: lora/${c.id}`, async (t) => {
    const dir = caseFolder(c)
    t.teardown(() => rmSync(dir, { recursive: true, force: true }))
    const result = await merge(bakeRecipe(c, dir), mergeOptions(c))
    const expected = readSafetensors(join(outputs, portOutput))
    const keys = c.keys!
    t.deepEqual([...expected.keys()].sort(), keys, 'the fixture file has the listed keys')
    t.deepEqual(
      [...result.keys()].filter((k) => !filledByHandler(c.base.config, k)).sort(),
      keys,
      'output keys (besides those the sdxl-sgm missing-key handler fills)',
    )
    // every key's problems in one assertion (ava reports only the first failing one)
    const problems: Record<string, string[]> = {}
    for (const [key, want] of expected) {
      const got = result.get(key)
      if (!got) continue // reported by the key comparison above
      const found: string[] = []
      const shape = c.shapes![key]
      const ranges = c.row_ranges?.[key] ?? [[0, c.rows!]]
      if (got.dtype !== 'F32') found.push(`dtype ${got.dtype}, want F32`)
      if (JSON.stringify(got.shape) !== JSON.stringify(shape)) found.push(`shape [${got.shape}], want [${shape}]`)
      else {
        const values = cutRows(toFloat32(got), got.shape, ranges)
        if (values.length !== want.values.length) found.push(`${values.length} values, want ${want.values.length}`)
        else found.push(...mismatches(values, want.values, c.tolerance, c.atol))
      }
      if (found.length) problems[key] = found
    }
    t.deepEqual(problems, {}, `values within ${c.tolerance} relative, ${c.atol} absolute (${c.description})`)

    for (const key of c.unmatched_keys ?? []) {
      t.true(
        result.report.keysSkipped.some((s) => s.key === key),
        `the report lists ${key} as skipped (sd-mecha warns: ${c.warnings?.join('; ')})`,
      )
    }
  })
}
