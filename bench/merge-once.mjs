// One merge with this library, in its own process so the benchmark measures its wall time and
// peak RSS alone. usage: merge-once.mjs <a> <b> <out> <alpha> [threads] [method] [memoryBudget]
// Prints the report with the plan's estimated peak memory.
import { callMethod, merge, model, plan } from '../dist/index.js'

const [a, b, output, alpha, threads = '0', method = 'weighted_sum', memory] = process.argv.slice(2)
const recipe = callMethod(method, [model(a), model(b)], { alpha: Number(alpha) })
const options = { threads: Number(threads), ...(memory ? { memoryBudget: memory } : {}) }
const planned = plan(recipe, options)
const report = await merge(recipe, { output, ...options })
console.log(JSON.stringify({ ...report, recipe: undefined, estimatedPeakBytes: planned.estimatedPeakBytes }))
