/**
 * Baking LoRA and LyCORIS files into a checkpoint: sd-mecha's `examples/lora_merge.py`
 * (`add_difference(base, convert(lora, base), alpha=…)`), for any number of LoRAs.
 */
import { configs } from './configs'
import { convert } from './convert'
import { ConfigError, OptionError } from './errors'
import { inspect } from './inspect'
import {
  extractKohyaLokr,
  extractKohyaLora,
  extractLycorisLokr,
  extractLycorisLora,
  omitComponent,
  subtract,
} from './methods.generated'
import { checkNames } from './options'
import { plan } from './plan'
import { Int, literal, model, RecipeNode, type MergeNode } from './recipe'
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
function asNodeFor(caller: string, value: unknown, name: string): RecipeNode {
  if (value instanceof RecipeNode) return value
  if (typeof value === 'string' && value !== '') return model(value)
  const shown = typeof value === 'string' ? '""' : value === null ? 'null' : typeof value
  throw new OptionError(
    `${caller}: ${name} must be a safetensors path (a non-empty string) or a recipe node, got ${shown}`,
  )
}

const asNode = (value: unknown, name: string) => asNodeFor(what, value, name)

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

/** How `extractLora` writes the difference between two models. */
export interface ExtractLoraOptions {
  /**
   * The rank of each layer's LoRA (default 8): `lora_up` is `[out, rank]`, `lora_down`
   * `[rank, in]`, and baking the file back gives the best rank-`rank` approximation of the
   * difference (layers smaller than the rank keep their own size). Unused by `lokr`.
   */
  rank?: number
  /**
   * Instead of one `rank`, each layer's own: `round(min(rows, columns) · rankRatio)` (sd-mecha's
   * `get_rank_from_ratio`), from 0 to 1. A layer whose rank comes out 0 is left out.
   */
  rankRatio?: number
  /**
   * `lora` (default): `lora_up`, `lora_down` and `alpha` per layer; `lokr`: the nearest
   * Kronecker product `lokr_w1 ⊗ lokr_w2` of each layer's difference.
   */
  algorithm?: 'lora' | 'lokr'
  /** The key names: `kohya` (default, `lora_unet_…`, `lora_te1_…`) or `lycoris` (`lycoris_unet_…`). */
  naming?: 'kohya' | 'lycoris'
  /**
   * The kohya layout the keys follow: `sdxl-kohya`, `sdxl-kohya_but_diffusers` or `sd1-kohya`.
   * By default `sdxl-kohya` for an SDXL base and `sd1-kohya` for an SD 1.x one.
   */
  config?: string
  /**
   * Use the seeded randomised SVD (default true, as sd-mecha; much faster on large layers);
   * `false` computes the exact truncation.
   */
  approximate?: boolean
  /** Power iterations of the randomised SVD (default 2). */
  iterations?: number
  /** Seed of the randomised SVD; by default each merge chooses one and records it. */
  seed?: number
  /** For `lokr`: the size of `lokr_w1` relative to `lokr_w2` (default 0.5, balanced). */
  kroneckerRatio?: number
}

const KOHYA_LAYOUTS = ['sdxl-kohya', 'sdxl-kohya_but_diffusers', 'sd1-kohya'] as const

/**
 * A LoRA file of the difference `tuned − base` (sd-mecha's `extract_kohya_lora` and siblings, on
 * the two models converted to their kohya layout): merge it to a safetensors path to write the
 * file. `bakeLoras(base, [file])` then rebuilds `tuned` up to the rank's approximation. The VAE is
 * left out (no LoRA loader applies one).
 *
 * ```ts
 * await merge(extractLora('sdxl-base.safetensors', 'sdxl-tuned.safetensors', { rank: 32 }), {
 *   output: 'tuned-lora.safetensors',
 * })
 * ```
 *
 * Throws an `OptionError` for an unknown option or value, and a `ConfigError` when the models
 * have no kohya layout (or different architectures). The `mecha lora extract` command runs this.
 */
