// Benchmark: key-format conversion of an SDXL fp16 checkpoint (real sdxl-sgm keys and shapes,
// random values: bench/out/sdxl-a.safetensors, as sdxl-weighted-sum.mjs writes it) to the kohya
// layout and back, measured side by side in one run:
//   - the I/O floor: reading the input once (cat) and writing an output-sized file (dd, fsync);
//   - this library: `node dist/cli.js convert in --to sdxl-kohya -o out`, then `--to sdxl-sgm`;
//   - sd-mecha 1.1.8 (bench/reference_convert.py), when bench/setup-reference.sh installed it:
//     `merge(convert(model(in), target), output=out)` with its defaults (fp16 output).
// Both back conversions read this library's kohya file, so the two engines convert the same bytes.
// Checks: our sgm → kohya → sgm round trip is byte-identical to the input for every key the kohya
// layout holds (the others are listed); our kohya file matches sd-mecha's outside the split q/k/v
// keys (1.1.8 writes those chunks wrongly to files: see docs/differences.md).
//
//   node bench/convert-bench.mjs [--cold] [--dir bench/out] [--rounds 1] [--threads N]
//                                [--skip-reference] [--keep]
import { closeSync, existsSync, mkdirSync, openSync, rmSync, statSync } from 'node:fs'
import { cpus, totalmem } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'

import { configs, writeRandomModel } from '../dist/index.js'
import { compareFiles, gb, ioFloor, median, mib, prepare, readTensor, tensorsOf, timed } from './harness.mjs'

const here = dirname(fileURLToPath(import.meta.url))
const arg = (name, fallback) => {
  const i = process.argv.indexOf(`--${name}`)
  return i > 0 ? (process.argv[i + 1] ?? true) : fallback
}
const cold = process.argv.includes('--cold')
const keep = process.argv.includes('--keep')
const threads = String(arg('threads', '0'))
const rounds = Number(arg('rounds', 1))
const dir = resolve(String(arg('dir', join(here, 'out'))))
mkdirSync(dir, { recursive: true })

const input = join(dir, 'sdxl-a.safetensors')
if (!existsSync(input)) {
  console.error(`generating ${input}`)
  await writeRandomModel(input, 'sdxl', 1)
}
const python = join(here, '.venv', 'bin', 'python')
const withReference = existsSync(python) && !process.argv.includes('--skip-reference')
const cli = join(here, '..', 'dist', 'cli.js')
const out = (name) => join(dir, `sdxl-a-${name}.safetensors`)
const ourKohya = out('kohya-mecha-node')
const ourBack = out('kohya-sgm-mecha-node')
const refKohya = out('kohya-sd-mecha')
const refBack = out('kohya-sgm-sd-mecha')
const floorOut = join(dir, 'floor.bin')

const ours = (from, to, output) =>
  timed(process.execPath, [cli, 'convert', from, '--to', to, '-o', output, '--threads', threads, '--json', '-q'])
const reference = (from, to, output) => {
  const r = timed(python, [join(here, 'reference_convert.py'), from, to, output])
  return { ...r, inner: JSON.parse(r.stdout.trim().split('\n').at(-1)) }
}

// The keys 1.1.8 splits with `chunk` (views): CLIP-G's q/k/v projections from in_proj_*.
const splitQkv = (name) => /^te2\.text_model\.encoder\.layers\.\d+\.self_attn\.[qkv]_proj\.(weight|bias)$/.test(name)

const runs = { fwd: { floor: [], ours: [], ref: [] }, back: { floor: [], ours: [], ref: [] } }
const checks = {}
let ourReports = {}

for (let round = 0; round < rounds; round++) {
  const last = round === rounds - 1
  // sgm → kohya
  prepare([input], [floorOut], cold)
  runs.fwd.floor.push(ioFloor([input], statSync(input).size, floorOut))
  prepare([input], [ourKohya], cold)
  const f = ours(input, 'sdxl-kohya', ourKohya)
  ourReports.fwd = JSON.parse(f.stdout)
  runs.fwd.ours.push(f)
  if (withReference) {
    prepare([input], [refKohya], cold)
    runs.fwd.ref.push(reference(input, 'sdxl-kohya', refKohya))
    if (last) checks.sizes = { ours: statSync(ourKohya).size, ref: statSync(refKohya).size }
    if (last) checks.kohya = compareFiles(ourKohya, refKohya, { skip: splitQkv })
    if (last) checks.kohyaSplit = compareFiles(ourKohya, refKohya, { skip: (n) => !splitQkv(n) })
    rmSync(refKohya, { force: true })
  }
  // kohya → sgm (both engines read our kohya file)
  prepare([ourKohya], [floorOut], cold)
  runs.back.floor.push(ioFloor([ourKohya], statSync(ourKohya).size, floorOut))
  prepare([ourKohya], [ourBack], cold)
  const b = ours(ourKohya, 'sdxl-sgm', ourBack)
  ourReports.back = JSON.parse(b.stdout)
  runs.back.ours.push(b)
  if (last) {
    checks.roundTrip = compareFiles(input, ourBack)
    const back = tensorsOf(ourBack)
    const fd = openSync(ourBack, 'r')
    checks.extraZero = checks.roundTrip.onlyInB.filter((k) => readTensor(fd, back.get(k)).every((b) => b === 0)).length
    closeSync(fd)
  }
  rmSync(ourBack, { force: true })
  if (withReference) {
    prepare([ourKohya], [refBack], cold)
    runs.back.ref.push(reference(ourKohya, 'sdxl-sgm', refBack))
    if (last) checks.refBack = compareFiles(input, refBack)
    rmSync(refBack, { force: true })
  }
  const line = (d) =>
    `floor ${runs[d].floor.at(-1).seconds.toFixed(2)} s, ours ${runs[d].ours.at(-1).seconds.toFixed(2)} s` +
    (withReference ? `, sd-mecha ${runs[d].ref.at(-1).seconds.toFixed(2)} s` : '')
  console.error(`round ${round + 1}/${rounds}: sgm → kohya: ${line('fwd')}; kohya → sgm: ${line('back')}`)
}
const kohyaBytes = statSync(ourKohya).size
if (!keep) rmSync(ourKohya, { force: true })

