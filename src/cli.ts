#!/usr/bin/env node
/** The `mecha` command line. */
import { existsSync, readFileSync, writeFileSync } from 'node:fs'
import { basename, extname } from 'node:path'
import native = require('./native')
import { configs } from './configs'
import { convert } from './convert'
import { MechaError, native as callNative } from './errors'
import { inspect } from './inspect'
import { bakeLoras, extractLora, type LoraEntry } from './lora'
import { mergeWire, parseBytes, parseShardSize, type EmbedRecipe, type MergeReport, type Progress } from './merge'
import { nearest, suggestion } from './options'
import { planWire } from './plan'
import { verify } from './verify'
import { mergeManyWire, sweepValues, withParameter, type MergeManyOptions } from './sweep'
import type { DtypeName } from './dtypes'
import { model, toWireWithNodes, type MergeSpace, type RecipeNode, type WireRecipe } from './recipe'

const HELP = `mecha: merge and convert safetensors models with sd-mecha recipes

Usage:
  mecha merge <recipe.mecha|recipe.json> -o <out.safetensors> [options]
  mecha sweep <recipe> --param alpha=0.1:0.9:0.2 -o 'out-{alpha}.safetensors'
                                            one read of the inputs, one output per value
  mecha convert <in.safetensors> --to <config> -o <out.safetensors> [options]
                                            the model's keys in another config (kohya → sgm, …)
  mecha lora bake <base.safetensors> <lora.safetensors>[:alpha]... -o <out.safetensors> [options]
                                            LoRA/LyCORIS files baked into a checkpoint
  mecha lora extract <base.safetensors> <tuned.safetensors> --rank <r> -o <lora.safetensors>
                                            the difference of two models as a LoRA file
  mecha plan <recipe> [--json]              dry run: configs, spaces, keys kept/skipped, memory
  mecha serialize <recipe> [-o out.mecha]   finalized .mecha text (configs inferred, paths absolute)
  mecha info <file.safetensors> [--json] [--keys]
  mecha verify <merged.safetensors> [--json]
                                            merge the recorded recipe again and compare
  mecha help <command>                      the options of one command
  mecha --help | --version

Recipes are .mecha files (sd-mecha's format) or JSON, which lists nodes; arguments refer to
earlier nodes by index:
  {"nodes": [{"model": "a.safetensors"}, {"model": "b.safetensors"},
             {"merge": "weighted_sum", "args": [{"node": 0}, {"node": 1}], "kwargs": {"alpha": 0.3}}]}
Relative model paths are resolved against the current directory.
`

/**
 * The engine options of the commands that run a merge (or plan one); `outputDtype` is the
 * `--output-dtype` line after its name, `space` whether `--strict-merge-space` is one of them.
 */
function engineOptions(outputDtype: string, space: boolean): string {
  return [
    '  -t, --threads <n>            worker threads (default: one per CPU; the output is the same for any count)',
    '      --merge-dtype <dtype>    f32 (default), f64, f16, bf16',
    `      --output-dtype <dtype>   ${outputDtype}`,
    ...(space
      ? ['      --strict-merge-space <s> the space the result must be in: weight (default), delta, param, or any']
      : []),
    '      --memory <size>          memory budget for keys computed at once, e.g. 2G (default: 1/4 of RAM, ≤ 4G)',
  ].join('\n')
}
const DTYPE_OPTIONS = engineOptions('f16 (default), bf16, f32, f64, f8_e4m3, f8_e5m2', true)
/**
 * The options of the commands that write one model in another form (convert, lora bake), after
 * their own; `of` names the model whose float dtype the output keeps by default.
 */
function writeOptions(of: string): string {
  return [
    '  -o, --output <path>          output safetensors file (required; never one of the inputs)',
    engineOptions(
      `f16, bf16, f32, f64, f8_e4m3, f8_e5m2 (default: the ${of}'s float\n` +
        '                               dtype when all its float tensors share one, else f16)',
      false,
    ),
    SHARD_OPTION,
    '      --json                   print the report as JSON',
    '  -q, --quiet                  no progress bar',
  ].join('\n')
}

const SHARD_OPTION =
  '      --max-shard-size <size>  write a sharded checkpoint: -o names a folder of shards of at most\n' +
  '                               this size (e.g. 5GB; GB = 10^9 bytes, GiB = 2^30) and their index'

