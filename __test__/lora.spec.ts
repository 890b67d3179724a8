// bakeLoras(): each LoRA converted to the base's config and added with its alpha, in order.
import test from 'ava'
import { join } from 'node:path'

import {
  OptionError,
  addDifference,
  bakeLoras,
  configs,
  convert,
  merge,
  model,
  serialize,
  toFloat32,
  type LoraInput,
} from '../dist/index.js'
import { randomValues, tempDir, writeSafetensors, type TestTensor } from './helpers.ts'

test('bakeLoras refuses an empty list and entries that are not LoRAs, with an OptionError naming them', (t) => {
  const cases: [() => unknown, RegExp][] = [
    [() => bakeLoras('base.safetensors', []), /^bakeLoras: loras is empty; give at least one LoRA/],
    [
      () => bakeLoras('base.safetensors', 'lora.safetensors' as unknown as LoraInput[]),
      /^bakeLoras: loras must be an array of LoRA paths, recipe nodes or \{ lora, alpha \} entries$/,
    ],
    [() => bakeLoras('', ['lora.safetensors']), /^bakeLoras: base must be a safetensors path .*, got ""$/],
    [
      () => bakeLoras('base.safetensors', ['a.safetensors', 3 as unknown as string]),
      /^bakeLoras: loras\[1\] must be a safetensors path \(a non-empty string\) or a recipe node, got number$/,
    ],
    [
      () => bakeLoras('base.safetensors', [{ lora: 'a.safetensors', alhpa: 0.5 } as LoraInput]),
      /^bakeLoras: loras\[0\]: unknown option "alhpa"; did you mean "alpha"\?$/,
    ],
    [
      () => bakeLoras('base.safetensors', [{ lora: 'a.safetensors', alpha: '0.5' as unknown as number }]),
      /^bakeLoras: loras\[0\]\.alpha must be a finite number, got "0\.5"$/,
    ],
    [
      () => bakeLoras('base.safetensors', [{ lora: 'a.safetensors', alpha: NaN }]),
      /^bakeLoras: loras\[0\]\.alpha must be a finite number, got NaN$/,
    ],
    [
      () => bakeLoras('base.safetensors', [{ alpha: 1 } as LoraInput]),
      /^bakeLoras: loras\[0\]\.lora must be a safetensors path .*, got undefined$/,
    ],
  ]
  for (const [call, message] of cases) {
    const error = t.throws(call, { instanceOf: OptionError })
    t.regex(error!.message, message)
  }
})

/** Two keys of sd1-ldm's UNet: the config is inferred from names only, so shapes can be small. */
const [KEY_A, KEY_B] = configs
  .keys('sd1-ldm')
  .filter((k) => k.key.startsWith('model.diffusion_model.out.'))
  .map((k) => k.key)

test('bakeLoras adds each difference times its alpha in order, keeping the previous value where one lacks a key', async (t) => {
  const dir = tempDir()
  const path = (name: string) => join(dir, `${name}.safetensors`)
  const f32 = (values: number[]): TestTensor => ({ dtype: 'F32', shape: [2], values })
  writeSafetensors(path('base'), { [KEY_A]: f32([1, 2]), [KEY_B]: f32([3, 4]) })
  // deltas already in the base's config: convert() leaves them as they are
  writeSafetensors(path('d1'), { [KEY_A]: f32([10, 20]) })
  writeSafetensors(path('d2'), { [KEY_A]: f32([100, 200]), [KEY_B]: f32([1000, 2000]) })
  const base = model(path('base'))
  const recipe = bakeLoras(base, [
    model(path('d1'), { mergeSpace: 'delta' }),
    { lora: model(path('d2'), { mergeSpace: 'delta' }), alpha: 0.5 },
  ])
  const merged = await merge(recipe, { outputDtype: 'f32' })
  t.deepEqual([...merged.keys()], [KEY_A, KEY_B])
  t.deepEqual(Array.from(toFloat32(merged.get(KEY_A)!)), [1 + 10 + 50, 2 + 20 + 100])
  t.deepEqual(Array.from(toFloat32(merged.get(KEY_B)!)), [3 + 500, 4 + 1000], 'd1 lacks the key: the base value')

  // the graph is sd-mecha's add_difference wrapper, once per LoRA, over one base node
  const text = serialize(recipe)
  t.is(text.match(/^model ".*base\.safetensors"/gm)?.length, 1)
  t.is(text.match(/^merge "add_difference" /gm)?.length, 2)
  t.regex(text.trimEnd().split('\n').at(-1)!, /^merge "fallback" &\d+ &\d+$/)
  t.regex(text, /dict key=0\.5\n/)
  // a path is a model; alpha defaults to 1
  t.is(
    serialize(bakeLoras(path('base'), [{ lora: model(path('d1'), { mergeSpace: 'delta' }) }])),
    serialize(addDifference(model(path('base')), model(path('d1'), { mergeSpace: 'delta' }), { alpha: 1 })),
  )
})

