/** The `.mecha` text format (version 0.1.0), shared with the Python sd-mecha. */
import native = require('./native')
import { native as callNative } from './errors'
import { fromWire, toWire, type MergeSpace, type RecipeInput, type RecipeNode } from './recipe'

/** Options of `serialize()`. */
export interface SerializeOptions {
  /**
   * The merge space the recipe's result must be in. By default none is required (as in sd-mecha's
   * `serialize`), but an ambiguous result is an error; `null` accepts any, preferring weight.
   */
  strictMergeSpace?: MergeSpace | null
}

/**
 * The recipe as `.mecha` text, finalized like sd-mecha does it: model headers are read to infer
 * configs, merge spaces are solved, defaults written out, model paths made absolute.
 */
export function serialize(recipe: RecipeInput, options: SerializeOptions = {}): string {
  const strict = options.strictMergeSpace === null ? 'any' : (options.strictMergeSpace ?? 'free')
  return callNative(() => native.serialize(JSON.stringify(toWire(recipe)), strict))
}

/** Reads `.mecha` text (as written by sd-mecha or `serialize`). Throws `ParseError` naming the line. */
export function deserialize(text: string): RecipeNode {
  return fromWire(JSON.parse(callNative(() => native.deserialize(text))))
}
