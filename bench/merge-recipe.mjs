// Merges `.mecha` recipes one after the other in this process, sharing one MergeCache, and
// prints the seconds of each. The output of the first one stays at <out> (the one compared with
// sd-mecha's); the later ones are written next to it and removed.
// usage: merge-recipe.mjs <out.safetensors> [--memory 2G] <recipe.mecha>...
import { readFileSync, rmSync } from 'node:fs'

import { MergeCache, deserialize, merge } from '../dist/index.js'

const args = process.argv.slice(2)
const output = args.shift()
const memory = args[0] === '--memory' ? (args.shift(), args.shift()) : undefined
const cache = new MergeCache()
const merges = []
let report
for (const [i, path] of args.entries()) {
  const target = i === 0 ? output : `${output}.again.safetensors`
  rmSync(target, { force: true })
  const started = performance.now()
  report = await merge(deserialize(readFileSync(path, 'utf8')), {
    output: target,
    cache,
    ...(memory ? { memoryBudget: memory } : {}),
  })
  merges.push((performance.now() - started) / 1000)
  if (i > 0) rmSync(target)
}
console.log(
  JSON.stringify({
    merges,
    threads: report.threads,
    memoryBudget: report.memoryBudget,
    overBudget: report.overBudget.length,
    cacheBytes: cache.bytes,
    cacheEntries: cache.entries,
    cacheLimit: cache.limitBytes,
  }),
)
