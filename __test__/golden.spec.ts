// Conformance with sd-mecha 1.1.8, from data its real implementation produced
// (scripts/golden/generate.py): the same recipes built here serialize to the same text, every
// text reads back unchanged, and config inference agrees on synthetic headers.
import test from 'ava'
import { readFileSync, realpathSync } from 'node:fs'
import { join } from 'node:path'
import { gunzipSync } from 'node:zlib'

import {
  MechaError,
  callMethod,
  clamp,
  convert,
  defineMergeMethod,
  deserialize,
  inspect,
  int,
  literal,
  model,
  nAverage,
  omitComponent,
  pickComponent,
  serialize,
  weightedSum,
  type LiteralDict,
  type MergeSpace,
  type RecipeInput,
  type RecipeNode,
} from '../dist/index.js'
import { tempDir, writeSafetensors } from './helpers.ts'

const fixtures = new URL('./fixtures/golden/', import.meta.url)
const read = (name: string) => readFileSync(new URL(name, fixtures))
const models: Record<string, string[]> = JSON.parse(gunzipSync(read('models.json.gz')).toString())
const inference: Record<string, { config: string; candidates: string[] }> = JSON.parse(
  read('inference.json').toString(),
)
interface Case {
  id: string
  python: string
  text: string | null
  error: string | null
  lenient_text?: string | null
}
const cases: Case[] = JSON.parse(read('cases.json').toString())

// sd-mecha writes resolved absolute paths; the fixtures say {dir} instead.
const dir = realpathSync(tempDir())
for (const [name, keys] of Object.entries(models)) {
  writeSafetensors(
    join(dir, name),
    Object.fromEntries(keys.map((k) => [k, { dtype: 'F16' as const, shape: [0], values: [] }])),
  )
}
const withDir = (text: string) => text.replaceAll('{dir}', dir.replace(/\\/g, '\\\\').replace(/"/g, '\\"'))

const m = (name: string, options: { config?: string; mergeSpace?: MergeSpace } = {}) => model(join(dir, name), options)
const call = (id: string, args: RecipeInput[], kwargs: Record<string, RecipeInput> = {}) => callMethod(id, args, kwargs)

/** The Python dict literal in a case's code (`{'BASE': 0.0, 'IN00': 1, …}`), ints kept as ints. */
function pyDict(id: string): LiteralDict {
  const source = cases.find((c) => c.id === id)!.python.match(/\{[^}]*\}/)![0]
  return Object.fromEntries(
    [...source.matchAll(/['"]([^'"]+)['"]\s*:\s*([^,}\s]+)/g)].map(([, k, v]) => [
      k,
      /^-?\d+$/.test(v) ? int(Number(v)) : Number(v),
    ]),
  )
}

// The generator's `golden_mix(a, b, *, k=0.25)`, defined the same way here.
const goldenMix = defineMergeMethod({
  id: 'golden_mix',
  inputs: [{ name: 'a' }, { name: 'b' }, { name: 'k', type: 'float', default: 0.25, keywordOnly: true }],
  fn: ({ a, b, k }) =>
    (a as Float32Array).map((x, i) => x * (1 - (k as number)) + (b as Float32Array)[i] * (k as number)),
})

