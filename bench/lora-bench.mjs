// Benchmark: baking a rank-64 SDXL LoRA with real kohya key names into an SDXL fp16 checkpoint
// (bench/out/sdxl-a.safetensors, real sdxl-sgm keys and shapes, random values, as
// sdxl-weighted-sum.mjs writes it), measured side by side in one run:
//   - the I/O floor: reading the base and the LoRA once (cat) and writing a base-sized file (dd, fsync);
//   - this library: `node dist/cli.js lora bake base lora.safetensors:0.8 -o out`;
//   - sd-mecha 1.1.8 (bench/reference_lora.py), when bench/setup-reference.sh installed it:
//     `add_difference(base, convert(lora, base), alpha=0.8) | base` with its defaults (fp16 output).
// The LoRA (bench/out/sdxl-lora-r64.safetensors, written here when absent) has the keys of the
// `sdxl-kohya_but_diffusers_kohya_lora` config for every linear layer of the UNet's transformer
// blocks (attn1/attn2 to_q/to_k/to_v/to_out_0, ff_net_0_proj, ff_net_2) and proj_in/proj_out, and
// every self-attention q/k/v/out projection and MLP layer of both text encoders: lora_down [64, in],
// lora_up [out, 64] with 0.01·N(0, 1) fp16 values, alpha 32 (fp16, 0-D). The outputs are compared
// element by element; the keys that changed are counted against those the LoRA should change.
//
//   node bench/lora-bench.mjs [--cold] [--dir bench/out] [--rounds 1] [--threads N] [--skip-reference]
//                             [--generate-only]
import { closeSync, existsSync, mkdirSync, openSync, rmSync, statSync, writeSync } from 'node:fs'
import { cpus, totalmem } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'

import { configs, inspect, writeRandomModel } from '../dist/index.js'
import { compareFiles, gb, ioFloor, median, mib, prepare, readTensor, tensorsOf, timed } from './harness.mjs'

const here = dirname(fileURLToPath(import.meta.url))
const arg = (name, fallback) => {
  const i = process.argv.indexOf(`--${name}`)
  return i > 0 ? (process.argv[i + 1] ?? true) : fallback
}
const cold = process.argv.includes('--cold')
const threads = String(arg('threads', '0'))
const rounds = Number(arg('rounds', 1))
const dir = resolve(String(arg('dir', join(here, 'out'))))
const alpha = '0.8'
const RANK = 64
mkdirSync(dir, { recursive: true })

const base = join(dir, 'sdxl-a.safetensors')
if (!existsSync(base)) {
  console.error(`generating ${base}`)
  await writeRandomModel(base, 'sdxl', 1)
}

// The LoRA's modules: the base layers (sdxl-kohya_but_diffusers keys) a kohya SDXL LoRA trains.
const unetLayer =
  /^unet\..*attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))\.weight$/
const teLayer = /^te[12]\.text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])\.weight$/
const modules = configs
  .keys('sdxl-kohya_but_diffusers')
  .filter((k) => unetLayer.test(k.key) || teLayer.test(k.key))
  .map((k) => {
    if (k.shape?.length !== 2) throw new Error(`${k.key}: expected a linear layer, got shape [${k.shape}]`)
    const name = `lora_${k.key.slice(0, -'.weight'.length).replaceAll('.', '_')}`
    return { base: k.key, name, out: k.shape[0], in: k.shape[1] }
  })
const loraKeys = new Set(configs.keys('sdxl-kohya_but_diffusers_kohya_lora').map((k) => k.key))
for (const m of modules)
  for (const suffix of ['lora_up.weight', 'lora_down.weight', 'alpha'])
    if (!loraKeys.has(`${m.name}.${suffix}`)) throw new Error(`${m.name}.${suffix} is not a key of the LoRA config`)
