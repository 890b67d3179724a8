// sd-mecha's merge() options beyond the numeric ones: fallback_model, check_extra_keys,
// strict_mandatory_keys, and how the output records its recipe.
import test from 'ava'
import { existsSync } from 'node:fs'
import { join } from 'node:path'

import {
  RecipeError,
  configs,
  deserialize,
  inspect,
  merge,
  model,
  modelDirs,
  plan,
  toFloat32,
  weightedSum,
  type EmbedRecipe,
} from '../dist/index.js'
import { tempDir, writeSafetensors, type TestTensor } from './helpers.ts'

const f32 = (...values: number[]): TestTensor => ({ dtype: 'F32', shape: [values.length], values })

test('fallbackModel provides the keys the recipe cannot, and the stored recipe includes it', async (t) => {
  const dir = tempDir()
  const [a, b, c] = ['a', 'b', 'c'].map((n) => join(dir, `${n}.safetensors`))
  writeSafetensors(a, { w: f32(0, 4), x: f32(1, 1) })
  writeSafetensors(b, { w: f32(4, 8) })
  writeSafetensors(c, { w: f32(-1, -1), x: f32(7, 9) })
  const recipe = weightedSum(model(a), model(b), { alpha: 0.25 })

  const without = await merge(recipe, { outputDtype: 'f32' })
  t.deepEqual([...without.keys()], ['w'])
  t.deepEqual(
    without.report.keysSkipped.map((s) => s.key),
    ['x'],
  )

  const out = join(dir, 'out.safetensors')
  const report = await merge(recipe, { output: out, outputDtype: 'f32', fallbackModel: c })
  t.is(report.keysWritten, 2)
  t.deepEqual(report.keysSkipped, [])
  t.regex(report.recipe, /merge "fallback"/)
  // the path form and the node form give the same result
  const viaNode = await merge(recipe, { outputDtype: 'f32', fallbackModel: model(c) })
  t.deepEqual([...toFloat32(viaNode.get('w')!)], [1, 5]) // 0.75·a + 0.25·b
  t.deepEqual([...toFloat32(viaNode.get('x')!)], [7, 9]) // from the fallback model
  const reread = await merge(model(out), { outputDtype: 'f32' })
  t.deepEqual([...toFloat32(reread.get('x')!)], [7, 9])

  await t.throwsAsync(merge(recipe, { fallbackModel: 3 as never }), {
    message: /merge: fallbackModel must be a model path or a recipe node/,
  })
})

/** sd1-ldm's CLIP-L text encoder at tiny shapes (config inference reads names), one VAE key, and
 * a key that no config lists. */
function textEncoderOnly(dir: string, name: string, drop: string[] = []) {
  const path = join(dir, name)
  const keys = configs.keys('sd1-ldm')
  const tensors: Record<string, TestTensor> = {}
  for (const k of keys.filter((k) => k.component === 'clip_l' && !drop.includes(k.key))) tensors[k.key] = f32(1)
  tensors[keys.find((k) => k.component === 'vae')!.key] = f32(1)
  tensors['not.a.config.key'] = f32(1)
  writeSafetensors(path, tensors)
  return path
}

test('checkExtraKeys: false leaves input keys outside the config out of the report', async (t) => {
  const a = model(textEncoderOnly(tempDir(), 'te.safetensors'))
  const checked = await merge(weightedSum(a, a))
  t.deepEqual(checked.report.keysSkipped, [
    { key: 'not.a.config.key', reason: 'not a key of the model config "sd1-ldm"' },
  ])
  const unchecked = await merge(weightedSum(a, a), { checkExtraKeys: false })
  t.deepEqual(unchecked.report.keysSkipped, [])
  t.is(unchecked.size, checked.size)
  t.deepEqual(plan(weightedSum(a, a), { checkExtraKeys: false }).keysSkipped, [])
  t.is(plan(weightedSum(a, a)).keysSkipped.length, 1)
})

test('strictMandatoryKeys refuses a merge that cannot build a mandatory key, naming it; optional keys do not count', async (t) => {
  const dir = tempDir()
  const dropped = 'cond_stage_model.transformer.text_model.final_layer_norm.weight'
  const position = 'cond_stage_model.transformer.text_model.embeddings.position_ids'
  const full = textEncoderOnly(dir, 'full.safetensors')
  const pruned = textEncoderOnly(dir, 'pruned.safetensors', [dropped, position])
  const recipe = weightedSum(model(full), model(pruned))

  // the default skips it, as sd-mecha does
  const lenient = await merge(recipe)
  t.true(lenient.report.keysSkipped.some((s) => s.key === dropped))

  // the plan lists every mandatory key it cannot build: the missing VAE and UNet keys and the
  // pruned one, not position_ids (optional in sd1-ldm)
  const unbuilt = plan(recipe).unbuiltMandatory
  const mandatory = configs.keys('sd1-ldm').filter((k) => !k.optional)
  const clipMandatory = mandatory.filter((k) => k.component === 'clip_l').length
  // built: CLIP-L's mandatory keys but the pruned one, and the one VAE key
  t.is(unbuilt.length, mandatory.length - (clipMandatory - 1) - 1)
  t.true(unbuilt.some((k) => k.key === dropped))
  t.false(unbuilt.some((k) => k.key === position))

  const out = join(dir, 'out.safetensors')
  const error = await t.throwsAsync(merge(recipe, { output: out, strictMandatoryKeys: true }), {
    instanceOf: RecipeError,
  })
  t.regex(
    error!.message,
    /^strictMandatoryKeys: \d+ mandatory key\(s\) of the model config "sd1-ldm" cannot be merged: /,
  )
  t.regex(error!.message, /merge without strictMandatoryKeys to skip them/)
  t.false(existsSync(out), 'nothing is written')
})