const [sd1, sd1b, sd1c] = ['sd1.safetensors', 'sd1_b.safetensors', 'sd1_c.safetensors']
const recipes: Record<string, () => RecipeInput> = {
  model: () => m(sd1),
  model_explicit_config: () => m(sd1, { config: 'sd1-ldm' }),
  model_delta: () => m(sd1, { mergeSpace: 'delta' }),
  literal_param: () => literal(0.5, { mergeSpace: 'param' }),
  literal_dict_blocks: () =>
    literal(pyDict('literal_dict_blocks'), { config: 'sd1-supermerger_blocks', mergeSpace: 'param' }),
  weighted_sum_default: () => weightedSum(m(sd1), m(sd1b)),
  weighted_sum_int: () => weightedSum(m(sd1), m(sd1b), { alpha: int(1) }),
  weighted_sum_float_one: () => weightedSum(m(sd1), m(sd1b), { alpha: 1.0 }),
  weighted_sum_tiny: () => weightedSum(m(sd1), m(sd1b), { alpha: 1e-6 }),
  weighted_sum_point3: () => weightedSum(m(sd1), m(sd1b), { alpha: 0.3 }),
  weighted_sum_positional: () => call('weighted_sum', [m(sd1), m(sd1b), 0.3]),
  weighted_sum_true: () => weightedSum(m(sd1), m(sd1b), { alpha: true }),
  weighted_sum_false: () => weightedSum(m(sd1), m(sd1b), { alpha: false }),
  weighted_sum_negative: () => weightedSum(m(sd1), m(sd1b), { alpha: -0.25 }),
  weighted_sum_same_file_twice: () => weightedSum(m(sd1), m(sd1), { alpha: 0.25 }),
  weighted_sum_nested: () => {
    const a = m(sd1)
    return weightedSum(weightedSum(a, m(sd1b), { alpha: 0.5 }), weightedSum(a, m(sd1c), { alpha: 0.5 }), { alpha: 0.5 })
  },
  op_subtract: () => m(sd1).sub(m(sd1b)),
  op_add_difference: () => m(sd1).add(m(sd1b).sub(m(sd1c))),
  op_scale: () => m(sd1).sub(m(sd1b)).mul(0.5),
  op_scale_int: () => m(sd1).sub(m(sd1b)).mul(int(2)),
  op_add_scaled: () => m(sd1).add(m(sd1b).sub(m(sd1c)).mul(0.5)),
  op_fallback: () => m('sd1_unet.safetensors').or(m(sd1)),
  op_fallback_scalar: () => m(sd1).or(1.0),
  op_to_dtype: () => m(sd1).to({ dtype: 'float16' }),
  op_to_device_dtype: () => m(sd1).to({ device: 'cpu', dtype: 'bfloat16' }),
  op_chain: () => {
    const a = m(sd1)
    return a
      .add(m(sd1b).sub(m(sd1c)).mul(0.5))
      .to({ dtype: 'float16' })
      .or(a)
  },
  add_difference_registered: () => call('add_difference', [m(sd1), m(sd1b).sub(m(sd1c))], { alpha: 0.5 }),
  add_difference_delta_model: () => call('add_difference', [m(sd1), m(sd1b, { mergeSpace: 'delta' })]),
  scale_registered: () => call('scale', [m(sd1b).sub(m(sd1c))]),
  subtract_registered: () => call('subtract', [m(sd1), m(sd1b)]),
  fallback_registered: () => call('fallback', [m('sd1_unet.safetensors'), m(sd1)]),
  cast_registered: () => call('cast', [m(sd1)], { device: null, dtype: 'bfloat16' }),
  cast_defaults: () => call('cast', [m(sd1)]),
  clamp_kwonly: () => clamp(m(sd1), [m(sd1b), m(sd1c)], { stiffness: 0.5 }),
  clamp_kwonly_default: () => clamp(m(sd1), [m(sd1b), m(sd1c)]),
  clamp_single_bound: () => clamp(weightedSum(m(sd1), m(sd1b), { alpha: 1.5 }), [m(sd1c)]),
  n_average_3: () => nAverage([m(sd1), m(sd1b), m(sd1c)]),
  n_average_repeat: () => {
    const a = m(sd1)
    return nAverage([a, m(sd1b), a])
  },
  pick_component: () => pickComponent(m(sd1), 'diffuser'),
  omit_component: () => omitComponent(m(sd1), 'clip_l'),
  pick_component_escape: () => pickComponent(m(sd1), 'we"ird\\name'),
  string_with_equals: () => pickComponent(m(sd1), 'a=b c'),
  shared_subtract: () => {
    const d = m(sd1b).sub(m(sd1c))
    return weightedSum(m(sd1).add(d), call('add_difference', [m(sd1), d], { alpha: 0.5 }))
  },
  shared_model_operators: () => {
    const a = m(sd1)
    return a.add(m(sd1b).sub(a).mul(0.5)).or(a)
  },
  structural_literal_equality: () => {
    const a = m(sd1)
    const oneF = call('convert_singleton', [literal(1.0, { mergeSpace: 'param' })])
    const oneI = call('convert_singleton', [literal(int(1), { mergeSpace: 'param' })])
    return weightedSum(weightedSum(a, m(sd1b), { alpha: oneF }), m(sd1c), { alpha: oneI })
  },
  structural_model_equality: () => weightedSum(m(sd1, { config: 'sd1-ldm' }), m(sd1), { alpha: 0.5 }),
  blocks_sd1_float: () => {
    const a = m(sd1)
    return weightedSum(a, m(sd1b), { alpha: convert(pyDict('blocks_sd1_float'), a) })
  },
  blocks_sd1_int: () => {
    const a = m(sd1)
    return weightedSum(a, m(sd1b), { alpha: convert(pyDict('blocks_sd1_int'), a) })
  },
  blocks_sd1_fallback: () => {
    const a = m(sd1)
    return weightedSum(a, m(sd1b), { alpha: (convert(pyDict('blocks_sd1_fallback'), a) as RecipeNode).or(1.0) })
  },
  blocks_sd1_partial_fallback: () => {
    const a = m(sd1)
    return weightedSum(a, m(sd1b), { alpha: (convert(pyDict('blocks_sd1_partial_fallback'), a) as RecipeNode).or(0.0) })
  },
  blocks_sd1_config_id: () =>
    weightedSum(m(sd1), m(sd1b), { alpha: convert(pyDict('blocks_sd1_config_id'), 'sd1-ldm') }),
  blocks_float_formats: () => {
    const a = m(sd1)
    return weightedSum(a, m(sd1b), { alpha: convert(pyDict('blocks_float_formats'), a) })
  },
  blocks_sdxl: () => {
    const a = m('sdxl.safetensors')
    return weightedSum(a, m('sdxl_b.safetensors'), { alpha: convert(pyDict('blocks_sdxl'), a) })
  },
  blocks_registered_converter: () =>
    weightedSum(m(sd1), m(sd1b), {
      alpha: call('convert_sd1_blocks_to_ldm', [
        literal(pyDict('blocks_registered_converter'), { config: 'sd1-supermerger_blocks' }),
      ]),
    }),
  convert_singleton_registered: () =>
    weightedSum(m(sd1), m(sd1b), { alpha: call('convert_singleton', [literal(0.75)]) }),
  unet_only: () => weightedSum(m('sd1_unet.safetensors'), m('sd1_unet_b.safetensors')),
  unet_only_explicit_config: () => m('sd1_unet.safetensors', { config: 'sd1-ldm' }),
  aliased: () => weightedSum(m('sd1_aliased.safetensors'), m(sd1)),
  no_optional: () => weightedSum(m('sd1_no_optional.safetensors'), m(sd1)),
  partial_clip_vae: () => weightedSum(m('sd1_clip_vae.safetensors'), m(sd1)),
  unknown_arch: () => weightedSum(m('unknown_a.safetensors'), m('unknown_b.safetensors'), { alpha: 0.3 }),
  unknown_arch_single: () => m('unknown_a.safetensors'),
  sdxl_weighted_sum: () => weightedSum(m('sdxl.safetensors'), m('sdxl_b.safetensors'), { alpha: 0.4 }),
  sdxl_add_difference: () => m('sdxl.safetensors').add(m('sdxl_b.safetensors').sub(m('sdxl_c.safetensors'))),
  sdxl_unet_fallback: () => m('sdxl_unet.safetensors').or(m('sdxl.safetensors')),
  flux_weighted_sum: () => weightedSum(m('flux.safetensors'), m('flux_b.safetensors'), { alpha: 0.5 }),
  lora_sdxl_model: () => m('lora_sdxl.safetensors'),
  lora_sd1_model: () => m('lora_sd1.safetensors'),
  path_with_space: () => weightedSum(m('sd1 copy.safetensors'), m(sd1)),
  path_with_equals: () => weightedSum(m('a=b.safetensors'), m(sd1)),
  golden_mix_default: () => goldenMix(m(sd1), m(sd1b)),
  golden_mix_explicit: () => goldenMix(m(sd1), m(sd1b), { k: 0.75 }),
  golden_mix_nested: () => goldenMix(m(sd1).add(m(sd1b).sub(m(sd1c))), weightedSum(m(sd1), m(sd1c)), { k: int(1) }),
  error_add_two_weights: () => m(sd1).add(m(sd1b)),
  error_unknown_config: () => m(sd1, { config: 'sd1-nope' }),
  error_unknown_merge_space: () => m(sd1, { mergeSpace: 'latent' as MergeSpace }),
  error_missing_file: () => m('missing.safetensors'),
  error_wrong_config: () => m(sd1, { config: 'sdxl-sgm' }),
  error_missing_mandatory_key: () => m('sd1_missing_key.safetensors'),
  error_sd1_with_sdxl: () => weightedSum(m(sd1), m('sdxl.safetensors')),
  error_weight_with_delta: () => weightedSum(m(sd1), m(sd1b).sub(m(sd1c))),
  error_subtract_delta: () => call('subtract', [m(sd1).sub(m(sd1b)), m(sd1)]),
  error_literal_no_merge_space: () => literal(0.5),
  error_pick_unknown_method: () => call('weighted_summ', [m(sd1), m(sd1b)]),
  error_too_many_args: () => call('weighted_sum', [m(sd1), m(sd1b), 0.5, 0.5]),
  error_unknown_keyword: () => call('weighted_sum', [m(sd1), m(sd1b)], { beta: 0.5 }),
  error_golden_mix_positional_k: () => call('golden_mix', [m(sd1), m(sd1b), 0.75]),
}