const count = (re) => modules.filter((m) => re.test(m.base)).length
const te2Qkv = count(/^te2\..*self_attn\.[qkv]_proj/)
/** The sdxl-sgm key a text-encoder module changes (CLIP-G's q/k/v all change in_proj_weight). */
function sgmKey(key) {
  if (key.startsWith('te1.')) return `conditioner.embedders.0.transformer.${key.slice(4)}`
  const m = /^te2\.text_model\.encoder\.layers\.(\d+)\.(self_attn\.([qkv]|out)_proj|mlp\.fc([12]))\.weight$/.exec(key)
  if (!m) return null
  const block = `conditioner.embedders.1.model.transformer.resblocks.${m[1]}`
  if (m[3] === 'out') return `${block}.attn.out_proj.weight`
  if (m[3]) return `${block}.attn.in_proj_weight`
  return `${block}.mlp.${m[4] === '1' ? 'c_fc' : 'c_proj'}.weight`
}
// The keys the bake should change: one per UNet module (the benchmark base has every UNet key),
// one per text-encoder sgm key the base holds. sdxl-a is pruned as many SDXL checkpoints are
// (no CLIP-L layer 11, no CLIP-G resblock 31), so the LoRA's modules there have no base key.
const baseKeys = new Set(inspect(base).tensors.map((t) => t.name))
const teKeys = new Set(modules.filter((m) => m.base.startsWith('te')).map((m) => sgmKey(m.base)))
const teKeysInBase = [...teKeys].filter((k) => baseKeys.has(k))
const teKeysMissing = [...teKeys].filter((k) => !baseKeys.has(k))
const expectedChanged = count(/^unet\./) + teKeysInBase.length

const lora = join(dir, `sdxl-lora-r${RANK}.safetensors`)
if (!existsSync(lora)) {
  console.error(`generating ${lora}`)
  writeLora(lora)
}
if (process.argv.includes('--generate-only')) process.exit(0)

/** Writes the LoRA: 0.01·N(0, 1) factors (seeded per tensor), alpha 32, all fp16. */
function writeLora(path) {
  const tensors = modules.flatMap((m) => [
    { name: `${m.name}.alpha`, shape: [] },
    { name: `${m.name}.lora_down.weight`, shape: [RANK, m.in] },
    { name: `${m.name}.lora_up.weight`, shape: [m.out, RANK] },
  ])
  const header = {}
  let offset = 0
  for (const t of tensors) {
    const bytes = t.shape.reduce((a, b) => a * b, 1) * 2
    header[t.name] = { dtype: 'F16', shape: t.shape, data_offsets: [offset, offset + bytes] }
    offset += bytes
  }
  let json = Buffer.from(JSON.stringify(header))
  json = Buffer.concat([json, Buffer.alloc((8 - (json.length % 8)) % 8, 0x20)])
  const fd = openSync(path, 'w')
  const size = Buffer.alloc(8)
  size.writeBigUInt64LE(BigInt(json.length))
  writeSync(fd, size)
  writeSync(fd, json)
  for (const [i, t] of tensors.entries()) {
    const n = t.shape.reduce((a, b) => a * b, 1)
    const out = new Uint16Array(n)
    if (t.shape.length === 0) out[0] = toHalf(32)
    else {
      const random = mulberry32(0x5eed + i)
      for (let j = 0; j < n; j += 2) {
        // Box–Muller: two normals from two uniforms
        const r = Math.sqrt(-2 * Math.log(1 - random()))
        const phi = 2 * Math.PI * random()
        out[j] = toHalf(0.01 * r * Math.cos(phi))
        if (j + 1 < n) out[j + 1] = toHalf(0.01 * r * Math.sin(phi))
      }
    }
    writeSync(fd, new Uint8Array(out.buffer))
  }
  closeSync(fd)
}

