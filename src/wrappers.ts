/**
 * sd-mecha's Python wrappers (`sd_mecha.add_difference`, `add_perpendicular`, `copy_region` /
 * `tensor_sum`, `rotate`, the TIES family's `add_difference_ties`, `add_difference_ties_extended`,
 * `add_ties_with_dare`, `n_model_stock` and `dropout`): functions that build graphs of registered
 * methods, so their `.mecha` text is the one sd-mecha writes for the same call.
 */
import { attachCache, type MergeCache } from './merge'
import { callMethod, Int, LiteralNode, ModelNode, RecipeNode, type MergeNode, type RecipeInput } from './recipe'

/** Options of `addDifference` (sd-mecha's `add_difference` wrapper). */
export interface AddDifferenceWrapperOptions {
  /** Weight of the difference (default 1). A number, per-block values or a tensor. */
  alpha?: RecipeInput
  /** Clamp the result to the range spanned by `a` and `b` (default false). */
  clampToAb?: boolean
}

function isOptions(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !(v instanceof RecipeNode) && !Array.isArray(v)
}

/** Whether the optional third input is in fact the options object (only `names` as keys). */
function isOptionsOf<T>(v: unknown, names: readonly string[]): v is T {
  return isOptions(v) && Object.keys(v).every((k) => names.includes(k))
}

/**
 * `a + alpha·(b − c)`, or `a + alpha·b` when `b` already is a delta and `c` is omitted; falls
 * back to `a` for keys the difference lacks. With `clampToAb`, the result is clamped to the
 * range spanned by `a` and `b`. (sd-mecha's `add_difference` wrapper, without its crash when
 * only one of `a` and `b` has a merge space.)
 */
export function addDifference(
  a: RecipeInput,
  b: RecipeInput,
  c?: RecipeInput | AddDifferenceWrapperOptions,
  options: AddDifferenceWrapperOptions = {},
): MergeNode {
  if (isOptionsOf<AddDifferenceWrapperOptions>(c, ['alpha', 'clampToAb'])) {
    options = c
    c = undefined
  }
  const delta = c === undefined ? b : callMethod('subtract', [b, c as RecipeInput], {})
  let res: MergeNode = callMethod('add_difference', [a, delta], { alpha: options.alpha ?? 1.0 })
  if (options.clampToAb) {
    // With c, b is a model like a; without, b is the delta and clamp's merge space check says so.
    res = callMethod('clamp', [res, a, c === undefined ? delta : b], { stiffness: 0.0 })
  }
  return callMethod('fallback', [res, a], {})
}

/** `a + alpha·perpendicular_component(a − c, b − c)`: adds the part of b's change that a lacks. */
export function addPerpendicular(
  a: RecipeInput,
  b: RecipeInput,
  c: RecipeInput,
  options: { alpha?: RecipeInput } = {},
): MergeNode {
  const perpendicular = callMethod(
    'perpendicular_component',
    [callMethod('subtract', [a, c], {}), callMethod('subtract', [b, c], {})],
    {},
  )
  return callMethod('add_difference', [a, perpendicular], { alpha: options.alpha ?? 1.0 })
}

/** Options of `copyRegion` / `tensorSum` (sd-mecha's `copy_region` wrapper). */
export interface CopyRegionOptions {
  /** Fraction of the tensor copied (default 1). */
  width?: number
  /** Where the region starts, as a fraction (default 0); regions wrap around. */
  offset?: number
  /** Select the region by magnitude rank (`top_k_tensor_sum`) instead of by rows (default false). */
  topK?: boolean
}

/**
 * Copies a region of `b` into `a` (`tensor_sum`, or `top_k_tensor_sum` with `topK`); with `c`,
 * the copy is done on the differences from `c` and added back to it.
 */
export function copyRegion(
  a: RecipeInput,
  b: RecipeInput,
  c?: RecipeInput | CopyRegionOptions,
  options: CopyRegionOptions = {},
): MergeNode {
  if (isOptionsOf<CopyRegionOptions>(c, ['width', 'offset', 'topK'])) {
    options = c
    c = undefined
  }
  return onDifferences(a, b, c as RecipeInput | undefined, (x, y) =>
    callMethod(options.topK ? 'top_k_tensor_sum' : 'tensor_sum', [x, y], {
      width: options.width ?? 1.0,
      offset: options.offset ?? 0.0,
    }),
  )
}

/** `f(a, b)`, or with `c`: `c + f(a − c, b − c)` (`add_difference` with alpha 1). */
function onDifferences(
  a: RecipeInput,
  b: RecipeInput,
  c: RecipeInput | undefined,
  f: (x: RecipeInput, y: RecipeInput) => MergeNode,
): MergeNode {
  if (c === undefined) return f(a, b)
  const res = f(callMethod('subtract', [a, c], {}), callMethod('subtract', [b, c], {}))
  return callMethod('add_difference', [c, res], { alpha: 1.0 })
}

/** sd-mecha's `tensor_sum` wrapper is `copy_region`. */
export const tensorSum = copyRegion

/**
 * Splits `[...models, options?]`: a trailing plain object is the options when all its keys are
 * option names (otherwise it is a per-key dict input).
 */
