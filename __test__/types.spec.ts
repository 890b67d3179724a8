// The public types carry what the code does: builders of JavaScript methods take the declared
// inputs, `fn` receives them with their types, tensors are discriminated by dtype. The wrong uses
// below are checked by `tsc -p __test__/tsconfig.json` (part of `npm run lint`): each
// `@ts-expect-error` fails the type check if the line after it compiles.
import test from 'ava'
import { join } from 'node:path'

import mecha, {
  convert,
  defineMergeMethod,
  int,
  literal,
  merge,
  model,
  pickComponent,
  toFloat32,
  weightedSum,
  type MergeNode,
  type MergeReport,
  type MergedModel,
  type RecipeNode,
  type Tensor,
} from '../dist/index.js'
import { tempDir, writeSafetensors } from './helpers.ts'

const mix = defineMergeMethod({
  id: 'types_mix',
  inputs: [
    { name: 'a' },
    { name: 'b' },
    { name: 'alpha', type: 'float', default: 0.5 },
    { name: 'steps', type: 'int', default: int(2) },
  ],
  elementwise: true,
  cacheFactory: () => ({ calls: 0 }),
  fn: ({ a, b, alpha, steps }, context) => {
    context.cache.calls++ // the cache's type comes from cacheFactory
    const weight: number = alpha
    const count: number = steps
    const out: Float32Array = a.map((x, i) => x + (b[i] - x) * weight)
    return count > 0 ? out : 0
  },
})

const sumAll = defineMergeMethod({
  id: 'types_sum_all',
  inputs: [
    { name: 'models', varargs: true },
    { name: 'label', type: 'str', default: 'sum' },
    { name: 'limit', type: 'int', default: null },
  ],
  fn: ({ models, label, limit }, context) => {
    const list: Float32Array[] = models
    const text: string = label
    const maybe: number | null = limit
    const out = new Float32Array(context.shape.reduce((x, y) => x * y, 1))
    for (const m of list) m.forEach((v, i) => (out[i] += v))
    return text === 'sum' && maybe === null ? out : 0
  },
})

const norm = defineMergeMethod({
  id: 'types_norm',
  inputs: [{ name: 'a' }],
  returns: { type: 'float', mergeSpace: 'param' },
  fn: ({ a }) => Math.hypot(...a),
})

// Builders: required inputs positionally, hyper-parameters in an options object.
const dir = tempDir()
const paths = { a: join(dir, 'a.safetensors'), b: join(dir, 'b.safetensors') }
const a = model(paths.a)
const b = model(paths.b)
// Only type-checked, never run (the wrong uses would throw).
function typeChecks(): RecipeNode[] {
  const built: MergeNode = mix(a, b, { alpha: 0.25 })
  mix(a, b)
  sumAll([a, b, b], { label: 'sum' })
  norm(a)

  // @ts-expect-error a required input is missing
  mix(a)
  // @ts-expect-error too many positional arguments
  mix(a, b, 3, 4, 5)
  // @ts-expect-error no such parameter
  mix(a, b, { alhpa: 0.25 })
  // @ts-expect-error varargs come as one array
  sumAll(a, b)
  // @ts-expect-error a method without hyper-parameters takes no options object
  norm(a, { alpha: 1 })

  defineMergeMethod({
    id: 'types_wrong_fn',
    inputs: [{ name: 'a' }, { name: 'k', type: 'int', default: int(1) }],
    // @ts-expect-error an int arrives as a number, not a string
    fn: ({ a, k }) => a.map(() => k.length),
  })
  defineMergeMethod({
    id: 'types_wrong_return',
    inputs: [{ name: 'a' }],
    returns: { type: 'str' },
    // @ts-expect-error a str method returns a string
    fn: ({ a }) => a,
  })
  defineMergeMethod({
    id: 'types_unknown_arg',
    inputs: [{ name: 'a' }],
    // @ts-expect-error fn receives only the declared inputs
    fn: ({ b }) => b,
  })

  // Operators, convert() and pickComponent() give recipe nodes, so chains type-check.
  const chained: RecipeNode = convert({ BASE: 0.5 }, a).sub(b).mul(0.5)
  const picked: RecipeNode = pickComponent(a, 'unet').add(b.sub(a))
  return [built, chained, picked]
}
void typeChecks

// Tensors are discriminated by dtype.
function firstValue(t: Tensor): number {
  if (t.dtype === 'F32') return t.data[0] // Float32Array
  if (t.dtype === 'I64' || t.dtype === 'U64') return Number(t.data[0]) // bigint arrays
  return toFloat32(t)[0]
}
function wrongData(t: Tensor): number {
  // @ts-expect-error without narrowing, data may be a BigInt64Array
  return t.data[0] + 1
}
void wrongData

test('typed JavaScript methods run with the values their types describe', async (t) => {
  writeSafetensors(paths.a, { w: { dtype: 'F32', shape: [2], values: [0, 4] } })
  writeSafetensors(paths.b, { w: { dtype: 'F32', shape: [2], values: [4, 8] } })
  const out = await merge(mix(a, b, { alpha: 0.25 }), { outputDtype: 'f32' })
  t.deepEqual([...toFloat32(out.get('w')!)], [1, 5])
  const summed = await merge(sumAll([a, b, b]), { outputDtype: 'f32' })
  t.is(firstValue(summed.get('w')!), 8)
  // a number given for a tensor input arrives as a filled Float32Array
  const filled = await merge(mix(a, 2, { alpha: 0.5 }), { outputDtype: 'f32' })
  t.deepEqual([...toFloat32(filled.get('w')!)], [1, 3])
  const f16 = await merge(weightedSum(a, b))
  const w = f16.get('w')!
  t.is(w.dtype, 'F16')
  if (w.dtype === 'F16') t.true(w.data instanceof Uint16Array)
  t.is(firstValue(w), 2)
})

test('merge() with an output known only at run time returns a report or the tensors', async (t) => {
  const outputs: (string | undefined)[] = [join(dir, 'out.safetensors'), undefined]
  for (const output of outputs) {
    const result: MergeReport | MergedModel = await merge(weightedSum(a, b), { output })
    t.is(result instanceof Map, output === undefined)
  }
  // the default export is the same API
  t.is(mecha.merge, merge)
  t.is(mecha.literal, literal)
})
