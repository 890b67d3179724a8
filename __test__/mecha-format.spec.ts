import test from 'ava'
import { spawnSync } from 'node:child_process'
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'

import {
  ConfigError,
  MergeSpaceError,
  ParseError,
  RecipeError,
  deserialize,
  inspect,
  merge,
  model,
  plan,
  serialize,
  weightedSum,
} from '../dist/index.js'
import { twoSmallModels, writeSafetensors } from './helpers.ts'

const { dir, a, b } = twoSmallModels()

const text = [
  'version 0.1.0',
  `model "${a}" model_config="structural" merge_space="weight"`,
  `model "${b}" model_config="structural" merge_space="weight"`,
  'dict key=0.3',
  'literal &2 model_config="singleton-mecha" merge_space="param"',
  'merge "convert_singleton" &3',
  'merge "weighted_sum" &0 &1 &4',
].join('\n')

test('serialize(deserialize(text)) reproduces the text', (t) => {
  t.is(serialize(deserialize(text)), text)
  t.is(serialize(weightedSum(model(a), model(b), { alpha: 0.3 })), text)
})

test('deserialize accepts blank lines, comments, a trailing newline, inf/nan and = in strings', async (t) => {
  const loose = `\n# merged by hand\n${text.replace('dict key=0.3', '\n  # the weight\ndict key=0.3')}\n\n`
  t.is(serialize(deserialize(loose)), text)
  const inf = deserialize(text.replace('key=0.3', 'key=inf'))
  t.true(serialize(inf).includes('dict key=inf'))
  const odd = join(dir, 'x=y "quoted".safetensors')
  writeSafetensors(odd, { w: { dtype: 'F32', shape: [2], values: [5, 6] } })
  const escaped = odd.replace(/\\/g, '\\\\').replace(/"/g, '\\"')
  const withOdd = text.replace(`model "${b}"`, `model "${escaped}"`)
  t.is(serialize(deserialize(withOdd)), withOdd)
  const result = await merge(deserialize(withOdd), { outputDtype: 'f32' })
  t.deepEqual(Array.from(result.get('w')!.data as Float32Array), [Math.fround(1 + 0.3 * 4), Math.fround(2 + 0.3 * 4)])
})

test('parse errors name the line and column', (t) => {
  const cases: [string, number, RegExp][] = [
    ['version 0.2.0\nmodel "a"', 1, /unsupported format/],
    [`${text}\nmerge "weighted_sum" &0 &9`, 8, /reference &9/],
    [`${text}\nmerge "weighted_sum" &0`, 8, /missing required argument "b"/],
    [`${text}\nmerge "no_such_method" &0`, 8, /unknown merge method "no_such_method"/],
    ['version 0.1.0\nmodel "unterminated', 2, /unterminated string/],
  ]
  for (const [source, line, message] of cases) {
    const err = t.throws(() => deserialize(source), { message }) as unknown as ParseError | undefined
    t.is(err?.line, line, source)
    t.true((err as unknown) instanceof ParseError || (err as unknown) instanceof RecipeError)
    t.true((err?.column ?? 0) >= 1)
  }
})

test('the CLI merges, plans and serializes .mecha files', (t) => {
  const cli = fileURLToPath(new URL('../dist/cli.js', import.meta.url))
  const run = (...args: string[]) => spawnSync(process.execPath, [cli, ...args], { encoding: 'utf8' })
  const recipe = join(dir, 'recipe.mecha')
  writeFileSync(recipe, `${text}\n`)
  const out = join(dir, 'out.safetensors')
  const merged = run('merge', recipe, '-o', out, '--output-dtype', 'f32', '--json')
  t.is(merged.status, 0, merged.stderr)
  t.is(inspect(out).recipe, text)
  const planned = run('plan', recipe, '--json')
  t.is(planned.status, 0, planned.stderr)
  t.like(JSON.parse(planned.stdout), { config: 'structural', mergeSpace: 'weight', keys: 1 })
  const serialized = run('serialize', recipe)
  t.is(serialized.stdout.trim(), text)
  const info = JSON.parse(run('info', a, '--json').stdout)
  t.is(info.config, null)
  const bad = join(dir, 'bad.mecha')
  writeFileSync(bad, 'version 0.1.0\nmerge "weighted_sum" &3')
  const failed = run('merge', bad, '-o', out)
  t.is(failed.status, 1)
  t.regex(failed.stderr, /ParseError: line 2, column 22: reference &3/)
})

test('malformed recipes give typed errors naming the node, and never crash', async (t) => {
  // A string where a number is expected: found when planning, with the path to the node.
  const typeMismatch = deserialize(text.replace('dict key=0.3', 'dict key="heavy"'))
  const err = t.throws(() => plan(typeMismatch), {
    instanceOf: RecipeError,
    message: /"alpha" expects tensors or numbers/,
  })
  t.is((err as unknown as RecipeError).node, 'weighted_sum')
  // Two weights added: the merge-space constraint that fails is named.
  const spaces = deserialize(`${text}\nmerge "add_difference" &0 &1`)
  t.throws(() => serialize(spaces), { instanceOf: MergeSpaceError, message: /add_difference input "b" requires delta/ })
  await t.throwsAsync(merge(spaces), { instanceOf: MergeSpaceError })
  // An unknown config id in the text.
  const config = deserialize(text.replace('model_config="structural"', 'model_config="sd9-nope"'))
  t.throws(() => serialize(config), { instanceOf: ConfigError, message: /unknown model config "sd9-nope"/ })
  // A forward reference.
  t.throws(() => deserialize('version 0.1.0\nmerge "weighted_sum" &1 &2\nmodel "a"'), {
    instanceOf: ParseError,
    message: /line 2/,
  })
})
