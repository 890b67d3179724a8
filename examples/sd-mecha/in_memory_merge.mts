// Port of sd-mecha's examples/in_memory_merge.py: merge without an output file and keep the
// tensors in memory. sd-mecha returns a dict of torch tensors; here `merge()` resolves with a
// `MergedModel`, a Map of key → { dtype, shape, data } that also carries the merge report.
//
//   node --import tsx examples/sd-mecha/in_memory_merge.ts a.safetensors b.safetensors [--show KEY]...
import { parseArgs } from 'node:util'
import { merge, model, toFloat32, weightedSum, type Tensor } from 'sd-mecha'

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: { show: { type: 'string', multiple: true, default: [] } },
})
const [pathA, pathB] = positionals
if (!pathA || !pathB) throw new Error('usage: in_memory_merge.ts <a.safetensors> <b.safetensors> [--show KEY]...')

const recipe = weightedSum(model(pathA), model(pathB))
const sd = await merge(recipe)

console.log(`${sd.size} tensors in memory, ${sd.report.keysSkipped.length} keys skipped`)
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
