// Recipes and merge spaces: operators, the weight/delta/param spaces, and `.mecha` round trips.
//
//   node --import tsx examples/guide/recipes-and-merge-spaces.mts a.safetensors b.safetensors base.safetensors [--show KEY]...
import { parseArgs } from 'node:util'
import {
  MergeSpaceError,
  addDifference,
  deserialize,
  merge,
  model,
  plan,
  serialize,
  toFloat32,
  weightedSum,
} from 'sd-mecha'

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: { show: { type: 'string', multiple: true, default: [] } },
})
const [pathA, pathB, pathBase] = positionals
if (!pathA || !pathB || !pathBase) throw new Error('usage: recipes-and-merge-spaces.mts <a> <b> <base> [--show KEY]...')
const a = model(pathA)
const b = model(pathB)
const base = model(pathBase)

// sd-mecha: a + (b - base) * 0.5
const delta = b.sub(base) // subtract(weight, weight) → delta
const recipe = a.add(delta.mul(0.5)) // scale(delta) → delta; add_difference(weight, delta) → weight

// The merge space of any node, solved like a type.
console.log(`b.sub(base) is a ${plan(delta, { strictMergeSpace: null }).mergeSpace}`)
console.log(`the recipe is a ${plan(recipe).mergeSpace}`)

// Adding two weights is refused before anything is read, as in sd-mecha.
try {
  plan(a.add(b))
} catch (error) {
  if (!(error instanceof MergeSpaceError)) throw error
  console.log(`a.add(b): ${error.name}`)
}

// sd-mecha's add_difference *wrapper* (a + alpha·(b − c), falling back to a) is addDifference().
const wrapped = addDifference(a, b, base, { alpha: 0.5 })

// `.mecha` text: finalized as sd-mecha writes it, and read back unchanged.
const text = serialize(wrapped)
console.log(`round trip: ${serialize(deserialize(text)) === text}`)
console.log(`mixed: ${serialize(weightedSum(recipe, wrapped, { alpha: 0.25 })).split('\n').length} lines`)

const sd = await merge(recipe, { outputDtype: 'f32' })
for (const key of values.show) {
  const tensor = sd.get(key)
  if (tensor === undefined) throw new Error(`no key ${key}`)
  console.log(JSON.stringify({ key, first: Array.from(toFloat32(tensor).subarray(0, 16)) }))
}
