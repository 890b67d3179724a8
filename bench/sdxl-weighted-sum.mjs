// Benchmark: a merge method (weighted_sum by default; --method slerp, add_cosine_a, crossover…)
// of two SDXL-layout fp16 models (real sdxl-sgm keys and shapes, random values) into an fp16
// file, measured side by side in one run:
//   - the I/O floor: reading both inputs once (cat) and writing one output-sized file (dd, fsync);
//   - this library (node, one process);
//   - sd-mecha 1.1.8, when bench/setup-reference.sh has installed it in bench/.venv.
// Each run starts from the same page-cache state: warm (inputs read beforehand, the default) or
// cold (--cold: caches dropped, needs root). Outputs are compared tensor by tensor.
//
//   node bench/sdxl-weighted-sum.mjs [--cold] [--threads N] [--dir bench/out] [--layout sdxl]
//                                    [--method weighted_sum] [--memory 1G] [--rounds 3]
import { execFileSync, spawnSync } from 'node:child_process'
import { existsSync, rmSync, statSync, writeFileSync } from 'node:fs'
import { cpus, totalmem } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'

import { compareOutputs } from './compare.mjs'
import { benchModels } from './harness.mjs'

const here = dirname(fileURLToPath(import.meta.url))
const arg = (name, fallback) => {
  const i = process.argv.indexOf(`--${name}`)
  return i > 0 ? (process.argv[i + 1] ?? true) : fallback
}
const cold = process.argv.includes('--cold')
const threads = String(arg('threads', '0'))
const layout = String(arg('layout', 'sdxl'))
const dir = resolve(String(arg('dir', join(here, 'out'))))
const alpha = '0.3'
const method = String(arg('method', 'weighted_sum'))
const memory = arg('memory', undefined)

const inputs = await benchModels(dir, layout)
const inputBytes = inputs.reduce((s, p) => s + statSync(p).size, 0)

function prepare(outputs) {
  for (const o of outputs) rmSync(o, { force: true })
  execFileSync('sync')
  if (cold) writeFileSync('/proc/sys/vm/drop_caches', '3')
  else execFileSync('cat', inputs, { stdio: ['ignore', 'ignore', 'inherit'] })
}

/** Runs a command under /usr/bin/time; returns wall seconds, peak RSS bytes and stdout. */
function timed(cmd, args) {
  const r = spawnSync('/usr/bin/time', ['-f', '%e %M', cmd, ...args], { encoding: 'utf8', maxBuffer: 1 << 26 })
  if (r.status !== 0) throw new Error(`${cmd} failed:\n${r.stdout}\n${r.stderr}`)
  const [wall, kb] = r.stderr.trim().split('\n').at(-1).split(' ').map(Number)
  return { seconds: wall, peakRss: kb * 1024, stdout: r.stdout }
}

const rounds = Number(arg('rounds', 3))
const ourOut = join(dir, `${layout}-${method}-mecha-node.safetensors`)
const refOut = join(dir, `${layout}-${method}-sd-mecha.safetensors`)
const floorOut = join(dir, 'floor.bin')
const python = join(here, '.venv', 'bin', 'python')
const withReference = existsSync(python) && !process.argv.includes('--skip-reference')
const runs = { floor: [], ours: [], reference: [] }
let ourReport

