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
export { merge, MergeCache, MergedModel } from './merge'
export type { ChosenSeed, EmbedRecipe, MergeOptions, MergeReport, Progress, SkippedKey } from './merge'
export { serialize, deserialize } from './serialize'
export { plan } from './plan'
export { convert } from './convert'
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
  ParamType,
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

export type MethodInfo = ReturnType<typeof native.methods>[number]

/** Introspection of the merge-method registry (e.g. to generate a node-based UI). */
export const methods = {
  /** Every method: id, inputs (type, merge space, config, varargs), hyper-parameters with defaults, return space. */
  list: (): MethodInfo[] => native.methods(),
  get: (id: string): MethodInfo | undefined => native.methods().find((m) => m.id === id),
}
