/**
 * sd-mecha for Node: merge and convert model state dicts stored as safetensors, one key at a
 * time, with sd-mecha's recipes and `.mecha` format. Recipes are built here and run natively.
 */
import * as mecha from './api'

export * from './api'
/**
 * The whole API as one object, for `import mecha from 'sd-mecha'` (then `mecha.merge(…)`,
 * `mecha.weightedSum(…)`; types too: `mecha.MergeOptions`).
 */
export default mecha
