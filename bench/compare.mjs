// Compares two merge outputs tensor by tensor, for the benchmarks' "outputs agree" line.
import { closeSync, openSync, readSync } from 'node:fs'

import { inspect, toFloat32, typedArray } from '../dist/index.js'

/** Compares the two outputs tensor by tensor (bytes, and values where bytes differ). */
export function compareOutputs(a, b) {
  const ia = inspect(a)
  const ib = new Map(inspect(b).tensors.map((t) => [t.name, t]))
  const fa = openSync(a, 'r')
  const fb = openSync(b, 'r')
  let identical = 0
  let differentDtype = []
  let maxDiff = 0
  let maxRel = 0
  let sampled = false
  const read = (fd, t) => {
    const buf = Buffer.alloc(t.bytes)
    readSync(fd, buf, 0, t.bytes, t.start)
    return buf
  }
  for (const t of ia.tensors) {
    const u = ib.get(t.name)
    if (!u) continue
    if (u.dtype !== t.dtype) {
      differentDtype.push(`${t.name} (${t.dtype} here, ${u.dtype} in sd-mecha)`)
      continue
    }
    const x = read(fa, t)
    const y = read(fb, u)
    if (x.equals(y)) {
      identical++
      continue
    }
    // Differing tensors are compared on their first 2^20 elements (decoding SDXL's 3.4 G
    // elements in JavaScript would take longer than the merges).
    const sample = (b) => b.subarray(0, Math.min(b.length, (1 << 20) * 2))
    const [vx, vy] = [x, y].map((b) =>
      toFloat32({ dtype: t.dtype, shape: [Math.min(b.length, 1 << 21) / 2], data: typedArray(t.dtype, sample(b)) }),
    )
    sampled = true
    for (let i = 0; i < vx.length; i++) {
      const scale = Math.max(Math.abs(vy[i]), 1e-3)
      maxDiff = Math.max(maxDiff, Math.abs(vx[i] - vy[i]))
      maxRel = Math.max(maxRel, Math.abs(vx[i] - vy[i]) / scale)
    }
  }
  closeSync(fa)
  closeSync(fb)
  console.log(
    `outputs: ${identical}/${ia.tensors.length} tensors bit-identical; elsewhere max |difference| ${maxDiff}, ` +
      `relative (to max(|x|, 1e-3)) ${maxRel.toExponential(2)}${sampled ? ' (first 2^20 elements of each)' : ''}`,
  )
  if (differentDtype.length)
    console.log(`different dtypes (deliberate, see docs/differences.md): ${differentDtype.join(', ')}`)
}