/**
 * sd-mecha's `serialize` insists on every mandatory key of the inferred config, so it refuses
 * partial models (a UNet-only file) that its own `merge` accepts; this library serializes them as
 * `merge` does (the fixtures' `lenient_text`). See docs/differences.md.
 */
const expected = (c: Case) =>
  differences[c.id] ?? c.text ?? (c.error?.includes('missing required keys') ? (c.lenient_text ?? null) : null)

/**
 * sd-mecha makes literals that carry a config and a merge space equal by value, so `literal(1)`
 * silently becomes the `literal(1.0)` seen first (and a deserialized `k=1` comes back as `k=1.0`,
 * breaking its own round trip). Here they stay distinct. See docs/differences.md.
 */
const differences: Record<string, string> = {
  structural_literal_equality: [
    'version 0.1.0',
    'model "{dir}/sd1.safetensors" model_config="sd1-ldm" merge_space="weight"',
    'model "{dir}/sd1_b.safetensors" model_config="sd1-ldm" merge_space="weight"',
    'dict key=1.0',
    'literal &2 model_config="singleton-mecha" merge_space="param"',
    'merge "convert_singleton" &3',
    'merge "convert_singleton" &4',
    'merge "weighted_sum" &0 &1 &5',
    'model "{dir}/sd1_c.safetensors" model_config="sd1-ldm" merge_space="weight"',
    'dict key=1',
    'literal &8 model_config="singleton-mecha" merge_space="param"',
    'merge "convert_singleton" &9',
    'merge "convert_singleton" &10',
    'merge "weighted_sum" &6 &7 &11',
  ].join('\n'),
}

test('every fixture case has a TypeScript recipe', (t) => {
  t.true(cases.length >= 30)
  t.deepEqual(
    cases.map((c) => c.id).filter((id) => !recipes[id]),
    [],
  )
})

for (const c of cases) {
  const want = expected(c)
  test(`serialize matches sd-mecha: ${c.id}`, (t) => {
    if (want === null) {
      t.throws(() => serialize(recipes[c.id]()), { instanceOf: MechaError }, `sd-mecha: ${c.error}`)
      return
    }
    t.is(serialize(recipes[c.id]()), withDir(want))
  })
  if (want !== null) {
    test(`serialize(deserialize(text)) === text: ${c.id}`, (t) => {
      const text = withDir(want)
      t.is(serialize(deserialize(text)), text)
    })
  }
}

test('config inference agrees with sd-mecha on every synthetic header', (t) => {
  for (const [file, { config, candidates }] of Object.entries(inference)) {
    const info = inspect(join(dir, file))
    t.is(info.config ?? 'structural', config, file)
    t.deepEqual(info.configCandidates, candidates, file)
  }
})
