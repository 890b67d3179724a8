// A few places where this library deliberately differs from sd-mecha 1.1.8 (docs/differences.md).
//
//   node --import tsx examples/guide/differences.mts a.safetensors b.safetensors b-missing-a-key.safetensors
import { parseArgs } from 'node:util'
import { dropout, merge, model, weightedSum } from 'sd-mecha'

const { positionals } = parseArgs({ allowPositionals: true })
const [pathA, pathB, pathPartial] = positionals
if (!pathA || !pathB || !pathPartial) throw new Error('usage: differences.mts <a> <b> <partial>')
const a = model(pathA)
const b = model(pathB)

// Integer tensors keep their dtype: sd-mecha writes position_ids as fp16.
const sd = await merge(weightedSum(a, b))
const dtypes = new Set([...sd.values()].map((t) => t.dtype))
console.log(`dtypes in the result: ${[...dtypes].sort().join(' ')}`)

// Keys that cannot be built are reported with the reason (sd-mecha logs them at DEBUG level).
const partial = await merge(weightedSum(a, model(pathPartial)))
for (const { key, reason } of partial.report.keysSkipped) console.log(`skipped ${key}: ${reason}`)

// A random method given seed: null gets a chosen seed, reported and recorded in the recipe, so
// the merge can be replayed (sd-mecha draws unseeded).
const random = await merge(dropout(a, b, { seed: null }))
const [chosen] = random.report.seeds
console.log(`chosen seed ${chosen.method}.${chosen.param} = ${chosen.seed}`)
// The stored recipe (report.recipe, the output's mecha_recipe) holds the seed as a literal.
console.log(`recorded: ${random.report.recipe.includes(`dict key=${chosen.seed}\n`)}`)