function mulberry32(seed) {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6d2b79f5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

/** float → fp16 bits, round to nearest even. */
function toHalf(v) {
  const f = new Float32Array([v])
  const x = new Uint32Array(f.buffer)[0]
  const sign = (x >>> 16) & 0x8000
  let e = ((x >>> 23) & 0xff) - 127 + 15
  let m = x & 0x7fffff
  if (((x >>> 23) & 0xff) === 255) return sign | 0x7c00 | (m ? 0x200 : 0)
  if (e >= 31) return sign | 0x7c00
  if (e <= 0) {
    if (e < -10) return sign
    m |= 0x800000
    const shift = 14 - e
    let h = m >>> shift
    const rem = m & ((1 << shift) - 1)
    const half = 1 << (shift - 1)
    if (rem > half || (rem === half && h & 1)) h++
    return sign | h
  }
  let h = (e << 10) | (m >>> 13)
  const rem = m & 0x1fff
  if (rem > 0x1000 || (rem === 0x1000 && h & 1)) h++
  return sign | h
}

const python = join(here, '.venv', 'bin', 'python')
const withReference = existsSync(python) && !process.argv.includes('--skip-reference')
const cli = join(here, '..', 'dist', 'cli.js')
const ourOut = join(dir, 'sdxl-a-lora-mecha-node.safetensors')
const refOut = join(dir, 'sdxl-a-lora-sd-mecha.safetensors')
const floorOut = join(dir, 'floor.bin')
const inputs = [base, lora]
const runs = { floor: [], ours: [], ref: [] }
let ourReport
let checks

for (let round = 0; round < rounds; round++) {
  const last = round === rounds - 1
  prepare(inputs, [floorOut], cold)
  runs.floor.push(ioFloor(inputs, statSync(base).size, floorOut))
  prepare(inputs, [ourOut], cold)
  const o = timed(process.execPath, [
    cli,
    'lora',
    'bake',
    base,
    `${lora}:${alpha}`,
    '-o',
    ourOut,
    '--threads',
    threads,
    '--json',
    '-q',
  ])
  ourReport = JSON.parse(o.stdout)
  runs.ours.push(o)
  if (withReference) {
    prepare(inputs, [refOut], cold)
    const r = timed(python, [join(here, 'reference_lora.py'), base, lora, refOut, alpha])
    runs.ref.push({ ...r, inner: JSON.parse(r.stdout.trim().split('\n').at(-1)) })
  }
  if (last) {
    checks = { oursVsBase: compareFiles(ourOut, base) }
    const outTensors = tensorsOf(ourOut)
    const fd = openSync(ourOut, 'r')
    checks.extraInfo = checks.oursVsBase.onlyInA.map((k) => {
      const zeros = readTensor(fd, outTensors.get(k)).every((b) => b === 0)
      return `${k} (${zeros ? 'all zeros' : 'not zeros'}${teKeysMissing.includes(k) ? ', a LoRA target' : ''})`
    })
    closeSync(fd)
    if (withReference) {
      const refTensors = tensorsOf(refOut)
      checks.refExtra = checks.oursVsBase.onlyInA.filter((k) => refTensors.has(k))
    }
    if (withReference) {
      checks.refVsBase = compareFiles(refOut, base)
      checks.oursVsRef = compareFiles(ourOut, refOut, { values: true })
    }
  }
  rmSync(ourOut, { force: true })
  rmSync(refOut, { force: true })
  console.error(
    `round ${round + 1}/${rounds}: floor ${runs.floor.at(-1).seconds.toFixed(2)} s, ours ${o.seconds.toFixed(2)} s` +
      (withReference ? `, sd-mecha ${runs.ref.at(-1).seconds.toFixed(2)} s` : ''),
  )
}

// Report.
const summary = (list) => ({
  seconds: median(list.map((r) => r.seconds)),
  min: Math.min(...list.map((r) => r.seconds)),
  peakRss: Math.max(...list.map((r) => r.peakRss)),
})
console.log(
  `\nLoRA bake: rank ${RANK}, ${modules.length} modules (${gb(statSync(lora).size)} GB fp16), alpha ${alpha}, into an SDXL fp16 checkpoint ` +
    `(${gb(statSync(base).size)} GB), ${cold ? 'cold' : 'warm'} page cache`,
)
console.log(
  `machine: ${cpus().length} × ${cpus()[0]?.model}, ${(totalmem() / 2 ** 30).toFixed(0)} GiB RAM; node ${process.version}`,
)
console.log(`${rounds} round(s), interleaved; wall time is the median (min in brackets)\n`)
const rows = [
  ['I/O floor (cat base + LoRA, dd output, fsync)', summary(runs.floor)],
  [`sd-mecha for Node (CLI, ${ourReport.threads ?? '?'} threads, fsync)`, summary(runs.ours)],
  ...(withReference ? [['sd-mecha 1.1.8 (torch CPU, no fsync)', summary(runs.ref)]] : []),
]
console.log('| run | wall s | vs I/O floor | peak RSS MiB |')
console.log('|---|---|---|---|')
for (const [name, s] of rows)
  console.log(
    `| ${name} | ${s.seconds.toFixed(2)} (${s.min.toFixed(2)}) | ${(s.seconds / rows[0][1].seconds).toFixed(2)}× | ${mib(s.peakRss)} |`,
  )
const [floor, o, r] = rows.map(([, s]) => s)
console.log(
  `\nI/O floor parts (median): read ${median(runs.floor.map((x) => x.read)).toFixed(2)} s, write + fsync ${median(runs.floor.map((x) => x.write)).toFixed(2)} s`,
)
console.log(`ours / floor: ${(o.seconds / floor.seconds).toFixed(2)}×`)
if (r) {
  const inner = runs.ref.map((x) => x.inner)
  console.log(
    `sd-mecha / ours: ${(r.seconds / o.seconds).toFixed(2)}× wall time, ${(r.peakRss / o.peakRss).toFixed(1)}× peak RSS` +
      ` (sd-mecha's own timer, median: ${median(inner.map((x) => x.seconds)).toFixed(2)} s, with fsync ${median(inner.map((x) => x.seconds_with_fsync)).toFixed(2)} s)`,
  )
}
console.log(
  `our report: ${(ourReport.keysSkipped ?? []).length} key(s) skipped${(ourReport.keysSkipped ?? []).length ? `: ${JSON.stringify(ourReport.keysSkipped).slice(0, 400)}` : ''}`,
)

const describe = (c, what) =>
  `${what}: ${c.differing.length} keys changed, ${c.identical.length} byte-identical, ${c.layout.length} differ in dtype/shape` +
  `${c.layout.length ? ` (${c.layout.join(', ')})` : ''}; keys only in the output: ${c.onlyInA.length}, only in the base: ${c.onlyInB.length}`
console.log(
  `\nexpected changed keys: ${expectedChanged} (${modules.length} LoRA modules: ${count(/^unet\./)} UNet, ${count(/^te1\./)} CLIP-L, ${count(/^te2\./)} CLIP-G;` +
    ` CLIP-G's ${te2Qkv} q/k/v modules change ${te2Qkv / 3} in_proj_weight keys; ${teKeysMissing.length} text-encoder keys the LoRA targets are not in the (pruned) base: ${teKeysMissing.join(', ')})`,
)
console.log(describe(checks.oursVsBase, 'ours vs base'))
const groups = {}
for (const k of checks.oursVsBase.differing) {
  const g = k.startsWith('model.diffusion_model.')
    ? 'unet'
    : k.startsWith('conditioner.embedders.0.')
      ? 'clip_l'
      : k.startsWith('conditioner.embedders.1.')
        ? 'clip_g'
        : 'other'
  groups[g] = (groups[g] ?? 0) + 1
}
console.log(
  `  changed by component: ${JSON.stringify(groups)}; changed keys not ending in weight: ${checks.oursVsBase.differing.filter((k) => !/weight$/.test(k)).join(', ') || 'none'}`,
)
console.log(
  `  ${checks.oursVsBase.differing.length === expectedChanged ? 'matches' : 'DOES NOT match'} the expected count`,
)
if (checks.oursVsBase.onlyInA.length) console.log(`  keys ours has and the base lacks: ${checks.extraInfo.join(', ')}`)
if (withReference) {
  console.log(describe(checks.refVsBase, "sd-mecha's vs base"))
  if (checks.oursVsBase.onlyInA.length)
    console.log(`  of the keys ours adds, sd-mecha's output has ${checks.refExtra.length}`)
  const a = new Set(checks.oursVsBase.differing)
  const b = new Set(checks.refVsBase.differing)
  const onlyOurs = [...a].filter((k) => !b.has(k))
  const onlyRef = [...b].filter((k) => !a.has(k))
  console.log(
    `  same changed set as ours: ${onlyOurs.length === 0 && onlyRef.length === 0} (only ours ${onlyOurs.length}, only sd-mecha's ${onlyRef.length})`,
  )
  if (onlyOurs.length + onlyRef.length) console.log(`  ${[...onlyOurs, ...onlyRef].slice(0, 10).join(', ')}`)
  const c = checks.oursVsRef
  const d = c.diff
  console.log(
    `ours vs sd-mecha's: ${c.identical.length} tensors byte-identical, ${c.differing.length} differ, ${c.layout.length} differ in dtype/shape` +
      `${c.layout.length ? ` (${c.layout.join(', ')})` : ''}; in the differing tensors (every element compared): ${d.differing}/${d.elements} elements differ,` +
      ` max |difference| ${d.maxAbs.toExponential(3)}, max relative (to max(|y|, 1e-3)) ${d.maxRel.toExponential(3)}, max ${d.maxUlp} fp16 step(s)`,
  )
}
console.log(
  `\ncommand: node bench/lora-bench.mjs${process.argv.length > 2 ? ` ${process.argv.slice(2).join(' ')}` : ''}`,
)