/** What `mecha help <command>` and `mecha <command> --help` print. */
const COMMAND_HELP: Record<string, string> = {
  merge: `Usage: mecha merge <recipe.mecha|recipe.json> -o <out.safetensors> [options]

Merges the recipe key by key into a safetensors file. The file appears only when the merge
completes (Ctrl-C cancels and leaves nothing behind); the recipe is stored in its metadata.

Options:
  -o, --output <path>          output safetensors file (required; never one of the inputs)
${DTYPE_OPTIONS}
      --fallback-model <path>  take the keys the recipe cannot produce from this model
      --strict-mandatory-keys  fail (writing nothing) when a key the model config does not mark
                               optional cannot be merged, instead of skipping it
      --embed-recipe <how>     the recipe stored in the output: relative (model paths as given;
                               default, as sd-mecha), absolute, or none
${SHARD_OPTION}
      --json                   print the report as JSON
  -q, --quiet                  no progress bar
`,
  sweep: `Usage: mecha sweep <recipe.mecha|recipe.json> --param <name>=<values> -o <template> [options]

Merges the recipe once for each value of a hyper-parameter, in one pass over the inputs: every
input tensor is read once for all the outputs, so a sweep costs about one merge plus the writes.
--param sets the parameter in every merge call of the recipe whose method has it (sd-mecha's
snake_case name, e.g. alpha, k, alignment); the values are start:stop:step (both ends included:
0.1:0.9:0.2 is 0.1, 0.3, 0.5, 0.7, 0.9) or a list (0.2,0.5,0.8). Given several times, every
combination is merged. The output path holds {name} for each parameter, replaced by the value.
Each output is the file \`mecha merge\` would write for its recipe, with that recipe in its
metadata; all appear when the sweep completes, or none does.

Options:
      --param <name>=<values>  the parameter and its values (required; may be repeated)
  -o, --output <template>      output path with {name} for each parameter (required)
${DTYPE_OPTIONS}
      --fallback-model <path>  take the keys the recipe cannot produce from this model
      --strict-mandatory-keys  fail (writing nothing) when a mandatory key cannot be merged
      --embed-recipe <how>     the recipe stored in each output: relative (default), absolute, none
${SHARD_OPTION}
      --json                   print the reports as JSON
  -q, --quiet                  no progress bar
`,
  plan: `Usage: mecha plan <recipe.mecha|recipe.json> [options]

Resolves the recipe without merging: the inferred model configs and merge spaces, the keys that
will be written or skipped (and why), and the working memory it will need.

Options:
${DTYPE_OPTIONS}
      --json                   print the plan as JSON
`,
  serialize: `Usage: mecha serialize <recipe.mecha|recipe.json> [-o out.mecha]

Prints the recipe as finalized .mecha text, as sd-mecha writes it: model configs inferred from
the files' headers, merge spaces solved, defaults written out, model paths absolute.

Options:
  -o, --output <path>          write the text to this file instead of printing it
      --strict-merge-space <s> the space the result must be in: weight, delta, param, or any
                               (default: any, preferring weight as merge does)
`,
  convert: `Usage: mecha convert <in.safetensors> --to <config> -o <out.safetensors> [options]

Converts a model's keys to another model config by the shortest chain of registered conversions
(sd-mecha's convert()), e.g. sdxl-kohya to sdxl-sgm, and writes the result: the text encoders'
q/k/v projections are joined into one in_proj key or split from it, text_projection transposed.
The file appears only when the conversion completes; the recipe is stored in its metadata. Keys
the target config has no place for are skipped and listed; a model already in that config is
copied.

Options:
      --to <config>            the config to convert to (required), e.g. sdxl-sgm, sdxl-kohya,
                               sd1-ldm, sd1-kohya (mecha info shows a file's config)
${writeOptions('input')}
`,
  lora: `Usage: mecha lora <subcommand> ...

LoRA and LyCORIS files in kohya's key layout (sd1-kohya, sdxl-kohya, sdxl-kohya_but_diffusers).

Subcommands:
  bake <base.safetensors> <lora.safetensors>[:alpha]... -o <out.safetensors> [options]
                               bake LoRAs into a checkpoint (mecha help lora bake)
  extract <base.safetensors> <tuned.safetensors> --rank <r> -o <lora.safetensors> [options]
                               a LoRA of tuned − base (mecha help lora extract)
`,
  'lora extract': `Usage: mecha lora extract <base.safetensors> <tuned.safetensors> -o <lora.safetensors> [options]

Writes the difference tuned − base as a LoRA file in kohya's layout (sd-mecha's
extract_kohya_lora): each layer's difference truncated to --rank by an SVD, stored as lora_up,
lora_down and alpha = rank, so \`mecha lora bake base.safetensors lora.safetensors\` gives back
tuned up to that approximation. Both models are converted to the kohya layout first (sgm, ldm and
diffusers files work); the VAE is left out. The file appears only when the extraction completes.

Options:
      --rank <r>               rank of each layer's LoRA (default 8)
      --rank-ratio <x>         instead, each layer's rank is round(min(rows, columns)·x), 0 to 1
      --algorithm <a>          lora (default: up, down, alpha) or lokr (nearest lokr_w1 ⊗ lokr_w2)
      --naming <n>             kohya (default: lora_unet_… keys) or lycoris (lycoris_unet_…)
      --layout <config>        sdxl-kohya, sdxl-kohya_but_diffusers or sd1-kohya (default: the
                               base's architecture in kohya's layout: sdxl-kohya or sd1-kohya)
      --exact                  exact SVD instead of the seeded randomised one (slower)
      --seed <n>               seed of the randomised SVD (default: chosen and reported)
      --iterations <n>         power iterations of the randomised SVD (default 2)
      --kronecker-ratio <x>    lokr: size of lokr_w1 against lokr_w2, 0 to 1 (default 0.5)
${writeOptions('base')}
`,
  'lora bake': `Usage: mecha lora bake <base.safetensors> <lora.safetensors>[:alpha]... -o <out.safetensors> [options]

Bakes LoRA or LyCORIS files into a checkpoint, as sd-mecha's lora_merge.py does: each LoRA, in
order, is converted to a difference in the base's config (alpha / rank · up @ down per layer) and
added with its alpha (default 1): out = base + alpha1·lora1 + alpha2·lora2 + …. Keys no LoRA
touches keep the base's value. The file appears only when the merge completes; the recipe is
stored in its metadata.

lora.safetensors:0.8 adds that LoRA with alpha 0.8 (negative subtracts it). Only a trailing
:<number> is an alpha, so paths holding a ':' (C:\\loras\\style.safetensors) work as they are.

Options:
${writeOptions('base')}
`,
  info: `Usage: mecha info <file.safetensors|checkpoint folder|index.json> [--json] [--keys]

Reads a safetensors header (no tensor data): tensor count, dtypes, size, transformer layers,
metadata, the recipe that made the file, and the model config sd-mecha would infer with how much
of each component is present. A sharded checkpoint (its folder or .safetensors.index.json) is read
as one model: every shard's header is checked against the index.

Options:
      --json                   print everything as JSON
      --keys                   also list every tensor with its dtype and shape
`,
  verify: `Usage: mecha verify <merged.safetensors|checkpoint folder> [options]

Merges again the recipe a merged file records (mecha_recipe, with the seeds it chose and the
options that change its bytes) from the inputs found now, and compares every tensor with the
file's; nothing is written. The inputs' content hashes, computed while reading, are compared with
those the merge recorded (mecha_inputs), and an input that changed is named. Relative model paths
resolve as in a merge, from the current directory. Exits 0 when the file is reproduced exactly,
1 when it is not.

Options:
  -t, --threads <n>            worker threads (default: one per CPU)
      --memory <size>          memory budget for keys computed at once, e.g. 2G
      --json                   print the report as JSON
`,
}

