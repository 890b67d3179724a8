// Block weights (MBW): one alpha per SuperMerger block, turned into per-key alphas by sd-mecha's
// block conversion (`sd1-supermerger_blocks` → `sd1-ldm`, or the SDXL one), chosen from the
// model's config.
//
//   node --import tsx examples/guide/block-weights.mts a.safetensors b.safetensors [--out mbw.safetensors]
import { parseArgs } from 'node:util'
import { configs, convert, merge, model, weightedSum } from 'sd-mecha'

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: { out: { type: 'string', default: 'mbw.safetensors' } },
})
const [pathA, pathB] = positionals
if (!pathA || !pathB) throw new Error('usage: block-weights.mts <a> <b> [--out file]')
const a = model(pathA)
const b = model(pathB)

// The block names are the keys of the blocks config: BASE, IN00…IN11, M00, OUT00…OUT11 for SD1.
const names = configs.keys('sd1-supermerger_blocks').map((k) => k.key)
console.log(names.join(' '))

// sd-mecha: sd_mecha.convert({"BASE": 0, "IN00": ..., ...}, a)
const blocks: Record<string, number> = { BASE: 0 }
for (let i = 0; i < 12; i++) blocks[`IN${String(i).padStart(2, '0')}`] = i / 12
blocks.M00 = 0.5
for (let i = 0; i < 12; i++) blocks[`OUT${String(i).padStart(2, '0')}`] = 1 - i / 12
const alpha = convert(blocks, a)

const report = await merge(weightedSum(a, b, { alpha }), { output: values.out })
console.log(`wrote ${report.keysWritten} keys`)
