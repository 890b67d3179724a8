/**
 * In-memory state dicts (sd-mecha's `model(state_dict)` and tensor literals): the tensors are
 * written once into one safetensors buffer that the native core keeps and reads like a file,
 * until the recipe node holding it is garbage collected.
 */
import native = require('./native')
import { native as callNative } from './errors'
import type { SafetensorsDtype, Tensor } from './dtypes'

/** Tensors by key: a plain object or a `Map`, as a merged model (`MergedModel`) is. */
export type StateDict = Readonly<Record<string, Tensor>> | ReadonlyMap<string, Tensor>

const bytesPer: Partial<Record<SafetensorsDtype, number>> = {
  BOOL: 1,
  U8: 1,
  I8: 1,
  F8_E4M3: 1,
  F8_E5M2: 1,
  F8_E8M0: 1,
  F8_E4M3FNUZ: 1,
  F8_E5M2FNUZ: 1,
  I16: 2,
  U16: 2,
  F16: 2,
  BF16: 2,
  I32: 4,
  U32: 4,
  F32: 4,
  C64: 8,
  F64: 8,
  I64: 8,
  U64: 8,
}

/** Whether `value` looks like a tensor (`{ dtype, shape, data }`), not a recipe value. */
export function isTensor(value: unknown): value is Tensor {
  if (typeof value !== 'object' || value === null) return false
  const t = value as Record<string, unknown>
  return typeof t.dtype === 'string' && Array.isArray(t.shape) && ArrayBuffer.isView(t.data)
}

export function isStateDict(value: unknown): value is StateDict {
  if (value instanceof Map) return true
  if (typeof value !== 'object' || value === null || Array.isArray(value)) return false
  const values = Object.values(value)
  return values.length > 0 && values.every(isTensor)
}

function entries(dict: StateDict): [string, Tensor][] {
  return dict instanceof Map ? [...dict.entries()] : Object.entries(dict)
}

/** The safetensors bytes of `tensors`, checking each tensor's dtype, shape and data size. */
function safetensorsBytes(what: string, tensors: [string, Tensor][]): Buffer {
  if (tensors.length === 0) throw new TypeError(`${what}: the state dict has no tensors`)
  const header: Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] }> = {}
  let offset = 0
  for (const [key, t] of tensors) {
    if (!isTensor(t)) throw new TypeError(`${what}: "${key}" is not a tensor ({ dtype, shape, data })`)
    const size = bytesPer[t.dtype]
    if (size === undefined)
      throw new TypeError(`${what}: "${key}" has dtype ${t.dtype}, which in-memory models do not take`)
    if (!t.shape.every((d) => Number.isSafeInteger(d) && d >= 0))
      throw new TypeError(`${what}: "${key}" has shape [${t.shape.join(', ')}]; dimensions are non-negative integers`)
    const bytes = t.shape.reduce((a, b) => a * b, 1) * size
    if (t.data.byteLength !== bytes)
      throw new TypeError(
        `${what}: "${key}" holds ${t.data.byteLength} bytes, but ${t.dtype} [${t.shape.join(', ')}] needs ${bytes}`,
      )
    header[key] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + bytes] }
    offset += bytes
  }
  // The header is padded with spaces to 8 bytes, as safetensors writers do.
  let json = Buffer.from(JSON.stringify(header))
  json = Buffer.concat([json, Buffer.alloc((8 - (json.length % 8)) % 8, 0x20)])
  const out = Buffer.alloc(8 + json.length + offset)
  out.writeBigUInt64LE(BigInt(json.length), 0)
  json.copy(out, 8)
  let at = 8 + json.length
  for (const [, t] of tensors) {
    out.set(new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength), at)
    at += t.data.byteLength
  }
  return out
}

/** Frees the native copy of an in-memory model once its node is unreachable. */
const release = new FinalizationRegistry<number>((id) => native.releaseMemoryModel(id))

/** Registers the tensors with the native core; returns the id the recipe's JSON form refers to. */
export function registerStateDict(what: string, dict: StateDict): number {
  return callNative(() => native.registerMemoryModel(safetensorsBytes(what, entries(dict))))
}

/** Frees the in-memory model `id` once `owner` (the node that refers to it) is unreachable. */
export function releaseWhenCollected(owner: object, id: number): void {
  release.register(owner, id)
}

/** How many in-memory models the native core holds (for tests of their release). */
export function memoryModelCount(): number {
  return native.memoryModelCount()
}