type Flags = Record<string, string | true>

/** The flags of the commands that write one model in another form (convert, lora bake). */
const writeFlags = [
  'output',
  'threads',
  'merge-dtype',
  'output-dtype',
  'memory',
  'max-shard-size',
  'json',
  'quiet',
] as const

/** The flags of the commands that merge a recipe file (merge, sweep). */
const recipeMergeFlags = [
  'output',
  'threads',
  'merge-dtype',
  'output-dtype',
  'strict-merge-space',
  'memory',
  'fallback-model',
  'strict-mandatory-keys',
  'embed-recipe',
  'max-shard-size',
  'json',
  'quiet',
] as const

/** The flags each command takes (`help` and `version` go anywhere). */
const commandFlags: Record<string, readonly string[]> = {
  merge: recipeMergeFlags,
  sweep: ['param', ...recipeMergeFlags],
  plan: ['threads', 'merge-dtype', 'output-dtype', 'strict-merge-space', 'memory', 'json'],
  serialize: ['output', 'strict-merge-space'],
  info: ['json', 'keys'],
  verify: ['threads', 'memory', 'json'],
  convert: ['to', ...writeFlags],
  'lora bake': writeFlags,
  'lora extract': [
    'rank',
    'rank-ratio',
    'algorithm',
    'naming',
    'layout',
    'exact',
    'seed',
    'iterations',
    'kronecker-ratio',
    ...writeFlags,
  ],
}
/** The positional arguments (after the command) each command takes: what they are, and how many at most. */
const commandArgs: Record<string, readonly [what: string, most: number]> = {
  merge: ['one recipe file', 1],
  sweep: ['one recipe file', 1],
  plan: ['one recipe file', 1],
  serialize: ['one recipe file', 1],
  info: ['one model (a file, or a sharded checkpoint)', 1],
  verify: ['one merged model (a file, or a sharded checkpoint)', 1],
  convert: ['one safetensors file', 1],
  'lora bake': ['a base model and LoRAs', Infinity],
  'lora extract': ['a base model and a tuned model', 2],
}
/** Commands made of subcommands (`mecha lora bake`), and theirs. */
const subcommands: Record<string, readonly string[]> = { lora: ['bake', 'extract'] }
/** The names a command line may start with. */
const commands = Object.keys(COMMAND_HELP).filter((c) => !c.includes(' '))

/** Refuses flags the command does not take and extra arguments, suggesting the closest flag. */
function checkUsage(command: string, args: string[], flags: Flags): void {
  const allowed = commandFlags[command]
  if (!allowed) return
  for (const name of Object.keys(flags)) {
    if (name === 'help' || name === 'version' || allowed.includes(name)) continue
    const near = nearest(name, allowed)
    throw new UsageError(
      `${command} has no option --${name}${near ? `; did you mean --${near}?` : `; it takes ${allowed.map((f) => `--${f}`).join(', ')}`}`,
    )
  }
  const [what, most] = commandArgs[command]
  if (args.length > most)
    throw new UsageError(`${command} takes ${what}, but was also given: ${args.slice(most).join(' ')}`)
}

/**
 * The command a command line names from its first positional argument `name` on (`lora bake` is
 * two of them), and the arguments after it. A command made of subcommands given none is itself.
 */
function resolveCommand(name: string, rest: readonly string[]): { command: string; rest: string[] } {
  const subs = subcommands[name]
  if (!subs) return { command: name, rest: [...rest] }
  const [sub, ...args] = rest
  if (sub === undefined) return { command: name, rest: [] }
  if (!subs.includes(sub))
    throw new UsageError(`${name} has no subcommand "${sub}"; ${suggestion(sub, subs)}`, COMMAND_HELP[name])
  return { command: `${name} ${sub}`, rest: args }
}

