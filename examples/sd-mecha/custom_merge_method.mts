// Port of sd-mecha's examples/custom_merge_method.py: a merge method written in the host
// language. sd-mecha's `@merge_method` decorates a Python function with `Parameter(...)`
// annotations; here `defineMergeMethod` takes the same information as data, and the returned
// builder makes recipe nodes like the builtin ones (`.mecha` text, `methods.list()`, planning).
//
//   node --import tsx examples/sd-mecha/custom_merge_method.ts a.safetensors b.safetensors [--out custom_merge.safetensors]
import { parseArgs } from 'node:util'
import { defineMergeMethod, merge, methods, model, serialize } from 'sd-mecha'

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: { out: { type: 'string', default: 'custom_merge.safetensors' } },
})
const [pathA, pathB] = positionals
if (!pathA || !pathB) throw new Error('usage: custom_merge_method.ts <a.safetensors> <b.safetensors> [--out file]')

const customSum = defineMergeMethod({
  id: 'custom_sum',
  inputs: [
    // Inputs without a default are tensors from the input models, in the result's merge space.
    { name: 'a' },
    { name: 'b' },
    // Parameters with a default value are automatically in the "param" merge space.
    { name: 'alpha', default: 0.5 },
    // Keyword-only, required, explicitly in the "param" merge space.
    { name: 'beta', keywordOnly: true, mergeSpace: 'param' },
  ],
  // The function only combines elements at the same position: the engine calls it once per
  // chunk of each key (sd-mecha calls the Python function once per key), with the key, the
  // chunk's offset and length in the context (sd-mecha's **kwargs). Every tensor input arrives
  // as a Float32Array of the chunk's length, a number given for it (alpha, beta) filled in.
  elementwise: true,
  fn: ({ a, b, alpha, beta }, { key, offset, length }) => {
    const out = new Float32Array(length)
    for (let i = 0; i < length; i++) {
      const weightedSum = (1 - alpha[i]) * a[i] + alpha[i] * b[i]
      // Just for the sake of the example, add noise to the sum. torch.randn_like has no
      // equivalent here: the noise is a function of the key and the element's index, so the
      // result does not depend on how the key is split into chunks or threads.
      out[i] = (1 - beta[i]) * weightedSum + beta[i] * gaussian(key, offset + i)
    }
    return out
  },
})

// Plan the custom weighted sum. The "sd1-ldm" (or any) config is inferred from the files; plain
// values (number, string, boolean, null) are broadcast to every key.
const recipe = customSum(model(pathA), model(pathB), { alpha: 0.6, beta: 0.1 })

const report = await merge(recipe, { output: values.out })
console.log(`wrote ${report.keysWritten} keys to ${report.output}`)
console.log(JSON.stringify(methods.get('custom_sum')?.params.map((p) => p.name)))
console.log(serialize(recipe).split('\n').at(-1))

/** A standard normal value for (key, index): Box–Muller over two hashed uniforms. */
function gaussian(key: string, index: number): number {
  let h = 2166136261
  for (let i = 0; i < key.length; i++) h = Math.imul(h ^ key.charCodeAt(i), 16777619)
  const u1 = (hash32(h, 2 * index) + 0.5) / 2 ** 32
  const u2 = (hash32(h, 2 * index + 1) + 0.5) / 2 ** 32
  return Math.sqrt(-2 * Math.log(u1)) * Math.cos(2 * Math.PI * u2)
}

function hash32(seed: number, n: number): number {
  let x = Math.imul(seed ^ n, 0x9e3779b1) ^ (n >>> 16)
  x = Math.imul(x ^ (x >>> 15), 0x85ebca6b)
  x = Math.imul(x ^ (x >>> 13), 0xc2b2ae35)
  return (x ^ (x >>> 16)) >>> 0
}
