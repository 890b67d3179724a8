// Port of sd-mecha's examples/rotate.py: align model A with model B by an orthogonal transform
// (alignment 1, alpha 0: A's rows are centred, rotated as close to B's as a rotation allows, and
// moved to B's mean). Keys with fewer than two dimensions are interpolated by alpha, i.e. kept.
//
//   node --import tsx examples/sd-mecha/rotate.ts a.safetensors b.safetensors [--show KEY]...
import { parseArgs } from 'node:util'
import { merge, model, rotate, toFloat32, type Tensor } from 'sd-mecha'

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: { show: { type: 'string', multiple: true, default: [] } },
})
const [pathA, pathB] = positionals
if (!pathA || !pathB) throw new Error('usage: rotate.ts <a.safetensors> <b.safetensors> [--show KEY]...')

const recipe = rotate(model(pathA), model(pathB))
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
