// Port of sd-mecha's examples/lora_merge.py: bake a LoRA into a checkpoint. `convert()` turns the
// LoRA (a kohya LoRA or LyCORIS file) into a difference in the base's model config, per layer
// alpha / rank · up @ down, and add_difference adds it; the result stays in memory.
//
//   node --import tsx examples/sd-mecha/lora_merge.mts base.safetensors lora.safetensors [--show KEY]...
import { parseArgs } from 'node:util'
import { addDifference, convert, merge, model, toFloat32, type Tensor } from 'sd-mecha'

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: { show: { type: 'string', multiple: true, default: [] } },
})
const [basePath, loraPath] = positionals
if (!basePath || !loraPath)
  throw new Error('usage: lora_merge.mts <base.safetensors> <lora.safetensors> [--show KEY]...')

// sd-mecha: lora = sd_mecha.convert(sd_mecha.model(lora_path), base)
const base = model(basePath)
const lora = convert(model(loraPath), base)
const recipe = addDifference(base, lora, { alpha: 1.0 })

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
