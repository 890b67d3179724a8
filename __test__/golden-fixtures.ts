// Reading the golden fixtures that sd-mecha 1.1.8 wrote (scripts/golden/*.py): a minimal
// safetensors reader and the tolerance check the golden specs share.
import { readFileSync } from 'node:fs'

export interface ExpectedTensor {
  shape: number[]
  values: Float32Array
}

/** A minimal safetensors reader: 8-byte little-endian header length, JSON header, data (F32 only). */
export function readSafetensors(path: string): Map<string, ExpectedTensor> {
  const bytes = readFileSync(path)
  const headerLength = Number(bytes.readBigUInt64LE(0))
  const header = JSON.parse(bytes.subarray(8, 8 + headerLength).toString('utf8')) as Record<
    string,
    { dtype: string; shape: number[]; data_offsets: [number, number] }
  >
  const data = bytes.subarray(8 + headerLength)
  const out = new Map<string, ExpectedTensor>()
  for (const [name, info] of Object.entries(header)) {
    if (name === '__metadata__') continue
    if (info.dtype !== 'F32') throw new Error(`${path}: ${name} is ${info.dtype}, expected F32`)
    const [start, end] = info.data_offsets
    const values = new Float32Array((end - start) / 4)
    for (let i = 0; i < values.length; i++) values[i] = data.readFloatLE(start + 4 * i)
    out.set(name, { shape: info.shape, values })
  }
  return out
}

/** Elements outside |x − y| ≤ max(tol·|y|, atol) (NaN must meet NaN, infinities must be equal), at most `limit`. */
export function mismatches(got: Float32Array, want: Float32Array, tol: number, atol: number, limit = 5): string[] {
  const out: string[] = []
  let count = 0
  for (let i = 0; i < want.length; i++) {
    const x = got[i]
    const y = want[i]
    let ok: boolean
    if (Number.isNaN(y) || Number.isNaN(x)) ok = Number.isNaN(x) && Number.isNaN(y)
    else if (!Number.isFinite(y) || !Number.isFinite(x)) ok = x === y
    else ok = Math.abs(x - y) <= Math.max(tol * Math.abs(y), atol)
    if (!ok) {
      count++
      if (out.length < limit) out.push(`[${i}] got ${x}, want ${y}`)
    }
  }
  if (count > out.length) out.push(`… ${count - out.length} more`)
  return out
}
