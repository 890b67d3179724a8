/** `convert()`: changes a recipe's model config through registered conversions. */
import native = require('./native')
import { native as callNative } from './errors'
import { callMethod, RecipeNode, toWire, type RecipeInput } from './recipe'

/**
 * Converts `recipe` to a config (an id, or the config of another recipe node) by the shortest
 * chain of conversions, e.g. per-block values to per-key values:
 * `convert({ BASE: 0, IN00: 0.5, … }, model('sd15.safetensors'))`.
 */
export function convert(recipe: RecipeInput, config: string | RecipeNode): RecipeInput {
  const path = callNative(() =>
    native.conversionPath(
      JSON.stringify(toWire(recipe)),
      typeof config === 'string' ? config : null,
      config instanceof RecipeNode ? JSON.stringify(toWire(config)) : null,
    ),
  )
  return path.reduce<RecipeInput>((node, id) => callMethod(id, [node], {}), recipe)
}
