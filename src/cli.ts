#!/usr/bin/env node
/** The `mecha` command line. */
import { readFileSync, writeFileSync } from 'node:fs'
import { basename, extname } from 'node:path'
import native = require('./native')
import { MechaError, native as callNative } from './errors'
import { inspect } from './inspect'
import { mergeWire, parseBytes, type EmbedRecipe, type MergeReport, type Progress } from './merge'
import { nearest, suggestion } from './options'
import { planWire } from './plan'
import type { DtypeName } from './dtypes'
import type { MergeSpace, WireRecipe } from './recipe'

const HELP = `mecha: merge and convert safetensors models with sd-mecha recipes

Usage:
  mecha merge <recipe.mecha|recipe.json> -o <out.safetensors> [options]
  mecha plan <recipe> [--json]              dry run: configs, spaces, keys kept/skipped, memory
  mecha serialize <recipe> [-o out.mecha]   finalized .mecha text (configs inferred, paths absolute)
  mecha info <file.safetensors> [--json] [--keys]
  mecha help <command>                      the options of one command
  mecha --help | --version

Recipes are .mecha files (sd-mecha's format) or JSON, which lists nodes; arguments refer to
earlier nodes by index:
  {"nodes": [{"model": "a.safetensors"}, {"model": "b.safetensors"},
             {"merge": "weighted_sum", "args": [{"node": 0}, {"node": 1}], "kwargs": {"alpha": 0.3}}]}
Relative model paths are resolved against the current directory.
`

const SPACE_OPTION = `      --strict-merge-space <s> the space the result must be in: weight (default), delta, param, or any`
const DTYPE_OPTIONS = `  -t, --threads <n>            worker threads (default: one per CPU; the output is the same for any count)
      --merge-dtype <dtype>    f32 (default), f64, f16, bf16
      --output-dtype <dtype>   f16 (default), bf16, f32, f64, f8_e4m3, f8_e5m2
${SPACE_OPTION}
      --memory <size>          memory budget for keys computed at once, e.g. 2G (default: 1/4 of RAM, ≤ 4G)`

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
      --json                   print the report as JSON
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
  info: `Usage: mecha info <file.safetensors> [--json] [--keys]

Reads a safetensors header (no tensor data): tensor count, dtypes, metadata, the recipe that made
the file, and the model config sd-mecha would infer with how much of each component is present.

Options:
      --json                   print everything as JSON
      --keys                   also list every tensor with its dtype and shape
`,
}

type Flags = Record<string, string | true>

/** The flags each command takes (`help` and `version` go anywhere). */
const commandFlags: Record<string, readonly string[]> = {
  merge: [
    'output',
    'threads',
    'merge-dtype',
    'output-dtype',
    'strict-merge-space',
    'memory',
    'fallback-model',
    'strict-mandatory-keys',
    'embed-recipe',
    'json',
    'quiet',
  ],
  plan: ['threads', 'merge-dtype', 'output-dtype', 'strict-merge-space', 'memory', 'json'],
  serialize: ['output', 'strict-merge-space'],
  info: ['json', 'keys'],
}
/** How many positional arguments (after the command) each command takes. */
const commandArgs: Record<string, string> = {
  merge: 'one recipe file',
  plan: 'one recipe file',
  serialize: 'one recipe file',
  info: 'one safetensors file',
}

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
  if (args.length > 1)
    throw new UsageError(`${command} takes ${commandArgs[command]}, but was also given: ${args.slice(1).join(' ')}`)
}

function parseArgs(argv: string[]): { positional: string[]; flags: Flags } {
  const aliases: Record<string, string> = { o: 'output', t: 'threads', q: 'quiet', h: 'help', v: 'version' }
  const valued = new Set([
    'output',
    'threads',
    'merge-dtype',
    'output-dtype',
    'strict-merge-space',
    'memory',
    'fallback-model',
    'embed-recipe',
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
      flags[name] = value
    } else {
      flags[name] = true
    }
  }
  return { positional, flags }
}

class UsageError extends Error {}

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

async function cmdMerge(positional: string[], flags: Flags): Promise<number> {
  const [recipePath] = positional
  if (!recipePath) throw new UsageError('merge needs a recipe file')
  const output = flags.output
  if (typeof output !== 'string') throw new UsageError('merge needs -o <out.safetensors>')
  const threads = flags.threads === undefined ? 0 : Number(flags.threads)
  if (!Number.isInteger(threads) || threads < 0) throw new UsageError('--threads must be a non-negative integer')
  const showProgress = process.stderr.isTTY && !flags.quiet && !flags.json
  const controller = new AbortController()
  const onSigint = () => {
    if (controller.signal.aborted) process.exit(130)
    process.stderr.write('\ncancelling…\n')
    controller.abort()
  }
  process.on('SIGINT', onSigint)
  try {
    const recipe = readRecipe(recipePath)
    const fallbackModel = flags['fallback-model'] as string | undefined
    const report = (await mergeWire(fallbackModel ? withFallback(recipe, fallbackModel) : recipe, {
      output,
      threads,
      mergeDtype: flags['merge-dtype'] as DtypeName | undefined,
      outputDtype: flags['output-dtype'] as DtypeName | undefined,
      strictMergeSpace: strictSpace(flags),
      memoryBudget: memoryFlag(flags),
      strictMandatoryKeys: flags['strict-mandatory-keys'] === true,
      embedRecipe: flags['embed-recipe'] as EmbedRecipe | undefined,
      onProgress: showProgress ? progressBar() : undefined,
      signal: controller.signal,
    })) as MergeReport
    if (showProgress) process.stderr.write('\n')
    if (flags.json) console.log(JSON.stringify(report, null, 2))
    else printReport(report)
    return 0
  } finally {
    process.off('SIGINT', onSigint)
  }
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
  console.log(`  ${info.tensors.length} tensors, ${fmtBytes(info.fileBytes)} (header ${info.headerBytes} bytes)`)
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

function commandHelp(command: string): string {
  const help = COMMAND_HELP[command]
  if (!help) throw new UsageError(`unknown command "${command}"; ${suggestion(command, Object.keys(commandFlags))}`)
  return help
}

async function main(argv: string[]): Promise<number> {
  const { positional, flags } = parseArgs(argv)
  const [command, ...rest] = positional
  if (flags.version) {
    console.log(JSON.parse(readFileSync(`${__dirname}/../package.json`, 'utf8')).version)
    return 0
  }
  if (command === 'help') {
    const [topic, ...extra] = rest
    if (extra.length) throw new UsageError(`help takes one command name, but was also given: ${extra.join(' ')}`)
    process.stdout.write(topic === undefined ? HELP : commandHelp(topic))
    return 0
  }
  if (flags.help || !command) {
    process.stdout.write(command ? commandHelp(command) : HELP)
    return command || flags.help ? 0 : 1
  }
  checkUsage(command, rest, flags)
  switch (command) {
    case 'merge':
      return cmdMerge(rest, flags)
    case 'info':
      return cmdInfo(rest, flags)
    case 'plan':
      return cmdPlan(rest, flags)
    case 'serialize':
      return cmdSerialize(rest, flags)
    default:
      throw new UsageError(`unknown command "${command}"; ${suggestion(command, Object.keys(commandFlags))}`)
  }
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (e: unknown) => {
    if (process.stderr.isTTY) process.stderr.write('\n')
    if (e instanceof UsageError) {
      console.error(`mecha: ${e.message}\nRun \`mecha --help\` for usage.`)
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
