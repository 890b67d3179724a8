/** Model configs (sd-mecha's key tables) and the folders searched for models. */
import native = require('./native')
import { native as callNative } from './errors'
import type { SafetensorsDtype } from './dtypes'

export interface ConfigKey {
  key: string
  component: string
  /** `null` when the config does not fix it. */
  shape: number[] | null
  dtype: SafetensorsDtype | null
  optional: boolean
  aliases: string[]
}

export interface ConfigInfo {
  id: string
  architecture: string
  implementation: string
  /** Component name → number of keys. */
  components: Record<string, number>
  keyCount: number
}

/** A config written as sd-mecha's YAML files are, as an object. */
export interface ConfigDefinition {
  identifier: string
  components: Record<
    string,
    Record<string, { shape?: number[] | null; dtype?: string | null; aliases?: string[]; optional?: boolean }>
  >
}

export const configs = {
  /** Every config, builtin (with the derived LoRA/LyCORIS ones) and registered, in sd-mecha's order. */
  list: (): ConfigInfo[] => native.configList(),
  /** The keys of a config, in order, with their component and metadata. */
  keys: (id: string): ConfigKey[] =>
    callNative(() => native.configKeys(id)).map((k) => ({
      ...k,
      shape: k.shape ?? null,
      dtype: (k.dtype ?? null) as SafetensorsDtype | null,
    })),
  /** A config's keys grouped by component. */
  get(id: string): { id: string; components: Record<string, ConfigKey[]> } {
    const components: Record<string, ConfigKey[]> = {}
    for (const k of configs.keys(id)) (components[k.component] ??= []).push(k)
    return { id, components }
  },
  components: (id: string): string[] => Object.keys(configs.get(id).components),
  /**
   * Registers a config from sd-mecha YAML text or an object of the same shape. Returns its id
   * (`options.id` overrides the `identifier` field, as sd-mecha uses file names).
   */
  register(definition: string | ConfigDefinition, options: { id?: string } = {}): string {
    const text = typeof definition === 'string' ? definition : JSON.stringify(definition)
    return callNative(() => native.configRegister(text, options.id))
  },
}

/** Folders searched, in order, for models given by a relative path (then the current directory). */
export const modelDirs = {
  add: (path: string): void => native.modelDirsAdd(path),
  list: (): string[] => native.modelDirsList(),
  clear: (): void => native.modelDirsClear(),
}
