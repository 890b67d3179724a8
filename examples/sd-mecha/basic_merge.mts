// Port of sd-mecha's examples/basic_merge.py: a weighted sum of two models, saved to a file.
//
//   node --import tsx examples/sd-mecha/basic_merge.ts a.safetensors b.safetensors [--out output.safetensors]
import { parseArgs } from 'node:util'
import { merge, model, weightedSum } from 'sd-mecha'

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: { out: { type: 'string', default: 'output.safetensors' } },
})
const [pathA, pathB] = positionals
if (!pathA || !pathB) throw new Error('usage: basic_merge.ts <a.safetensors> <b.safetensors> [--out file]')

// plan a simple weighted sum (alpha defaults to 0.5, as in sd-mecha); nothing is read yet
const a = model(pathA)
const b = model(pathB)
const recipe = weightedSum(a, b)

// perform the entire merge plan and save to the output path
const report = await merge(recipe, { output: values.out })
console.log(`wrote ${report.keysWritten} keys to ${report.output} in ${report.seconds.toFixed(2)} s`)
