// Merge results of sd-mecha 1.1.8 for the merge methods, from data its real implementation produced
// (scripts/golden/methods.py, and scripts/golden/svd.py for the SVD family): every case's `.mecha`
// text reads back unchanged, merges to the tensors sd-mecha wrote (within the case's tolerance),
// and the cases built with sd-mecha's Python wrappers come out of the TypeScript wrappers as the
// same text.
import test from 'ava'
import { readFileSync, realpathSync } from 'node:fs'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'

import * as mecha from '../dist/index.js'
import { deserialize, merge, model, serialize, toFloat32, type MergeOptions, type RecipeInput } from '../dist/index.js'
import { mismatches, readSafetensors } from './golden-fixtures.ts'

/** Each fixture folder (layout in scripts/golden/README.md) and the methods its cases must cover. */
const suites = [
  {
    name: 'methods',
    methods: [
      'slerp',
      'perpendicular_component',
      'geometric_sum',
      'multiply_quotient',
      'train_difference_mask',
      'add_opposite_mask',
      'add_strict_opposite_mask',
      'add_cosine_a',
      'add_cosine_b',
      'crossover',
      'tensor_sum',
      'top_k_tensor_sum',
      'get_dtype',
      'get_device',
      'stack',
      'omit_non_finite',
    ],
    wrappers: ['add_difference', 'add_perpendicular', 'copy_region', 'tensor_sum'],
  },
  {
    name: 'svd',
    methods: ['rotate', 'truncate_rank', 'truncate_kronecker', 'get_rank_from_ratio'],
    wrappers: ['rotate'],
  },
]

type Json = null | boolean | number | string | Json[] | { [key: string]: Json }

/** An input of a wrapper call: a file name under inputs/ (without `.safetensors`), or one with a merge space. */
type WrapperArg = string | { name: string; merge_space: 'weight' | 'delta' | 'param' }

interface Case {
  id: string
  description: string
  python: string
  /** sd-mecha's serialization, with `{dir}` for the folder of the input files. */
  text: string
  /** File under outputs/ with the merged tensors (F32). */
  output: string
  keys: string[]
  shapes: Record<string, number[]>
  /** sd_mecha.merge() keyword options besides the dtypes (Python names). */
  options: Record<string, Json>
  /** Relative tolerance; `atol` is the absolute floor: |x − y| ≤ max(tolerance·|y|, atol). */
  tolerance: number
  atol: number
  /** Set when the recipe came from one of sd-mecha's Python wrappers. */
  wrapper?: { name: string; args: WrapperArg[]; kwargs: Record<string, Json> }
  /** Keys whose result sd-mecha leaves to rounding (its float32 and float64 merges disagree):
   * only their shape and finiteness are checked. */
  ill_posed?: string[]
}

/** sd_mecha.merge() keyword options → MergeOptions. */
const optionNames: Record<string, keyof MergeOptions> = {
  omit_non_finite_inputs: 'omitNonFiniteInputs',
  check_finite_output: 'checkFiniteOutput',
  strict_merge_space: 'strictMergeSpace',
}

function mergeOptions(c: Case): Omit<MergeOptions, 'output'> {
  const options: Record<string, unknown> = { mergeDtype: 'f32', outputDtype: 'f32' }
  for (const [name, value] of Object.entries(c.options)) {
    const tsName = optionNames[name]
    if (!tsName) throw new Error(`${c.id}: no MergeOptions name for sd_mecha.merge(${name}=...)`)
    options[tsName] = value
  }
  return options as Omit<MergeOptions, 'output'>
}

// sd-mecha's Python wrappers build graphs of registered methods; the TypeScript port offers them as
// addDifference(a, b, c?, { alpha, clampToAb }), addPerpendicular(a, b, c, { alpha }),
// copyRegion(a, b, c?, { width, offset, topK }) (sd_mecha.tensor_sum is copy_region under another
// name) and rotate(a, b, c?, { alignment, alpha }). They are looked up at run time so this file
// type-checks before they exist.
type Wrapper = (...args: unknown[]) => RecipeInput
const exported = mecha as unknown as Record<string, Wrapper | undefined>

const wrapperNames: Record<string, { ts: string; positional: number; kwargs: Record<string, string> }> = {
  add_difference: { ts: 'addDifference', positional: 3, kwargs: { alpha: 'alpha', clamp_to_ab: 'clampToAb' } },
  add_perpendicular: { ts: 'addPerpendicular', positional: 3, kwargs: { alpha: 'alpha' } },
  copy_region: { ts: 'copyRegion', positional: 3, kwargs: { width: 'width', offset: 'offset', top_k: 'topK' } },
  tensor_sum: { ts: 'copyRegion', positional: 3, kwargs: { width: 'width', offset: 'offset', top_k: 'topK' } },
  rotate: { ts: 'rotate', positional: 3, kwargs: { alignment: 'alignment', alpha: 'alpha' } },
}

