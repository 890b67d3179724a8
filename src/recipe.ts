/**
 * Recipe graphs: models, literals and merge nodes. Building a recipe reads nothing; the native
 * core validates it (methods, arity, merge spaces) and streams it when you `merge()` or `serialize()`.
 */

import { RecipeError } from './errors'
import { suggestion } from './options'
import type { Tensor } from './dtypes'
import { isStateDict, isTensor, registerStateDict, releaseWhenCollected, type StateDict } from './state-dict'

/**
 * sd-mecha's merge spaces: `'weight'` (model weights), `'delta'` (a difference of weights, e.g.
 * `subtract(a, b)`) and `'param'` (hyper-parameter values such as `alpha`).
 */
export type MergeSpace = 'weight' | 'delta' | 'param'

/** Marks a number to be written as an integer (`3`), not a float (`3.0`), in `.mecha` text. */
export class Int {
  constructor(readonly value: number) {
    if (!Number.isSafeInteger(value)) throw new RangeError(`int(${value}): not a safe integer`)
  }
}

/** An integer hyper-parameter value, e.g. `truncateRank(d, { rank: int(8) })`. */
export const int = (value: number): Int => new Int(value)

/**
 * A plain recipe value (sd-mecha's literal values): a number (written as a float), a boolean, a
 * string, `null`, or an `Int` for an integer.
 */
export type Scalar = number | boolean | string | null | Int
/** Per-key values (e.g. one per block) or per-key sub-recipes. */
export type LiteralDict = { [key: string]: Scalar | RecipeNode }
/** Anything a merge method accepts: a node, a number/string/bool broadcast to every key, or a dict. */
export type RecipeInput = RecipeNode | Scalar | LiteralDict

/** The node's model config and merge space, for `model()` and `literal()` (sd-mecha's `config=` and `merge_space=`). */
export interface NodeOptions {
  /** Model config id, e.g. `'sdxl-sgm'`; inferred from the file when omitted. */
  config?: string
  /** The node's merge space: `model()` defaults to `'weight'`; `literal()` leaves it to inference. */
  mergeSpace?: MergeSpace
}

/**
 * A node of a recipe graph (sd-mecha's `RecipeNode`): a model, a literal or a merge-method call.
 * Its methods are sd-mecha's operators (`+`, `-`, `*`, `|`, `.to()`).
 */
export abstract class RecipeNode {
  /** `add_difference(this, delta, alpha)`: adds a delta (e.g. `b.sub(c)`) to this node. */
  add(delta: RecipeInput, options: { alpha?: RecipeInput } = {}): MergeNode {
    return callMethod('add_difference', [this, delta], options)
  }

  /** `subtract(this, other)`: the difference of two weights, a delta. */
  sub(other: RecipeInput): MergeNode {
    return callMethod('subtract', [this, other], {})
  }

  /** `scale(this, alpha)`: multiplies a delta. */
  mul(alpha: RecipeInput): MergeNode {
    return callMethod('scale', [this, alpha], {})
  }

  /** `fallback(this, other)`: this node's value where it has the key, otherwise `other`'s. */
  or(other: RecipeInput): MergeNode {
    return callMethod('fallback', [this, other], {})
  }

  /** `cast(this, device, dtype)`: rounds values to a dtype such as `'float16'` or `'bfloat16'`. */
  to(options: { dtype?: string | null; device?: string | null }): MergeNode {
    return callMethod('cast', [this], { device: options.device ?? null, dtype: options.dtype ?? null })
  }
}

/** A safetensors file, as `model(path)` makes it (sd-mecha's `ModelRecipeNode`); nothing is read until it is used. */
export class ModelNode extends RecipeNode {
  constructor(
    /** The path as given; a relative one is searched in `modelDirs`, then the current directory. */
    readonly path: string,
    /** Model config id, or `undefined` to infer it from the file's keys. */
    readonly config: string | undefined,
    /** Merge space of the file's tensors (`'weight'` unless told otherwise). */
    readonly mergeSpace: MergeSpace,
  ) {
    super()
  }
}