function splitOptions<O extends object>(
  args: readonly (RecipeInput | O)[],
  names: readonly string[],
): [RecipeInput[], Partial<O>] {
  const last = args[args.length - 1]
  if (args.length && isOptions(last) && Object.keys(last).every((k) => names.includes(k))) {
    return [args.slice(0, -1) as RecipeInput[], last as Partial<O>]
  }
  return [args as RecipeInput[], {}]
}

/** Each model's difference from `base` where it is in weight space; others (deltas, merge nodes) as they are. */
function deltasFrom(base: RecipeInput, models: readonly RecipeInput[]): RecipeInput[] {
  return models.map((m) =>
    (m instanceof ModelNode || m instanceof LiteralNode) && m.mergeSpace === 'weight'
      ? callMethod('subtract', [m, base], {})
      : m,
  )
}

/** A seed for the random methods: an integer, or `null` to have one chosen (and reported). */
export type Seed = number | Int | null

/** A number given for an `int` parameter, written as an integer (as Python passes it). */
const asInt = <T>(v: number | T): Int | T => (typeof v === 'number' ? new Int(v) : v)

/** Options of `addDifferenceTies` (sd-mecha's `add_difference_ties`), given after the models. */
export interface AddDifferenceTiesOptions {
  /** Weight of the merged difference (default 1). */
  alpha?: RecipeInput
  /** Fraction of each delta kept, by magnitude (default 1: all). */
  k?: number
}

/**
 * `base + alpha·ties_sum(models − base)`, falling back to `base` for keys the sum lacks
 * (sd-mecha's `add_difference_ties`, whose wrapper crashes when `base` is a model: this is the
 * graph it means).
 */
export function addDifferenceTies(base: RecipeInput, ...models: (RecipeInput | AddDifferenceTiesOptions)[]): MergeNode {
  const [inputs, o] = splitOptions<AddDifferenceTiesOptions>(models, ['alpha', 'k'])
  const res = callMethod('ties_sum', deltasFrom(base, inputs), { k: o.k ?? 1.0 })
  return addDifference(base, res, undefined, { alpha: o.alpha ?? 1.0 })
}

/** The options of sd-mecha's `ties_sum_extended`, shared by `addDifferenceTiesExtended` and `addTiesWithDare`. */
export interface TiesExtendedOptions {
  /** Fraction of each delta kept, by magnitude. */
  k?: number
  /** Elect the sign of the sum rather than the most common sign (default false). */
  voteSgn?: boolean
  /** sd-mecha's inverted flag: false (the default) applies model stock's factor, true leaves it out. */
  applyStock?: boolean
  /** Epsilon of model stock's cosine similarity (`cos_eps`, default 1e-6). */
  cosEps?: number
  /** Combine the elected deltas by their geometric median (default false). */
  applyMedian?: boolean
  /** Geometric median: the smallest distance divided by in Weiszfeld's iteration (default 1e-6). */
  eps?: number
  /** Geometric median: the most iterations (default 100). */
  maxiter?: number | Int
  /** Geometric median: stop when the objective changes by at most this fraction (default 1e-20). */
  ftol?: number
}

const tiesExtendedNames = ['k', 'voteSgn', 'applyStock', 'cosEps', 'applyMedian', 'eps', 'maxiter', 'ftol']

/** The extended TIES keyword arguments with sd-mecha's defaults (`k` as given). */
function tiesExtendedArgs(o: TiesExtendedOptions, k: number) {
  return {
    k: o.k ?? k,
    vote_sgn: o.voteSgn ?? false,
    apply_stock: o.applyStock ?? false,
    cos_eps: o.cosEps ?? 1e-6,
    apply_median: o.applyMedian ?? false,
    eps: o.eps ?? 1e-6,
    maxiter: asInt(o.maxiter ?? 100),
    ftol: o.ftol ?? 1e-20,
  }
}

/** Options of `addDifferenceTiesExtended` (sd-mecha's `add_difference_ties_extended`), given after the models. */
export interface AddDifferenceTiesExtendedOptions extends TiesExtendedOptions {
  /** Weight of the merged difference (default 1). */
  alpha?: RecipeInput
}

/**
 * `base + alpha·ties_sum_extended(models − base)` (default k 0.2), falling back to `base`
 * (sd-mecha's `add_difference_ties_extended`, without its crash).
 */
export function addDifferenceTiesExtended(
  base: RecipeInput,
  ...models: (RecipeInput | AddDifferenceTiesExtendedOptions)[]
): MergeNode {
  const [inputs, o] = splitOptions<AddDifferenceTiesExtendedOptions>(models, ['alpha', ...tiesExtendedNames])
  const res = callMethod('ties_sum_extended', deltasFrom(base, inputs), tiesExtendedArgs(o, 0.2))
  return addDifference(base, res, undefined, { alpha: o.alpha ?? 1.0 })
}

