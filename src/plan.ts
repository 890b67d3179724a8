/** Dry runs: what a merge would do, from headers only. */
import native = require('./native')
import { native as callNative } from './errors'
import { toWire, type RecipeInput } from './recipe'
import { checkMergeOptions, parseBytes, planOptionNames, type MergeOptions, type SkippedKey } from './merge'

/** What `plan()` found a merge would do, from headers only: configs, spaces, keys, output size and memory. */
export interface PlanReport {
  /** Model config of the result (`'structural'` for an unknown architecture). */
  config: string
  /** Merge space of the result (`'weight'`, `'delta'` or `'param'`). */
  mergeSpace: string
  /** Each model input with the config inferred for it. */
  inputs: { path: string; config: string }[]
  /** Keys the output would hold. */
  keys: number
  /** Bytes of tensor data the output would hold (its header not counted). */
  outputBytes: number
  /** Keys present in some input but not produced, and why. */
  keysSkipped: SkippedKey[]
  /** Keys of the result's config, not optional, that cannot be built (`strictMandatoryKeys` refuses these). */
  unbuiltMandatory: SkippedKey[]
  /** Worker threads the merge would use. */
  threads: number
  /** Working memory of the merge threads, excluding the process itself. */
  estimatedWorkingBytes: number
  /** Estimated peak resident memory of the process during the merge (now + working memory). */
  estimatedPeakBytes: number
  /** The memory budget the merge would run under. */
  memoryBudget: number
  /** Keys whose computation needs more than the budget, so would run alone. */
  overBudget: string[]
  /** The finalized `.mecha` text. */
  recipe: string
}

/** Plans a merge without reading tensor data. */
export function plan(
  recipe: RecipeInput,
  options: Pick<
    MergeOptions,
    'threads' | 'mergeDtype' | 'outputDtype' | 'strictMergeSpace' | 'chunkElements' | 'memoryBudget' | 'checkExtraKeys'
  > = {},
): PlanReport {
  return planWire(JSON.stringify(toWire(recipe)), options)
}

export function planWire(wire: string, options: Parameters<typeof plan>[1] = {}): PlanReport {
  checkMergeOptions(options, 'plan', planOptionNames)
  return callNative(() =>
    native.plan(wire, {
      threads: options.threads,
      mergeDtype: options.mergeDtype,
      outputDtype: options.outputDtype,
      strictMergeSpace: options.strictMergeSpace === null ? 'any' : options.strictMergeSpace,
      chunk: options.chunkElements,
      checkExtraKeys: options.checkExtraKeys,
      memoryBudget: options.memoryBudget === undefined ? undefined : parseBytes(options.memoryBudget, 'memoryBudget'),
    }),
  )
}