function parseArgs(argv: string[]): { positional: string[]; flags: Flags } {
  const aliases: Record<string, string> = { o: 'output', t: 'threads', q: 'quiet', h: 'help', v: 'version' }
  const valued = new Set([
    'output',
    'to',
    'threads',
    'merge-dtype',
    'output-dtype',
    'strict-merge-space',
    'memory',
    'max-shard-size',
    'fallback-model',
    'embed-recipe',
    'rank',
    'rank-ratio',
    'algorithm',
    'naming',
    'layout',
    'seed',
    'iterations',
    'kronecker-ratio',
    'param',
  ])
  const positional: string[] = []
  const flags: Flags = {}
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]
    if (!arg.startsWith('-') || arg === '-') {
      positional.push(arg)
      continue
    }
    let [name, value] = arg.replace(/^--?/, '').split(/=(.*)/s, 2) as [string, string | undefined]
    name = aliases[name] ?? name
    if (valued.has(name)) {
      value ??= argv[++i]
      if (value === undefined) throw new UsageError(`--${name} needs a value`)
      // --param may be repeated: one per line
      flags[name] = name === 'param' && typeof flags.param === 'string' ? `${flags.param}\n${value}` : value
    } else {
      flags[name] = true
    }
  }
  return { positional, flags }
}

/** A mistake on the command line: exit status 2, with `usage` (a command's usage text) when given. */
class UsageError extends Error {
  constructor(
    message: string,
    readonly usage?: string,
  ) {
    super(message)
  }
}

const GB = 1e9
const fmtBytes = (b: number) => (b >= GB ? `${(b / GB).toFixed(2)} GB` : `${(b / 1e6).toFixed(1)} MB`)

function progressBar(): (p: Progress) => void {
  return (p) => {
    const frac = p.bytesTotal ? p.bytesDone / p.bytesTotal : p.keysDone / Math.max(1, p.keysTotal)
    const width = 24
    const filled = Math.round(frac * width)
    const rate = p.elapsedSeconds > 0 ? p.bytesDone / p.elapsedSeconds : 0
    const eta = rate > 0 ? Math.max(0, (p.bytesTotal - p.bytesDone) / rate) : 0
    const line =
      `[${'#'.repeat(filled)}${'-'.repeat(width - filled)}] ${(frac * 100).toFixed(1).padStart(5)}%  ` +
      `${p.keysDone}/${p.keysTotal} keys  ${fmtBytes(p.bytesDone)}/${fmtBytes(p.bytesTotal)}  ` +
      `${fmtBytes(rate)}/s  eta ${eta.toFixed(0)}s`
    process.stderr.write(`\r${line.padEnd(process.stderr.columns ? process.stderr.columns - 1 : line.length)}`)
  }
}

function printReport(report: MergeReport) {
  const rate = report.seconds > 0 ? report.bytesWritten / report.seconds : 0
  console.log(`wrote ${report.output}`)
  console.log(
    `  ${report.keysWritten} keys, ${fmtBytes(report.bytesWritten)} in ${report.seconds.toFixed(2)} s ` +
      `(${fmtBytes(rate)}/s written, ${fmtBytes(report.bytesRead)} read), ${report.threads} threads, ` +
      `peak memory ${fmtBytes(report.peakRssBytes)}`,
  )
  if (report.nonFiniteOutputs.length) {
    console.log(
      `  warning: ${report.nonFiniteOutputs.length} keys hold NaN or infinity: ${report.nonFiniteOutputs.slice(0, 5).join(', ')}`,
    )
  }
  for (const s of report.seeds)
    console.log(`  ${s.method} drew from seed ${s.seed} (${s.param} was null; the recipe in the output records it)`)
  if (report.keysSkipped.length) {
    console.log(`  ${report.keysSkipped.length} keys skipped:`)
    for (const s of report.keysSkipped.slice(0, 20)) console.log(`    ${s.key}: ${s.reason}`)
    if (report.keysSkipped.length > 20) console.log(`    … and ${report.keysSkipped.length - 20} more (see --json)`)
  }
}

/** A recipe file in the JSON form the native layer reads. */
function readRecipe(path: string): string {
  const ext = extname(path).toLowerCase()
  let text: string
  try {
    text = readFileSync(path, 'utf8')
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code
    const why = code === 'ENOENT' ? 'no such file' : code === 'EISDIR' ? 'it is a folder' : (e as Error).message
    throw new UsageError(`cannot read recipe ${path}: ${why}`)
  }
  if (ext === '.mecha') return callNative(() => native.deserialize(text))
  if (ext === '.json') return text
  throw new UsageError(`cannot read recipe ${basename(path)}: use a .mecha or .json file`)
}

/** The wire recipe `fallback(recipe, model(path))`, as `merge()`'s `fallbackModel` builds it. */
function withFallback(wireText: string, path: string): string {
  let wire: WireRecipe
  try {
    wire = JSON.parse(wireText) as WireRecipe
  } catch {
    return wireText // the merge reports what is wrong with it
  }
  if (!Array.isArray(wire?.nodes)) return wireText
  const recipeRoot = wire.root ?? wire.nodes.length - 1 // the wire format's default root
  const modelId = wire.nodes.push({ model: path }) - 1
  const root = wire.nodes.push({ merge: 'fallback', args: [{ node: recipeRoot }, { node: modelId }], kwargs: {} }) - 1
  return JSON.stringify({ nodes: wire.nodes, root })
}

