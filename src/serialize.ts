/** The `.mecha` text format (version 0.1.0), shared with the Python sd-mecha. */
import native = require('./native')
import { native as callNative } from './errors'
import { toWire, type MergeSpace, type RecipeInput } from './recipe'

export interface SerializeOptions {
  /** The merge space the recipe's result must be in (default `'weight'`); `null` accepts any. */
  strictMergeSpace?: MergeSpace | null
}

/** The recipe as `.mecha` text: merge spaces solved, defaults written out, model paths absolute. */
export function serialize(recipe: RecipeInput, options: SerializeOptions = {}): string {
  const strict = options.strictMergeSpace === null ? 'any' : options.strictMergeSpace
  return callNative(() => native.serialize(JSON.stringify(toWire(recipe)), strict))
}
