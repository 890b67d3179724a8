// Test helpers written independently of the library: a safetensors writer and f16/bf16
// encoders in plain JavaScript, so outputs are checked against a separate implementation.
import { mkdirSync, mkdtempSync, readdirSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

export type Dtype = 'F16' | 'BF16' | 'F32' | 'F64' | 'I64'

/** f32 → f16 bits, round to nearest even (IEEE 754). */
export function f16Bits(value: number): number {
  const f = new Float32Array([value])
  const x = new Uint32Array(f.buffer)[0]
  const sign = (x >>> 16) & 0x8000
  const exp = (x >>> 23) & 0xff
  let mant = x & 0x7fffff
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0)
  const e = exp - 127 + 15
  if (e >= 0x1f) return sign | 0x7c00
  if (e <= 0) {
    if (e < -10) return sign
    mant |= 0x800000
    const shift = 14 - e
    let half = mant >>> shift
    const rem = mant & ((1 << shift) - 1)
    const mid = 1 << (shift - 1)
    if (rem > mid || (rem === mid && half & 1)) half++
    return sign | half
  }
  let h = (e << 10) | (mant >>> 13)
  const rem = mant & 0x1fff
  if (rem > 0x1000 || (rem === 0x1000 && h & 1)) h++
  return sign | h
}

export function f16Value(bits: number): number {
  const sign = bits & 0x8000 ? -1 : 1
  const e = (bits >> 10) & 0x1f
  const m = bits & 0x3ff
  if (e === 0) return sign * m * 2 ** -24
  if (e === 31) return m ? NaN : sign * Infinity
  return sign * (1 + m / 1024) * 2 ** (e - 15)
}

export function bf16Bits(value: number): number {
  const x = new Uint32Array(new Float32Array([value]).buffer)[0]
  if (Number.isNaN(value)) return 0x7fc0
  return ((x + 0x7fff + ((x >>> 16) & 1)) >>> 16) & 0xffff
}

export function bf16Value(bits: number): number {
  return new Float32Array(new Uint32Array([bits << 16]).buffer)[0]
}

/** What a value becomes when stored in `dtype` (float64 in, float64 out). */
export function stored(dtype: Dtype, v: number): number {
  if (dtype === 'F16') return f16Value(f16Bits(v))
  if (dtype === 'BF16') return bf16Value(bf16Bits(v))
  if (dtype === 'F32') return Math.fround(v)
  return v
}

export interface TestTensor {
  dtype: Dtype
  shape: number[]
  values: number[]
}

function encode(t: TestTensor): Buffer {
  const n = t.values.length
  if (t.dtype === 'F16' || t.dtype === 'BF16') {
    const out = Buffer.alloc(2 * n)
    t.values.forEach((v, i) => out.writeUInt16LE(t.dtype === 'F16' ? f16Bits(v) : bf16Bits(v), 2 * i))
    return out
  }
  if (t.dtype === 'F32') return Buffer.from(new Float32Array(t.values).buffer)
  if (t.dtype === 'F64') return Buffer.from(new Float64Array(t.values).buffer)
  return Buffer.from(new BigInt64Array(t.values.map((v) => BigInt(v))).buffer)
}

export function writeSafetensors(path: string, tensors: Record<string, TestTensor>, metadata?: Record<string, string>) {
  const header: Record<string, unknown> = metadata ? { __metadata__: metadata } : {}
  const chunks: Buffer[] = []
  let offset = 0
  for (const [name, t] of Object.entries(tensors)) {
    const data = encode(t)
    header[name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + data.length] }
    chunks.push(data)
    offset += data.length
  }
  const json = Buffer.from(JSON.stringify(header))
  const len = Buffer.alloc(8)
  len.writeBigUInt64LE(BigInt(json.length))
  writeFileSync(path, Buffer.concat([len, json, ...chunks]))
}

/** Deterministic values in [-1, 1). */
export function randomValues(seed: number, n: number): number[] {
  let s = seed >>> 0 || 1
  return Array.from({ length: n }, () => {
    s ^= s << 13
    s >>>= 0
    s ^= s >>> 17
    s ^= s << 5
    s >>>= 0
    return (s / 2 ** 32) * 2 - 1
  })
}

export function tempDir(): string {
  return mkdtempSync(join(tmpdir(), 'mecha-test-'))
}

export const files = (dir: string) => readdirSync(dir).sort()

/** Two one-tensor models (`w`: [1, 2] and [3, 4], f32) in a fresh folder. */
export function twoSmallModels() {
  const dir = tempDir()
  const a = join(dir, 'a.safetensors')
  const b = join(dir, 'b.safetensors')
  writeSafetensors(a, { w: { dtype: 'F32', shape: [2], values: [1, 2] } })
  writeSafetensors(b, { w: { dtype: 'F32', shape: [2], values: [3, 4] } })
  return { dir, a, b }
}

/** Qwen2's keys and shapes for two decoder layers of a tiny model (hidden 8, MLP 16, vocabulary 20). */
export function qwenLayout(): [string, number[]][] {
  const shapes: [string, number[]][] = [['model.embed_tokens.weight', [20, 8]]]
  for (const i of [0, 1]) {
    for (const [name, shape] of [
      ['input_layernorm.weight', [8]],
      ['self_attn.q_proj.weight', [8, 8]],
      ['self_attn.q_proj.bias', [8]],
      ['self_attn.k_proj.weight', [4, 8]],
      ['self_attn.v_proj.weight', [4, 8]],
      ['self_attn.o_proj.weight', [8, 8]],
      ['post_attention_layernorm.weight', [8]],
      ['mlp.gate_proj.weight', [16, 8]],
      ['mlp.up_proj.weight', [16, 8]],
      ['mlp.down_proj.weight', [8, 16]],
    ] as [string, number[]][])
      shapes.push([`model.layers.${i}.${name}`, shape])
  }
  shapes.push(['model.norm.weight', [8]], ['lm_head.weight', [20, 8]])
  return shapes
}

/** `qwenLayout()` with random BF16 values (as stored, so they read back exactly). */
export function qwenTensors(seed: number): Record<string, TestTensor> {
  return Object.fromEntries(
    qwenLayout().map(([k, shape], i) => {
      const values = randomValues(
        seed * 100 + i,
        shape.reduce((a, b) => a * b, 1),
      ).map((v) => stored('BF16', v))
      return [k, { dtype: 'BF16', shape, values }]
    }),
  )
}

/**
 * Writes tensors as a Hugging Face sharded checkpoint in `folder`: `shards` files named as
 * `save_pretrained` names them, and `model.safetensors.index.json`.
 */
export function writeCheckpoint(folder: string, tensors: Record<string, TestTensor>, shards: number): void {
  mkdirSync(folder, { recursive: true })
  const names = Object.keys(tensors)
  const per = Math.ceil(names.length / shards)
  const weightMap: Record<string, string> = {}
  for (let s = 0; s < shards; s++) {
    const file = `model-${String(s + 1).padStart(5, '0')}-of-${String(shards).padStart(5, '0')}.safetensors`
    const part = names.slice(s * per, (s + 1) * per)
    writeSafetensors(join(folder, file), Object.fromEntries(part.map((n) => [n, tensors[n]])))
    for (const n of part) weightMap[n] = file
  }
  writeFileSync(join(folder, 'model.safetensors.index.json'), JSON.stringify({ metadata: {}, weight_map: weightMap }))
}
