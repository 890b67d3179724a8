// One merge with this library, in its own process so the benchmark measures its wall time and
// peak RSS alone. usage: merge-once.mjs <a> <b> <out> <alpha> [threads]
import { merge, model, weightedSum } from '../dist/index.js'

const [a, b, output, alpha, threads = '0'] = process.argv.slice(2)
const report = await merge(weightedSum(model(a), model(b), { alpha: Number(alpha) }), {
  output,
  threads: Number(threads),
})
console.log(JSON.stringify({ ...report, recipe: undefined }))
