// LoRAs: kohya LoRA and LyCORIS files are recognised, converted to a difference in a checkpoint's
// model config, and baked into it, one LoRA or several (`bakeLoras`, or `mecha lora bake`); and the
// other way, the difference of two models extracted as a LoRA file (`extractLora`, or
// `mecha lora extract`).
//
//   node --import tsx examples/guide/lora.mts base.safetensors lora.safetensors other-lora.safetensors \
//     [--out baked.safetensors] [--lora extracted.safetensors]
import { parseArgs } from 'node:util'
import { addDifference, bakeLoras, configs, convert, extractLora, inspect, merge, model, plan } from 'sd-mecha'

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    out: { type: 'string', default: 'baked.safetensors' },
    lora: { type: 'string', default: 'extracted.safetensors' },
  },
})
const [basePath, loraPath, otherPath] = positionals
if (!basePath || !loraPath || !otherPath) throw new Error('usage: lora.mts <base> <lora> <other-lora> [--out file]')

// 1. The kohya LoRA/LyCORIS configs sd-mecha derives exist, and a LoRA file is recognised.
console.log(
  configs
    .list()
    .filter((c) => c.id.endsWith('_lora'))
    .map((c) => c.id)
    .join(' '),
)
const info = inspect(loraPath)
console.log(`${loraPath}: ${info.config}`)

// 2. sd-mecha's lora_merge.py: convert() finds the chain of conversions from the LoRA's config to
//    the base's (here sd1-kohya_kohya_lora → sd1-kohya, a delta, → sd1-ldm), and add_difference
//    adds that delta: alpha / rank · up @ down per layer, times 0.8.
const base = model(basePath)
const delta = convert(model(loraPath), base)
const once = plan(addDifference(base, delta, { alpha: 0.8 }))
console.log(`one LoRA: config ${once.config}, ${once.keys} keys`)

// 3. Several LoRAs, in order, each with its alpha (default 1): base + 0.8·lora + 0.5·other.
//    Paths are model(path); keys no LoRA touches keep the base's value.
const recipe = bakeLoras(base, [
  { lora: loraPath, alpha: 0.8 },
  { lora: otherPath, alpha: 0.5 },
])
const report = await merge(recipe, { output: values.out })
console.log(`baked: ${report.keysWritten} keys`)

// 4. Using the LoRA file itself as a delta does not apply it: its keys (lora_unet_…) are not the
//    base's, so the recipe falls back to an unknown ("structural") layout and every LoRA key is
//    skipped. Convert it, as above.
const p = plan(addDifference(base, model(loraPath, { mergeSpace: 'delta' })))
console.log(`as a delta: config ${p.config}, ${p.keysSkipped.length} keys skipped`)

// 5. The other way: the difference baked − base as a kohya LoRA file (sd-mecha's
//    extract_kohya_lora on both models converted to sd1-kohya), each layer truncated to rank 8 by
//    an exact SVD. Baking it into the base gives the baked model back, up to that rank.
const extraction = extractLora(basePath, values.out, { rank: 8, approximate: false })
const extracted = await merge(extraction, { output: values.lora })
console.log(`extracted: ${extracted.keysWritten} keys`)