function strictSpace(flags: Flags): MergeSpace | null | undefined {
  const strict = flags['strict-merge-space'] as string | undefined
  return strict === 'any' ? null : (strict as MergeSpace | undefined)
}

function memoryFlag(flags: Flags): number | undefined {
  const value = flags.memory
  if (value === undefined) return undefined
  if (typeof value !== 'string') throw new UsageError('--memory needs a size such as 2G')
  try {
    return parseBytes(value, '--memory')
  } catch (e) {
    throw new UsageError((e as Error).message)
  }
}

/** What a command that writes a model checks before reading anything: `-o`, `--threads`, `--memory`. */
interface WriteSettings {
  output: string
  threads: number
  memoryBudget: number | undefined
  maxShardSize: number | undefined
}

function writeSettings(command: string, flags: Flags): WriteSettings {
  const output = flags.output
  if (typeof output !== 'string') throw new UsageError(`${command} needs -o <out.safetensors>`)
  const threads = flags.threads === undefined ? 0 : Number(flags.threads)
  if (!Number.isInteger(threads) || threads < 0) throw new UsageError('--threads must be a non-negative integer')
  const shard = flags['max-shard-size']
  if (shard === true) throw new UsageError('--max-shard-size needs a size, e.g. 5GB')
  let maxShardSize: number | undefined
  try {
    maxShardSize = shard === undefined ? undefined : parseShardSize(shard)
  } catch (e) {
    throw new UsageError((e as Error).message)
  }
  return { output, threads, memoryBudget: memoryFlag(flags), maxShardSize }
}

function wireOf(recipe: RecipeNode): { wire: string; objects: readonly (RecipeNode | undefined)[] } {
  const { wire, objects } = toWireWithNodes(recipe)
  return { wire: JSON.stringify(wire), objects }
}

/**
 * Merges a recipe (a recipe file's JSON form, or a node) to the output, as every command that
 * writes a model does: progress bar on a terminal, Ctrl-C cancels (nothing is left behind), the
 * report printed or as JSON. `outputDtype` is the default when `--output-dtype` is not given.
 */
async function runMerge(
  recipe: string | RecipeNode,
  settings: WriteSettings,
  flags: Flags,
  outputDtype?: DtypeName,
): Promise<number> {
  // a recipe file's JSON text as it is; a node in that form, with the node objects it came from
  const { wire, objects } = typeof recipe === 'string' ? { wire: recipe, objects: [] } : wireOf(recipe)
  return withCancel(flags, async (options) => {
    const report = (await mergeWire(
      wire,
      { ...settings, ...options, outputDtype: options.outputDtype ?? outputDtype },
      objects,
    )) as MergeReport
    return [report]
  })
}

/**
 * Runs a merge the command line started: the engine options its flags give, a progress bar on a
 * terminal, Ctrl-C cancels (nothing is left behind); prints the reports, or them as JSON (one
 * object for one report).
 */
async function withCancel(flags: Flags, run: (options: MergeManyOptions) => Promise<MergeReport[]>): Promise<number> {
  const showProgress = process.stderr.isTTY && !flags.quiet && !flags.json
  const controller = new AbortController()
  const onSigint = () => {
    if (controller.signal.aborted) process.exit(130)
    process.stderr.write('\ncancelling…\n')
    controller.abort()
  }
  process.on('SIGINT', onSigint)
  try {
    const reports = await run({
      mergeDtype: flags['merge-dtype'] as DtypeName | undefined,
      outputDtype: flags['output-dtype'] as DtypeName | undefined,
      strictMergeSpace: strictSpace(flags),
      strictMandatoryKeys: flags['strict-mandatory-keys'] === true,
      embedRecipe: flags['embed-recipe'] as EmbedRecipe | undefined,
      onProgress: showProgress ? progressBar() : undefined,
      signal: controller.signal,
    })
    if (showProgress) process.stderr.write('\n')
    if (flags.json) console.log(JSON.stringify(reports.length === 1 ? reports[0] : reports, null, 2))
    else reports.forEach(printReport)
    return 0
  } finally {
    process.off('SIGINT', onSigint)
  }
}

async function cmdMerge(positional: string[], flags: Flags): Promise<number> {
  const [recipePath] = positional
  if (!recipePath) throw new UsageError('merge needs a recipe file')
  const settings = writeSettings('merge', flags)
  const recipe = readRecipe(recipePath)
  const fallbackModel = flags['fallback-model'] as string | undefined
  return runMerge(fallbackModel ? withFallback(recipe, fallbackModel) : recipe, settings, flags)
}

/** `--param name=values` flags: each parameter and its values, in order. */
function sweepParams(flags: Flags): { name: string; values: number[] }[] {
  const given = flags.param
  if (typeof given !== 'string')
    throw new UsageError('sweep needs --param <name>=<values>, e.g. --param alpha=0.1:0.9:0.2')
  return given.split('\n').map((spec) => {
    const m = /^([A-Za-z_][A-Za-z0-9_]*)=(.+)$/.exec(spec)
    if (!m) throw new UsageError(`--param ${spec}: use <name>=<values>, e.g. alpha=0.1:0.9:0.2 or alpha=0.2,0.5`)
    try {
      return { name: m[1], values: sweepValues(m[2]) }
    } catch (e) {
      throw new UsageError(`--param ${m[1]}: ${(e as Error).message}`)
    }
  })
}

