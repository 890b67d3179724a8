// Benchmark: a 5-point alpha sweep (weighted_sum, alpha 0.1 … 0.9) of the two SDXL-layout fp16
// models with mergeMany(), against one merge of the same recipe, measured side by side in one run
// with the I/O floors that bound them:
//   - read floor: both inputs read once (cat);
//   - write floors: one output-sized file, and five, written and flushed (dd, fsync);
//   - one merge (alpha 0.3), then the sweep; the sweep's alpha-0.3 output must equal the merge's
//     byte for byte.
// Warm page cache (inputs read beforehand). Needs ~55 GB free next to the models.
//
//   node bench/sweep-bench.mjs [--threads N] [--dir bench/out] [--layout sdxl] [--points 5] [--rounds 1]
import { spawnSync } from 'node:child_process'
import { rmSync, statSync } from 'node:fs'
import { cpus, totalmem } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'

import { benchModels, prepare, timed } from './harness.mjs'

const here = dirname(fileURLToPath(import.meta.url))
const arg = (name, fallback) => {
  const i = process.argv.indexOf(`--${name}`)
  return i > 0 ? (process.argv[i + 1] ?? true) : fallback
}
const threads = String(arg('threads', '0'))
const layout = String(arg('layout', 'sdxl'))
const points = Number(arg('points', 5))
const dir = resolve(String(arg('dir', join(here, 'out'))))
const alphas = Array.from({ length: points }, (_, i) =>
  String(Number((0.1 + (0.8 * i) / Math.max(1, points - 1)).toFixed(3))),
)
const single = alphas.includes('0.3') ? '0.3' : alphas[Math.floor(points / 2)]

const inputs = await benchModels(dir, layout)
const inputBytes = inputs.reduce((s, p) => s + statSync(p).size, 0)
const outputBytes = inputBytes / 2

const warm = () => prepare(inputs, [])

/** Writes `count` output-sized files of zeros one after the other, each flushed; then removes them. */
function writeFloor(count) {
  const files = Array.from({ length: count }, (_, i) => join(dir, `floor-${i}.bin`))
  const script = files
    .map((f) => `dd if=/dev/zero of="${f}" bs=16M count=${Math.ceil(outputBytes / 2 ** 24)} conv=fsync status=none`)
    .join(' && ')
  warm()
  const t = timed('sh', ['-c', script])
  for (const f of files) rmSync(f, { force: true })
  return t
}

const singleOut = join(dir, `${layout}-sweep-single.safetensors`)
const template = join(dir, `${layout}-sweep-{alpha}.safetensors`)
const sweepOuts = alphas.map((a) => template.replace('{alpha}', a))
const rounds = Number(arg('rounds', 1))
const runs = { read: [], write1: [], writeN: [], one: [], sweep: [] }
let oneReport
let sweepReports
let identical = true
// The disk of a shared machine is noisy: interleave the runs and report medians.
for (let round = 0; round < rounds; round++) {
  warm()
  runs.read.push(timed('sh', ['-c', `cat "${inputs[0]}" "${inputs[1]}" > /dev/null`]))
  runs.write1.push(writeFloor(1))
  runs.writeN.push(writeFloor(points))

  rmSync(singleOut, { force: true })
  warm()
  const one = timed(process.execPath, [join(here, 'merge-once.mjs'), ...inputs, singleOut, single, threads])
  oneReport = JSON.parse(one.stdout)
  runs.one.push(one)

  for (const o of sweepOuts) rmSync(o, { force: true })
  warm()
  const sweep = timed(process.execPath, [join(here, 'sweep-once.mjs'), ...inputs, template, alphas.join(','), threads])
  sweepReports = JSON.parse(sweep.stdout)
  runs.sweep.push(sweep)

  identical &&= spawnSync('cmp', ['-s', singleOut, template.replace('{alpha}', single)]).status === 0
  rmSync(singleOut, { force: true })
  for (const o of sweepOuts) rmSync(o, { force: true })
  const last = (k) => runs[k].at(-1).seconds.toFixed(2)
  console.error(
    `round ${round + 1}/${rounds}: read ${last('read')} s, write 1 ${last('write1')} s, write ${points} ${last('writeN')} s, ` +
      `one merge ${last('one')} s, sweep ${last('sweep')} s`,
  )
}
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]
const med = (k) => ({
  seconds: median(runs[k].map((r) => r.seconds)),
  min: Math.min(...runs[k].map((r) => r.seconds)),
  peakRss: Math.max(...runs[k].map((r) => r.peakRss)),
})
const [read, write1, writeN, one, sweep] = ['read', 'write1', 'writeN', 'one', 'sweep'].map(med)

const gb = (b) => (b / 1e9).toFixed(2)
const mib = (b) => (b / 2 ** 20).toFixed(0)
console.log(
  `\nweighted_sum of two ${layout} fp16 models (${gb(inputBytes)} GB in, ${gb(outputBytes)} GB per output), warm page cache`,
)
console.log(
  `machine: ${cpus().length} × ${cpus()[0]?.model}, ${(totalmem() / 2 ** 30).toFixed(0)} GiB RAM; node ${process.version}\n`,
)
console.log(`${rounds} round(s), interleaved; wall time is the median (min in brackets)\n`)
console.log('| run | wall s | peak RSS MiB |')
console.log('|---|---|---|')
console.log(
  `| read floor: both inputs (cat) | ${read.seconds.toFixed(2)} (${read.min.toFixed(2)}) | ${mib(read.peakRss)} |`,
)
console.log(
  `| write floor: 1 output (dd, fsync) | ${write1.seconds.toFixed(2)} (${write1.min.toFixed(2)}) | ${mib(write1.peakRss)} |`,
)
console.log(
  `| write floor: ${points} outputs (dd, fsync) | ${writeN.seconds.toFixed(2)} (${writeN.min.toFixed(2)}) | ${mib(writeN.peakRss)} |`,
)
console.log(
  `| one merge (alpha ${single}, ${oneReport.threads} threads, fsync) | ${one.seconds.toFixed(2)} (${one.min.toFixed(2)}) | ${mib(one.peakRss)} |`,
)
console.log(
  `| mergeMany: ${points} alphas (${alphas.join(', ')}) | ${sweep.seconds.toFixed(2)} (${sweep.min.toFixed(2)}) | ${mib(sweep.peakRss)} |`,
)
const sweepRead = sweepReports.reduce((s, r) => s + r.bytesRead, 0)
console.log(`\nsweep / one merge: ${(sweep.seconds / one.seconds).toFixed(2)}× wall time for ${points} outputs`)
console.log(
  `sweep / its I/O floor (read once + write ${points}): ${(sweep.seconds / (read.seconds + writeN.seconds)).toFixed(2)}×; ` +
    `one merge / its floor (read + write 1): ${(one.seconds / (read.seconds + write1.seconds)).toFixed(2)}×`,
)
console.log(`bytes read: sweep ${gb(sweepRead)} GB, one merge ${gb(oneReport.bytesRead)} GB`)
console.log(`the sweep's alpha-${single} output ${identical ? 'is' : 'is NOT'} byte-identical to the single merge's`)
console.log(
  `\ncommand: node bench/sweep-bench.mjs${process.argv.slice(2).length ? ` ${process.argv.slice(2).join(' ')}` : ''}`,
)
if (!identical) process.exit(1)
