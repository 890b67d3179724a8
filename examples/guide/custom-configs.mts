// A model config for an architecture sd-mecha does not know, in sd-mecha's YAML format: its keys,
// grouped in components, with shapes, dtypes, aliases and optional keys.
//
//   node --import tsx examples/guide/custom-configs.mts a.safetensors b.safetensors [--out merged.safetensors]
import { parseArgs } from 'node:util'
import { configs, inspect, merge, model, pickComponent, weightedSum } from 'sd-mecha'

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: { out: { type: 'string', default: 'merged.safetensors' } },
})
const [pathA, pathB] = positionals
if (!pathA || !pathB) throw new Error('usage: custom-configs.mts <a> <b> [--out file]')

// sd-mecha: extensions.model_configs.register(from_yaml(text)); the identifier names the config.
const id = configs.register(`
identifier: toy-mlp
components:
  encoder:
    enc.0.weight: {shape: [4, 4], dtype: float32}
    enc.0.bias: {shape: [4], dtype: float32}
    enc.0.running_mean: {shape: [4], dtype: float32, optional: true}
  head:
    head.weight: {shape: [2, 4], dtype: float32, aliases: [classifier.weight]}
    head.bias: {shape: [2], dtype: float32}
`)
console.log(`registered ${id}: ${configs.components(id).join(', ')}`)

// Files are matched to it by their keys, as builtin configs are (an alias counts).
for (const path of [pathA, pathB]) console.log(`${path}: ${inspect(path).config}`)

// Components work as for builtins: the head from the weighted sum, the encoder from a.
const a = model(pathA, { config: id })
const b = model(pathB)
const recipe = pickComponent(weightedSum(a, b, { alpha: 0.5 }), 'head').or(a)
const report = await merge(recipe, { output: values.out, outputDtype: 'f32' })
console.log(`wrote ${report.keysWritten} keys`)
