// Port of sd-mecha's examples/n_average.py: the plain average of any number of models.
// sd-mecha's `n_average(*models)` takes varargs; the builder here takes them as an array.
//
//   node --import tsx examples/sd-mecha/n_average.ts m1.safetensors m2.safetensors ... [--show KEY]...
import { parseArgs } from 'node:util'
import { merge, model, nAverage, toFloat32, type Tensor } from 'sd-mecha'

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: { show: { type: 'string', multiple: true, default: [] } },
})
if (positionals.length < 2) throw new Error('usage: n_average.ts <model> <model>... [--show KEY]...')

const recipe = nAverage(positionals.map((p) => model(p)))
const sd = await merge(recipe)

console.log(`averaged ${positionals.length} models: ${sd.size} tensors`)
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
