/**
 * Merge methods written in JavaScript. A defined method takes part in recipes, merge-space and
 * config inference, `.mecha` text and `methods.list()` like a builtin; its function runs on the
 * JavaScript thread while the engine keeps working on other keys.
 */
import native = require('./native')
import { native as callNative } from './errors'
import { callMethod, Int, RecipeNode, type MergeNode, type MergeSpace, type RecipeInput, type Scalar } from './recipe'
import { noteCallbackError, runningNode } from './merge'
import { configs } from './configs'

export type ParamType = 'Tensor' | 'float' | 'int' | 'bool' | 'str' | 'T'

export interface MethodInput {
  name: string
  /** Default `'Tensor'`. `'T'` accepts whatever the argument produces. */
  type?: ParamType
  /**
   * Allowed merge spaces. Default: inputs without a default share the result's space (the method's
   * merge-space variable); hyper-parameters (with a default, or not tensors) are `'param'`.
   */
  mergeSpace?: MergeSpace | MergeSpace[]
  /** The model config this input must have (as for conversions). */
  config?: string
  /** Takes any number of arguments (`*models`); passed to the builder as an array. */
  varargs?: boolean
  /** Written `name=` in `.mecha` text (parameters after varargs always are). */
  keywordOnly?: boolean
  /** A default makes the parameter optional; use `int(n)` for an integer default. */
  default?: Scalar
  /** The method reads other keys of this input (conversions). */
  stateDict?: boolean
}

export interface MethodContext {
  /** The key being computed. */
  key: string
  /** Shape of the whole output tensor. */
  shape: number[]
  /** For elementwise methods, the chunk computed: elements `offset … offset + length - 1`. */
  offset: number
  length: number
  /** This node's cache (from `cacheFactory`), kept across merges of the same node object. */
  cache: unknown
  /**
   * Each input's shape (an array of shapes for varargs). Inputs keep their own shapes: a
   * conversion's inputs need not have the output's shape.
   */
  shapes: Record<string, number[] | number[][] | undefined>
}

export type MethodValue = Float32Array | number | boolean | string | null | MethodValue[]

export interface MergeMethodDefinition {
  /** sd-mecha-style id, e.g. `noise_sum`. */
  id: string
  description?: string
  inputs: MethodInput[]
  returns?: { type?: ParamType; mergeSpace?: MergeSpace; config?: string }
  /** The function only combines elements at the same position: it is called per chunk. */
  elementwise?: boolean
  /** A conversion from the first input's config to `returns.config` (used by `convert`). */
  isConversion?: boolean
  /** For each key of `returns.config`, the keys of the first input it is computed from. */
  mapKeys?: (outputKey: string) => string | string[] | null | undefined
  cacheFactory?: () => unknown
  /**
   * Computes one key (or chunk). Tensors arrive as `Float32Array`s (a broadcast value as a
   * number); return `length` values, or a number to fill them. A method whose `returns.type` is
   * `'int'`, `'float'` or `'str'` returns that value (a number or a string).
   */
  fn: (args: Record<string, MethodValue>, context: MethodContext) => Float32Array | number | string
}

/** Builds a node of the method: required inputs positionally (varargs as an array), then options. */
export type MethodBuilder = (...args: unknown[]) => MergeNode

const caches = new WeakMap<RecipeNode, unknown>()

function isOptions(v: unknown): v is Record<string, RecipeInput | undefined> {
  return typeof v === 'object' && v !== null && !(v instanceof RecipeNode) && !(v instanceof Int) && !Array.isArray(v)
}

export function defineMergeMethod(def: MergeMethodDefinition): MethodBuilder {
  let afterVarargs = false
  const params = def.inputs.map((p) => {
    const type = p.type ?? 'Tensor'
    const hasDefault = 'default' in p
    const keyword = p.keywordOnly || afterVarargs
    if (p.varargs) afterVarargs = true
    const tensorLike = type === 'Tensor' || type === 'T'
    const spaces = p.mergeSpace === undefined ? undefined : ([] as MergeSpace[]).concat(p.mergeSpace)
    return {
      name: p.name,
      type,
      stateDict: p.stateDict ?? false,
      mergeSpace: spaces ?? (hasDefault || !tensorLike ? ['param'] : undefined),
      modelConfig: p.config,
      kind: p.varargs ? 'varargs' : keyword ? 'keyword' : 'positional',
      hasDefault,
      default: p.default instanceof Int ? p.default.value : p.default,
      defaultIsInt: p.default instanceof Int,
    }
  })
  let routes: Record<string, string[]> | undefined
  if (def.mapKeys) {
    const target = def.returns?.config
    if (!target) throw new TypeError(`${def.id}: mapKeys needs returns.config, whose keys it maps`)
    routes = {}
    for (const { key } of configs.keys(target)) {
      const from = def.mapKeys(key)
      if (from !== null && from !== undefined) routes[key] = ([] as string[]).concat(from)
    }
  }
  const convert = (value: native.JsMethodArg, type: string): MethodValue => {
    if (value.items) return value.items.map((item) => convert(item, type))
    if (value.tensor) return value.tensor
    if (value.isNull) return null
    if (value.text !== undefined && value.text !== null) return value.text
    if (value.boolean !== undefined && value.boolean !== null) return value.boolean
    const n = value.number as number
    return type === 'bool' ? n !== 0 : type === 'int' ? Math.trunc(n) : n
  }
  const shapeOf = (value: native.JsMethodArg): number[] | number[][] | undefined =>
    value.items ? value.items.map((item) => item.shape ?? []) : (value.shape ?? undefined)
  callNative(() =>
    native.registerMethod(
      {
        id: def.id,
        description: def.description ?? '',
        params,
        returnType: def.returns?.type ?? 'Tensor',
        returnMergeSpace: def.returns?.mergeSpace,
        returnModelConfig: def.returns?.config,
        elementwise: def.elementwise ?? false,
        isConversion: def.isConversion ?? false,
        routes,
      },
      (call) => {
        const args: Record<string, MethodValue> = {}
        const shapes: Record<string, number[] | number[][] | undefined> = {}
        params.forEach((p, i) => {
          args[p.name] = convert(call.args[i], p.type)
          shapes[p.name] = shapeOf(call.args[i])
        })
        const node = call.node === undefined || call.node === null ? undefined : runningNode(call.context, call.node)
        let cache: unknown
        if (def.cacheFactory && node) {
          if (!caches.has(node)) caches.set(node, def.cacheFactory())
          cache = caches.get(node)
        }
        try {
          return def.fn(args, {
            key: call.key,
            shape: call.shape,
            offset: call.offset,
            length: call.length,
            cache,
            shapes,
          })
        } catch (error) {
          // The merge fails with a RecipeError naming the method and key; this becomes its cause.
          noteCallbackError(call.context, error)
          throw error
        }
      },
    ),
  )

  const required = params.filter((p) => p.kind === 'positional' && !p.hasDefault)
  const varargs = params.find((p) => p.kind === 'varargs')
  return (...args: unknown[]) => {
    const positional = args.slice(0, required.length) as RecipeInput[]
    const rest = args.slice(required.length)
    const many = varargs ? ((rest.shift() ?? []) as RecipeInput[]) : []
    const options = rest.length && isOptions(rest[rest.length - 1]) ? rest.pop() : {}
    if (rest.length) throw new TypeError(`${def.id}: too many arguments`)
    return callMethod(def.id, [...positional, ...many], options as Record<string, RecipeInput | undefined>)
  }
}