// The disk of a shared machine is noisy: interleave the runs and report medians.
for (let round = 0; round < rounds; round++) {
  // I/O floor: read both inputs once, then write an output-sized file and flush it.
  prepare([floorOut])
  const read = timed('sh', ['-c', `cat "${inputs[0]}" "${inputs[1]}" > /dev/null`])
  const outputBytes = inputBytes / 2
  const write = timed('dd', [
    'if=/dev/zero',
    `of=${floorOut}`,
    'bs=16M',
    `count=${Math.ceil(outputBytes / 2 ** 24)}`,
    'conv=fsync',
    'status=none',
  ])
  rmSync(floorOut, { force: true })
  runs.floor.push({
    seconds: read.seconds + write.seconds,
    peakRss: Math.max(read.peakRss, write.peakRss),
    read: read.seconds,
    write: write.seconds,
  })

  prepare([ourOut])
  const ours = timed(process.execPath, [
    join(here, 'merge-once.mjs'),
    ...inputs,
    ourOut,
    alpha,
    threads,
    method,
    ...(memory ? [String(memory)] : []),
  ])
  ourReport = JSON.parse(ours.stdout)
  runs.ours.push(ours)

  if (withReference) {
    prepare([refOut])
    const ref = timed(python, [join(here, 'reference_merge.py'), ...inputs, refOut, alpha, method])
    runs.reference.push({ ...ref, inner: JSON.parse(ref.stdout.trim().split('\n').at(-1)) })
  }
  console.error(
    `round ${round + 1}/${rounds}: floor ${runs.floor.at(-1).seconds.toFixed(2)} s, ours ${ours.seconds.toFixed(2)} s${withReference ? `, sd-mecha ${runs.reference.at(-1).seconds.toFixed(2)} s` : ''}`,
  )
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]
const summary = (name, list) => ({
  name,
  seconds: median(list.map((r) => r.seconds)),
  min: Math.min(...list.map((r) => r.seconds)),
  peakRss: Math.max(...list.map((r) => r.peakRss)),
})
const results = [
  summary('I/O floor (cat inputs + dd output, fsync)', runs.floor),
  summary(`sd-mecha for Node (${ourReport.threads} threads, fsync)`, runs.ours),
  ...(withReference ? [summary('sd-mecha 1.1.8 (torch CPU, no fsync)', runs.reference)] : []),
]

// Report.
const gb = (b) => (b / 1e9).toFixed(2)
console.log(
  `\n${method} of two ${layout} fp16 models (${gb(inputBytes)} GB in, ${gb(statSync(ourOut).size)} GB out), ${cold ? 'cold' : 'warm'} page cache`,
)
console.log(
  `machine: ${cpus().length} × ${cpus()[0]?.model}, ${(totalmem() / 2 ** 30).toFixed(0)} GiB RAM; node ${process.version}\n`,
)
console.log(`${rounds} round(s), interleaved; wall time is the median (min in brackets)\n`)
console.log('| run | wall s | vs I/O floor | peak RSS MiB |')
console.log('|---|---|---|---|')
const floor = results[0].seconds
for (const r of results) {
  const wall = `${r.seconds.toFixed(2)} (${r.min.toFixed(2)})`
  console.log(`| ${r.name} | ${wall} | ${(r.seconds / floor).toFixed(2)}× | ${(r.peakRss / 2 ** 20).toFixed(0)} |`)
}
console.log(
  `\nthis library's plan: estimated peak ${(ourReport.estimatedPeakBytes / 2 ** 20).toFixed(0)} MiB, memory budget ` +
    `${(ourReport.memoryBudget / 2 ** 20).toFixed(0)} MiB, ${ourReport.overBudget.length} key(s) over it (ran alone)`,
)
const floorRead = median(runs.floor.map((r) => r.read))
const floorWrite = median(runs.floor.map((r) => r.write))
console.log(`\nI/O floor parts (median): read ${floorRead.toFixed(2)} s, write + fsync ${floorWrite.toFixed(2)} s`)
if (withReference) {
  const ourRun = results[1]
  const refRun = results[2]
  console.log(
    `\nsd-mecha / this library: ${(refRun.seconds / ourRun.seconds).toFixed(2)}× wall time, ${(refRun.peakRss / ourRun.peakRss).toFixed(1)}× peak RSS`,
  )
  const inner = runs.reference.map((r) => r.inner)
  const innerMerge = median(inner.map((r) => r.seconds)).toFixed(2)
  const innerFsync = median(inner.map((r) => r.seconds_with_fsync)).toFixed(2)
  console.log(`(sd-mecha's own timer, median: merge ${innerMerge} s, with fsync ${innerFsync} s)`)
  compareOutputs(ourOut, refOut)
}
console.log(
  `\ncommand: node bench/sdxl-weighted-sum.mjs${process.argv.slice(2).length ? ` ${process.argv.slice(2).join(' ')}` : ''}`,
)
