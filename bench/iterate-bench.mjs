// Benchmark: iterate() over weighted_sum of the two SDXL-layout fp16 models with a consumer that
// sleeps 1 ms per tensor, against the same process that only plans the recipe (its baseline
// memory: Node, the addon, the model-config tables). Warm page cache.
//
//   node bench/iterate-bench.mjs [--dir bench/out] [--layout sdxl] [--sleep 1] [--buffer 64M]
import { execFileSync, spawnSync } from 'node:child_process'
import { existsSync } from 'node:fs'
import { cpus, totalmem } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'

import { writeRandomModel } from '../dist/index.js'

const here = dirname(fileURLToPath(import.meta.url))
const arg = (name, fallback) => {
  const i = process.argv.indexOf(`--${name}`)
  return i > 0 ? (process.argv[i + 1] ?? true) : fallback
}
const layout = String(arg('layout', 'sdxl'))
const dir = resolve(String(arg('dir', join(here, 'out'))))
const sleepMs = String(arg('sleep', '1'))
const buffer = String(arg('buffer', '64M'))
const inputs = [join(dir, `${layout}-a.safetensors`), join(dir, `${layout}-b.safetensors`)]
for (const [i, path] of inputs.entries()) {
  if (!existsSync(path)) {
    console.error(`generating ${path}`)
    await writeRandomModel(path, layout, i + 1)
  }
}
execFileSync('cat', inputs, { stdio: ['ignore', 'ignore', 'inherit'] })

function timed(args) {
  const r = spawnSync('/usr/bin/time', ['-f', '%e %M', process.execPath, join(here, 'iterate-once.mjs'), ...args], {
    encoding: 'utf8',
  })
  if (r.status !== 0) throw new Error(`iterate-once failed:\n${r.stdout}\n${r.stderr}`)
  const [wall, kb] = r.stderr.trim().split('\n').at(-1).split(' ').map(Number)
  return { seconds: wall, peakRss: kb * 1024, ...JSON.parse(r.stdout) }
}

const baseline = timed([...inputs, sleepMs, buffer, '--baseline'])
const run = timed([...inputs, sleepMs, buffer])
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
