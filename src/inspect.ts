/** Reading safetensors headers without loading tensors. */
import native = require('./native')
import { native as callNative } from './errors'
import type { SafetensorsDtype } from './dtypes'

export interface TensorInfo {
  name: string
  dtype: SafetensorsDtype
  shape: number[]
  /** Byte offset of the data from the start of the file. */
  start: number
  bytes: number
}

export interface FileInfo {
  path: string
  fileBytes: number
  headerBytes: number
  /** Tensors in file order. */
  tensors: TensorInfo[]
  metadata: Record<string, string>
  /** Count of tensors per dtype. */
  dtypes: Partial<Record<SafetensorsDtype, number>>
  /** The `.mecha` recipe that produced the file, when it was made by sd-mecha or this library. */
  recipe?: string
  /** The model config sd-mecha's rules infer from the keys; `null` for an unknown architecture. */
  config: string | null
  /** Every config the keys could be, best first (sd-mecha's ranking). */
  configCandidates: string[]
}

/** Reads and validates a safetensors header. Throws `SafetensorsError` for invalid files. */
export function inspect(path: string): FileInfo {
  const info = callNative(() => native.inspect(path))
  const tensors = info.tensors as TensorInfo[]
  const dtypes: Partial<Record<SafetensorsDtype, number>> = {}
  for (const t of tensors) dtypes[t.dtype] = (dtypes[t.dtype] ?? 0) + 1
  const config = callNative(() => native.inferConfig(path)) ?? null
  const configCandidates = callNative(() => native.configCandidates(path))
  return { ...info, tensors, dtypes, recipe: info.metadata['mecha_recipe'], config, configCandidates }
}
