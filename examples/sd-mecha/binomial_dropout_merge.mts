// Port of sd-mecha's examples/binomial_dropout_merge.py: n-supermario dropout. Each model's
// difference from the base keeps each element with probability 1 − 0.9; kept elements are
// averaged where several models keep them, rescaled by 1 / (1 − probability) and added with
// alpha 0.5. The masks are seeded (seed 0) so the merge can be repeated. The random stream is
// this library's own (per key, independent of threads), not NumPy's: the same seed gives other
// masks than in sd-mecha, with the same distribution.
//
//   node --import tsx examples/sd-mecha/binomial_dropout_merge.ts base.safetensors m1.safetensors m2.safetensors... [--show KEY]...
import { parseArgs } from 'node:util'
import { dropout, merge, model, toFloat32, type Tensor } from 'sd-mecha'

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: { show: { type: 'string', multiple: true, default: [] } },
})
const [basePath, ...modelPaths] = positionals
if (!basePath || modelPaths.length === 0)
  throw new Error('usage: binomial_dropout_merge.ts <base> <model>... [--show KEY]...')

const recipe = dropout(model(basePath), ...modelPaths.map((p) => model(p)), { probability: 0.9, alpha: 0.5, seed: 0 })
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