// The benchmark input has the keys of sdxl-sgm that are not optional (and position_ids), as
// pruned SDXL checkpoints do. A second, small file holds the 51 optional keys (CLIP-L layer 11,
// CLIP-G resblock 31, final norms, text_projection, logit_scale, the scheduler, v_pred, ztsnr,
// edm_vpred.*): it checks the round trip and the transposed text_projection against sd-mecha.
const optional = join(dir, 'sdxl-optional-keys.safetensors')
const optOut = (name) => join(dir, `sdxl-optional-keys-${name}.safetensors`)
await writeRandomModel(
  optional,
  configs
    .keys('sdxl-sgm')
    .filter((k) => k.optional)
    .map((k) => ({ name: k.key, dtype: /^[IU]/.test(k.dtype ?? '') ? k.dtype : 'F16', shape: k.shape })),
  7,
)
const optKohya = ours(optional, 'sdxl-kohya', optOut('kohya-mecha-node'))
checks.optSkipped = JSON.parse(optKohya.stdout).keysSkipped.map((k) => k.key)
ours(optOut('kohya-mecha-node'), 'sdxl-sgm', optOut('kohya-sgm-mecha-node'))
checks.optRoundTrip = compareFiles(optional, optOut('kohya-sgm-mecha-node'))
if (withReference) {
  reference(optional, 'sdxl-kohya', optOut('kohya-sd-mecha'))
  checks.optKohya = compareFiles(optOut('kohya-mecha-node'), optOut('kohya-sd-mecha'))
}
for (const name of ['kohya-mecha-node', 'kohya-sgm-mecha-node', 'kohya-sd-mecha']) rmSync(optOut(name), { force: true })
rmSync(optional, { force: true })

// Report.
const summary = (list) => ({
  seconds: median(list.map((r) => r.seconds)),
  min: Math.min(...list.map((r) => r.seconds)),
  peakRss: Math.max(...list.map((r) => r.peakRss)),
})
console.log(
  `\nconvert of an SDXL fp16 checkpoint (${gb(statSync(input).size)} GB sdxl-sgm, ${gb(kohyaBytes)} GB sdxl-kohya), ${cold ? 'cold' : 'warm'} page cache`,
)
console.log(
  `machine: ${cpus().length} × ${cpus()[0]?.model}, ${(totalmem() / 2 ** 30).toFixed(0)} GiB RAM; node ${process.version}`,
)
console.log(`${rounds} round(s), interleaved; wall time is the median (min in brackets)\n`)
console.log('| direction | run | wall s | vs I/O floor | peak RSS MiB |')
console.log('|---|---|---|---|---|')
const table = {}
for (const [d, label] of [
  ['fwd', 'sgm → kohya'],
  ['back', 'kohya → sgm'],
]) {
  const rows = [
    ['I/O floor (cat input + dd output, fsync)', summary(runs[d].floor)],
    [`sd-mecha for Node (CLI, ${ourReports[d].threads ?? '?'} threads, fsync)`, summary(runs[d].ours)],
    ...(withReference ? [['sd-mecha 1.1.8 (torch CPU, no fsync)', summary(runs[d].ref)]] : []),
  ]
  table[d] = rows.map(([, s]) => s)
  for (const [name, s] of rows)
    console.log(
      `| ${label} | ${name} | ${s.seconds.toFixed(2)} (${s.min.toFixed(2)}) | ${(s.seconds / rows[0][1].seconds).toFixed(2)}× | ${mib(s.peakRss)} |`,
    )
}
for (const d of ['fwd', 'back']) {
  const [floor, o, r] = table[d]
  const parts =
    median(runs[d].floor.map((x) => x.read)).toFixed(2) +
    ' s read, ' +
    median(runs[d].floor.map((x) => x.write)).toFixed(2) +
    ' s write + fsync'
  let text = `\n${d === 'fwd' ? 'sgm → kohya' : 'kohya → sgm'}: ours / floor ${(o.seconds / floor.seconds).toFixed(2)}× (floor: ${parts})`
  if (r) {
    const inner = runs[d].ref.map((x) => x.inner)
    text +=
      `; sd-mecha / ours ${(r.seconds / o.seconds).toFixed(2)}× wall time, ${(r.peakRss / o.peakRss).toFixed(1)}× peak RSS` +
      ` (sd-mecha's own timer, median: ${median(inner.map((x) => x.seconds)).toFixed(2)} s, with fsync ${median(inner.map((x) => x.seconds_with_fsync)).toFixed(2)} s)`
  }
  console.log(text)
}
if (withReference) {
  const total = (i) => table.fwd[i].seconds + table.back[i].seconds
  console.log(
    `both directions: sd-mecha / ours ${(total(2) / total(1)).toFixed(2)}×, ours / floor ${(total(1) / total(0)).toFixed(2)}×`,
  )
}
console.log(`our reports: sgm → kohya skipped ${JSON.stringify(ourReports.fwd.keysSkipped ?? '?')}`)