async function cmdSweep(positional: string[], flags: Flags): Promise<number> {
  const [recipePath] = positional
  if (!recipePath) throw new UsageError('sweep needs a recipe file')
  const params = sweepParams(flags)
  const settings = writeSettings('sweep', flags)
  for (const { name } of params)
    if (!settings.output.includes(`{${name}}`))
      throw new UsageError(`-o ${settings.output} must hold {${name}}, replaced by each value of --param ${name}`)
  const text = readRecipe(recipePath)
  const fallbackModel = flags['fallback-model'] as string | undefined
  const base = JSON.parse(fallbackModel ? withFallback(text, fallbackModel) : text) as WireRecipe
  // Every combination of the values, the first parameter varying slowest.
  let points: Record<string, number>[] = [{}]
  for (const { name, values } of params) points = points.flatMap((p) => values.map((v) => ({ ...p, [name]: v })))
  const jobs = points.map((point) => {
    let wire = base
    let output = settings.output
    for (const [name, value] of Object.entries(point)) {
      try {
        wire = withParameter(wire, name, value)
      } catch (e) {
        throw new UsageError(`--param ${name}: ${(e as Error).message}`)
      }
      output = output.split(`{${name}}`).join(String(value))
    }
    return { wire: JSON.stringify(wire), objects: [], output, maxShardSize: settings.maxShardSize }
  })
  return withCancel(flags, (options) =>
    mergeManyWire(jobs, { ...options, threads: settings.threads, memoryBudget: settings.memoryBudget }),
  )
}

/** The output dtypes a file's float tensors can keep, by their safetensors name. */
const keptDtypes: Readonly<Record<string, DtypeName>> = {
  F16: 'f16',
  BF16: 'bf16',
  F32: 'f32',
  F64: 'f64',
  F8_E4M3: 'f8_e4m3',
  F8_E5M2: 'f8_e5m2',
}

/**
 * The dtype a model's float tensors share, so that converting it or baking into it keeps it
 * (a kohya → sgm → kohya round trip is then byte for byte); f16, the merge default, when they
 * differ or the dtype cannot be written. Reads the header only.
 */
function floatDtypeOf(path: string): DtypeName {
  const { tensors } = callNative(() => native.inspect(path))
  const floats = new Set(tensors.map((t) => t.dtype).filter((d) => /^B?F\d/.test(d)))
  const [only] = floats
  return (floats.size === 1 && keptDtypes[only]) || 'f16'
}

async function cmdConvert(positional: string[], flags: Flags): Promise<number> {
  const [input] = positional
  if (!input) throw new UsageError('convert needs a safetensors file')
  const to = flags.to
  if (typeof to !== 'string') throw new UsageError('convert needs --to <config>, e.g. --to sdxl-sgm')
  const settings = writeSettings('convert', flags)
  const ids = configs.list().map((c) => c.id)
  if (!ids.includes(to)) throw new UsageError(`--to: unknown model config "${to}"; ${suggestion(to, ids)}`)
  const outputDtype = flags['output-dtype'] === undefined ? floatDtypeOf(input) : undefined
  return runMerge(convert(model(input), to), settings, flags, outputDtype)
}

