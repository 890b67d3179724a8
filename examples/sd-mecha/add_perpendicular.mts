// Port of sd-mecha's examples/add_perpendicular.py: add to `a` the part of `b`'s change from
// the base model `c` that is perpendicular to `a`'s own change from `c`:
// a + perpendicular_component(a − c, b − c), computed per key over the whole tensor.
//
//   node --import tsx examples/sd-mecha/add_perpendicular.ts a.safetensors b.safetensors base.safetensors [--out result.safetensors]
import { parseArgs } from 'node:util'
import { addPerpendicular, merge, model } from 'sd-mecha'

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: { out: { type: 'string', default: 'result.safetensors' } },
})
const [pathA, pathB, pathBase] = positionals
if (!pathA || !pathB || !pathBase) throw new Error('usage: add_perpendicular.ts <a> <b> <base> [--out file]')

const recipe = addPerpendicular(model(pathA), model(pathB), model(pathBase))

const report = await merge(recipe, { output: values.out })
console.log(`wrote ${report.keysWritten} keys to ${report.output}`)