/**
 * Tensors held in memory (`model(stateDict)`, tensor literals), read by the merge like a file.
 * A recipe holding one cannot be serialized, and a merge to a file stores no recipe for it.
 */
export class StateDictNode extends RecipeNode {
  constructor(
    /** The native core's id of the tensors. */
    readonly id: number,
    /** The keys it holds, in order. */
    readonly keys: readonly string[],
    /** Model config id, or `undefined` to infer it from the keys. */
    readonly config: string | undefined,
    /** Merge space of the tensors, or `undefined` to infer it (tensor literals). */
    readonly mergeSpace: MergeSpace | undefined,
  ) {
    super()
    releaseWhenCollected(this, id)
  }

  /** The name it has in errors, reports and recipe text. */
  get label(): string {
    return `<in-memory model ${this.id}>`
  }
}

/** A literal value, as `literal()` makes it (sd-mecha's `LiteralRecipeNode`): one value, or a dict of per-key values. */
export class LiteralNode extends RecipeNode {
  constructor(
    /** The value broadcast to every key, or the dict of per-key values or sub-recipes. */
    readonly value: Scalar | LiteralDict,
    /** Model config id (the dict's keys are this config's), or `undefined` to infer it. */
    readonly config: string | undefined,
    /** Merge space of the value, or `undefined` to infer it. */
    readonly mergeSpace: MergeSpace | undefined,
  ) {
    super()
  }
}

/** A call of a merge method on its inputs (sd-mecha's `MergeRecipeNode`), as the builders such as `weightedSum` make it. */
export class MergeNode extends RecipeNode {
  constructor(
    /** sd-mecha method id, e.g. `weighted_sum`. */
    readonly method: string,
    /** Positional arguments, varargs spread in. */
    readonly args: readonly RecipeInput[],
    /** Keyword arguments by sd-mecha parameter name (snake_case, e.g. `vote_sgn`); omitted ones take their defaults. */
    readonly kwargs: Readonly<Record<string, RecipeInput>>,
  ) {
    super()
  }
}

function stateDictNode(what: string, dict: StateDict, options: NodeOptions, space: MergeSpace | undefined) {
  const keys = dict instanceof Map ? [...dict.keys()] : Object.keys(dict)
  return new StateDictNode(registerStateDict(what, dict), keys, options.config, space)
}

/**
 * A model: a safetensors file, or tensors already in memory (a `Map` or object of tensors, such
 * as a `MergedModel`), as sd-mecha's `model(path | state_dict)`. `mergeSpace` defaults to
 * `'weight'` (use `'delta'` for a difference file).
 */
export function model(stateDict: StateDict, options?: NodeOptions): StateDictNode
export function model(path: string, options?: NodeOptions): ModelNode
export function model(source: string | StateDict, options: NodeOptions = {}): ModelNode | StateDictNode {
  if (typeof source === 'string') {
    if (source === '') throw new TypeError('model(path): path must be a non-empty string')
    return new ModelNode(source, options.config, options.mergeSpace ?? 'weight')
  }
  if (isStateDict(source)) return stateDictNode('model', source, options, options.mergeSpace ?? 'weight')
  throw new TypeError(
    'model() takes a safetensors path (a non-empty string) or a state dict (a Map or object of { dtype, shape, data } tensors)',
  )
}

/**
 * A literal value: a number/string/bool broadcast to every key, a dict of per-key values, or
 * tensors: a dict of tensors (an in-memory model whose merge space is inferred) or one tensor
 * broadcast to every key (sd-mecha's `literal(tensor)`).
 */