test('the stored recipe keeps model paths as given (embedRecipe: relative), or absolute, or is left out', async (t) => {
  const dir = tempDir()
  writeSafetensors(join(dir, 'a.safetensors'), { w: f32(1, 2) })
  writeSafetensors(join(dir, 'b.safetensors'), { w: f32(3, 4) })
  modelDirs.add(dir)
  try {
    const recipe = weightedSum(model('a.safetensors'), model('b.safetensors'))
    const stored = async (embedRecipe?: EmbedRecipe) => {
      const out = join(dir, `out-${embedRecipe ?? 'default'}.safetensors`)
      const report = await merge(recipe, { output: out, ...(embedRecipe ? { embedRecipe } : {}) })
      return { report, metadata: inspect(out).metadata }
    }
    const given = await stored()
    t.regex(given.metadata['mecha_recipe'], /^model "a\.safetensors" model_config="structural" merge_space="weight"$/m)
    t.false(given.metadata['mecha_recipe'].includes(dir), 'the folder is not revealed')
    t.is(given.report.recipe, given.metadata['mecha_recipe'])
    t.is((await stored('relative')).metadata['mecha_recipe'], given.metadata['mecha_recipe'])

    const absolute = await stored('absolute')
    t.true(absolute.metadata['mecha_recipe'].includes(`model "${join(dir, 'a.safetensors')}"`))
    t.is(absolute.report.recipe, absolute.metadata['mecha_recipe'])

    const none = await stored('none')
    t.false('mecha_recipe' in none.metadata)
    t.is(none.report.recipe, absolute.metadata['mecha_recipe'], 'the report still has the recipe')

    // a stored relative recipe merges again where its models are found
    const again = await merge(deserialize(given.metadata['mecha_recipe']), { outputDtype: 'f32' })
    t.deepEqual([...toFloat32(again.get('w')!)], [2, 3])
    await t.throwsAsync(merge(recipe, { embedRecipe: 'hidden' as EmbedRecipe }), {
      message: /merge: embedRecipe must be 'relative' \(model paths as given\), 'absolute' or 'none'/,
    })
  } finally {
    modelDirs.clear()
  }
})

test("sdxl-sgm's missing-key handler fills position_ids and the pruned CLIP layers (what 1.1.8's handler is for)", async (t) => {
  const position = 'conditioner.embedders.0.transformer.text_model.embeddings.position_ids'
  const pruned = (key: string) =>
    key.startsWith('conditioner.embedders.0.transformer.text_model.encoder.layers.11.') ||
    key.startsWith('conditioner.embedders.1.model.transformer.resblocks.31.')
  const keys = configs.keys('sdxl-sgm')
  const tensors: Record<string, TestTensor> = {}
  for (const k of keys.filter((k) => k.component === 'clip_l' || k.component === 'clip_g'))
    if (k.key !== position && !pruned(k.key)) tensors[k.key] = f32(1)
  const dir = tempDir()
  const path = join(dir, 'pruned-sdxl.safetensors')
  writeSafetensors(path, tensors)
  const recipe = weightedSum(model(path), model(path))
  const merged = await merge(recipe)

  const ids = merged.get(position)!
  t.is(ids.dtype, 'I64')
  t.deepEqual(ids.shape, [1, 77])
  t.deepEqual([...toFloat32(ids)], [...Array(77).keys()])
  const filled = keys.filter((k) => pruned(k.key))
  t.true(filled.length > 20)
  for (const k of filled) {
    const v = merged.get(k.key)
    t.truthy(v, k.key)
    t.is(v!.dtype, 'F16') // the output dtype
    t.deepEqual(v!.shape, k.shape)
    t.true(
      toFloat32(v!).every((x) => x === 0),
      k.key,
    )
  }
  // only components the inputs have: no UNet or VAE key is made up
  t.false([...merged.keys()].some((k) => k.startsWith('model.') || k.startsWith('first_stage_model.')))
  t.is(merged.size, Object.keys(tensors).length + 1 + filled.length)
  // sd1-ldm has no handler: a pruned position_ids stays missing
  const sd1 = textEncoderOnly(dir, 'sd1.safetensors', [
    'cond_stage_model.transformer.text_model.embeddings.position_ids',
  ])
  const sd1Merged = await merge(weightedSum(model(sd1), model(sd1)))
  t.false(sd1Merged.has('cond_stage_model.transformer.text_model.embeddings.position_ids'))
})