const NUMBER = /^[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?$/i

/**
 * A LoRA argument of `lora bake`: `path` or `path:alpha`. Only a trailing `:<number>` is an
 * alpha: a drive letter (`C:\…`) or a ':' in a folder name stays part of the path, and so does
 * the tail of an existing file's name; any other tail is a mistyped alpha.
 */
function parseLoraArg(arg: string): LoraEntry {
  const colon = arg.lastIndexOf(':')
  const [path, tail] = [arg.slice(0, colon), arg.slice(colon + 1)]
  if (colon < 0 || /^[a-z]$/i.test(path) || /[/\\]/.test(tail)) return { lora: arg }
  if (path === '') throw new UsageError(`LoRA ${arg}: no path before the alpha`)
  if (NUMBER.test(tail) && Number.isFinite(Number(tail))) return { lora: path, alpha: Number(tail) }
  if (existsSync(arg)) return { lora: arg }
  throw new UsageError(`LoRA ${arg}: the alpha after ":" must be a number, got "${tail}" (and no such file exists)`)
}

async function cmdLoraBake(positional: string[], flags: Flags): Promise<number> {
  const [base, ...rest] = positional
  if (!base) throw new UsageError('lora bake needs a base model and at least one LoRA')
  if (!rest.length) throw new UsageError(`lora bake needs at least one LoRA after the base model (${base})`)
  const loras = rest.map(parseLoraArg)
  const settings = writeSettings('lora bake', flags)
  const outputDtype = flags['output-dtype'] === undefined ? floatDtypeOf(base) : undefined
  return runMerge(bakeLoras(base, loras), settings, flags, outputDtype)
}

/** An integer flag at least `least`, or undefined when absent. */
function integerFlag(flags: Flags, name: string, least: number): number | undefined {
  const value = flags[name]
  if (value === undefined) return undefined
  const n = Number(value)
  if (typeof value !== 'string' || !Number.isSafeInteger(n) || n < least)
    throw new UsageError(`--${name} must be an integer ≥ ${least}, got ${value === true ? 'nothing' : value}`)
  return n
}

async function cmdLoraExtract(positional: string[], flags: Flags): Promise<number> {
  const [base, tuned] = positional
  if (!base || !tuned) throw new UsageError('lora extract needs a base model and a tuned model')
  const settings = writeSettings('lora extract', flags)
  const choice = <T extends string>(name: string, values: readonly T[]): T | undefined => {
    const value = flags[name]
    if (value === undefined) return undefined
    if (typeof value !== 'string' || !(values as readonly string[]).includes(value))
      throw new UsageError(`--${name} must be ${values.join(' or ')}, got ${value === true ? 'nothing' : value}`)
    return value as T
  }
  const fraction = (name: string): number | undefined => {
    const value = flags[name]
    if (value === undefined) return undefined
    const n = Number(value)
    if (typeof value !== 'string' || value.trim() === '' || !(n >= 0 && n <= 1))
      throw new UsageError(`--${name} must be a number from 0 to 1, got ${value === true ? 'nothing' : value}`)
    return n
  }
  const rankRatio = fraction('rank-ratio')
  if (rankRatio !== undefined && flags.rank !== undefined) throw new UsageError('give --rank or --rank-ratio, not both')
  const kroneckerRatio = fraction('kronecker-ratio')
  const recipe = extractLora(base, tuned, {
    rank: integerFlag(flags, 'rank', 1),
    rankRatio,
    algorithm: choice('algorithm', ['lora', 'lokr'] as const),
    naming: choice('naming', ['kohya', 'lycoris'] as const),
    config: choice('layout', ['sdxl-kohya', 'sdxl-kohya_but_diffusers', 'sd1-kohya'] as const),
    approximate: flags.exact === true ? false : undefined,
    seed: integerFlag(flags, 'seed', 0),
    iterations: integerFlag(flags, 'iterations', 0),
    kroneckerRatio,
  })
  const outputDtype = flags['output-dtype'] === undefined ? floatDtypeOf(base) : undefined
  return runMerge(recipe, settings, flags, outputDtype)
}

function cmdPlan(positional: string[], flags: Flags): number {
  const [recipePath] = positional
  if (!recipePath) throw new UsageError('plan needs a recipe file')
  const threads = flags.threads === undefined ? 0 : Number(flags.threads)
  const report = planWire(readRecipe(recipePath), {
    threads,
    mergeDtype: flags['merge-dtype'] as DtypeName | undefined,
    outputDtype: flags['output-dtype'] as DtypeName | undefined,
    strictMergeSpace: strictSpace(flags),
    memoryBudget: memoryFlag(flags),
  })
  if (flags.json) {
    console.log(JSON.stringify(report, null, 2))
    return 0
  }
  console.log(`result: model config ${report.config}, merge space ${report.mergeSpace}`)
  for (const input of report.inputs) console.log(`  input ${input.path} (${input.config})`)
  console.log(`keys: ${report.keys} written (${fmtBytes(report.outputBytes)}), ${report.keysSkipped.length} skipped`)
  for (const s of report.keysSkipped.slice(0, 20)) console.log(`    ${s.key}: ${s.reason}`)
  if (report.keysSkipped.length > 20) console.log(`    … and ${report.keysSkipped.length - 20} more (see --json)`)
  console.log(
    `estimated working memory: ${fmtBytes(report.estimatedWorkingBytes)} with ${report.threads} threads ` +
      `(peak ${fmtBytes(report.estimatedPeakBytes)} with the process; budget ${fmtBytes(report.memoryBudget)})`,
  )
  if (report.overBudget.length)
    console.log(`  ${report.overBudget.length} key(s) need more than the budget and will run alone`)
  console.log(`recipe:\n${report.recipe.replace(/^/gm, '  ')}`)
  return 0
}

function cmdSerialize(positional: string[], flags: Flags): number {
  const [recipePath] = positional
  if (!recipePath) throw new UsageError('serialize needs a recipe file')
  // `any` by default: every recipe merge and plan accept serializes the same way (an ambiguous
  // model takes weight, as there), and so do fragments whose result is a delta.
  const strict = strictSpace(flags)
  const text = callNative(() => native.serialize(readRecipe(recipePath), strict ?? 'any'))
  if (typeof flags.output === 'string') writeFileSync(flags.output, text.endsWith('\n') ? text : `${text}\n`)
  else console.log(text)
  return 0
}

function cmdInfo(positional: string[], flags: Flags): number {
  const [path] = positional
  if (!path) throw new UsageError('info needs a safetensors file')
  const info = inspect(path)
  if (flags.json) {
    console.log(JSON.stringify(flags.keys ? info : { ...info, tensors: info.tensors.length }, null, 2))
    return 0
  }
  const { recipe, ...rest } = info
  console.log(info.path)
  const sharded = info.files.length > 1 ? `, in ${info.files.length} shards` : ''
  console.log(
    `  ${info.tensors.length} tensors, ${fmtBytes(info.dataBytes)} of data${sharded} ` +
      `(${fmtBytes(info.fileBytes)} on disk, headers ${info.headerBytes} bytes)`,
  )
  if (info.layers !== null) console.log(`  layers: ${info.layers}`)
  console.log(
    `  dtypes: ${Object.entries(info.dtypes)
      .map(([d, n]) => `${d}×${n}`)
      .join(', ')}`,
  )
  if (info.config === null) {
    console.log('  config: none of the known configs matches these keys (merge it with an explicit config)')
  } else {
    console.log(`  config: ${info.config}`)
    console.log('  components:')
    for (const c of info.components) {
      const missing = c.total - c.present
      const note = missing
        ? ` (${missing} missing${c.optionalMissing ? `, ${c.optionalMissing} of them optional` : ''})`
        : ''
      console.log(`    ${c.name.padEnd(12)} ${c.present}/${c.total} keys${note}`)
    }
    if (info.keysOutsideConfig) console.log(`  ${info.keysOutsideConfig} keys are not in the config`)
  }
  const meta = Object.entries(rest.metadata).filter(([k]) => k !== 'mecha_recipe')
  if (meta.length) {
    console.log('  metadata:')
    for (const [k, v] of meta) console.log(`    ${k}: ${v.length > 200 ? `${v.slice(0, 200)}…` : v}`)
  }
  if (recipe) console.log(`  recipe:\n${recipe.replace(/^/gm, '    ')}`)
  if (flags.keys) for (const t of info.tensors) console.log(`  ${t.name}  ${t.dtype}  [${t.shape.join(', ')}]`)
  return 0
}

async function cmdVerify(positional: string[], flags: Flags): Promise<number> {
  const [path] = positional
  if (!path) throw new UsageError('verify needs a merged safetensors file')
  const threads = flags.threads === undefined ? undefined : Number(flags.threads)
  const report = await verify(path, { threads, memoryBudget: memoryFlag(flags) })
  if (flags.json) {
    console.log(JSON.stringify(report, null, 2))
    return report.reproducible ? 0 : 1
  }
  console.log(path)
  const engine = report.recordedEngine ?? 'an unrecorded engine'
  console.log(`  written by ${engine}; replayed with ${report.engine} in ${report.seconds.toFixed(1)} s`)
  for (const input of report.inputs) {
    const state = input.matches ? 'same' : input.recorded === undefined ? 'not recorded' : 'CHANGED'
    console.log(`  input ${input.model}${input.path ? ` (${input.path})` : ''}: ${state}`)
  }
  const same = report.keysCompared - report.differingKeys.length
  console.log(`  tensors: ${same} of ${report.keysCompared} identical`)
  if (report.reproducible) {
    console.log('reproducible: the recorded recipe gives the same bytes from the same inputs')
    return 0
  }
  console.log('NOT reproducible:')
  for (const problem of report.problems) console.log(`  - ${problem}`)
  return 1
}

function commandHelp(command: string): string {
  const help = COMMAND_HELP[command]
  if (!help) throw new UsageError(`unknown command "${command}"; ${suggestion(command, commands)}`)
  return help
}

async function main(argv: string[]): Promise<number> {
  const { positional, flags } = parseArgs(argv)
  if (flags.version) {
    console.log(JSON.parse(readFileSync(`${__dirname}/../package.json`, 'utf8')).version)
    return 0
  }
  const [first, ...args] = positional
  if (first === 'help') {
    const [name, ...more] = args
    if (name === undefined) {
      process.stdout.write(HELP)
      return 0
    }
    const { command: topic, rest: extra } = resolveCommand(name, more)
    if (extra.length) throw new UsageError(`help takes one command name, but was also given: ${extra.join(' ')}`)
    process.stdout.write(commandHelp(topic))
    return 0
  }
  if (first === undefined) {
    process.stdout.write(HELP)
    return flags.help ? 0 : 1
  }
  const { command, rest } = resolveCommand(first, args)
  if (flags.help) {
    process.stdout.write(commandHelp(command))
    return 0
  }
  const subs = subcommands[command]
  if (subs) throw new UsageError(`${command} needs a subcommand: ${subs.join(', ')}`, COMMAND_HELP[command])
  checkUsage(command, rest, flags)
  switch (command) {
    case 'merge':
      return cmdMerge(rest, flags)
    case 'sweep':
      return cmdSweep(rest, flags)
    case 'convert':
      return cmdConvert(rest, flags)
    case 'lora bake':
      return cmdLoraBake(rest, flags)
    case 'lora extract':
      return cmdLoraExtract(rest, flags)
    case 'info':
      return cmdInfo(rest, flags)
    case 'plan':
      return cmdPlan(rest, flags)
    case 'serialize':
      return cmdSerialize(rest, flags)
    case 'verify':
      return cmdVerify(rest, flags)
    default:
      throw new UsageError(`unknown command "${command}"; ${suggestion(command, commands)}`)
  }
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (e: unknown) => {
    if (process.stderr.isTTY) process.stderr.write('\n')
    if (e instanceof UsageError) {
      process.stderr.write(`mecha: ${e.message}\n${e.usage ? `\n${e.usage}` : 'Run `mecha --help` for usage.\n'}`)
      process.exit(2)
    }
    if (e instanceof MechaError) {
      console.error(`mecha: ${e.name}: ${e.message}`)
      process.exit(e.name === 'AbortError' ? 130 : 1)
    }
    // Not a user mistake: a bug. The stack helps whoever fixes it.
    console.error('mecha: internal error (please report it):', e)
    process.exit(1)
  },
)
