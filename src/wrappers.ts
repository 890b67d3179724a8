/**
 * sd-mecha's Python wrappers (`sd_mecha.add_difference`, `add_perpendicular`, `copy_region` /
 * `tensor_sum`, `rotate`): functions that build graphs of registered methods, so their `.mecha` text is
 * the one sd-mecha writes for the same call.
 */
import { callMethod, RecipeNode, type MergeNode, type RecipeInput } from './recipe'

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

export interface RotateWrapperOptions {
  /** How far `a` is turned toward `b`: the power of the orthogonal transform (default 1). */
  alignment?: RecipeInput
  /** How far `a`'s scaling moves toward `b`'s (default 0). A number, per-block values or a tensor. */
  alpha?: RecipeInput
}

/**
 * Aligns `a` with `b` by an orthogonal transform (`rotate`); with `c`, on the differences from
 * `c`, added back to it. sd-mecha's wrapper also takes `cache` and crashes on it (`set_cache`);
 * here decompositions are kept by the merge itself (see docs/differences.md).
 */
export function rotate(
  a: RecipeInput,
  b: RecipeInput,
  c?: RecipeInput | RotateWrapperOptions,
  options: RotateWrapperOptions = {},
): MergeNode {
  if (isOptionsOf<RotateWrapperOptions>(c, ['alignment', 'alpha'])) {
    options = c
    c = undefined
  }
  return onDifferences(a, b, c as RecipeInput | undefined, (x, y) =>
    callMethod('rotate', [x, y], { alignment: options.alignment ?? 1.0, alpha: options.alpha ?? 0.0 }),
  )
}
