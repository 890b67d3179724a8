/**
 * Baking LoRA and LyCORIS files into a checkpoint: sd-mecha's `examples/lora_merge.py`
 * (`add_difference(base, convert(lora, base), alpha=…)`), for any number of LoRAs.
 */
import { convert } from './convert'
import { OptionError } from './errors'
import { checkNames } from './options'
import { model, RecipeNode, type MergeNode } from './recipe'
import { addDifference } from './wrappers'

/**
 * One LoRA for `bakeLoras`: a safetensors path or a recipe node (a LoRA/LyCORIS file in a
 * kohya layout, or a delta already in the base's config), alone (alpha 1) or with its alpha.
 */
export type LoraInput = string | RecipeNode | LoraEntry

/** A LoRA with the weight it is added with, as `bakeLoras` takes it. */
export interface LoraEntry {
  /** The LoRA: a safetensors path or a recipe node. */
  lora: string | RecipeNode
  /**
   * How much of the LoRA's difference is added (default 1). It multiplies the scale the file
   * itself stores (each layer's `alpha / rank`), as sd-mecha's `add_difference(…, alpha=…)` does.
   */
  alpha?: number
}

const what = 'bakeLoras'

/** A path or a node, as a node (paths become `model(path)`); refuses anything else. */
function asNode(value: unknown, name: string): RecipeNode {
  if (value instanceof RecipeNode) return value
  if (typeof value === 'string' && value !== '') return model(value)
  const shown = typeof value === 'string' ? '""' : value === null ? 'null' : typeof value
  throw new OptionError(
    `${what}: ${name} must be a safetensors path (a non-empty string) or a recipe node, got ${shown}`,
  )
}

/** Splits one entry of `loras` into its node and alpha. */
function entry(value: LoraInput, index: number): { lora: RecipeNode; alpha: number } {
  const name = `loras[${index}]`
  if (typeof value === 'object' && value !== null && !(value instanceof RecipeNode)) {
    checkNames(value, ['lora', 'alpha'], `${what}: ${name}`)
    const alpha = value.alpha ?? 1
    if (typeof alpha !== 'number' || !Number.isFinite(alpha)) {
      const shown = typeof alpha === 'string' ? `"${alpha}"` : String(alpha)
      throw new OptionError(`${what}: ${name}.alpha must be a finite number, got ${shown}`)
    }
    return { lora: asNode(value.lora, `${name}.lora`), alpha }
  }
  return { lora: asNode(value, name), alpha: 1 }
}

/**
 * Bakes LoRAs into `base`: each one in order is converted to a difference in the base's model
 * config (`convert(lora, base)`: kohya LoRA and LyCORIS files become `alpha / rank · up @ down`
 * per layer, through the registered conversions) and added with its alpha, so the result is
 * `base + alpha₁·Δ₁ + alpha₂·Δ₂ + …`. Keys a LoRA lacks keep the value before it (each step is
 * `addDifference(previous, convert(lora, base), { alpha })`, which falls back to `previous`).
 *
 * ```ts
 * const base = model('sdxl.safetensors')
 * await merge(bakeLoras(base, ['style.safetensors', { lora: 'detail.safetensors', alpha: 0.5 }]), {
 *   output: 'baked.safetensors',
 * })
 * ```
 *
 * `base` is a safetensors path or a recipe node (it may itself be a merge). Throws an
 * `OptionError` for an empty `loras` list or an entry that is not a LoRA, and a `ConfigError`
 * (from `convert`) for a LoRA no chain of conversions leads from to the base's config. The
 * `mecha lora bake` command runs this.
 */
export function bakeLoras(base: string | RecipeNode, loras: readonly LoraInput[]): MergeNode {
  const baseNode = asNode(base, 'base')
  if (!Array.isArray(loras))
    throw new OptionError(`${what}: loras must be an array of LoRA paths, recipe nodes or { lora, alpha } entries`)
  if (loras.length === 0)
    throw new OptionError(`${what}: loras is empty; give at least one LoRA (a path, a recipe node or { lora, alpha })`)
  const [first, ...rest] = loras.map(entry)
  const step = (previous: RecipeNode, { lora, alpha }: { lora: RecipeNode; alpha: number }) =>
    addDifference(previous, convert(lora, baseNode), { alpha })
  return rest.reduce<MergeNode>(step, step(baseNode, first))
}
