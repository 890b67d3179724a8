/** Running recipes: `merge()` streams a recipe to a safetensors file or into memory. */
import { rmSync } from 'node:fs'
import native = require('./native')
import { AbortError, OptionError, errorFromNative, native as callNative } from './errors'
import {
  checkNames,
  checkValue,
  isBool,
  isCount,
  isDtypeName,
  isMillis,
  isSpace,
  isThreads,
  maxThreads,
} from './options'
import { tensorFromBytes, type DtypeName, type SafetensorsDtype, type Tensor } from './dtypes'
import { fallback } from './methods.generated'
import { model, RecipeNode, toWireWithNodes, type MergeSpace, type RecipeInput } from './recipe'

/** How the output records its recipe: model paths as given, absolute, or no recipe. */
export type EmbedRecipe = 'relative' | 'absolute' | 'none'

/** What `onProgress` receives while a merge runs (where sd-mecha updates its `tqdm` bar). */
export interface Progress {
  /** Output keys finished so far. */
  keysDone: number
  /** Output keys the merge writes. */
  keysTotal: number
  /** Bytes of output tensor data produced so far. */
  bytesDone: number
  /** Bytes of tensor data the output will hold. */
  bytesTotal: number
  /** Seconds since the merge started. */
  elapsedSeconds: number
  /** The key that just finished. */
  key: string
}

/** Options of `merge()`, sd-mecha's `merge()` keywords in camelCase plus engine settings; every one is optional. */
export interface MergeOptions {
  /**
   * Output safetensors path (with `maxShardSize`, a folder). Omit to get the tensors back in
   * memory.
   */
  output?: string
  /**
   * Write `output` as a Hugging Face sharded checkpoint: a folder of shards of at most this size
   * (`model-00001-of-0000N.safetensors`, filled in key order as `transformers`' `save_pretrained`
   * does) and `model.safetensors.index.json`; a model that fits in one shard is written as
   * `model.safetensors` alone. A number of bytes, or a size as `transformers` writes it: `'5GB'`
   * (10⁹ bytes), `'500MB'`, `'2GiB'` (2³⁰ bytes). All shards and the index appear together when
   * the merge completes, or none do. The folder must be new, empty, or hold a checkpoint written
   * before (which is replaced whole).
   */
  maxShardSize?: number | string
  /** Worker threads; 0 (default) = one per CPU. Output is identical for any count. */
  threads?: number
  /** Precision arithmetic runs in: `'f32'` (default), `'f64'`, or `'f16'`/`'bf16'` (rounded after every step). */
  mergeDtype?: DtypeName
  /** Dtype floating-point outputs are stored in (default `'f16'`). Integer tensors keep their dtype. */
  outputDtype?: DtypeName
  /** The merge space the result must be in (default `'weight'`); `null` accepts any, preferring weight. */
  strictMergeSpace?: MergeSpace | null
  /** Called with progress, at most every `progressIntervalMs` (default 100), never blocking the merge. */
  onProgress?: (progress: Progress) => void
  /** Least milliseconds between two `onProgress` calls (default 100). */
  progressIntervalMs?: number
  /** Cancels the merge; no output file is left behind. Checked between keys and chunks. */
  signal?: AbortSignal
  /** Elements per work chunk (advanced tuning). */
  chunkElements?: number
  /**
   * Treat input tensors holding NaN or infinity as missing (default `true`, as sd-mecha): a
   * `fallback` takes its other input, other keys are skipped and reported.
   */
  omitNonFiniteInputs?: boolean
  /** List keys written with NaN or infinity in `report.nonFiniteOutputs` (default `true`). */
  checkFiniteOutput?: boolean
  /**
   * Bytes of working memory the keys computed at the same time may use together (default: a
   * quarter of physical memory, at most 4 GiB). Whole-tensor methods (slerp, crossover, …) wait
   * for room; a key needing more than the budget runs alone and is listed in `report.overBudget`.
   * A number of bytes, or a size such as `'2G'` or `'512M'`.
   */
  memoryBudget?: number | string
  /**
   * A model (a path or any recipe node) that provides every key the recipe cannot: the recipe
   * becomes `fallback(recipe, fallbackModel)`, as sd-mecha's `fallback_model` does. The stored
   * recipe includes the fallback, so merging it again gives the same file.
   */
  fallbackModel?: string | RecipeNode
  /**
   * List input keys the output's model config does not have in `report.keysSkipped` (default
   * `true`, as sd-mecha warns about them); `false` leaves them out of the report.
   */
  checkExtraKeys?: boolean
  /**
   * Refuse the merge (a `RecipeError` naming the keys and why) when a key of the output's config
   * that is not optional cannot be built, e.g. because an input lacks it (default `false`: such
   * keys are skipped and reported, as in sd-mecha).
   */
  strictMandatoryKeys?: boolean
  /**
   * What the output's `mecha_recipe` metadata records (default `'relative'`): the finalized recipe
   * with model paths as they were given, as sd-mecha's `merge` stores it, so a shared file does not
   * reveal the folders of whoever merged it; `'absolute'` resolves them; `'none'` stores no recipe
   * (nor chosen seeds). `report.recipe` is the stored text (the absolute one with `'none'`).
   */
  embedRecipe?: EmbedRecipe
  /**
   * Write a file with no tensors when no key can be produced (default `false`: the merge is
   * refused with a `RecipeError` saying why the keys were skipped, as sd-mecha refuses it).
   */
  allowEmpty?: boolean
  /**
   * Keeps what methods compute once per node and key (the SVD and eigen decompositions of
   * `rotate`, `truncateRank`, `truncate_kronecker`) for later merges given the same cache: merge
   * the same recipe again with another `alpha` or `alignment` and those steps are skipped.
   * Without one, nothing is kept.
   */
  cache?: MergeCache
}

