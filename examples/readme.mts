// The README's two samples, run exactly as written there (the test suite checks that the README's
// text is this file's), from a folder holding base.safetensors, style.safetensors and
// detail.safetensors with the SD 1.5 key layout:
//   node --import tsx examples/readme.mts <folder>
// Prettier leaves this file alone (.prettierignore): the README aligns its comments by hand.
import { readFileSync, writeFileSync } from 'node:fs'
process.chdir(process.argv[2] ?? '.')

import { model, weightedSum, addDifference, merge, serialize } from 'sd-mecha'

const base = model('base.safetensors')
const style = model('style.safetensors')
const detail = model('detail.safetensors')

// Nothing is read yet: this only describes the merge. addDifference(a, b, c) is sd-mecha's
// add_difference wrapper: a + alpha·(b − c), falling back to a where the difference has no key.
const recipe = addDifference(weightedSum(base, style, { alpha: 0.4 }), detail, base, { alpha: 0.5 })

const controller = new AbortController()
const report = await merge(recipe, {
  output: 'merged.safetensors', // written atomically: nothing appears unless the merge completes
  threads: 0,                   // 0 = one per CPU; the output is identical for any count
  outputDtype: 'f16',           // default; integer tensors (position_ids) keep their dtype
  memoryBudget: '2G',           // whole-tensor methods (slerp, crossover…) share this; default ¼ of RAM, ≤ 4G
  signal: controller.signal,
  onProgress: (p) => console.log(`${p.keysDone}/${p.keysTotal}`),
})
console.log(report.keysWritten, report.keysSkipped, report.peakRssBytes)

console.log(serialize(recipe)) // sd-mecha's `.mecha` text, also stored in the output's metadata

const tensors = await merge(recipe) // no output: a Map of key → { dtype, shape, data }

// What the second sample refers to: a .mecha file, a config in sd-mecha's YAML format.
writeFileSync('recipe.mecha', serialize(recipe))
const yamlText = 'identifier: readme-pair\ncomponents:\n  all:\n    w: {shape: [2], dtype: float32}\n'

import { convert, deserialize, plan, pickComponent, defineMergeMethod, configs, modelDirs } from 'sd-mecha'

// Block weights (MBW): SuperMerger block names → per-key weights, through sd-mecha's conversion.
const alpha = convert({ BASE: 0, IN00: 0.2, /* … */ M00: 0.5, /* … */ OUT11: 1 }, base)
await merge(weightedSum(base, style, { alpha }), { output: 'mbw.safetensors' })

plan(recipe)                       // dry run: configs, spaces, keys kept/skipped, memory estimate
deserialize(readFileSync('recipe.mecha', 'utf8')) // .mecha files from sd-mecha, unchanged
pickComponent(base, 'diffuser')    // only the UNet keys
modelDirs.add('/models')           // relative model paths are searched here
configs.register(yamlText)         // custom model configs, in sd-mecha's YAML format
model(tensors)                     // an in-memory state dict (a merge result, or { dtype, shape, data } tensors)

// Your own merge method, in JavaScript: usable in recipes, .mecha text and methods.list().
const clampedMix = defineMergeMethod({
  id: 'clamped_mix',
  inputs: [{ name: 'a' }, { name: 'b' }, { name: 'alpha', type: 'float', default: 0.5 }],
  elementwise: true, // called per chunk of each key, with Float32Arrays
  fn: ({ a, b, alpha }) => a.map((x, i) => Math.max(-1, Math.min(1, x + alpha * (b[i] - x)))), // typed from `inputs`
})

import { methods, toFloat32 } from 'sd-mecha'

// What the test checks.
const key = 'model.diffusion_model.out.2.bias'
const mixed = await merge(clampedMix(base, style, { alpha: 0.5 }), { outputDtype: 'f32' })
const again = await merge(weightedSum(model(tensors), base, { alpha: 0 }), { outputDtype: 'f32' })
console.log(
  JSON.stringify({
    written: report.keysWritten,
    inMemory: tensors.size,
    clamped: [...(mixed.get(key)?.data ?? [])],
    fromMemory: [...toFloat32(again.get(key)!)],
    methodListed: methods.get('clamped_mix')?.id,
    config: configs.get('readme-pair')?.id,
  }),
)
