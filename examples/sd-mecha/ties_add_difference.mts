// Port of sd-mecha's examples/ties_add_difference.py: TIES-merging of several fine-tunes of one
// base: each model's difference from the base, signs elected per element, agreeing values
// averaged, added to the base with alpha 0.5 (k = 1: nothing trimmed, sd-mecha's default).
// sd-mecha's `add_difference_ties(base, *models, alpha=0.5)` is `addDifferenceTies(base, ...models, { alpha: 0.5 })`.
//
//   node --import tsx examples/sd-mecha/ties_add_difference.ts base.safetensors m1.safetensors m2.safetensors... [--show KEY]...
import { parseArgs } from 'node:util'
import { addDifferenceTies, merge, model, toFloat32, type Tensor } from 'sd-mecha'

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: { show: { type: 'string', multiple: true, default: [] } },
})
const [basePath, ...modelPaths] = positionals
if (!basePath || modelPaths.length === 0)
  throw new Error('usage: ties_add_difference.ts <base> <model>... [--show KEY]...')

const models = modelPaths.map((p) => model(p))
const recipe = addDifferenceTies(model(basePath), ...models, { alpha: 0.5 })
// sd-mecha's example passes output_device="cpu"; every computation runs on the CPU here.
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
