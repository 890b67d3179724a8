// Embedding merges in an application: progress, cancellation, results in memory, typed errors.
//
//   node --import tsx examples/guide/embedding-in-an-app.mts a.safetensors b.safetensors other-shape.safetensors --out merged.safetensors
import { existsSync } from 'node:fs'
import { parseArgs } from 'node:util'
import {
  AbortError,
  MechaError,
  OptionError,
  SafetensorsError,
  ShapeError,
  merge,
  model,
  toFloat32,
  weightedSum,
  type Progress,
  type Tensor,
} from 'sd-mecha'

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: { out: { type: 'string', default: 'merged.safetensors' } },
})
const [pathA, pathB, pathOther] = positionals
if (!pathA || !pathB || !pathOther) throw new Error('usage: embedding-in-an-app.mts <a> <b> <other> [--out file]')
const recipe = weightedSum(model(pathA), model(pathB), { alpha: 0.5 })

// Progress: called on the JavaScript thread at most every progressIntervalMs, never blocking the
// merge (a slow handler only means fewer updates). One worker thread leaves the other cores to the UI.
const updates: Progress[] = []
const report = await merge(recipe, {
  output: values.out,
  threads: 1,
  progressIntervalMs: 0,
  onProgress: (p) => updates.push(p),
})
const monotonic = updates.every((p, i) => i === 0 || p.keysDone >= updates[i - 1].keysDone)
console.log(JSON.stringify({ step: 'progress', keysWritten: report.keysWritten, updates: updates.length, monotonic }))

// Cancel: abort the signal (a Cancel button) and the merge rejects with an AbortError; the
// output is written under a temporary name and renamed only on success, so nothing is left.
const cancelled = values.out.replace(/\.safetensors$/, '') + '-cancelled.safetensors'
const controller = new AbortController()
let keysWhenCancelled = 0
try {
  await merge(recipe, {
    output: cancelled,
    threads: 1,
    progressIntervalMs: 0,
    signal: controller.signal,
    onProgress: (p) => {
      keysWhenCancelled = p.keysDone
      controller.abort() // the user pressed Cancel after the first key
    },
  })
  console.log(JSON.stringify({ step: 'cancel', error: null }))
} catch (error) {
  if (!(error instanceof AbortError)) throw error
  console.log(JSON.stringify({ step: 'cancel', error: error.name, keysWhenCancelled, exists: existsSync(cancelled) }))
}

// In memory: no `output`, and the result is a MergedModel, a Map of key → tensor with the report.
const inMemory = await merge(recipe, { outputDtype: 'f32' })
const [firstKey, firstTensor] = inMemory.entries().next().value ?? ['', undefined]
console.log(
  JSON.stringify({
    step: 'memory',
    size: inMemory.size,
    keysWritten: inMemory.report.keysWritten,
    firstKey,
    dtype: firstTensor?.dtype,
    shape: firstTensor?.shape,
  }),
)

// Weights the app already holds (a merge result, tensors it computed) are models too: model()
// takes a Map or object of { dtype, shape, data } tensors, as sd-mecha's model(state_dict) does.
const held = new Map<string, Tensor>()
for (const [key, tensor] of inMemory)
  held.set(key, { dtype: 'F32', shape: tensor.shape, data: toFloat32(tensor).map((x) => 2 * x) })
const remerged = await merge(weightedSum(model(held), model(pathA), { alpha: 0.5 }), { outputDtype: 'f32' })
const firstRemerged = remerged.get(firstKey)
console.log(
  JSON.stringify({
    step: 'held',
    size: remerged.size,
    merged: firstTensor ? [...toFloat32(firstTensor).slice(0, 4)] : [],
    remerged: firstRemerged ? [...toFloat32(firstRemerged).slice(0, 4)] : [],
  }),
)

// Errors are classes (all MechaError), with the file, key or recipe node involved.
async function failure(run: () => Promise<unknown>) {
  try {
    await run()
    return null
  } catch (error) {
    if (!(error instanceof MechaError)) throw error
    const kind =
      error instanceof ShapeError
        ? 'shape'
        : error instanceof SafetensorsError
          ? 'safetensors'
          : error instanceof OptionError
            ? 'option'
            : 'other'
    return { name: error.name, kind, file: error.file ?? null, key: error.key ?? null }
  }
}
console.log(
  JSON.stringify({ step: 'error', ...(await failure(() => merge(weightedSum(model(pathA), model(pathOther))))) }),
)
console.log(JSON.stringify({ step: 'error', ...(await failure(() => merge(model(`${pathA}.missing`)))) }))
console.log(JSON.stringify({ step: 'error', ...(await failure(() => merge(recipe, { memoryBudget: 'two gigs' }))) }))
