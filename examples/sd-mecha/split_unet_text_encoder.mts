// Port of sd-mecha's examples/split_unet_text_encoder.py (SDXL models): the UNet from a weighted
// sum of two models, the text encoders (and VAE) from add_perpendicular over their base model.
//
//   node --import tsx examples/sd-mecha/split_unet_text_encoder.ts a.safetensors b.safetensors base.safetensors [--show KEY]...
import { parseArgs } from 'node:util'
import { addPerpendicular, merge, model, pickComponent, toFloat32, weightedSum, type Tensor } from 'sd-mecha'

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: { show: { type: 'string', multiple: true, default: [] } },
})
const [pathA, pathB, pathBase] = positionals
if (!pathA || !pathB || !pathBase) throw new Error('usage: split_unet_text_encoder.ts <a> <b> <base> [--show KEY]...')

const textEncoderRecipe = addPerpendicular(model(pathA), model(pathB), model(pathBase))
const unetRecipe = weightedSum(model(pathA), model(pathB))

// sd-mecha: pick_component(unet_recipe, "diffuser") | text_encoder_recipe
const recipe = pickComponent(unetRecipe, 'diffuser').or(textEncoderRecipe)
const sd = await merge(recipe)

console.log(`${sd.size} tensors in memory`)
for (const key of values.show) {
  const tensor = sd.get(key)
  if (tensor === undefined) throw new Error(`no key ${key} in the result`)
  console.log(JSON.stringify(summary(key, tensor)))
}

/** One line per key: dtype, shape, mean, root mean square and the first values (as f32). */
function summary(key: string, tensor: Tensor) {
  const v = toFloat32(tensor) // f16 and bf16 arrive as raw bits: decode them
  const mean = v.reduce((s, x) => s + x, 0) / v.length
  const rms = Math.sqrt(v.reduce((s, x) => s + x * x, 0) / v.length)
  return { key, dtype: tensor.dtype, shape: tensor.shape, mean, rms, first: Array.from(v.subarray(0, 16)) }
}
