// Shared pieces of the side-by-side benchmarks (convert-bench.mjs, lora-bench.mjs): timing under
// /usr/bin/time, the page-cache preparation of sdxl-weighted-sum.mjs, the I/O floor, and
// tensor-by-tensor comparisons of safetensors files (bytes, and fp16 values where bytes differ).
import { execFileSync, spawnSync } from 'node:child_process'
import { closeSync, existsSync, mkdirSync, openSync, readSync, rmSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'

import { inspect, writeRandomModel } from '../dist/index.js'

/** The two benchmark models of `layout` in `dir` (`<layout>-a`, `<layout>-b`, seeds 1 and 2), generated when missing. */
export async function benchModels(dir, layout) {
  mkdirSync(dir, { recursive: true })
  const paths = [join(dir, `${layout}-a.safetensors`), join(dir, `${layout}-b.safetensors`)]
  for (const [i, path] of paths.entries()) {
    if (!existsSync(path)) {
      console.error(`generating ${path}`)
      await writeRandomModel(path, layout, i + 1)
    }
  }
  return paths
}

/** Removes `outputs`, flushes dirty pages, then warms the page cache with `inputs` (or drops it). */
export function prepare(inputs, outputs, cold = false) {
  for (const o of outputs) rmSync(o, { force: true })
  execFileSync('sync')
  if (cold) writeFileSync('/proc/sys/vm/drop_caches', '3')
  else execFileSync('cat', inputs, { stdio: ['ignore', 'ignore', 'inherit'] })
}

/** Runs a command under /usr/bin/time; returns wall seconds, peak RSS bytes and stdout. */
export function timed(cmd, args) {
  const r = spawnSync('/usr/bin/time', ['-f', '%e %M', cmd, ...args], { encoding: 'utf8', maxBuffer: 1 << 26 })
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed:\n${r.stdout}\n${r.stderr}`)
  const [wall, kb] = r.stderr.trim().split('\n').at(-1).split(' ').map(Number)
  return { seconds: wall, peakRss: kb * 1024, stdout: r.stdout, stderr: r.stderr }
}

/** The I/O floor: read `inputs` once (cat), then write an `outputBytes` file with dd and fsync. */
export function ioFloor(inputs, outputBytes, scratch) {
  const read = timed('sh', ['-c', `cat ${inputs.map((p) => `"${p}"`).join(' ')} > /dev/null`])
  const write = timed('dd', [
    'if=/dev/zero',
    `of=${scratch}`,
    'bs=16M',
    `count=${Math.ceil(outputBytes / 2 ** 24)}`,
    'conv=fsync',
    'status=none',
  ])
  rmSync(scratch, { force: true })
  return {
    seconds: read.seconds + write.seconds,
    peakRss: Math.max(read.peakRss, write.peakRss),
    read: read.seconds,
    write: write.seconds,
  }
}

export const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]

/** The tensors of a safetensors file by name (header only). */
export function tensorsOf(path) {
  return new Map(inspect(path).tensors.map((t) => [t.name, t]))
}

/** Reads one tensor's bytes. */
export function readTensor(fd, t) {
  const buf = Buffer.alloc(t.bytes)
  if (t.bytes) readSync(fd, buf, 0, t.bytes, t.start)
  return buf
}

/** fp16 bits → float, through a 65,536-entry table. */
const F16 = (() => {
  const table = new Float32Array(65536)
  for (let h = 0; h < 65536; h++) {
    const s = h & 0x8000 ? -1 : 1
    const e = (h >> 10) & 0x1f
    const m = h & 0x3ff
    table[h] = e === 0 ? s * m * 2 ** -24 : e === 31 ? (m ? NaN : s * Infinity) : s * (1 + m / 1024) * 2 ** (e - 15)
  }
  return table
})()

/** fp16 bits → an integer that orders like the value (so |a − b| counts fp16 steps). */
const ordered = (h) => (h & 0x8000 ? -(h & 0x7fff) : h)

/**
 * Compares two F16 tensors' bytes element by element: differing elements, max |difference|,
 * max relative difference (to max(|y|, 1e-3)) and max distance in fp16 steps.
 */
export function diffF16(x, y) {
  const a = new Uint16Array(x.buffer, x.byteOffset, x.length / 2)
  const b = new Uint16Array(y.buffer, y.byteOffset, y.length / 2)
  let differing = 0
  let maxAbs = 0
  let maxRel = 0
  let maxUlp = 0
  for (let i = 0; i < a.length; i++) {
    if (a[i] === b[i]) continue
    differing++
    const u = F16[a[i]]
    const v = F16[b[i]]
    const d = Math.abs(u - v)
    if (d > maxAbs) maxAbs = d
    const r = d / Math.max(Math.abs(v), 1e-3)
    if (r > maxRel) maxRel = r
    const steps = Math.abs(ordered(a[i]) - ordered(b[i]))
    if (steps > maxUlp) maxUlp = steps
  }
  return { elements: a.length, differing, maxAbs, maxRel, maxUlp }
}

/**
 * Compares file `a` with file `b` tensor by tensor. `skip(name)` leaves keys out of the byte
 * comparison (they are counted apart). Returns the key-set differences, the identical keys, the
 * keys whose dtype or shape differ, and, for F16 keys whose bytes differ, the value differences
 * (every element, when `values` is set).
 */
export function compareFiles(a, b, { skip = () => false, values = false } = {}) {
  const ta = tensorsOf(a)
  const tb = tensorsOf(b)
  const fa = openSync(a, 'r')
  const fb = openSync(b, 'r')
  const result = {
    onlyInA: [...ta.keys()].filter((k) => !tb.has(k)),
    onlyInB: [...tb.keys()].filter((k) => !ta.has(k)),
    skipped: [],
    identical: [],
    layout: [],
    differing: [],
    diff: { elements: 0, differing: 0, maxAbs: 0, maxRel: 0, maxUlp: 0 },
  }
  try {
    for (const [name, t] of ta) {
      const u = tb.get(name)
      if (!u) continue
      if (skip(name)) {
        result.skipped.push(name)
        continue
      }
      if (t.dtype !== u.dtype || t.shape.join() !== u.shape.join()) {
        result.layout.push(`${name} (${t.dtype} [${t.shape}] vs ${u.dtype} [${u.shape}])`)
        continue
      }
      const x = readTensor(fa, t)
      const y = readTensor(fb, u)
      if (x.equals(y)) {
        result.identical.push(name)
        continue
      }
      result.differing.push(name)
      if (values && t.dtype === 'F16') {
        const d = diffF16(x, y)
        const s = result.diff
        s.elements += d.elements
        s.differing += d.differing
        s.maxAbs = Math.max(s.maxAbs, d.maxAbs)
        s.maxRel = Math.max(s.maxRel, d.maxRel)
        s.maxUlp = Math.max(s.maxUlp, d.maxUlp)
      }
    }
  } finally {
    closeSync(fa)
    closeSync(fb)
  }
  return result
}

export const gb = (b) => (b / 1e9).toFixed(2)
export const mib = (b) => (b / 2 ** 20).toFixed(0)