/**
 * A cache of per-node, per-key results kept across merges (sd-mecha's `cache=` argument). Reuse
 * one for merges of the same recipe with different hyper-parameters (an ablation sweep); entries
 * are found by what the node computes from its inputs, so a different recipe never reads
 * another's entries. Holds at most `limit` bytes, dropping the oldest entries first.
 */
export class MergeCache {
  /** @internal */
  readonly handle: native.MergeCache

  /** `limit`: bytes or a size such as `'2G'` (default: a quarter of physical memory, at most 4 GiB). */
  constructor(options: { limit?: number | string } = {}) {
    const limit = options.limit === undefined ? undefined : parseBytes(options.limit, 'cache limit')
    this.handle = new native.MergeCache(limit)
  }

  /** Bytes held now. */
  get bytes(): number {
    return this.handle.bytes
  }

  /** Entries held now (one per node, key and decomposition). */
  get entries(): number {
    return this.handle.entries
  }

  /** The most bytes it holds (the `limit` it was made with). */
  get limitBytes(): number {
    return this.handle.limitBytes
  }

  /** Drops every entry, so the next merge computes everything again. */
  clear(): void {
    this.handle.clear()
  }
}

/**
 * Parses a shard size as `transformers` does: a number of bytes, or digits with KB/MB/GB/TB
 * (powers of 1000) or KiB/MiB/GiB/TiB (powers of 1024).
 */
export function parseShardSize(size: number | string): number {
  if (typeof size === 'number') return parseBytes(size, 'maxShardSize')
  const m = typeof size === 'string' ? /^\s*(\d+(?:\.\d+)?)\s*(?:([kmgt])(i?)b|b)?\s*$/i.exec(size) : null
  if (!m)
    throw new OptionError(
      `maxShardSize: ${JSON.stringify(size)} is not a size; use bytes (200 or '200B') or a number with KB, MB, GB, TB ` +
        `(powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024), e.g. '5GB'`,
    )
  const power = m[2] === undefined ? 0 : 'kmgt'.indexOf(m[2].toLowerCase()) + 1
  return parseBytes(Math.floor(Number(m[1]) * (m[3] ? 1024 : 1000) ** power), 'maxShardSize')
}

