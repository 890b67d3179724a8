// Benchmark: one recipe merged by this library and by sd-mecha 1.1.8 from the same `.mecha` text,
// side by side in one run, on SD 1.5-layout fp16 models (real sd1-ldm keys and shapes, random
// values), warm page cache. Cases (issue 8):
//   ties          add_difference_ties(base, m1, m2, m3, k=0.5)             (W3)
//   rotate        rotate(a, b, alignment=0.5), then again with alpha=0.5    (W4)
//   truncate_rank a + truncate_rank(b − a, rank=32, full SVD), then rank 16 (W4)
// The "again" merge runs in the same process with a MergeCache kept from the first, to measure
// how much of the first merge the cached decompositions save.
//
//   node bench/recipe-bench.mjs --case ties|rotate|truncate_rank [--rounds 1] [--dir bench/out]
//                               [--memory 2G] [--skip-reference] [--near] [--reference-timeout S]
// --reference-timeout stops sd-mecha after S seconds, or once it has merged for S times this
// library's first merge when written `2.5x` (rotate of a whole model takes it hours), and reports
// how many keys it had finished: the ratio printed is then a lower bound.
import { spawnSync } from 'node:child_process'
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { cpus, totalmem } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'

import * as mecha from '../dist/index.js'
import { compareOutputs } from './compare.mjs'

const here = dirname(fileURLToPath(import.meta.url))
const arg = (name, fallback) => {
  const i = process.argv.indexOf(`--${name}`)
  return i > 0 ? (process.argv[i + 1] ?? true) : fallback
}
const which = String(arg('case', 'ties'))
const rounds = Number(arg('rounds', 1))
const memory = arg('memory', undefined)
const referenceTimeout = arg('reference-timeout', undefined)
const dir = resolve(String(arg('dir', join(here, 'out'))))
mkdirSync(dir, { recursive: true })

const names = ['a', 'b', 'c', 'd']
const inputs = names.slice(0, which === 'ties' ? 4 : 2).map((n) => join(dir, `sd1-${n}.safetensors`))
for (const [i, path] of inputs.entries()) {
  if (!existsSync(path)) {
    console.error(`generating ${path}`)
    await mecha.writeRandomModel(path, 'sd1', i + 1)
  }
}
// --near: the second model is a "fine-tune" of the first, 0.95·a + 0.05·b, instead of an
// unrelated one (independent random models put rotate's Stiefel logarithm far from where its
// iteration converges)
if (process.argv.includes('--near')) {
  const near = join(dir, 'sd1-b-near.safetensors')
  if (!existsSync(near)) {
    console.error(`generating ${near}`)
    await mecha.merge(mecha.weightedSum(mecha.model(inputs[0]), mecha.model(inputs[1]), { alpha: 0.05 }), {
      output: near,
      outputDtype: 'float16',
    })
  }
  inputs[1] = near
}

const m = inputs.map((p) => mecha.model(p))
const { int } = mecha
const cases = {
  ties: () => [mecha.addDifferenceTies(m[0], m[1], m[2], m[3], { k: 0.5 })],
  rotate: () => [
    mecha.rotate(m[0], m[1], { alignment: 0.5 }),
    mecha.rotate(m[0], m[1], { alignment: 0.5, alpha: 0.5 }),
  ],
  truncate_rank: () => [
    m[0].add(mecha.truncateRank(m[1].sub(m[0]), { rank: int(32), useApproximateBasis: false })),
    m[0].add(mecha.truncateRank(m[1].sub(m[0]), { rank: int(16), useApproximateBasis: false })),
  ],
}
if (!cases[which]) throw new Error(`--case must be one of ${Object.keys(cases).join(', ')}`)
const recipes = cases[which]().map((recipe, i) => {
  const path = join(dir, `${which}-${i + 1}.mecha`)
  writeFileSync(path, mecha.serialize(recipe))
  return path
})

/**
 * Runs a command under /usr/bin/time (and `timeout -s KILL` when given a limit); returns wall
 * seconds, peak RSS bytes, stdout and whether the limit stopped it.
 */
function timed(cmd, args, limitSeconds) {
  const limited = limitSeconds ? ['timeout', '-s', 'KILL', String(limitSeconds), cmd] : [cmd]
  const r = spawnSync('/usr/bin/time', ['-f', '%e %M', ...limited, ...args], { encoding: 'utf8', maxBuffer: 1 << 26 })
  // With a limit, a run that fails is reported rather than thrown: sd-mecha's rotate can abort a
  // whole merge on one key (inventory §12, item 11), and how far it got is still a measurement.
  const stopped = Boolean(limitSeconds) && r.status !== 0
  if (r.status !== 0 && !stopped) throw new Error(`${cmd} failed:\n${r.stdout}\n${r.stderr}`)
  const lines = r.stderr.trim().split('\n')
  const [wall, kb] = lines.at(-1).split(' ').map(Number)
  const failure =
    stopped && r.status !== 137 ? (lines.findLast((l) => /Error/.test(l)) ?? `exit ${r.status}`) : undefined
  return { seconds: wall, peakRss: kb * 1024, stdout: r.stdout, stopped, failure }
}
const warm = () => spawnSync('cat', inputs, { stdio: ['ignore', 'ignore', 'inherit'] })

