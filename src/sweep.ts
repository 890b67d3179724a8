/**
 * One read, many outputs: `mergeMany()` merges several recipes in one pass over their inputs
 * (a sweep of one recipe's hyper-parameters), and `withParameter()` makes the recipes of a sweep.
 */
import native = require('./native')
import { OptionError } from './errors'
import { checkNames } from './options'
import {
  checkMergeOptions,
  mergeOptionNames,
  nativeOptions,
  parseShardSize,
  runNative,
  withFallbackModel,
  type MergeOptions,
  type MergeReport,
} from './merge'
import { RecipeNode, toWireWithNodes, type RecipeInput, type WireRecipe, type WireValue } from './recipe'

/** One merge of {@link mergeMany}: a recipe and the file (or, with `maxShardSize`, the folder) it is written to. */
export interface SweepJob {
  recipe: RecipeInput
  output: string
  /** Write this output as a sharded checkpoint (see `MergeOptions.maxShardSize`). */
  maxShardSize?: number | string
}

/** The options of `mergeMany()`: `merge()`'s, but each job gives its own `output`. */
export type MergeManyOptions = Omit<MergeOptions, 'output' | 'maxShardSize'>

/** `merge()`'s options but the output, which each job gives. */
const mergeManyOptionNames = mergeOptionNames.filter((n) => n !== 'output' && n !== 'maxShardSize')

/** A job in the JSON form the native layer reads, with the node objects its recipe came from. */
export interface WireJob {
  wire: string
  objects: readonly (RecipeNode | undefined)[]
  output: string
  maxShardSize?: number | string
}

/**
 * Merges every job's recipe to its output in one pass over the inputs: keys of the same name are
 * computed together, so an input tensor several recipes read is read once and an alpha sweep of
 * five merges costs about one merge plus the writes. Each output is the file `merge()` would
 * write for its recipe alone, byte for byte (its own recipe, seeds and input hashes in its
 * metadata). Every output appears when all are complete, or none does (an error in any recipe,
 * a cancel). `onProgress` counts the keys and bytes of all outputs together. Resolves with one
 * report per job, in order; each report's `bytesRead` counts the bytes read while computing
 * that output's keys (an input shared with an earlier output counts once, for that one).
 */
export async function mergeMany(jobs: readonly SweepJob[], options: MergeManyOptions = {}): Promise<MergeReport[]> {
  checkMergeOptions(options, 'mergeMany', mergeManyOptionNames)
  if (!Array.isArray(jobs) || jobs.length === 0)
    throw new OptionError('mergeMany: give an array of at least one { recipe, output }')
  const { fallbackModel, ...rest } = options
  const wired = jobs.map((job, i): WireJob => {
    if (job === null || typeof job !== 'object')
      throw new OptionError(`mergeMany: job ${i + 1} must be { recipe, output }`)
    checkNames(
      job as unknown as Record<string, unknown>,
      ['recipe', 'output', 'maxShardSize'],
      `mergeMany: job ${i + 1}`,
    )
    checkMergeOptions({ output: job.output, maxShardSize: job.maxShardSize }, `mergeMany: job ${i + 1}`)
    if (job.output === undefined) throw new OptionError(`mergeMany: job ${i + 1} needs an output path`)
    const { wire, objects } = toWireWithNodes(withFallbackModel(job.recipe, fallbackModel))
    return { wire: JSON.stringify(wire), objects, output: job.output, maxShardSize: job.maxShardSize }
  })
  return mergeManyWire(wired, rest)
}

/** `mergeMany()` for recipes already in their JSON form (as the CLI's `sweep` makes them). */
export async function mergeManyWire(jobs: readonly WireJob[], options: MergeManyOptions): Promise<MergeReport[]> {
  checkMergeOptions(options, 'mergeMany', mergeManyOptionNames)
  const outputs = jobs.map((j) => ({ path: j.output, folder: j.maxShardSize !== undefined }))
  const nativeJobs = jobs.map((j) => ({
    recipe: j.wire,
    output: j.output,
    maxShardBytes: j.maxShardSize === undefined ? undefined : parseShardSize(j.maxShardSize),
  }))
  const objects = jobs.map((j) => j.objects)
  const outcome = await runNative(options, objects, outputs, (context, token, cache, progress) =>
    native.mergeMany(nativeJobs, nativeOptions(options, context), token, cache, progress),
  )
  return outcome.reports as MergeReport[]
}

/**
 * The recipe with hyper-parameter `name` (sd-mecha's snake_case name, e.g. `alpha`) set to
 * `value` in every merge call whose method has it, given or left at its default. A value another
 * call shares (a literal node) is replaced only where this parameter reads it. Throws an
 * `OptionError` when no call in the recipe takes `name`, or an integer parameter is given a
 * fraction.
 */
export function withParameter(recipe: WireRecipe, name: string, value: number): WireRecipe {
  const signatures = new Map(native.methods().map((m) => [m.id, m.params]))
  let found = 0
  const nodes = recipe.nodes.map((node) => {
    if (!('merge' in node)) return node
    const params = signatures.get(node.merge)
    const at = params?.findIndex((p) => p.name === name) ?? -1
    if (!params || at < 0) return node
    const param = params[at]
    if (param.kind === 'varargs')
      throw new OptionError(`${name} of ${node.merge} is a list of inputs, not a hyper-parameter`)
    if (param.type === 'int' && !Number.isInteger(value))
      throw new OptionError(`${name} of ${node.merge} is an integer, got ${value}`)
    const wired: WireValue = param.type === 'int' ? { int: value } : value
    found++
    // Positional arguments fill the parameters before any varargs, in order.
    const varargs = params.findIndex((p) => p.kind === 'varargs')
    const positional = param.kind !== 'keyword' && (varargs < 0 || at < varargs) && at < node.args.length
    if (positional) return { ...node, args: node.args.map((a, i) => (i === at ? wired : a)) }
    return { ...node, kwargs: { ...node.kwargs, [name]: wired } }
  })
  if (found === 0) {
    const used = [...new Set(recipe.nodes.flatMap((n) => ('merge' in n ? [n.merge] : [])))]
    throw new OptionError(`no merge method in the recipe takes "${name}" (it uses ${used.join(', ') || 'none'})`)
  }
  return { ...recipe, nodes }
}

/**
 * The values of a sweep parameter: `start:stop:step` (both ends included, e.g. `0.1:0.9:0.2` is
 * 0.1, 0.3, 0.5, 0.7, 0.9) or a comma-separated list (`0.2,0.5,0.8`).
 */
export function sweepValues(spec: string): number[] {
  const number = (text: string): number => {
    const v = Number(text)
    if (text.trim() === '' || !Number.isFinite(v)) throw new OptionError(`"${text}" in "${spec}" is not a number`)
    return v
  }
  const parts = spec.split(':')
  if (parts.length === 1) return spec.split(',').map(number)
  if (parts.length !== 3)
    throw new OptionError(`"${spec}" is not start:stop:step (e.g. 0.1:0.9:0.2) nor a list (0.1,0.5)`)
  const [start, stop, step] = parts.map(number)
  if (!(step > 0) || stop < start) throw new OptionError(`"${spec}": the step must be positive and stop at least start`)
  const count = Math.floor((stop - start) / step + 1e-9) + 1
  if (count > 1000) throw new OptionError(`"${spec}" makes ${count} values; a sweep takes at most 1000`)
  // Rounded to 12 significant digits, so 0.1 + 2 × 0.2 is 0.5 and not 0.5000000000000001.
  return Array.from({ length: count }, (_, i) => Number((start + i * step).toPrecision(12)))
}