/** Parses a byte size: a number, or digits with an optional K/M/G/T suffix (binary units). */
export function parseBytes(size: number | string, what = 'size'): number {
  if (typeof size === 'number') {
    if (!(Number.isFinite(size) && size >= 1))
      throw new OptionError(`${what} must be a positive number of bytes, got ${size}`)
    return Math.floor(size)
  }
  const m = typeof size === 'string' ? /^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$/i.exec(size) : null
  if (typeof size !== 'string' || !m)
    throw new OptionError(
      `${what}: ${JSON.stringify(size)} is not a size; use bytes or a number with K, M, G or T (e.g. '2G')`,
    )
  const scale = { '': 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40 }[
    m[2].toLowerCase() as '' | 'k' | 'm' | 'g' | 't'
  ]
  return parseBytes(Math.floor(Number(m[1]) * scale), what)
}

/** A key the merge (or plan) does not produce, and why. */
export interface SkippedKey {
  /** The key's name (in the output's config). */
  key: string
  /** Why it cannot be built, e.g. which input lacks it. */
  reason: string
}

/** What a merge did: the keys written and skipped, bytes, time, memory, and the recipe it stored. */
export interface MergeReport {
  /** The output file, or `undefined` for an in-memory merge. */
  output?: string
  /** Keys in the output. */
  keysWritten: number
  /** Keys present in some input but not produced, and why (e.g. missing from one model). */
  keysSkipped: SkippedKey[]
  /** Keys written with NaN or infinity in them (sd-mecha warns about these). */
  nonFiniteOutputs: string[]
  /** Bytes of tensor data read from the inputs. */
  bytesRead: number
  /** Bytes of tensor data written (or returned, for an in-memory merge). */
  bytesWritten: number
  /** Wall-clock duration of the merge, in seconds. */
  seconds: number
  /**
   * Peak resident memory of the whole process while this merge ran (exact when it ran alone;
   * sampled every few milliseconds while other merges ran in the same process).
   */
  peakRssBytes: number
  /** Worker threads the merge used. */
  threads: number
  /** The memory budget the merge ran under, in bytes. */
  memoryBudget: number
  /** Keys whose computation needed more than the budget, so ran alone. */
  overBudget: string[]
  /**
   * The recipe as `.mecha` text, as stored in the output's `mecha_recipe` metadata (see
   * `embedRecipe`), with the chosen seeds in place of `seed: null`, so merging it again (from the
   * same folder, for relative paths) reproduces the output exactly.
   */
  recipe: string
  /** Seeds chosen for `seed: null` parameters (also stored in the `mecha_seeds` metadata). */
  seeds: ChosenSeed[]
  /**
   * The content hash of each input file, computed while reading it (no extra pass) and stored in
   * the output's `mecha_inputs` metadata for {@link verify}; empty when the output records no
   * recipe (in-memory merges, `embedRecipe: 'none'`).
   */
  inputHashes: InputHash[]
}

/**
 * The content hash of one input: xxh3-128 over its header and the tensor bytes the merge read,
 * block by block in file order (the same for any thread count or chunk size). It tells a changed
 * file apart; it is not a cryptographic signature.
 */
export interface InputHash {
  /** The model path as the recipe gives it. */
  model: string
  /** The file it was read from. */
  path: string
  /** 32 hex digits. */
  hash: string
}

/** A seed a merge chose because the recipe left a random method's `seed` null. */
export interface ChosenSeed {
  /** The node's index in the recipe as given (its line in `.mecha` text), if it has one. */
  node?: number
  /** The method's sd-mecha id, e.g. `dropout`. */
  method: string
  /** The parameter given the seed, e.g. `seed` or `approximate_basis_seed`. */
  param: string
  /** The seed chosen (below 2^53, so exact). */
  seed: number
}

/** The result of an in-memory merge: key → tensor, in output order, plus the report. */
export class MergedModel extends Map<string, Tensor> {
  constructor(readonly report: MergeReport) {
    super()
  }
}