export function literal(value: Tensor, options?: NodeOptions): RecipeNode
export function literal(value: Readonly<Record<string, Tensor>>, options?: NodeOptions): StateDictNode
export function literal(value: Scalar | LiteralDict, options?: NodeOptions): LiteralNode
export function literal(
  value: Scalar | LiteralDict | Tensor | Readonly<Record<string, Tensor>>,
  options: NodeOptions = {},
): RecipeNode {
  if (isTensor(value)) {
    // As sd-mecha does for any plain value: `{"key": value}` in the singleton config, broadcast
    // to every key unless that config is asked for.
    const single = stateDictNode('literal', { key: value }, { config: SINGLETON }, options.mergeSpace)
    return options.config === SINGLETON ? single : callMethod('convert_singleton', [single], {})
  }
  if (isStateDict(value)) return stateDictNode('literal', value, options, options.mergeSpace)
  const entries = typeof value === 'object' && value !== null && !(value instanceof Int) ? Object.values(value) : []
  if (entries.some(isTensor))
    throw new TypeError('literal(): a dict mixes tensors and other values; sd-mecha requires one kind per dict')
  return new LiteralNode(value as Scalar | LiteralDict, options.config, options.mergeSpace)
}

const SINGLETON = 'singleton-mecha'

/**
 * Refuses hyper-parameter names a builder does not take: in plain JavaScript a typo such as
 * `alhpa` would otherwise be dropped and the default used.
 */
export function checkOptionNames(method: string, options: object, names: readonly string[]): void {
  for (const name of Object.keys(options)) {
    if (!names.includes(name))
      throw new RecipeError(`${method}(): unknown parameter "${name}"; ${suggestion(name, names)}`)
  }
}

/** Calls a merge method by its sd-mecha id. Arguments are checked when the recipe is used. */
export function callMethod(
  method: string,
  args: readonly RecipeInput[],
  kwargs: Readonly<Record<string, RecipeInput | undefined>>,
): MergeNode {
  const given: Record<string, RecipeInput> = {}
  for (const [k, v] of Object.entries(kwargs)) if (v !== undefined) given[k] = v
  return new MergeNode(method, args, given)
}

// ---------------------------------------------------------------------------------------------
// The JSON form the native core reads (see crates/mecha-core/src/recipe/wire.rs).

export type WireValue = number | boolean | string | null | { int: number } | { float: string } | { node: number }
export type WireNode =
  | { model: string; memory?: number; config?: string; mergeSpace?: string }
  | { literal: WireValue | { dict: Record<string, WireValue> }; config?: string; mergeSpace?: string }
  | { merge: string; args: WireValue[]; kwargs: Record<string, WireValue> }

export interface WireRecipe {
  nodes: WireNode[]
  root: number
}

/** The JSON form plus, for each wire node, the node object it came from (dict literals have none). */
export interface WireWithNodes {
  wire: WireRecipe
  objects: (RecipeNode | undefined)[]
}

function isDict(v: unknown): v is LiteralDict {
  return typeof v === 'object' && v !== null && !(v instanceof RecipeNode) && !(v instanceof Int)
}

export function toWire(root: RecipeInput): WireRecipe {
  return toWireWithNodes(root).wire
}

/** What a recipe graph is made of when walking it: nodes, and dicts of per-key sub-recipes. */
type Item = RecipeNode | LiteralDict

function childItems(item: Item): Item[] {
  const of = (v: RecipeInput): Item[] => (v instanceof RecipeNode || isDict(v) ? [v] : [])
  if (item instanceof MergeNode) return [...item.args.flatMap(of), ...Object.values(item.kwargs).flatMap(of)]
  if (item instanceof LiteralNode) return isDict(item.value) ? childItems(item.value) : []
  if (item instanceof RecipeNode) return []
  return Object.values(item).filter((v): v is RecipeNode => v instanceof RecipeNode)
}

/**
 * Calls `emit` once per item reachable from `root`, children first, in the order a recursive
 * depth-first walk would finish them; iterative, so a chain of 100,000 nodes needs no stack.
 */
function walkPostOrder(root: Item, emit: (item: Item) => void): void {
  const done = new Set<Item>()
  const stack: { item: Item; expanded: boolean }[] = [{ item: root, expanded: false }]
  while (stack.length) {
    const top = stack.pop()!
    if (done.has(top.item)) continue
    if (top.expanded) {
      done.add(top.item)
      emit(top.item)
      continue
    }
    stack.push({ item: top.item, expanded: true })
    const children = childItems(top.item)
    for (let i = children.length - 1; i >= 0; i--)
      if (!done.has(children[i])) stack.push({ item: children[i], expanded: false })
  }
}

