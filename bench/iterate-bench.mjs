// Benchmark: iterate() over weighted_sum of the two SDXL-layout fp16 models with a consumer that
// sleeps 1 ms per tensor, against the same process that only plans the recipe (its baseline
// memory: Node, the addon, the model-config tables). Warm page cache.
//
//   node bench/iterate-bench.mjs [--dir bench/out] [--layout sdxl] [--sleep 1] [--buffer 64M]
import { cpus, totalmem } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'

import { benchModels, prepare, timed } from './harness.mjs'

const here = dirname(fileURLToPath(import.meta.url))
const arg = (name, fallback) => {
  const i = process.argv.indexOf(`--${name}`)
  return i > 0 ? (process.argv[i + 1] ?? true) : fallback
}
const layout = String(arg('layout', 'sdxl'))
const dir = resolve(String(arg('dir', join(here, 'out'))))
const sleepMs = String(arg('sleep', '1'))
const buffer = String(arg('buffer', '64M'))
const inputs = await benchModels(dir, layout)
prepare(inputs, [])

function iterateOnce(args) {
  const r = timed(process.execPath, [join(here, 'iterate-once.mjs'), ...args])
  return { ...r, ...JSON.parse(r.stdout) }
}

const baseline = iterateOnce([...inputs, sleepMs, buffer, '--baseline'])
const run = iterateOnce([...inputs, sleepMs, buffer])
const mib = (b) => (b / 2 ** 20).toFixed(0)
console.log(
  `\niterate(weighted_sum) of two ${layout} fp16 models, consumer sleeping ${sleepMs} ms per tensor, bufferSize ${buffer}`,
)
console.log(
  `machine: ${cpus().length} × ${cpus()[0]?.model}, ${(totalmem() / 2 ** 30).toFixed(0)} GiB RAM; node ${process.version}\n`,
)
console.log('| run | wall s | peak RSS MiB |')
console.log('|---|---|---|')
console.log(
  `| the same process, planning only (baseline) | ${baseline.seconds.toFixed(2)} | ${mib(baseline.peakRss)} |`,
)
console.log(
  `| iterate: ${run.keys} tensors, ${(run.bytes / 1e9).toFixed(2)} GB | ${run.seconds.toFixed(2)} | ${mib(run.peakRss)} |`,
)
console.log(
  `\nlargest tensor delivered: ${mib(run.largest)} MiB; peak RSS above the baseline: ${mib(run.peakRss - baseline.peakRss)} MiB`,
)
console.log(
  `\ncommand: node bench/iterate-bench.mjs${process.argv.slice(2).length ? ` ${process.argv.slice(2).join(' ')}` : ''}`,
)
