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

/**
 * The type of a method's input or result, as sd-mecha annotates them (`Parameter(Tensor)`,
 * `Parameter(float)`, …); `'T'` is a type variable that accepts whatever the argument produces.
 */
export type ParamType = 'Tensor' | 'float' | 'int' | 'bool' | 'str' | 'T'

/** One declared input of a JavaScript merge method (sd-mecha's `Parameter(...)` annotation). */
export interface MethodInput {
  /** The parameter's name, as in `.mecha` text and the builder's options (e.g. `alpha`). */
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

/** What `fn` receives besides its arguments: the key, shapes, the chunk and the node's cache. */
export interface MethodContext<Cache = unknown> {
  /** The key being computed. */
  key: string
  /** Shape of the whole output tensor. */
  shape: number[]
  /** For elementwise methods, the chunk computed: elements `offset … offset + length - 1`. */
  offset: number
  /** Number of elements computed: the chunk's for elementwise methods, else the whole key's. */
  length: number
  /** This node's cache (from `cacheFactory`), kept across merges of the same node object. */
  cache: Cache
  /**
   * Each input's shape (an array of shapes for varargs). Inputs keep their own shapes: a
   * conversion's inputs need not have the output's shape.
   */
  shapes: Record<string, number[] | number[][] | undefined>
}

/** Any value an argument of `fn` can be: a tensor, a number, a boolean, a string, `null`, or an array of them (varargs). */
export type MethodValue = Float32Array | number | boolean | string | null | MethodValue[]

/**
 * What a parameter of type `T` arrives as in `fn`: a number for `'int'` and `'float'`, a boolean,
 * a string, any `MethodValue` for `'T'`, and a `Float32Array` for `'Tensor'` (the default).
 */
export type ValueOf<T extends ParamType | undefined> = T extends 'int' | 'float'
  ? number
  : T extends 'bool'
    ? boolean
    : T extends 'str'
      ? string
      : T extends 'T'
        ? MethodValue
        : Float32Array

/**
 * What one declared input arrives as in `fn`: varargs as an array; a `stateDict` input as one
 * tensor or, when `mapKeys` gives several source keys, an array of them; `null` when that is the
 * default.
 */
export type MethodArg<I extends MethodInput> = I extends { varargs: true }
  ? ValueOf<I['type']>[]
  : I extends { stateDict: true }
    ? ValueOf<I['type']> | ValueOf<I['type']>[]
    : ValueOf<I['type']> | (I extends { default: null } ? null : never)

/** The `args` object `fn` receives, one entry per declared input. */
export type MethodArgs<Inputs extends readonly MethodInput[]> = {
  [I in Inputs[number] as I['name']]: MethodArg<I>
}

/** What `fn` returns for a method whose result has type `T`. */
export type MethodResult<T extends ParamType | undefined> = T extends 'int' | 'float'
  ? number
  : T extends 'str'
    ? string
    : T extends 'bool'
      ? number
      : T extends 'T'
        ? Float32Array | number | string
        : Float32Array | number

/** The return declaration of a method. */
export interface MethodReturns<T extends ParamType = ParamType> {
  /** The result's type (default `'Tensor'`). */
  type?: T
  /** The result's merge space; by default the space its inputs share (the method's merge-space variable). */
  mergeSpace?: MergeSpace
  /** The result's model config (a conversion's target); by default inferred together with its inputs'. */
  config?: string
}

/**
 * A merge method written in JavaScript, for `defineMergeMethod` (sd-mecha's `@merge_method`
 * decorator): its id, declared inputs and result, and the function computing a key.
 */
export interface MergeMethodDefinition<
  Inputs extends readonly MethodInput[] = readonly MethodInput[],
  Returns extends ParamType = ParamType,
  Cache = unknown,
> {
  /** sd-mecha-style id, e.g. `noise_sum`. */
  id: string
  /** A one-line summary, listed by `methods.list()`. */
  description?: string
  /** The parameters, in sd-mecha's order: positional ones, varargs, then keyword-only ones. */
  inputs: Inputs
  /** The result's type, merge space and config (default: a tensor in the inputs' shared space). */
  returns?: MethodReturns<Returns>
  /** The function only combines elements at the same position: it is called per chunk. */
  elementwise?: boolean
  /** A conversion from the first input's config to `returns.config` (used by `convert`). */
  isConversion?: boolean
  /**
   * The id of an interface (such as `exchange_ema`, `rebasin` or `extract_kohya_lora`) this
   * method implements: calls of the interface whose inputs have the configs given here (at
   * least one input declares `config`) run this method. The parameters must be the
   * interface's (names, kinds, types, defaults). Registration fails otherwise.
   */
  implements?: string
  /** For each key of `returns.config`, the keys of the first input it is computed from. */
  mapKeys?: (outputKey: string) => string | string[] | null | undefined
  /** Makes the per-node cache `fn` finds in `context.cache`, once per node object (sd-mecha's `cache=` dict). */
  cacheFactory?: () => Cache
  /**
   * Computes one key (or chunk). Tensor inputs arrive as `Float32Array`s (a number given for a
   * tensor input arrives filled to the chunk's or key's size); return `length` values, or a
   * number to fill them. A method whose `returns.type` is `'int'`, `'float'` or `'str'` returns
   * that value (a number or a string).
   */
  fn: (args: MethodArgs<Inputs>, context: MethodContext<Cache>) => MethodResult<Returns>
}

/**
 * The builder's positional parameters for the declared inputs: the required ones (no default,
 * not keyword-only) as recipe inputs, then the varargs array.
 */
export type PositionalArgs<Inputs extends readonly MethodInput[]> = Inputs extends readonly [
  infer First extends MethodInput,
  ...infer Rest extends readonly MethodInput[],
]
  ? First extends { varargs: true }
    ? [RecipeInput[]]
    : First extends { keywordOnly: true } | { default: unknown }
      ? PositionalArgs<Rest>
      : [RecipeInput, ...PositionalArgs<Rest>]
  : []

/**
 * The names of the inputs the builder takes in its options object: those with a default, the
 * keyword-only ones and those after varargs.
 */
export type OptionNames<Inputs extends readonly MethodInput[], AfterVarargs = false> = Inputs extends readonly [
  infer First extends MethodInput,
  ...infer Rest extends readonly MethodInput[],
]
  ? First extends { varargs: true }
    ? OptionNames<Rest, true>
    : | (AfterVarargs extends true
          ? First['name']
          : First extends { default: unknown }
            ? First['name']
            : First extends { keywordOnly: true }
              ? First['name']
              : never)
      | OptionNames<Rest, AfterVarargs>
  : never

/**
 * Builds a node of the method: required inputs positionally (varargs as an array), then an
 * options object with the other inputs.
 */
export type MethodBuilder<Inputs extends readonly MethodInput[] = readonly MethodInput[]> = [
  OptionNames<Inputs>,
] extends [never]
  ? (...args: PositionalArgs<Inputs>) => MergeNode
  : (...args: [...PositionalArgs<Inputs>, options?: { [Name in OptionNames<Inputs>]?: RecipeInput }]) => MergeNode

const caches = new WeakMap<RecipeNode, unknown>()

function isOptions(v: unknown): v is Record<string, RecipeInput | undefined> {
  return typeof v === 'object' && v !== null && !(v instanceof RecipeNode) && !(v instanceof Int) && !Array.isArray(v)
}

/**
 * Registers a merge method written in JavaScript and returns its builder. Declare `inputs` inline
 * (or `as const`): the builder's parameters and the types `fn` receives follow from them.
 */
export function defineMergeMethod<
  const Inputs extends readonly MethodInput[],
  Returns extends ParamType = 'Tensor',
  Cache = unknown,
>(def: MergeMethodDefinition<Inputs, Returns, Cache>): MethodBuilder<Inputs> {
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
  // `size`: how many values a number given for a tensor input is filled to (the chunk or key).
  const convert = (value: native.JsMethodArg, type: string, size: number): MethodValue => {
    if (value.items) return value.items.map((item) => convert(item, type, size))
    if (value.tensor) return value.tensor
    if (value.isNull) return null
    if (value.text !== undefined && value.text !== null) return value.text
    if (value.boolean !== undefined && value.boolean !== null) return value.boolean
    const n = value.number as number
    if (type === 'Tensor') return new Float32Array(size).fill(n)
    return type === 'bool' ? n !== 0 : type === 'int' ? Math.trunc(n) : n
  }
  const shapeOf = (value: native.JsMethodArg, filled: number[]): number[] | number[][] | undefined => {
    if (value.items) return value.items.map((item) => shapeOf(item, filled) as number[])
    if (value.shape) return value.shape
    return typeof value.number === 'number' ? filled : undefined
  }
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
        implements: def.implements,
        routes,
      },
      (call) => {
        const args: Record<string, MethodValue> = {}
        const shapes: Record<string, number[] | number[][] | undefined> = {}
        const elementwise = def.elementwise ?? false
        const size = elementwise ? call.length : call.shape.reduce((a, b) => a * b, 1)
        const filled = elementwise ? [call.length] : call.shape
        params.forEach((p, i) => {
          args[p.name] = p.type === 'Tensor' ? convert(call.args[i], p.type, size) : convert(call.args[i], p.type, 0)
          shapes[p.name] = p.type === 'Tensor' ? shapeOf(call.args[i], filled) : shapeOf(call.args[i], [])
        })
        const node = call.node === undefined || call.node === null ? undefined : runningNode(call.context, call.node)
        let cache: unknown
        if (def.cacheFactory && node) {
          if (!caches.has(node)) caches.set(node, def.cacheFactory())
          cache = caches.get(node)
        }
        // The declared inputs' types describe what `convert` made of each argument.
        const typedArgs = args as MethodArgs<Inputs>
        try {
          return def.fn(typedArgs, {
            key: call.key,
            shape: call.shape,
            offset: call.offset,
            length: call.length,
            cache: cache as Cache,
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
  const build = (...args: unknown[]): MergeNode => {
    const positional = args.slice(0, required.length) as RecipeInput[]
    const rest = args.slice(required.length)
    const many = varargs ? ((rest.shift() ?? []) as RecipeInput[]) : []
    const options = rest.length && isOptions(rest[rest.length - 1]) ? rest.pop() : {}
    if (rest.length) throw new TypeError(`${def.id}: too many arguments`)
    return callMethod(def.id, [...positional, ...many], options as Record<string, RecipeInput | undefined>)
  }
  // The conditional type cannot be checked against the implementation; `build` takes exactly
  // the arguments it describes.
  return build as MethodBuilder<Inputs>
}
