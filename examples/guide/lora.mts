// What LoRA support exists today: LoRA/LyCORIS files are recognised, and nothing converts them
// into a delta for a checkpoint yet (sd-mecha's `convert(lora, base)` has no equivalent here).
//
//   node --import tsx examples/guide/lora.mts base.safetensors lora.safetensors
import { parseArgs } from 'node:util'
import { ConfigError, addDifference, configs, convert, inspect, model, plan } from 'sd-mecha'

const { positionals } = parseArgs({ allowPositionals: true })
const [basePath, loraPath] = positionals
if (!basePath || !loraPath) throw new Error('usage: lora.mts <base> <lora>')

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

// 2. sd-mecha's lora_merge.py converts the LoRA to the base's config. No conversion from a LoRA
//    config is registered yet, so convert() refuses, naming both configs.
try {
  convert(model(loraPath), model(basePath))
} catch (error) {
  if (!(error instanceof ConfigError)) throw error
  console.log(`convert: ${error.name}`)
}

// 3. Using the LoRA file as a delta does not apply it: its keys (lora_unet_…) are not the base's,
//    so the recipe falls back to an unknown ("structural") layout and every LoRA key is skipped.
const p = plan(addDifference(model(basePath), model(loraPath, { mergeSpace: 'delta' })))
console.log(`as a delta: config ${p.config}, ${p.keysSkipped.length} keys skipped`)
