import native = require('./native')
import { errorFromNative, native as callNative, OptionError } from './errors'
import { parseBytes } from './merge'

/** Options of {@link verify}. */
export interface VerifyOptions {
  /** Worker threads (default: one per CPU; the result does not depend on it). */
  threads?: number
  /** Working memory budget, bytes or a size such as `'2G'` (default: as a merge). */
  memoryBudget?: number | string
}

/** One input of the recorded merge, as recorded and as found now. */
export interface InputCheck {
  /** The model path as the recipe gives it (relative paths resolve as in a merge). */
  model: string
  /** The file it resolves to now, when the recipe reads it. */
  path?: string
  /** The content hash the merge recorded (`mecha_inputs`), if it recorded this input. */
  recorded?: string
  /** The content hash of the file found now, if the recipe reads it. */
  found?: string
  /** Both hashes are there and equal. */
  matches: boolean
}

/** What {@link verify} found. */
export interface VerifyReport {
  /** Every tensor has the same bytes, and every recorded input hash matches. */
  reproducible: boolean
  /** Why not, one sentence per reason (e.g. which input changed); empty when reproducible. */
  problems: string[]
  /** Each input, as the merge recorded it and as found now. */
  inputs: InputCheck[]
  /** Tensors the replayed merge produced and compared. */
  keysCompared: number
  /** Keys whose bytes, dtype or shape differ from the file's (or that it lacks). */
  differingKeys: string[]
  /** Keys of the file that the recipe does not produce now. */
  missingKeys: string[]
  /** The engine that wrote the file (`mecha_engine`), if recorded. */
  recordedEngine?: string
  /** This engine. */
  engine: string
  /** The recipe replayed (the file's `mecha_recipe`). */
  recipe: string
  /** Wall-clock duration of the replay, in seconds. */
  seconds: number
}

/**
 * Merges again the recipe a merged file records (`mecha_recipe`, with its seeds, and the options
 * in `mecha_options`) from the inputs found now, and compares every tensor with the file's
 * instead of writing one. The inputs' content hashes, computed while reading, are compared with
 * those in `mecha_inputs`, so an input that changed is named even where its change does not
 * reach the output. Relative model paths resolve as in a merge (the current directory, then
 * `modelDirs`).
 */
export async function verify(path: string, options: VerifyOptions = {}): Promise<VerifyReport> {
  if (typeof path !== 'string') throw new OptionError(`verify: the path must be a string, got ${typeof path}`)
  for (const name of Object.keys(options))
    if (name !== 'threads' && name !== 'memoryBudget')
      throw new OptionError(`verify has no option "${name}"; it takes threads and memoryBudget`)
  const outcome = await callNative(() =>
    native.verify(path, {
      threads: options.threads,
      memoryBudget: options.memoryBudget === undefined ? undefined : parseBytes(options.memoryBudget, 'memoryBudget'),
    }),
  )
  if (outcome.error) throw errorFromNative(outcome.error)
  const report = outcome.report as VerifyReport
  for (const input of report.inputs)
    for (const k of ['path', 'recorded', 'found'] as const) if (input[k] == null) delete input[k]
  if (report.recordedEngine == null) delete report.recordedEngine
  return report
}