/** The options `merge()` takes. */
export const mergeOptionNames = [
  'output',
  'threads',
  'mergeDtype',
  'outputDtype',
  'strictMergeSpace',
  'onProgress',
  'progressIntervalMs',
  'signal',
  'chunkElements',
  'omitNonFiniteInputs',
  'checkFiniteOutput',
  'memoryBudget',
  'allowEmpty',
  'cache',
  'fallbackModel',
  'checkExtraKeys',
  'strictMandatoryKeys',
  'embedRecipe',
  'maxShardSize',
] as const

/** The options `plan()` takes (a subset of `merge()`'s). */
export const planOptionNames = [
  'threads',
  'mergeDtype',
  'outputDtype',
  'strictMergeSpace',
  'chunkElements',
  'memoryBudget',
  'checkExtraKeys',
] as const

/** Refuses unknown option names and values outside what each option allows. */
export function checkMergeOptions(options: unknown, what: string, names: readonly string[] = mergeOptionNames): void {
  if (options === null || typeof options !== 'object') throw new OptionError(`${what}: options must be an object`)
  const o = options as Record<string, unknown>
  checkNames(o, names, what)
  checkValue(what, 'output', o.output, (v) => typeof v === 'string' && v !== '', 'a non-empty file path')
  checkValue(what, 'threads', o.threads, isThreads, `an integer from 0 (one per CPU) to ${maxThreads()}`)
  for (const name of ['mergeDtype', 'outputDtype'])
    checkValue(what, name, o[name], isDtypeName, "a dtype name such as 'f16', 'bf16' or 'f32'")
  checkValue(what, 'strictMergeSpace', o.strictMergeSpace, isSpace, "'weight', 'delta', 'param' or null")
  checkValue(what, 'onProgress', o.onProgress, (v) => typeof v === 'function', 'a function')
  checkValue(what, 'progressIntervalMs', o.progressIntervalMs, isMillis, 'a number of milliseconds ≥ 0')
  checkValue(what, 'signal', o.signal, (v) => v instanceof AbortSignal, 'an AbortSignal')
  checkValue(what, 'chunkElements', o.chunkElements, isCount, 'a positive integer')
  for (const name of [
    'omitNonFiniteInputs',
    'checkFiniteOutput',
    'allowEmpty',
    'checkExtraKeys',
    'strictMandatoryKeys',
  ])
    checkValue(what, name, o[name], isBool, 'true or false')
  checkValue(what, 'cache', o.cache, (v) => v instanceof MergeCache, 'a MergeCache')
  checkValue(
    what,
    'embedRecipe',
    o.embedRecipe,
    (v) => v === 'relative' || v === 'absolute' || v === 'none',
    "'relative' (model paths as given), 'absolute' or 'none'",
  )
  checkValue(
    what,
    'fallbackModel',
    o.fallbackModel,
    (v) => (typeof v === 'string' && v !== '') || v instanceof RecipeNode,
    'a model path or a recipe node',
  )
  if (o.memoryBudget !== undefined) parseBytes(o.memoryBudget as number | string, 'memoryBudget')
  if (o.maxShardSize !== undefined) {
    if (o.output === undefined)
      throw new OptionError(`${what}: maxShardSize needs output (the folder to write the shards to)`)
    parseShardSize(o.maxShardSize as number | string)
  }
}

function strictSpace(s: MergeSpace | null | undefined): string | undefined {
  return s === null ? 'any' : s
}

/**
 * Merges a recipe, streaming key by key. With `output`, writes a safetensors file (atomically:
 * nothing appears at the path unless the merge completes) and resolves with the report; without,
 * resolves with the tensors in memory.
 */
