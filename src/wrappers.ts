/**
 * sd-mecha's Python wrappers (`sd_mecha.add_difference`, `add_perpendicular`, `copy_region` /
 * `tensor_sum`): functions that build graphs of registered methods, so their `.mecha` text is
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
  if (isOptions(c) && !(c instanceof RecipeNode) && Object.keys(c).every((k) => k === 'alpha' || k === 'clampToAb')) {
    options = c as AddDifferenceWrapperOptions
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
  if (isOptions(c) && Object.keys(c).every((k) => k === 'width' || k === 'offset' || k === 'topK')) {
    options = c as CopyRegionOptions
    c = undefined
  }
  const base = c as RecipeInput | undefined
  const [x, y] =
    base === undefined ? [a, b] : [callMethod('subtract', [a, base], {}), callMethod('subtract', [b, base], {})]
  const res = callMethod(options.topK ? 'top_k_tensor_sum' : 'tensor_sum', [x, y], {
    width: options.width ?? 1.0,
    offset: options.offset ?? 0.0,
  })
  return base === undefined ? res : callMethod('add_difference', [base, res], { alpha: 1.0 })
}

/** sd-mecha's `tensor_sum` wrapper is `copy_region`. */
export const tensorSum = copyRegion