/** Options of `addTiesWithDare` (sd-mecha's `add_ties_with_dare`; `k` defaults to 1), given after the models. */
export interface AddTiesWithDareOptions extends TiesExtendedOptions {
  /** DELLA: how much more likely larger magnitudes are kept (default 0: DARE). */
  dellaEps?: number
  /** Probability of dropping each delta element (default 0.9). */
  probability?: RecipeInput
  /** Divide by 1 − probability afterwards (default true). */
  rescale?: boolean
  /** Weight of the merged difference (default 1). */
  alpha?: RecipeInput
  /** Seed of the random dropout (default `null`: one is chosen and reported in `report.seeds`). */
  seed?: Seed
}

/**
 * `base + alpha·ties_sum_with_dropout(models − base)`: DARE/DELLA, then TIES (default k 1),
 * rescaled (sd-mecha's `add_ties_with_dare`). Random: pass a `seed` to reproduce it.
 */
export function addTiesWithDare(base: RecipeInput, ...models: (RecipeInput | AddTiesWithDareOptions)[]): MergeNode {
  const names = ['dellaEps', 'probability', 'rescale', 'alpha', 'seed', ...tiesExtendedNames]
  const [inputs, o] = splitOptions<AddTiesWithDareOptions>(models, names)
  const res = callMethod('ties_sum_with_dropout', deltasFrom(base, inputs), {
    probability: o.probability ?? 0.9,
    della_eps: o.dellaEps ?? 0.0,
    rescale: o.rescale ?? true,
    ...tiesExtendedArgs(o, 1.0),
    seed: asInt(o.seed ?? null),
  })
  return callMethod('add_difference', [base, res], { alpha: o.alpha ?? 1.0 })
}

/** `base + model_stock(models − base)` (sd-mecha's `n_model_stock`). */
export function nModelStock(base: RecipeInput, ...models: (RecipeInput | { cosEps?: number })[]): MergeNode {
  const [inputs, o] = splitOptions<{ cosEps?: number }>(models, ['cosEps'])
  const res = callMethod('model_stock', deltasFrom(base, inputs), { cos_eps: o.cosEps ?? 1e-6 })
  return callMethod('add_difference', [base, res], { alpha: 1.0 })
}

/** Options of `dropout` (sd-mecha's `dropout` wrapper), given after the models. */
export interface DropoutWrapperOptions {
  /** Probability of dropping each element of each delta (default 0.9). */
  probability?: number
  /** Weight of the merged difference (default 0.5). */
  alpha?: RecipeInput
  /** How the models' kept subsets overlap (default 1: independently). */
  overlap?: number
  /** When `overlap` is not odd: how far the subsets' distribution blends toward binomial weights (`overlap_emphasis`, default 0). */
  overlapEmphasis?: number
  /** Seed of the random subsets (default `null`: one is chosen and reported in `report.seeds`). */
  seed?: Seed
}

/**
 * `a + alpha·dropout(models − a)` (n-supermario; sd-mecha's `dropout` wrapper). Random: pass a
 * `seed` to reproduce it. The registered method itself is `dropoutMethod`.
 */
export function dropout(a: RecipeInput, ...models: (RecipeInput | DropoutWrapperOptions)[]): MergeNode {
  const names = ['probability', 'alpha', 'overlap', 'overlapEmphasis', 'seed']
  const [inputs, o] = splitOptions<DropoutWrapperOptions>(models, names)
  const deltas = inputs.map((m) => callMethod('subtract', [m, a], {}))
  const res = callMethod('dropout', deltas, {
    probability: o.probability ?? 0.9,
    overlap: o.overlap ?? 1.0,
    overlap_emphasis: o.overlapEmphasis ?? 0.0,
    seed: asInt(o.seed ?? null),
  })
  return callMethod('add_difference', [a, res], { alpha: o.alpha ?? 0.5 })
}

/** Options of `rotate` (sd-mecha's `rotate` wrapper). */
export interface RotateWrapperOptions {
  /** How far `a` is turned toward `b`: the power of the orthogonal transform (default 1). */
  alignment?: RecipeInput
  /** How far `a`'s scaling moves toward `b`'s (default 0). A number, per-block values or a tensor. */
  alpha?: RecipeInput
  /**
   * Keeps the decompositions for later merges of this recipe (with another `alignment` or
   * `alpha`): a merge of a recipe containing this node uses it unless given its own `cache`.
   */
  cache?: MergeCache
}

/**
 * Aligns `a` with `b` by an orthogonal transform (`rotate`); with `c`, on the differences from
 * `c`, added back to it. sd-mecha's wrapper takes `cache` and crashes on it (`set_cache`); here
 * the cache is attached to the node and used by `merge()` (see docs/differences.md).
 */
export function rotate(
  a: RecipeInput,
  b: RecipeInput,
  c?: RecipeInput | RotateWrapperOptions,
  options: RotateWrapperOptions = {},
): MergeNode {
  if (isOptionsOf<RotateWrapperOptions>(c, ['alignment', 'alpha', 'cache'])) {
    options = c
    c = undefined
  }
  const node = onDifferences(a, b, c as RecipeInput | undefined, (x, y) =>
    callMethod('rotate', [x, y], { alignment: options.alignment ?? 1.0, alpha: options.alpha ?? 0.0 }),
  )
  if (options.cache) attachCache(node, options.cache)
  return node
}
