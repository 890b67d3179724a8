// Getting started: describe a merge, look at it, run it, read what it did.
//
//   node --import tsx examples/guide/getting-started.mts base.safetensors style.safetensors [--out merged.safetensors]
import { parseArgs } from 'node:util'
import { merge, model, plan, serialize, weightedSum } from 'sd-mecha'

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: { out: { type: 'string', default: 'merged.safetensors' } },
})
const [basePath, stylePath] = positionals
if (!basePath || !stylePath) throw new Error('usage: getting-started.mts <base> <style> [--out file]')

// 1. Describe the merge. Nothing is read yet.
const base = model(basePath)
const style = model(stylePath)
const recipe = weightedSum(base, style, { alpha: 0.3 })

// 2. A dry run from the headers only: config, keys, memory.
const p = plan(recipe)
console.log(`config ${p.config}, ${p.keys} keys, ${p.keysSkipped.length} skipped, ~${p.outputBytes} output bytes`)

// 3. Run it.
let updates = 0
const report = await merge(recipe, {
  output: values.out,
  onProgress: () => updates++,
})
console.log(`wrote ${report.keysWritten} keys in ${report.seconds.toFixed(2)} s (${updates} progress updates)`)

// 4. The recipe as sd-mecha's `.mecha` text (also stored in the output's metadata).
console.log(serialize(recipe))
