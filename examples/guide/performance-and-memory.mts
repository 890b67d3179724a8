// Memory budget, threads and the merge cache for decomposition sweeps.
//
//   node --import tsx examples/guide/performance-and-memory.mts a.safetensors b.safetensors
import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { parseArgs } from 'node:util'
import {
  MergeCache,
  int,
  merge,
  mergeMany,
  model,
  plan,
  rotate,
  slerp,
  toFloat32,
  truncateRank,
  type MergedModel,
} from 'sd-mecha'

const { positionals } = parseArgs({ allowPositionals: true })
const [pathA, pathB] = positionals
if (!pathA || !pathB) throw new Error('usage: performance-and-memory.mts <a> <b>')
const a = model(pathA)
const b = model(pathB)

// Whole-tensor methods (slerp here) read each key whole. plan() computes every key's working
// memory before anything is read; keys run side by side only while they fit in memoryBudget.
const p = plan(slerp(a, b), { memoryBudget: '64M', threads: 2 })
console.log(JSON.stringify({ budget: p.memoryBudget, threads: p.threads, working: p.estimatedWorkingBytes }))

// A key larger than the budget waits until nothing else runs, then runs alone; the report lists it.
const tight = await merge(slerp(a, b), { memoryBudget: 1024, threads: 2 })
console.log(`budget 1 KiB: ${tight.report.overBudget.length} of ${tight.size} keys ran alone`)

// Sweeps: a MergeCache keeps rotate's decompositions, found by the recipe's inputs with the
// hyper-parameters left out, so only the first merge of the sweep decomposes.
const cache = new MergeCache({ limit: '256M' })
const sweep: number[] = []
for (const alignment of [0.25, 0.5, 0.75]) {
  await merge(rotate(a, b, { alignment }), { cache })
  sweep.push(cache.entries)
}
console.log(`rotate sweep, cache entries after each merge: ${sweep.join(' ')}`)

// A cached result equals a fresh one byte for byte.
const cached = await merge(rotate(a, b, { alignment: 0.5 }), { cache })
const fresh = await merge(rotate(a, b, { alignment: 0.5 }))
console.log(`cached equals fresh: ${same(cached, fresh)}`)

// The same for truncate_rank (low-rank approximations of a difference) at several ranks.
const rankCache = new MergeCache()
for (const rank of [2, 1])
  await merge(truncateRank(b.sub(a), { rank: int(rank) }), { cache: rankCache, strictMergeSpace: 'delta' })
console.log(`truncate_rank sweep: ${rankCache.entries} entries, ${rankCache.bytes} bytes`)

// One read, many outputs: mergeMany() writes every recipe of a sweep in one pass over the
// inputs; each output is the file merge() writes for its recipe alone.
const folder = mkdtempSync(join(tmpdir(), 'sweep-'))
const alphas = [0.25, 0.5, 0.75]
const reports = await mergeMany(
  alphas.map((alpha) => ({ recipe: slerp(a, b, { alpha }), output: join(folder, `slerp-${alpha}.safetensors`) })),
)
const single = await merge(slerp(a, b, { alpha: 0.5 }), { output: join(folder, 'single.safetensors') })
const readOnce = reports.reduce((sum, r) => sum + r.bytesRead, 0) === single.bytesRead
const identical = readFileSync(reports[1].output!).equals(readFileSync(single.output!))
console.log(`mergeMany: ${reports.length} outputs, inputs read once: ${readOnce}, same bytes as merge(): ${identical}`)
rmSync(folder, { recursive: true })

function same(x: MergedModel, y: MergedModel): boolean {
  if (x.size !== y.size) return false
  for (const [key, tensor] of x) {
    const other = y.get(key)
    if (other === undefined) return false
    const [u, v] = [toFloat32(tensor), toFloat32(other)]
    if (u.length !== v.length || u.some((e, i) => !Object.is(e, v[i]))) return false
  }
  return true
}