export function merge(recipe: RecipeInput, options: MergeOptions & { output: string }): Promise<MergeReport>
export function merge(recipe: RecipeInput, options?: MergeOptions & { output?: undefined }): Promise<MergedModel>
/** `output` not known statically: a report when it is a path, the merged tensors otherwise. */
export function merge(recipe: RecipeInput, options?: MergeOptions): Promise<MergeReport | MergedModel>
// async so that every mistake, an option or the recipe, arrives as a rejected promise
export async function merge(recipe: RecipeInput, options: MergeOptions = {}): Promise<MergeReport | MergedModel> {
  checkMergeOptions(options, 'merge')
  const { fallbackModel, ...rest } = options
  const { wire, objects } = toWireWithNodes(withFallbackModel(recipe, fallbackModel))
  return mergeWire(JSON.stringify(wire), rest, objects)
}

/** `fallback(recipe, fallbackModel)`, as sd-mecha's `fallback_model` builds it; the recipe itself without one. */
export function withFallbackModel(recipe: RecipeInput, fallbackModel: string | RecipeNode | undefined): RecipeInput {
  if (fallbackModel === undefined) return recipe
  return fallback(recipe, typeof fallbackModel === 'string' ? model(fallbackModel) : fallbackModel)
}

/**
 * `onProgress` wrapped so that a throw stops the merge (`stop`) and is kept: the merge then
 * rejects with that error (`error()`) rather than its own cancellation.
 */
export function guardedProgress(
  onProgress: ((p: Progress) => void) | undefined,
  stop: () => void,
): { progress: ((p: Progress) => void) | undefined; error: () => { error: unknown } | undefined } {
  let thrown: { error: unknown } | undefined
  const progress = onProgress
    ? (p: Progress) => {
        if (thrown) return
        try {
          onProgress(p)
        } catch (error) {
          thrown = { error }
          stop()
        }
      }
    : undefined
  return { progress, error: () => thrown }
}

/** Caches attached to recipe nodes (sd-mecha's `rotate(…, cache=…)`), used by merges of them. */
const attachedCaches = new WeakMap<RecipeNode, MergeCache>()

/** Makes merges of recipes containing `node` use `cache` unless they are given one. */
export function attachCache(node: RecipeNode, cache: MergeCache): void {
  attachedCaches.set(node, cache)
}

/** The merges in progress, by context id: their node objects (so JavaScript methods find their
 * node) and the first error a JavaScript callback of theirs threw. */
interface Running {
  objects: readonly (RecipeNode | undefined)[]
  callbackError?: { error: unknown }
}
const running = new Map<number, Running>()
let nextContext = 1

function attachedCache(objects: readonly (RecipeNode | undefined)[]): MergeCache | undefined {
  for (const o of objects) {
    const cache = o && attachedCaches.get(o)
    if (cache) return cache
  }
  return undefined
}

export function runningNode(context: number, node: number): RecipeNode | undefined {
  return running.get(context)?.objects[node]
}

/** Records what a JavaScript merge method threw, to attach to the merge's error as its cause. */
export function noteCallbackError(context: number, error: unknown): void {
  const merge = running.get(context)
  if (merge && !merge.callbackError) merge.callbackError = { error }
}

/** `merge()` for a recipe already in its JSON form (as the CLI reads it from a file). */
export async function mergeWire(
  wire: string,
  options: MergeOptions,
  objects: readonly (RecipeNode | undefined)[] = [],
): Promise<MergeReport | MergedModel> {
  checkMergeOptions(options, 'merge')
  const outputs =
    options.output === undefined ? [] : [{ path: options.output, folder: options.maxShardSize !== undefined }]
  const outcome = await runNative(options, [objects], outputs, (context, token, cache, progress) =>
    native.merge(wire, nativeOptions(options, context), token, cache, progress),
  )
  const report = outcome.report as MergeReport
  if (options.output !== undefined) return report
  const result = new MergedModel(report)
  for (const t of outcome.tensors ?? []) {
    const dtype = t.dtype as SafetensorsDtype
    result.set(t.name, tensorFromBytes(dtype, t.shape, t.data))
  }
  return result
}

