/** Every export of the package; `index.ts` re-exports it, and exports it whole as the default. */
import native = require('./native')

export {
  model,
  literal,
  int,
  Int,
  callMethod,
  RecipeNode,
  ModelNode,
  StateDictNode,
  LiteralNode,
  MergeNode,
} from './recipe'
export type { StateDict } from './state-dict'
export type { MergeSpace, Scalar, LiteralDict, RecipeInput, NodeOptions } from './recipe'
export * from './methods.generated'
export {
  addDifference,
  addDifferenceTies,
  addDifferenceTiesExtended,
  addPerpendicular,
  addTiesWithDare,
  copyRegion,
  dropout,
  nModelStock,
  rotate,
  tensorSum,
} from './wrappers'
export type {
  AddDifferenceTiesExtendedOptions,
  AddDifferenceTiesOptions,
  AddDifferenceWrapperOptions,
  AddTiesWithDareOptions,
  CopyRegionOptions,
  DropoutWrapperOptions,
  RotateWrapperOptions,
  Seed,
  TiesExtendedOptions,
} from './wrappers'
export { merge, MergeCache, MergedModel, parseShardSize } from './merge'
export type { ChosenSeed, EmbedRecipe, InputHash, MergeOptions, MergeReport, Progress, SkippedKey } from './merge'
export { mergeMany } from './sweep'
export { iterate } from './iterate'
export type { IterateOptions, MergedTensor } from './iterate'
export type { MergeManyOptions, SweepJob } from './sweep'
export { verify } from './verify'
export type { InputCheck, VerifyOptions, VerifyReport } from './verify'
export { serialize, deserialize } from './serialize'
export { plan } from './plan'
export { convert } from './convert'
export { bakeLoras, extractLora } from './lora'
export type { ExtractLoraOptions, LoraEntry, LoraInput } from './lora'
export { configs, modelDirs } from './configs'
export type { ConfigKey, ConfigInfo, ConfigDefinition } from './configs'
export { defineMergeMethod } from './define'
export type {
  MergeMethodDefinition,
  MethodArg,
  MethodArgs,
  MethodBuilder,
  MethodContext,
  MethodInput,
  MethodResult,
  MethodReturns,
  MethodValue,
  OptionNames,
  ParamType,
  PositionalArgs,
  ValueOf,
} from './define'
export type { PlanReport } from './plan'
export type { SerializeOptions } from './serialize'
export { inspect } from './inspect'
export type { ComponentCoverage, FileInfo, TensorInfo } from './inspect'
export { toFloat32, typedArray } from './dtypes'
export { modelLayout, writeRandomModel } from './synthetic'
export type { LayoutName, TensorSpec } from './synthetic'
export type { DtypeName, SafetensorsDtype, Tensor, TensorArrays, TensorData, TensorOf } from './dtypes'
export {
  MechaError,
  SafetensorsError,
  RecipeError,
  MergeSpaceError,
  ConfigError,
  ShapeError,
  OutputError,
  IoError,
  ParseError,
  AbortError,
  InternalError,
  OptionError,
} from './errors'
export type { ErrorDetails } from './errors'

/** The merge spaces a parameter or a result may be in, as `methods.list()` describes them. */
export interface SpaceInfo {
  /** True when the method's own merge-space variable is used (shared with the return value). */
  symbol: boolean
  /** Allowed spaces (`'weight'`, `'delta'`, `'param'`). */
  spaces: Array<string>
}

/** One parameter of a merge method, as `methods.list()` describes it (sd-mecha's `Parameter(...)`). */
export interface ParamInfo {
  /** sd-mecha's name, in snake_case (the generated builders take it in camelCase). */
  name: string
  /** `Tensor`, `float`, `int`, `bool`, `str` or `T` (any). */
  type: string
  /** Whether the method reads other keys of this input (sd-mecha's `StateDict[...]`, in conversions). */
  stateDict: boolean
  /** The merge spaces the argument may be in. */
  mergeSpace: SpaceInfo
  /** The model config the argument must have, when the method fixes one (conversions). */
  modelConfig?: string
  /** `positional`, `varargs` or `keyword`. */
  kind: string
  /** Whether the parameter is optional. */
  hasDefault: boolean
  /** The default, when `hasDefault` (`null` for a random method's `seed`, which each merge then chooses). */
  default?: number | boolean | string | null | undefined
}

/** A registered merge method's signature (sd-mecha's `MergeMethod`), builtin or from `defineMergeMethod`. */
export interface MethodInfo {
  /** sd-mecha's method id, e.g. `'weighted_sum'`, as in `.mecha` text. */
  id: string
  /** A one-line summary of what it computes. */
  description: string
  /** The parameters, in signature order. */
  params: Array<ParamInfo>
  /** The result's type: `Tensor`, `float`, `int`, `bool`, `str` or `T`. */
  returnType: string
  /** The merge spaces the result may be in. */
  returnMergeSpace: SpaceInfo
  /** The model config of the result, when the method fixes one (a conversion's target). */
  returnModelConfig?: string
  /** Whether it converts between model configs (found by `convert()`); the builders leave these out. */
  isConversion: boolean
  /** Whether it combines elements at the same position only, so keys are streamed in chunks. */
  elementwise: boolean
  /**
   * Whether it is an interface (sd-mecha's `is_interface`): a call is dispatched, by the
   * configs its inputs have, to one of the methods that implement it.
   */
  isInterface: boolean
  /** The interface this method implements for its inputs' configs (e.g. `exchange_ema`). */
  implements?: string
}

/** Introspection of the merge-method registry (e.g. to generate a node-based UI). */
export const methods = {
  /** Every method: id, inputs (type, merge space, config, varargs), hyper-parameters with defaults, return space. */
  list: (): MethodInfo[] => native.methods(),
  /** The method with this sd-mecha id (e.g. `'weighted_sum'`), or `undefined` when there is none. */
  get: (id: string): MethodInfo | undefined => native.methods().find((m) => m.id === id),
}
