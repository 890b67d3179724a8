// Port of sd-mecha's examples/recipe_deserialize.py: read a `.mecha` recipe (the one
// recipe_serialize.ts writes, or any written by sd-mecha) and merge it in memory.
//
//   node --import tsx examples/sd-mecha/recipe_deserialize.ts [recipes/test_split_unet_text_encoder.mecha] [--show KEY]...
import { readFileSync } from 'node:fs'
import { parseArgs } from 'node:util'
import { deserialize, merge, toFloat32, type Tensor } from 'sd-mecha'

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: { show: { type: 'string', multiple: true, default: [] } },
})
const recipePath = positionals[0] ?? 'recipes/test_split_unet_text_encoder.mecha'

// sd-mecha's deserialize takes the text or its lines; here the text
const recipe = deserialize(readFileSync(recipePath, 'utf8'))
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
