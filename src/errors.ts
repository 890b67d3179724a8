/** Typed errors. Every error names the file, key or recipe node involved and says what to do. */

export interface ErrorDetails {
  /** Safetensors file involved, when there is one. */
  file?: string
  /** State-dict key being computed, when there is one. */
  key?: string
  /** Recipe nodes from the root down to the failing one, e.g. `weighted_sum > b: model "x"`. */
  node?: string
  /** 1-based position in `.mecha` text, for parse errors. */
  line?: number
  column?: number
}

export class MechaError extends Error implements ErrorDetails {
  file?: string
  key?: string
  node?: string
  line?: number
  column?: number

  constructor(message: string, details: ErrorDetails = {}, options?: { cause?: unknown }) {
    super(message, options)
    this.name = new.target.name
    Object.assign(this, details)
  }
}

/** A safetensors file is missing, truncated or has an invalid header. */
export class SafetensorsError extends MechaError {}
/** The recipe is malformed: unknown method, wrong arity, bad reference, bad value. */
export class RecipeError extends MechaError {}
/** Merge-space constraints cannot be satisfied (e.g. adding a weight where a delta is needed). */
export class MergeSpaceError extends MechaError {}
/** A model config is unknown, or config constraints conflict. */
export class ConfigError extends MechaError {}
/** Inputs disagree on a tensor's shape, or a method cannot handle a dtype. */
export class ShapeError extends MechaError {}
/** The output path is unusable (it is an input, its folder is missing, ...). */
export class OutputError extends MechaError {}
/** Reading or writing failed at the operating-system level. */
export class IoError extends MechaError {}
/** `.mecha` text could not be parsed. */
export class ParseError extends MechaError {}
/** The merge was cancelled through its `AbortSignal`. */
export class AbortError extends MechaError {}
/** An option passed to `merge()`, `plan()` or the CLI is unknown or has a value it cannot take. */
export class OptionError extends MechaError {}
/** A bug in this package: the native engine panicked. Reported instead of crashing the process. */
export class InternalError extends MechaError {}

const classes = {
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
} as const

/** What the native layer reports about an error. */
export interface NativeErrorInfo extends ErrorDetails {
  kind: string
  message: string
}

export function errorFromNative(info: NativeErrorInfo): MechaError {
  const Class = (classes as Record<string, typeof MechaError>)[info.kind] ?? MechaError
  const details: ErrorDetails = {}
  for (const k of ['file', 'key', 'node', 'line', 'column'] as const) {
    if (info[k] !== undefined && info[k] !== null) (details as Record<string, unknown>)[k] = info[k]
  }
  return new Class(info.message, details)
}

/** Runs a native call, turning the errors it throws into typed errors. */
export function native<T>(call: () => T): T {
  try {
    return call()
  } catch (e) {
    const info = (e as { mecha?: NativeErrorInfo } | null)?.mecha
    if (info) throw errorFromNative(info)
    throw e
  }
}
