/** Model configs (sd-mecha's key tables) and the folders searched for models. */
import native = require('./native')
import { native as callNative } from './errors'
import type { SafetensorsDtype } from './dtypes'

/** One key of a model config, with its metadata (sd-mecha's `KeyMetadata`). */
export interface ConfigKey {
  /** The key's canonical name, as written to outputs. */
  key: string
  /** The component it belongs to, e.g. `'diffuser'`, `'vae'`, `'clip_l'`. */
  component: string
  /** `null` when the config does not fix it. */
  shape: number[] | null
  /** The safetensors dtype the config gives it; `null` when the config does not fix it. */
  dtype: SafetensorsDtype | null
  /** Whether models may lack the key (sd-mecha's `optional`): `strictMandatoryKeys` does not require it. */
  optional: boolean
  /** Other names the key has in files; an input's key found under one is read as this key. */
  aliases: string[]
}

/** A model config as `configs.list()` describes it. */
export interface ConfigInfo {
  /** The config id (sd-mecha's `identifier`), e.g. `'sdxl-sgm'`. */
  id: string
  /** The part of the id before the first `-`, e.g. `'sdxl'`. */
  architecture: string
  /** The part of the id after the first `-`, e.g. `'sgm'` (empty when there is none). */
  implementation: string
  /** Component name → number of keys. */
  components: Record<string, number>
  /** Number of keys in the config, all components together. */
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

/** The model configs (sd-mecha's `extensions.model_configs` registry): list, look up and register them. */
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
  /** The names of a config's components, in config order. */
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

/**
 * Folders searched, in order, for models given by a relative path (then the current directory), as
 * sd-mecha's `model_dirs`. Process-wide.
 */
export const modelDirs = {
  /** Adds a folder, searched after those added before (sd-mecha's `model_dirs.add_path`); adding one twice keeps one. */
  add: (path: string): void => native.modelDirsAdd(path),
  /** The folders searched, in order (sd-mecha's `model_dirs.get_all`). */
  list: (): string[] => native.modelDirsList(),
  /** Removes every folder, so relative paths are read from the current directory only. */
  clear: (): void => native.modelDirsClear(),
}