test('bakeLoras bakes a kohya LoRA into an sdxl-sgm checkpoint, as addDifference(base, convert(lora, base)) does', async (t) => {
  const dir = tempDir()
  const base = join(dir, 'sgm.safetensors')
  const lora = join(dir, 'lora.safetensors')
  const values = (seed: number, n: number) => randomValues(seed, n).map(Math.fround)
  const q = 'conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight'
  const baseQ = values(1, 768 * 768)
  writeSafetensors(base, {
    [q]: { dtype: 'F32', shape: [768, 768], values: baseQ },
    'model.diffusion_model.input_blocks.4.1.proj_in.bias': { dtype: 'F32', shape: [640], values: values(2, 640) },
  })
  const stem = 'lora_te1_text_model_encoder_layers_0_self_attn_q_proj'
  const [up, down] = [values(3, 768 * 4), values(4, 4 * 768)]
  writeSafetensors(lora, {
    [`${stem}.lora_up.weight`]: { dtype: 'F32', shape: [768, 4], values: up },
    [`${stem}.lora_down.weight`]: { dtype: 'F32', shape: [4, 768], values: down },
    [`${stem}.alpha`]: { dtype: 'F32', shape: [], values: [2] },
  })
  const baked = await merge(bakeLoras(base, [{ lora, alpha: 0.8 }]), { outputDtype: 'f32' })
  const explicit = await merge(addDifference(model(base), convert(model(lora), model(base)), { alpha: 0.8 }), {
    outputDtype: 'f32',
  })
  t.deepEqual([...baked.keys()].sort(), [...explicit.keys()].sort())
  for (const [key, tensor] of explicit) t.deepEqual(toFloat32(baked.get(key)!), toFloat32(tensor), key)
  // base + 0.8 · (alpha / rank) · up @ down, in float64
  const got = toFloat32(baked.get(q)!)
  let worst = 0
  for (let i = 0; i < 768; i++)
    for (let j = 0; j < 768; j++) {
      let delta = 0
      for (let k = 0; k < 4; k++) delta += up[i * 4 + k] * down[k * 768 + j]
      const expected = baseQ[i * 768 + j] + 0.8 * (2 / 4) * delta
      worst = Math.max(worst, Math.abs(got[i * 768 + j] - expected) / Math.max(1, Math.abs(expected)))
    }
  t.true(worst <= 1e-5, `largest error ${worst}`)
})

test('a LoRA that trains only some of CLIP-G q, k and v still changes in_proj_weight, the other blocks by zero', async (t) => {
  const dir = tempDir()
  const IN_PROJ = 'conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight'
  const width = 1280
  const base = randomValues(3, 3 * width * width).map(Math.fround)
  writeSafetensors(join(dir, 'base.safetensors'), {
    [IN_PROJ]: { dtype: 'F32', shape: [3 * width, width], values: base },
  })
  // kohya names CLIP-G's projections te2 …q_proj, k_proj, v_proj; this LoRA has q and v only
  const [rank, alpha] = [2, 1]
  const factors = (proj: string, seed: number) => {
    const stem = `lora_te2_text_model_encoder_layers_0_self_attn_${proj}_proj`
    return {
      [`${stem}.lora_up.weight`]: {
        dtype: 'F32' as const,
        shape: [width, rank],
        values: randomValues(seed, width * rank).map(Math.fround),
      },
      [`${stem}.lora_down.weight`]: {
        dtype: 'F32' as const,
        shape: [rank, width],
        values: randomValues(seed + 1, rank * width).map(Math.fround),
      },
      [`${stem}.alpha`]: { dtype: 'F32' as const, shape: [], values: [alpha] },
    }
  }
  const lora = { ...factors('q', 10), ...factors('v', 20) }
  writeSafetensors(join(dir, 'lora.safetensors'), lora)
  const merged = await merge(bakeLoras(join(dir, 'base.safetensors'), [join(dir, 'lora.safetensors')]), {
    outputDtype: 'f32',
  })
  t.deepEqual(merged.report.keysSkipped, [], 'every LoRA key is applied')
  const out = toFloat32(merged.get(IN_PROJ)!)
  const delta = (proj: 'q' | 'v', i: number, j: number) => {
    const stem = `lora_te2_text_model_encoder_layers_0_self_attn_${proj}_proj`
    const [up, down] = [lora[`${stem}.lora_up.weight`].values, lora[`${stem}.lora_down.weight`].values]
    let sum = 0
    for (let k = 0; k < rank; k++) sum += up[i * rank + k] * down[k * width + j]
    return (alpha / rank) * sum
  }
  let worst = 0
  for (const i of [0, 7, width - 1, width, width + 5, 2 * width - 1, 2 * width, 3 * width - 1])
    for (const j of [0, 3, width - 1]) {
      const block = Math.floor(i / width)
      const change = block === 0 ? delta('q', i, j) : block === 2 ? delta('v', i - 2 * width, j) : 0
      worst = Math.max(worst, Math.abs(out[i * width + j] - (base[i * width + j] + change)))
    }
  t.true(worst < 1e-5, `q and v rows changed, k rows kept (max error ${worst})`)
})