/** Whether every value is finite. */
const allFinite = (values: Float32Array) => values.every((v) => Number.isFinite(v))

for (const suite of suites) {
  const fixtures = new URL(`./fixtures/golden/${suite.name}/`, import.meta.url)
  const inputs = realpathSync(fileURLToPath(new URL('inputs/', fixtures)))
  const cases: Case[] = JSON.parse(readFileSync(new URL('cases.json', fixtures), 'utf8'))
  /** The text with `{dir}` replaced by the inputs folder, escaped as a `.mecha` string. */
  const withDir = (text: string) => text.replaceAll('{dir}', inputs.replace(/\\/g, '\\\\').replace(/"/g, '\\"'))

  test(`${suite.name}: the fixtures cover every merge method the port must run`, (t) => {
    t.deepEqual(
      suite.methods.filter((m) => !cases.some((c) => c.text.includes(`merge "${m}"`))),
      [],
    )
    for (const name of suite.wrappers) {
      t.true(
        cases.some((c) => c.wrapper?.name === name),
        `a case for the ${name} wrapper`,
      )
    }
  })

  for (const c of cases) {
    test(`merge matches sd-mecha: ${suite.name}/${c.id}`, async (t) => {
      const text = withDir(c.text)
      const recipe = deserialize(text)
      t.is(serialize(recipe), text, 'serialize(deserialize(text)) === text')

      const result = await merge(recipe, mergeOptions(c))
      const expected = readSafetensors(join(fileURLToPath(fixtures), 'outputs', c.output))
      t.deepEqual([...expected.keys()].sort(), c.keys, 'the fixture file has the listed keys')
      t.deepEqual([...result.keys()].sort(), c.keys, 'output keys')
      // every key's problems in one assertion (ava reports only the first failing one)
      const problems: Record<string, string[]> = {}
      for (const [key, want] of expected) {
        const got = result.get(key)
        if (!got) continue // reported by the key comparison above
        const found: string[] = []
        if (got.dtype !== 'F32') found.push(`dtype ${got.dtype}, want F32`)
        if (JSON.stringify(got.shape) !== JSON.stringify(want.shape)) {
          found.push(`shape [${got.shape}], want [${want.shape}]`)
        } else {
          const values = toFloat32(got)
          if (values.length !== want.values.length) found.push(`${values.length} values, want ${want.values.length}`)
          else if (c.ill_posed?.includes(key)) {
            if (!allFinite(values)) found.push('non-finite values in an ill-posed key')
          } else found.push(...mismatches(values, want.values, c.tolerance, c.atol))
        }
        if (found.length) problems[key] = found
      }
      t.deepEqual(problems, {}, `values within ${c.tolerance} relative, ${c.atol} absolute (${c.description})`)
    })
  }

  for (const c of cases) {
    const w = c.wrapper
    if (!w) continue
    test(`wrapper builds sd-mecha's graph: ${suite.name}/${c.id}`, (t) => {
      const spec = wrapperNames[w.name]
      if (!spec) return t.fail(`unknown wrapper ${w.name}`)
      const fn = exported[spec.ts]
      if (typeof fn !== 'function') return t.fail(`${spec.ts} is not exported`)
      // one node per input name, as the Python code binds each file to one variable
      const nodes = new Map<string, RecipeInput>()
      const node = (arg: WrapperArg) => {
        const { name, merge_space: mergeSpace } = typeof arg === 'string' ? { name: arg, merge_space: undefined } : arg
        const id = `${name}/${mergeSpace ?? ''}`
        if (!nodes.has(id)) nodes.set(id, model(join(inputs, `${name}.safetensors`), mergeSpace ? { mergeSpace } : {}))
        return nodes.get(id)!
      }
      const args: unknown[] = w.args.map(node)
      while (args.length < spec.positional) args.push(undefined)
      const options: Record<string, Json> = {}
      for (const [name, value] of Object.entries(w.kwargs)) {
        const tsName = spec.kwargs[name]
        if (!tsName) return t.fail(`${w.name}: no TypeScript option for ${name}`)
        options[tsName] = value
      }
      t.is(serialize(fn(...args, options)), withDir(c.text))
    })
  }
}
