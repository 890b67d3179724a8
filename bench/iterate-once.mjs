// One iterate() over weighted_sum(a, b) with a consumer that sleeps `sleepMs` per tensor, in its
// own process so the benchmark measures its peak RSS alone. usage: iterate-once.mjs <a> <b> [sleepMs] [bufferSize]
// With `--baseline`, loads the library and plans the recipe only (the process's own memory).
// Prints { keys, bytes, largest, seconds }.
import { setTimeout as sleep } from 'node:timers/promises'
import { iterate, model, plan, weightedSum } from '../dist/index.js'

const [a, b, sleepMs = '1', bufferSize = '64M'] = process.argv.slice(2).filter((x) => !x.startsWith('--'))
const recipe = weightedSum(model(a), model(b), { alpha: 0.3 })
const started = Date.now()
let keys = 0
let bytes = 0
let largest = 0
if (process.argv.includes('--baseline')) {
  plan(recipe)
} else {
  for await (const { tensor } of iterate(recipe, { dtype: 'f16', bufferSize })) {
    keys++
    bytes += tensor.data.byteLength
    largest = Math.max(largest, tensor.data.byteLength)
    await sleep(Number(sleepMs))
  }
}
console.log(JSON.stringify({ keys, bytes, largest, seconds: (Date.now() - started) / 1000 }))
