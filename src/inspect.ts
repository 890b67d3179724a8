/** Reading safetensors headers without loading tensors. */
import native = require('./native')
import { native as callNative } from './errors'
import { configs } from './configs'
import type { SafetensorsDtype } from './dtypes'

/** One tensor of a safetensors header, as `inspect()` lists it. */
export interface TensorInfo {
  /** The tensor's key. */
  name: string
  /** Its dtype, as the header names it. */
  dtype: SafetensorsDtype
  /** Its dimensions (`[]` for a scalar). */
  shape: number[]
  /** Byte offset of the data from the start of the file. */
  start: number
  /** Size of its data, in bytes. */
  bytes: number
  /** Which of `FileInfo.files` holds it (0 unless the model is sharded). */
  shard: number
}

/**
 * What `inspect()` reads from a safetensors file's header (or every shard's, for a sharded
 * checkpoint): tensors, metadata and the model config they fit.
 */
export interface FileInfo {
  /** The path as given. */
  path: string
  /** The files holding the data: the file itself, or a sharded checkpoint's shards in order. */
  files: string[]
  /** Size of the file (of all shards together), in bytes. */
  fileBytes: number
  /** Size of the JSON header (all shards' together), in bytes, not counting the 8-byte lengths. */
  headerBytes: number
  /** Bytes of tensor data (the sum of `tensors[].bytes`). */
  dataBytes: number
  /**
   * Numbered blocks of a transformer stack (`model.layers.N.…`, `h.N.…`, `blocks.N.…`): how many,
   * or `null` when the keys have none (image models number their blocks differently).
   */
  layers: number | null
  /** Tensors in file order. */
  tensors: TensorInfo[]
  /** The header's `__metadata__` entries (e.g. `mecha_recipe`); empty when there are none. */
  metadata: Record<string, string>
  /** Count of tensors per dtype. */
  dtypes: Partial<Record<SafetensorsDtype, number>>
  /** The `.mecha` recipe that produced the file, when it was made by sd-mecha or this library (or a shard's metadata has it). */
  recipe?: string
  /** The model config sd-mecha's rules infer from the keys; `null` for an unknown architecture. */
  config: string | null
  /** Every config the keys could be, best first (sd-mecha's ranking). */
  configCandidates: string[]
  /**
   * The inferred config's components (clip_l, vae, diffuser, …) in config order, each with how
   * many of its keys the file holds (a key found under one of its aliases counts) and how many it
   * has; empty when no config was inferred.
   */
  components: ComponentCoverage[]
  /** Tensors in the file that the inferred config does not list (all of them when there is none). */
  keysOutsideConfig: number
}

/** How much of one component of the inferred config a file holds (see `FileInfo.components`). */
export interface ComponentCoverage {
  /** The component's name, e.g. `'diffuser'`. */
  name: string
  /** Keys of the component present in the file. */
  present: number
  /** Keys the component has in the config. */
  total: number
  /** Of the keys missing from the file, how many the config marks optional. */
  optionalMissing: number
}

/**
 * Reads and validates a safetensors header: a `.safetensors` file, or a sharded checkpoint (its
 * `*.safetensors.index.json` or its folder), whose shards' headers are all read and checked
 * against the index. Throws `SafetensorsError` for invalid files.
 */
export function inspect(path: string): FileInfo {
  const info = callNative(() => native.inspect(path))
  const tensors = info.tensors as TensorInfo[]
  const dtypes: Partial<Record<SafetensorsDtype, number>> = {}
  for (const t of tensors) dtypes[t.dtype] = (dtypes[t.dtype] ?? 0) + 1
  const config = callNative(() => native.inferConfig(path)) ?? null
  const configCandidates = callNative(() => native.configCandidates(path))
  const { components, keysOutsideConfig } = coverage(config, tensors)
  return {
    ...info,
    tensors,
    dataBytes: tensors.reduce((sum, t) => sum + t.bytes, 0),
    layers: countLayers(tensors),
    dtypes,
    recipe: info.metadata['mecha_recipe'],
    config,
    configCandidates,
    components,
    keysOutsideConfig,
  }
}

/** How many numbered transformer blocks the keys hold (`…layers.N.…`, `…h.N.…`, `…blocks.N.…`). */
function countLayers(tensors: readonly TensorInfo[]): number | null {
  const found = new Set<string>()
  for (const t of tensors) {
    const m = /(?:^|\.)(?:layers|h|blocks)\.(\d+)\./.exec(t.name)
    if (m) found.add(m[1])
  }
  return found.size === 0 ? null : found.size
}

/** How much of each component of `config` the tensors cover. */
function coverage(
  config: string | null,
  tensors: readonly TensorInfo[],
): { components: ComponentCoverage[]; keysOutsideConfig: number } {
  if (config === null) return { components: [], keysOutsideConfig: tensors.length }
  const names = new Set(tensors.map((t) => t.name))
  const counted = new Set<string>()
  const components = new Map<string, ComponentCoverage>()
  for (const key of configs.keys(config)) {
    const c = components.get(key.component) ?? { name: key.component, present: 0, total: 0, optionalMissing: 0 }
    components.set(key.component, c)
    c.total++
    const found = [key.key, ...key.aliases].find((name) => names.has(name))
    if (found !== undefined) {
      c.present++
      counted.add(found)
    } else if (key.optional) {
      c.optionalMissing++
    }
  }
  return { components: [...components.values()], keysOutsideConfig: names.size - counted.size }
}
