// A virtual merged model: iterate() yields the merged tensors in output order with the values
// merge() gives, stops the engine when the consumer leaves, and fails rather than deliver a
// tensor whose inputs hold NaN.
import test from 'ava'
import { join } from 'node:path'

import {
  AbortError,
  OptionError,
  RecipeError,
  defineMergeMethod,
  iterate,
  merge,
  model,
  slerp,
  toFloat32,
  weightedSum,
} from '../dist/index.js'
import { qwenTensors, tempDir, writeSafetensors } from './helpers.ts'

function models() {
  const dir = tempDir()
  const [a, b, nan] = ['a', 'b', 'nan'].map((n) => join(dir, `${n}.safetensors`))
  writeSafetensors(a, qwenTensors(1))
  writeSafetensors(b, qwenTensors(2))
  const withNan = qwenTensors(2)
  const key = Object.keys(withNan)[5]
  withNan[key] = { ...withNan[key], values: withNan[key].values.map((v, i) => (i === 2 ? NaN : v)) }
  writeSafetensors(nan, withNan)
  return { dir, a, b, nan, nanKey: key }
}

test('iterate yields every merged tensor in output order, with the values of merge()', async (t) => {
  const { a, b } = models()
  for (const recipe of [weightedSum(model(a), model(b), { alpha: 0.3 }), slerp(model(a), model(b))]) {
    const expected = await merge(recipe, { outputDtype: 'bf16' })
    const keys: string[] = []
    const it = iterate(recipe, { dtype: 'bf16', bufferSize: 1024, chunkElements: 256 })
    for await (const { key, tensor } of it) {
      keys.push(key)
      const e = expected.get(key)!
      t.is(tensor.dtype, e.dtype)
      t.deepEqual(tensor.shape, e.shape)
      t.deepEqual(toFloat32(tensor), toFloat32(e), key)
    }
    t.deepEqual(keys, [...expected.keys()])
  }
  // The generator's return value is the report.
  const it = iterate(weightedSum(model(a), model(b)))
  let step = await it.next()
  while (!step.done) step = await it.next()
  t.is(step.value.keysWritten, [...(await merge(weightedSum(model(a), model(b)))).keys()].length)
})

test('leaving the loop or aborting stops the merge', async (t) => {
  const { a, b } = models()
  let seen = 0
  for await (const _ of iterate(weightedSum(model(a), model(b)), { bufferSize: 1 })) {
    if (++seen === 2) break
  }
  t.is(seen, 2)
  const controller = new AbortController()
  const error = await t.throwsAsync(
    (async () => {
      for await (const _ of iterate(weightedSum(model(a), model(b)), { signal: controller.signal, bufferSize: 1 }))
        controller.abort()
    })(),
  )
  t.true(error instanceof AbortError, String(error))
  // A progress callback that throws ends the iteration with its error.
  const thrown = (async () => {
    for await (const _ of iterate(weightedSum(model(a), model(b)), {
      progressIntervalMs: 0,
      bufferSize: 1,
      onProgress: () => {
        throw new Error('progress failed')
      },
    }));
  })()
  await t.throwsAsync(thrown, { message: 'progress failed' })
})

test('an input holding NaN fails the iteration before its tensor', async (t) => {
  const { a, nan, nanKey } = models()
  const keys: string[] = []
  const error = await t.throwsAsync(
    (async () => {
      for await (const { key } of iterate(weightedSum(model(a), model(nan)))) keys.push(key)
    })(),
    { instanceOf: RecipeError },
  )
  t.regex(error!.message, /omitNonFiniteInputs: false/)
  t.false(keys.includes(nanKey))
  // Without leaving NaN inputs out, the merge streams them as merge() writes them.
  let count = 0
  for await (const _ of iterate(weightedSum(model(a), model(nan)), { omitNonFiniteInputs: false })) count++
  t.is(count, (await merge(weightedSum(model(a), model(nan)), { omitNonFiniteInputs: false })).size)
})

test('JavaScript methods run inside an iteration, and options are checked', async (t) => {
  const { a, b } = models()
  const doubled = defineMergeMethod({
    id: 'test_iterate_doubled',
    inputs: [{ name: 'a' }],
    elementwise: true,
    fn: ({ a }) => (a as Float32Array).map((v) => 2 * v),
  })
  const recipe = doubled(weightedSum(model(a), model(b)))
  const expected = await merge(recipe, { outputDtype: 'f32' })
  for await (const { key, tensor } of iterate(recipe, { outputDtype: 'f32' }))
    t.deepEqual(toFloat32(tensor), toFloat32(expected.get(key)!))
  const drain = async (options: object) => {
    for await (const _ of iterate(recipe, options as never));
  }
  await t.throwsAsync(drain({ output: 'x.safetensors' }), {
    instanceOf: OptionError,
    message: /unknown option "output"/,
  })
  await t.throwsAsync(drain({ dtype: 'f16', outputDtype: 'f32' }), { instanceOf: OptionError, message: /disagree/ })
  await t.throwsAsync(drain({ bufferSize: 'lots' }), { instanceOf: OptionError })
})