export function extractLora(
  base: string | RecipeNode,
  tuned: string | RecipeNode,
  options: ExtractLoraOptions = {},
): MergeNode {
  const name = 'extractLora'
  checkNames(
    options,
    ['rank', 'rankRatio', 'algorithm', 'naming', 'config', 'approximate', 'iterations', 'seed', 'kroneckerRatio'],
    name,
  )
  const { algorithm = 'lora', naming = 'kohya' } = options
  if (algorithm !== 'lora' && algorithm !== 'lokr')
    throw new OptionError(`${name}: algorithm must be "lora" or "lokr", got ${JSON.stringify(algorithm)}`)
  if (naming !== 'kohya' && naming !== 'lycoris')
    throw new OptionError(`${name}: naming must be "kohya" or "lycoris", got ${JSON.stringify(naming)}`)
  const integer = (value: unknown, what: string, least: number) => {
    if (value === undefined) return undefined
    if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < least)
      throw new OptionError(`${name}: ${what} must be an integer ≥ ${least}, got ${String(value)}`)
    return new Int(value)
  }
  const rank = integer(options.rank, 'rank', 1)
  const iterations = integer(options.iterations, 'iterations', 0)
  const seed = integer(options.seed, 'seed', 0)
  if (options.approximate !== undefined && typeof options.approximate !== 'boolean')
    throw new OptionError(`${name}: approximate must be true or false, got ${String(options.approximate)}`)
  const rankRatio = options.rankRatio
  if (rankRatio !== undefined && (typeof rankRatio !== 'number' || !(rankRatio >= 0 && rankRatio <= 1)))
    throw new OptionError(`${name}: rankRatio must be a number from 0 to 1, got ${String(rankRatio)}`)
  if (rankRatio !== undefined && options.rank !== undefined)
    throw new OptionError(`${name}: give rank or rankRatio, not both`)
  const ratio = options.kroneckerRatio
  if (ratio !== undefined && (typeof ratio !== 'number' || !(ratio >= 0 && ratio <= 1)))
    throw new OptionError(`${name}: kroneckerRatio must be a number from 0 to 1, got ${String(ratio)}`)
  if (options.config !== undefined && !(KOHYA_LAYOUTS as readonly string[]).includes(options.config))
    throw new OptionError(
      `${name}: config must be one of ${KOHYA_LAYOUTS.join(', ')}, got ${JSON.stringify(options.config)}`,
    )
  const [baseNode, tunedNode] = [asNodeFor(name, base, 'base'), asNodeFor(name, tuned, 'tuned')]
  // The base's inferred config, read once (a header for a file, a plan for a recipe).
  let baseConfig: string | null | undefined
  const configOfBase = (): string | null => {
    if (baseConfig === undefined) baseConfig = typeof base === 'string' ? inspect(base).config : plan(baseNode).config
    return baseConfig
  }
  if (typeof base === 'string' && typeof tuned === 'string') {
    // Files of two architectures may share a few key names; say so rather than extract nothing.
    const [a, b] = [configOfBase(), inspect(tuned).config]
    if (a && b && a.split('-')[0] !== b.split('-')[0])
      throw new ConfigError(
        `${name}: the base is ${a} but tuned is ${b}; a LoRA is the difference of two models of one architecture`,
      )
  }
  const layout = options.config ?? kohyaLayoutOf(configOfBase())
  const delta = omitComponent(subtract(convert(tunedNode, layout), convert(baseNode, layout)), 'vae')
  if (algorithm === 'lokr') {
    const extract = naming === 'kohya' ? extractKohyaLokr : extractLycorisLokr
    return extract(delta, { kroneckerRatio: ratio })
  }
  const extract = naming === 'kohya' ? extractKohyaLora : extractLycorisLora
  return extract(delta, {
    rank: rankRatio === undefined ? rank : ranksByRatio(layout, naming, rankRatio),
    useApproximateBasis: options.approximate,
    approximateBasisIters: iterations,
    approximateBasisSeed: seed,
  })
}

/**
 * The kohya layout for a model: its own config when it is one, else its architecture's
 * (`sdxl-kohya` for SDXL, `sd1-kohya` for SD 1.x), from the config inferred from its keys.
 */
function kohyaLayoutOf(config: string | null): string {
  if (config && (KOHYA_LAYOUTS as readonly string[]).includes(config)) return config
  const architecture = config?.split('-')[0]
  if (architecture === 'sdxl') return 'sdxl-kohya'
  if (architecture === 'sd1') return 'sd1-kohya'
  throw new ConfigError(
    `extractLora: the base model (${config ?? 'no known config'}) has no kohya layout; LoRA files exist for SDXL and SD 1.x models (sdxl-kohya, sdxl-kohya_but_diffusers, sd1-kohya)`,
  )
}

/** Python's `round` (half to even), as sd-mecha's `get_rank_from_ratio` rounds. */
function roundHalfEven(x: number): number {
  const r = Math.round(x)
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r
}

/**
 * Each layer's rank for `rankRatio`, as a literal in the LoRA config: the extraction reads its
 * `rank` at every key it writes (`…lora_up.weight`, `…lora_down.weight`, `…alpha`), so the dict
 * has the layer's rank under each. Ranks come from the layout's shapes; a layer of another
 * shape is clamped to its own size by the method.
 */
function ranksByRatio(layout: string, naming: 'kohya' | 'lycoris', ratio: number): RecipeNode {
  const prefix = naming === 'kohya' ? 'lora' : 'lycoris'
  const ranks: Record<string, Int> = {}
  for (const { key, shape, dtype } of configs.keys(layout)) {
    // the keys a LoRA has: floating-point weights of two or more dimensions
    if (!shape || shape.length < 2 || key.endsWith('bias') || (dtype !== null && !/^B?F/.test(dtype))) continue
    const columns = shape.slice(1).reduce((a, b) => a * b, 1)
    const rank = new Int(
      Math.min(Math.max(roundHalfEven(Math.min(shape[0], columns) * ratio), 0), Math.min(shape[0], columns)),
    )
    const stem = `${prefix}_${key.replace(/\.weight$/, '').replaceAll('.', '_')}`
    for (const suffix of ['lora_up.weight', 'lora_down.weight', 'alpha']) ranks[`${stem}.${suffix}`] = rank
  }
  return literal(ranks, { config: `${layout}_${naming}_lora`, mergeSpace: 'param' })
}