export function toWireWithNodes(root: RecipeInput): WireWithNodes {
  const nodes: WireNode[] = []
  const objects: (RecipeNode | undefined)[] = []
  const ids = new Map<Item, number>()

  const scalar = (v: Scalar): WireValue => {
    if (v instanceof Int) return { int: v.value }
    // JSON has no infinities, NaN or negative zero.
    if (typeof v === 'number' && !Number.isFinite(v)) return { float: Number.isNaN(v) ? 'nan' : v > 0 ? 'inf' : '-inf' }
    if (Object.is(v, -0)) return { float: '-0.0' }
    if (typeof v === 'number' || typeof v === 'boolean' || typeof v === 'string' || v === null) return v
    throw new TypeError(`unsupported recipe value: ${String(v)}`)
  }
  // Children are emitted before their parents, so their ids are known here.
  const ref = (item: Item): WireValue => ({ node: ids.get(item)! })
  const dict = (d: LiteralDict): Record<string, WireValue> =>
    Object.fromEntries(Object.entries(d).map(([k, v]) => [k, v instanceof RecipeNode ? ref(v) : scalar(v)]))
  const value = (v: RecipeInput): WireValue => (v instanceof RecipeNode || isDict(v) ? ref(v) : scalar(v))
  const wireOf = (item: Item): WireNode => {
    if (item instanceof ModelNode) return { model: item.path, config: item.config, mergeSpace: item.mergeSpace }
    if (item instanceof StateDictNode)
      return { model: item.label, memory: item.id, config: item.config, mergeSpace: item.mergeSpace }
    if (item instanceof LiteralNode)
      return {
        literal: isDict(item.value) ? { dict: dict(item.value) } : scalar(item.value),
        config: item.config,
        mergeSpace: item.mergeSpace,
      }
    if (item instanceof MergeNode) {
      const kwargs = Object.fromEntries(Object.entries(item.kwargs).map(([k, v]) => [k, value(v)]))
      return { merge: item.method, args: item.args.map(value), kwargs }
    }
    if (item instanceof RecipeNode) throw new TypeError('unknown recipe node')
    return { literal: { dict: dict(item) } }
  }

  const top = root instanceof RecipeNode ? root : literal(isDict(root) ? root : (root as Scalar))
  walkPostOrder(top, (item) => {
    ids.set(item, nodes.push(wireOf(item)) - 1)
    objects.push(item instanceof RecipeNode ? item : undefined)
  })
  return { wire: { nodes, root: ids.get(top)! }, objects }
}

/** Rebuilds node objects from the JSON form (as `deserialize` returns it). */
export function fromWire(wire: WireRecipe): RecipeNode {
  const built: RecipeNode[] = []
  const value = (v: WireValue): Scalar | RecipeNode => {
    if (v === null || typeof v !== 'object') return v
    if ('node' in v) return built[v.node]
    if ('int' in v) return new Int(v.int)
    return v.float === 'inf' ? Infinity : v.float === '-inf' ? -Infinity : Number(v.float)
  }
  for (const n of wire.nodes) {
    if ('model' in n) {
      built.push(new ModelNode(n.model, n.config, (n.mergeSpace ?? 'weight') as MergeSpace))
    } else if ('literal' in n) {
      const v = n.literal
      const dict: LiteralDict | Scalar =
        v !== null && typeof v === 'object' && 'dict' in v
          ? Object.fromEntries(Object.entries(v.dict).map(([k, x]) => [k, value(x)]))
          : (value(v) as Scalar)
      built.push(new LiteralNode(dict, n.config, n.mergeSpace as MergeSpace | undefined))
    } else {
      const kwargs = Object.fromEntries(Object.entries(n.kwargs).map(([k, x]) => [k, value(x)]))
      built.push(new MergeNode(n.merge, n.args.map(value), kwargs))
    }
  }
  return built[wire.root]
}
