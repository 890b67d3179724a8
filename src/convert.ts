/** `convert()`: changes a recipe's model config through registered conversions. */
import native = require('./native')
import { native as callNative } from './errors'
import { callMethod, literal, RecipeNode, toWire, type RecipeInput } from './recipe'

/**
 * Converts `recipe` to a config (an id, or the config of another recipe node) by the shortest
 * chain of conversions, e.g. per-block values to per-key values:
 * `convert({ BASE: 0, IN00: 0.5, … }, model('sd15.safetensors'))`.
 */
export function convert(recipe: RecipeInput, config: string | RecipeNode): RecipeNode {
  const path = callNative(() =>
    native.conversionPath(
      JSON.stringify(toWire(recipe)),
      typeof config === 'string' ? config : null,
      config instanceof RecipeNode ? JSON.stringify(toWire(config)) : null,
    ),
  )
  // Already in that config: a value becomes the literal node it stands for.
  const start = recipe instanceof RecipeNode ? recipe : literal(recipe)
  return path.reduce<RecipeNode>((node, id) => callMethod(id, [node], {}), start)
}
