// Merge methods written in JavaScript (sd-mecha's `@merge_method`), elementwise and whole-key.
//
//   node --import tsx examples/guide/custom-methods.mts a.safetensors b.safetensors [--show KEY]...
import { parseArgs } from 'node:util'
import { defineMergeMethod, merge, methods, model, serialize, toFloat32 } from 'sd-mecha'

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: { show: { type: 'string', multiple: true, default: [] } },
})
const [pathA, pathB] = positionals
if (!pathA || !pathB) throw new Error('usage: custom-methods.mts <a> <b> [--show KEY]...')

// Elementwise: called per chunk of each key, inputs as Float32Arrays of the chunk's length.
// sd-mecha:
//   @merge_method
//   def clamped_mix(a: Parameter(Tensor), b: Parameter(Tensor), alpha: Parameter(Tensor) = 0.5) -> Return(Tensor):
//       return torch.clamp(torch.lerp(a, b, alpha), -1, 1)
const clampedMix = defineMergeMethod({
  id: 'clamped_mix',
  description: 'lerp(a, b, alpha), clamped to [-limit, limit]',
  inputs: [{ name: 'a' }, { name: 'b' }, { name: 'alpha', default: 0.5 }, { name: 'limit', type: 'float', default: 1 }],
  elementwise: true,
  fn: ({ a, b, alpha, limit }) => a.map((x, i) => Math.max(-limit, Math.min(limit, x + alpha[i] * (b[i] - x)))),
})

// Whole key: called once per key with every input whole; `shape` says how to read it.
// This one gives b's values the Frobenius norm of a's.
const matchNorm = defineMergeMethod({
  id: 'match_norm',
  inputs: [{ name: 'a' }, { name: 'b' }],
  fn: ({ a, b }) => {
    const norm = (v: Float32Array) => Math.sqrt(v.reduce((s, x) => s + x * x, 0))
    const scale = norm(b) === 0 ? 0 : norm(a) / norm(b)
    return b.map((x) => x * scale)
  },
})

const a = model(pathA)
const b = model(pathB)
const recipe = clampedMix(a, matchNorm(a, b), { alpha: 0.75, limit: 0.5 })

// Defined methods are listed like builtins (for UIs) and written into `.mecha` text.
const info = methods.get('clamped_mix')
console.log(JSON.stringify(info?.params.map((p) => [p.name, p.type, p.default ?? null])))
console.log(serialize(recipe).split('\n').at(-1))

const sd = await merge(recipe, { outputDtype: 'f32' })
for (const key of values.show) {
  const tensor = sd.get(key)
  if (tensor === undefined) throw new Error(`no key ${key}`)
  console.log(JSON.stringify({ key, first: Array.from(toFloat32(tensor).subarray(0, 16)) }))
}
