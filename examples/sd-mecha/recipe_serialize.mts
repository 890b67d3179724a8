// Port of sd-mecha's examples/recipe_serialize.py: build a recipe that merges the UNet one way
// and the text encoder (and VAE) another, and save it as `.mecha` text without merging.
// `serialize()` finalizes the recipe as sd-mecha does (configs inferred from the headers, merge
// spaces solved, defaults written out, model paths made absolute); sd-mecha's
// `serialize(recipe, output=path)` is `writeFileSync(path, serialize(recipe))`.
//
//   node --import tsx examples/sd-mecha/recipe_serialize.ts a.safetensors b.safetensors base.safetensors [--out recipes/test_split_unet_text_encoder.mecha]
import { mkdirSync, writeFileSync } from 'node:fs'
import { dirname } from 'node:path'
import { parseArgs } from 'node:util'
import { addPerpendicular, model, pickComponent, serialize, weightedSum } from 'sd-mecha'

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: { out: { type: 'string', default: 'recipes/test_split_unet_text_encoder.mecha' } },
})
const [pathA, pathB, pathBase] = positionals
if (!pathA || !pathB || !pathBase) throw new Error('usage: recipe_serialize.ts <a> <b> <base> [--out file.mecha]')

const textEncoderRecipe = addPerpendicular(model(pathA), model(pathB), model(pathBase))
const unetRecipe = weightedSum(model(pathA), model(pathB))

// `x | y` in sd-mecha is `x.or(y)`: the UNet from the weighted sum, every other key from add_perpendicular
const recipe = pickComponent(unetRecipe, 'diffuser').or(textEncoderRecipe)

const text = serialize(recipe)
mkdirSync(dirname(values.out), { recursive: true })
writeFileSync(values.out, text)
console.log(text)