const python = join(here, '.venv', 'bin', 'python')
const withReference = existsSync(python) && !process.argv.includes('--skip-reference')
const ourOut = join(dir, `${which}-mecha-node.safetensors`)
const refOut = join(dir, `${which}-sd-mecha.safetensors`)
const runs = []
for (let round = 0; round < rounds; round++) {
  rmSync(ourOut, { force: true })
  warm()
  const ours = timed(process.execPath, [
    join(here, 'merge-recipe.mjs'),
    ourOut,
    ...(memory ? ['--memory', String(memory)] : []),
    ...recipes,
  ])
  const report = JSON.parse(ours.stdout.trim().split('\n').at(-1))
  let reference
  if (withReference) {
    rmSync(refOut, { force: true })
    warm()
    const progress = `${refOut}.progress`
    rmSync(progress, { force: true })
    const script = [join(here, 'reference_recipe.py'), recipes[0], refOut, '--progress', progress]
    // `Nx`: N times our merge, plus 30 s for sd-mecha's imports, which its own clock (the one
    // compared) does not count, so a stopped run has merged for at least N times ours
    const limit = String(referenceTimeout ?? '').endsWith('x')
      ? Math.ceil(parseFloat(referenceTimeout) * report.merges[0]) + 30
      : referenceTimeout
    reference = timed(python, script, limit)
    reference.limit = limit
    if (reference.stopped) {
      // a lower bound: the merge had run this long when the limit stopped it
      // (and the peak RSS its last key saw: /usr/bin/time cannot see through a killed `timeout`)
      const [done, total, , startedUnix, peakKib] = readFileSync(progress, 'utf8').trim().split(' ').map(Number)
      reference.inner = { seconds: Date.now() / 1000 - startedUnix, done, total }
      reference.peakRss = peakKib * 1024
      rmSync(refOut, { force: true })
    } else {
      reference.inner = JSON.parse(reference.stdout.trim().split('\n').at(-1))
    }
    rmSync(progress, { force: true })
  }
  runs.push({ ours, report, reference })
  console.error(
    `round ${round + 1}/${rounds}: ours ${report.merges.map((s) => s.toFixed(2)).join(' s, then ')} s` +
      (reference ? `; sd-mecha ${reference.inner.seconds.toFixed(2)} s` : '') +
      (reference?.stopped
        ? ` (${reference.failure ? 'failed' : 'stopped'}, ${reference.inner.done} of ${reference.inner.total} keys done)`
        : ''),
  )
}

const median = (xs) => [...xs].sort((x, y) => x - y)[Math.floor(xs.length / 2)]
const first = median(runs.map((r) => r.report.merges[0]))
console.log(`\n${which}: ${inputs.length} sd1-ldm fp16 models, warm page cache, ${rounds} round(s), medians`)
console.log(
  `machine: ${cpus().length} × ${cpus()[0]?.model}, ${(totalmem() / 2 ** 30).toFixed(0)} GiB RAM; node ${process.version}\n`,
)
console.log('| run | merge s | peak RSS MiB |')
console.log('|---|---|---|')
const ourRss = Math.max(...runs.map((r) => r.ours.peakRss))
console.log(
  `| sd-mecha for Node, ${runs[0].report.threads} threads | ${first.toFixed(2)} | ${(ourRss / 2 ** 20).toFixed(0)} |`,
)
if (runs[0].report.merges.length > 1) {
  const again = median(runs.map((r) => r.report.merges[1]))
  console.log(`| … the second recipe, cache kept | ${again.toFixed(2)} | (same process) |`)
  console.log(`\nsecond merge with the cache: ${(first / again).toFixed(2)}× faster than the first`)
}
if (withReference) {
  const ref = median(runs.map((r) => r.reference.inner.seconds))
  const refRss = Math.max(...runs.map((r) => r.reference.peakRss))
  const stopped = runs.some((r) => r.reference.stopped)
  console.log(
    `| sd-mecha 1.1.8 (torch CPU) | ${stopped ? '> ' : ''}${ref.toFixed(2)} | ${(refRss / 2 ** 20).toFixed(0)} |`,
  )
  console.log(
    `\nsd-mecha / this library: ${stopped ? 'more than ' : ''}${(ref / first).toFixed(2)}× merge time, ` +
      `${(refRss / ourRss).toFixed(1)}× peak RSS`,
  )
  if (stopped) {
    const { done, total } = runs[0].reference.inner
    const { limit, failure } = runs[0].reference
    console.log(
      failure
        ? `sd-mecha failed before its ${limit} s limit with ${done} of ${total} keys done: ${failure}`
        : `sd-mecha was stopped at its ${limit} s limit (${referenceTimeout}) with ${done} of ${total} keys done`,
    )
  } else {
    compareOutputs(ourOut, refOut)
  }
}
console.log(
  `memory budget ${(runs[0].report.memoryBudget / 2 ** 20).toFixed(0)} MiB, ${runs[0].report.overBudget} key(s) over it`,
)
const { cacheBytes, cacheEntries, cacheLimit } = runs[0].report
console.log(
  `MergeCache after the merges: ${(cacheBytes / 2 ** 20).toFixed(0)} MiB in ${cacheEntries} entries ` +
    `(limit ${(cacheLimit / 2 ** 20).toFixed(0)} MiB)`,
)
console.log(`\ncommand: node bench/recipe-bench.mjs ${process.argv.slice(2).join(' ')}`)