/** The native form of the options every merge shares (`output` aside for `mergeMany`). */
export function nativeOptions(options: MergeOptions, context: number): native.NativeMergeOptions {
  return {
    output: options.output,
    threads: options.threads,
    mergeDtype: options.mergeDtype,
    outputDtype: options.outputDtype,
    strictMergeSpace: strictSpace(options.strictMergeSpace),
    chunk: options.chunkElements,
    progressIntervalMs: options.progressIntervalMs,
    context,
    omitNonFiniteInputs: options.omitNonFiniteInputs,
    checkFiniteOutput: options.checkFiniteOutput,
    allowEmpty: options.allowEmpty,
    checkExtraKeys: options.checkExtraKeys,
    strictMandatoryKeys: options.strictMandatoryKeys,
    embedRecipe: options.embedRecipe,
    memoryBudget: options.memoryBudget === undefined ? undefined : parseBytes(options.memoryBudget, 'memoryBudget'),
    maxShardBytes: options.maxShardSize === undefined ? undefined : parseShardSize(options.maxShardSize),
  }
}

type NativeProgress = (p: Progress) => void

/**
 * Runs a native merge call with cancellation, progress and JavaScript methods wired up: job `i`
 * (of `jobObjects`) runs under host context `context + i`, so its JavaScript methods find their
 * own nodes. Rejects with the typed error (its cause the first error a callback threw), or with
 * the error `onProgress` threw, in which case the `outputs` just written are removed.
 */
export async function runNative<O extends { error?: native.ErrorInfo | null }>(
  options: MergeOptions,
  jobObjects: readonly (readonly (RecipeNode | undefined)[])[],
  outputs: readonly { path: string; folder: boolean }[],
  call: (
    context: number,
    token: native.CancelToken,
    cache: native.MergeCache,
    progress: NativeProgress | undefined,
  ) => Promise<O>,
): Promise<O> {
  const { signal, onProgress } = options
  if (signal?.aborted) throw new AbortError('the merge was cancelled before it started; no output file was written')
  const { context, states, release } = registerRunning(jobObjects)
  const token = new native.CancelToken()
  const onAbort = () => token.cancel()
  signal?.addEventListener('abort', onAbort, { once: true })
  const { progress, error: progressError } = guardedProgress(onProgress, () => token.cancel())
  try {
    const cache = cacheFor(options, jobObjects.flat())
    const outcome = await callNative(() => call(context, token, cache, progress))
    const thrown = progressError()
    if (thrown) {
      // It may have thrown after the merge finished: the promise rejects, so no output stays.
      // (a sharded output is a folder this merge has just written whole)
      if (!outcome.error) for (const o of outputs) rmSync(o.path, { force: true, recursive: o.folder })
      throw thrown.error
    }
    if (outcome.error) {
      const error = errorFromNative(outcome.error)
      const callbackError = states.find((s) => s.callbackError)?.callbackError
      if (callbackError) Object.defineProperty(error, 'cause', { value: callbackError.error })
      throw error
    }
    return outcome
  } finally {
    signal?.removeEventListener('abort', onAbort)
    release()
  }
}

/**
 * Registers merges about to run under consecutive host contexts (job `i` under `context + i`),
 * so their JavaScript methods find their node objects and their errors; `release` forgets them.
 */
export function registerRunning(jobObjects: readonly (readonly (RecipeNode | undefined)[])[]): {
  context: number
  states: readonly { callbackError?: { error: unknown } }[]
  release: () => void
} {
  const context = nextContext
  nextContext += Math.max(1, jobObjects.length)
  const states: Running[] = jobObjects.map((objects) => ({ objects }))
  states.forEach((state, i) => running.set(context + i, state))
  return { context, states, release: () => states.forEach((_, i) => running.delete(context + i)) }
}

/** The cache a merge uses: the one given, else one attached to a node of the recipe, else none. */
export function cacheFor(options: MergeOptions, objects: readonly (RecipeNode | undefined)[]): native.MergeCache {
  return (options.cache ?? attachedCache(objects))?.handle ?? new native.MergeCache(0)
}
