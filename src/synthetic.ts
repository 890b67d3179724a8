/** Models with real key layouts and random values, for demos, benchmarks and tests. */
import native = require('./native')
import { native as callNative } from './errors'

/** A tensor to write with `writeRandomModel`, as `modelLayout` lists them. */
export interface TensorSpec {
  /** The tensor's key. */
  name: string
  /** safetensors or torch dtype name. */
  dtype: string
  /** Its dimensions. */
  shape: number[]
}

/**
 * - `sd1`: an SD 1.5 checkpoint (CLIP-L, VAE, UNet from the `sd1-ldm` config), fp16, 2.1 GB.
 * - `sdxl`: an SDXL checkpoint (the required keys of `sdxl-sgm`), fp16, 6.9 GB.
 * - `small`: the `sd1` keys with every dimension but the last divided by 8 (about 110 MB).
 */
export type LayoutName = 'small' | 'sd1' | 'sdxl'

const sources: Record<LayoutName, { config: string; components: string[] }> = {
  small: { config: 'sd1-ldm', components: ['clip_l', 'vae', 'diffuser'] },
  sd1: { config: 'sd1-ldm', components: ['clip_l', 'vae', 'diffuser'] },
  sdxl: { config: 'sdxl-sgm', components: ['clip_l', 'clip_g', 'vae', 'diffuser'] },
}

/** The tensors of a layout: real key names and shapes, floats as fp16, integer buffers kept. */
export function modelLayout(name: LayoutName): TensorSpec[] {
  const source = sources[name]
  if (!source) throw new TypeError(`unknown layout "${name}"; use small, sd1 or sdxl`)
  return callNative(() => native.configKeys(source.config))
    .filter((k) => source.components.includes(k.component) && (!k.optional || k.key.endsWith('position_ids')))
    .map((k) => {
      const shape = (k.shape ?? []).map((d, i, all) => (name === 'small' && i < all.length - 1 ? Math.ceil(d / 8) : d))
      const integer = k.dtype !== null && k.dtype !== undefined && /^[IU]/.test(k.dtype)
      return { name: k.key, dtype: integer ? (k.dtype as string) : 'F16', shape }
    })
}

/** Writes a safetensors file with these tensors, filled with deterministic random values. */
export async function writeRandomModel(path: string, tensors: TensorSpec[] | LayoutName, seed = 0): Promise<void> {
  const specs = typeof tensors === 'string' ? modelLayout(tensors) : tensors
  await native.writeRandomModel(path, specs, seed)
}
