import test from 'ava'

import {
  MergeNode,
  type RecipeNode,
  addDifferenceMethod,
  int,
  literal,
  merge,
  methods,
  model,
  nAverage,
  deserialize,
  plan,
  serialize,
  toFloat32,
  weightedSum,
} from '../dist/index.js'
import { twoSmallModels } from './helpers.ts'

const { a, b } = twoSmallModels()

test('builders and operators build sd-mecha method calls', (t) => {
  const ws = weightedSum(model(a), model(b), { alpha: 0.3 })
  t.true(ws instanceof MergeNode)
  t.is(ws.method, 'weighted_sum')
  t.is(model(a).add(model(b).sub(model(a))).method, 'add_difference')
  t.is(model(a).sub(model(b)).method, 'subtract')
  t.is(model(a).sub(model(b)).mul(0.5).method, 'scale')
  t.is(model(a).or(model(b)).method, 'fallback')
  t.is(model(a).to({ dtype: 'float16' }).method, 'cast')
  t.is(nAverage([model(a), model(b)]).args.length, 2)
})

test('serialize writes sd-mecha 0.1.0 text with defaults, singleton broadcast and dedup', (t) => {
  const m = model(a)
  const text = serialize(addDifferenceMethod(weightedSum(m, model(b), { alpha: 0.3 }), model(b).sub(m)))
  t.is(
    text,
    [
      'version 0.1.0',
      `model "${a}" model_config="structural" merge_space="weight"`,
      `model "${b}" model_config="structural" merge_space="weight"`,
      'dict key=0.3',
      'literal &2 model_config="singleton-mecha" merge_space="param"',
      'merge "convert_singleton" &3',
      'merge "weighted_sum" &0 &1 &4',
      'merge "subtract" &1 &0',
      'dict key=1.0',
      'literal &7 model_config="singleton-mecha" merge_space="param"',
      'merge "convert_singleton" &8',
      'merge "add_difference" &5 &6 &9',
    ].join('\n'),
  )
})

test('numbers serialize like Python: floats by default, int() for integers', (t) => {
  const text = serialize(weightedSum(model(a), model(b), { alpha: int(1) }))
  t.true(text.includes('dict key=1\n'))
  t.true(serialize(weightedSum(model(a), model(b), { alpha: 1e-6 })).includes('dict key=1e-06\n'))
  t.true(serialize(weightedSum(model(a), model(b), { alpha: literal(0.25) })).includes('dict key=0.25\n'))
})

test('methods.list() describes every method for UIs', (t) => {
  const list = methods.list()
  const ws = list.find((m) => m.id === 'weighted_sum')!
  t.deepEqual(
    ws.params.map((p) => [p.name, p.type, p.kind, p.hasDefault, p.default ?? null, p.mergeSpace.symbol]),
    [
      ['a', 'Tensor', 'positional', false, null, true],
      ['b', 'Tensor', 'positional', false, null, true],
      ['alpha', 'Tensor', 'positional', true, 0.5, false],
    ],
  )
  t.deepEqual(ws.params[2].mergeSpace.spaces, ['param'])
  t.true(ws.returnMergeSpace.symbol)
  const sub = methods.get('subtract')!
  t.deepEqual(sub.returnMergeSpace.spaces, ['delta'])
  t.is(methods.get('n_average')!.params[0].kind, 'varargs')
  t.true(methods.get('convert_singleton')!.isConversion)
  for (const id of ['weighted_sum', 'add_difference', 'subtract', 'n_average', 'fallback', 'cast', 'scale']) {
    t.truthy(methods.get(id), id)
  }
})

test('literal dicts may hold recipe nodes, one per key', async (t) => {
  const perKey = literal({ w: weightedSum(model(a), model(b), { alpha: 0.5 }) }, { mergeSpace: 'weight' })
  const text = serialize(perKey)
  t.regex(text, /dict w=&\d+\nliteral &\d+ model_config="structural" merge_space="weight"$/)
  const result = await merge(perKey, { outputDtype: 'f32' })
  t.deepEqual(Array.from(result.get('w')!.data as Float32Array), [2, 3])
})

test('a chain of 100,000 nodes serializes, deserializes, plans and merges (no recursion on depth)', async (t) => {
  let r: RecipeNode = model(a)
  const other = model(b)
  for (let i = 0; i < 100_000; i++) r = weightedSum(r, other, { alpha: 0.5 })
  const text = serialize(r)
  t.is(text.split('\n').filter((l) => l.startsWith('merge "weighted_sum"')).length, 100_000)
  t.is(serialize(deserialize(text)), text)
  t.true(plan(r).keys > 0)
  const merged = await merge(r, { outputDtype: 'f32' })
  const replay = await merge(deserialize(text), { outputDtype: 'f32' })
  t.deepEqual(
    [...replay].map(([k, v]) => [k, [...toFloat32(v)]]),
    [...merged].map(([k, v]) => [k, [...toFloat32(v)]]),
  )
})

test('a node used twice at each of 30 levels is serialized and merged once per node', async (t) => {
  let r: RecipeNode = model(a)
  for (let i = 0; i < 30; i++) r = weightedSum(r, r, { alpha: 0.5 })
  const text = serialize(r)
  // version, the model, the alpha (dict, literal, broadcast: one set, identical lines are shared), 30 merges
  t.is(text.split('\n').filter((l) => l.startsWith('merge "weighted_sum"')).length, 30)
  t.is(text.split('\n').length, 1 + 1 + 3 + 30)
  const merged = await merge(r, { outputDtype: 'f32' })
  const input = await merge(model(a), { outputDtype: 'f32' })
  for (const [k, v] of input) t.deepEqual([...toFloat32(merged.get(k)!)], [...toFloat32(v)], k)
})