const rt = checks.roundTrip
console.log(
  `\nround trip sgm → kohya → sgm (ours): ${rt.identical.length}/${rt.identical.length + rt.onlyInA.length + rt.layout.length + rt.differing.length} input keys byte-identical;` +
    ` ${rt.differing.length} differ, ${rt.layout.length} changed dtype/shape, ${rt.onlyInB.length} extra;` +
    ` absent (no place in sdxl-kohya): ${rt.onlyInA.length ? rt.onlyInA.join(', ') : 'none'}`,
)
if (rt.differing.length || rt.layout.length) console.log(`  differing: ${[...rt.differing, ...rt.layout].join(', ')}`)
if (rt.onlyInB.length) {
  // sdxl-sgm's missing-key handler (docs/differences.md) fills CLIP-L layer 11 / CLIP-G resblock 31
  console.log(
    `  extra keys in the back conversion (not in the input; ${checks.extraZero} of them all zeros, from sdxl-sgm's missing-key handler): ${rt.onlyInB.join(', ')}`,
  )
}
if (withReference) {
  const k = checks.kohya
  const s = checks.kohyaSplit
  console.log(
    `our kohya file vs sd-mecha's, outside the ${s.identical.length + s.differing.length + s.layout.length} split q/k/v keys:` +
      ` ${k.identical.length} byte-identical, ${k.differing.length} differ, ${k.layout.length} differ in dtype/shape;` +
      ` keys only ours: ${k.onlyInA.length}, only sd-mecha's: ${k.onlyInB.length}`,
  )
  for (const l of k.layout) console.log(`  dtype/shape: ${l}`)
  if (k.differing.length) console.log(`  differing: ${k.differing.slice(0, 20).join(', ')}`)
  if (k.onlyInA.length || k.onlyInB.length)
    console.log(`  only ours: ${k.onlyInA.join(', ')}; only sd-mecha's: ${k.onlyInB.join(', ')}`)
  console.log(`  file sizes: ours ${checks.sizes.ours} bytes, sd-mecha's ${checks.sizes.ref} bytes`)
  console.log(
    `  the split q/k/v keys, compared apart: ${s.identical.length} byte-identical, ${s.differing.length} differ, ${s.layout.length} differ in dtype/shape`,
  )
  const r = checks.refBack
  console.log(
    `sd-mecha's kohya → sgm (from our kohya file) vs the input: ${r.identical.length} byte-identical, ${r.differing.length} differ,` +
      ` ${r.layout.length} differ in dtype/shape; absent: ${r.onlyInA.length}, extra: ${r.onlyInB.length}`,
  )
  const shown = [...r.layout, ...r.differing]
  if (shown.length)
    console.log(`  ${shown.slice(0, 6).join(', ')}${shown.length > 6 ? `, … (${shown.length} in all)` : ''}`)
}
const ort = checks.optRoundTrip
console.log(
  `optional sgm keys (51, small file): round trip ${ort.identical.length} byte-identical, ${ort.differing.length} differ, ${ort.layout.length} changed dtype/shape,` +
    ` ${ort.onlyInB.length} extra; absent after the round trip: ${ort.onlyInA.join(', ')}`,
)
const unreported = ort.onlyInA.filter((k) => !checks.optSkipped.includes(k))
console.log(
  `  our sgm → kohya report lists ${checks.optSkipped.length} of them as skipped${unreported.length ? `; not listed: ${unreported.join(', ')}` : ''}`,
)
if (checks.optKohya) {
  const c = checks.optKohya
  console.log(
    `  our kohya file vs sd-mecha's on it: ${c.identical.length} byte-identical, ${c.differing.length} differ (${c.differing.join(', ')}), ${c.layout.length} differ in dtype/shape` +
      `${c.layout.length ? ` (${c.layout.join(', ')})` : ''}; only ours: ${c.onlyInA.join(', ') || 'none'}; only sd-mecha's: ${c.onlyInB.join(', ') || 'none'}`,
  )
}
console.log(
  `\ncommand: node bench/convert-bench.mjs${process.argv.length > 2 ? ` ${process.argv.slice(2).join(' ')}` : ''}`,
)
