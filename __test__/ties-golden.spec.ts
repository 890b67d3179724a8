// The TIES family against sd-mecha 1.1.8 (scripts/golden/ties.py): deterministic cases merge to
// sd-mecha's tensors within their tolerance; random cases (DARE, DELLA, dropout) are compared by
// statistics with sd-mecha's own random output on the same inputs and with the distribution they
// should follow; every `.mecha` text reads back unchanged, and the wrappers build sd-mecha's text.
import test from 'ava'
import { readFileSync, realpathSync } from 'node:fs'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'

import * as mecha from '../dist/index.js'
import { deserialize, merge, model, serialize, toFloat32, type RecipeInput } from '../dist/index.js'
import { mismatches, readSafetensors } from './golden-fixtures.ts'

const fixtures = new URL('./fixtures/golden/ties/', import.meta.url)
const inputs = realpathSync(fileURLToPath(new URL('inputs/', fixtures)))
const outputs = fileURLToPath(new URL('outputs/', fixtures))

type Json = null | boolean | number | string | Json[] | { [key: string]: Json }

interface RandomSpec {
  kind: 'dare' | 'dropout'
  probability: number
  della_eps?: number
  rescale?: boolean | number
  overlap?: number
  overlap_emphasis?: number
  /** sd-mecha's overlapping_sets_pmf (subset index bit m ⇔ delta m kept), when subsets are drawn. */
  pmf?: number[]
}

interface Case {
  id: string
  description: string
  text: string
  output: string
  keys: string[]
  shapes: Record<string, number[]>
  tolerance?: number
  atol?: number
  /** Keys whose shape sd-mecha gets wrong (model stock writes a 0-D key as [1]): the port's shape. */
  port_shapes?: Record<string, number[]>
  wrapper?: { name: string; args: string[]; kwargs: Record<string, Json> }
  random?: RandomSpec
}

const cases: Case[] = JSON.parse(readFileSync(new URL('cases.json', fixtures), 'utf8'))
const withDir = (text: string) => text.replaceAll('{dir}', inputs.replace(/\\/g, '\\\\').replace(/"/g, '\\"'))
const options = { mergeDtype: 'f32', outputDtype: 'f32', omitNonFiniteInputs: false } as const

async function mergeText(text: string, extra: { threads?: number } = {}) {
  const result = await merge(deserialize(text), { ...options, ...extra })
  return new Map([...result].map(([k, t]) => [k, { shape: t.shape, values: toFloat32(t) }]))
}

test('the fixtures cover the family', (t) => {
  for (const m of [
    'ties_sum',
    'ties_sum_extended',
    'ties_sum_with_dropout',
    'model_stock',
    'geometric_median',
    'dropout',
  ]) {
    t.true(
      cases.some((c) => c.text.includes(`merge "${m}"`)),
      m,
    )
  }
  for (const w of [
    'add_difference_ties',
    'add_difference_ties_extended',
    'add_ties_with_dare',
    'n_model_stock',
    'dropout',
  ]) {
    t.true(
      cases.some((c) => c.wrapper?.name === w),
      w,
    )
  }
  t.true(cases.filter((c) => c.random).length >= 8)
})

for (const c of cases.filter((c) => !c.random)) {
  test(`merge matches sd-mecha: ${c.id}`, async (t) => {
    const text = withDir(c.text)
    t.is(serialize(deserialize(text)), text, 'serialize(deserialize(text)) === text')
    const got = await mergeText(text)
    const expected = readSafetensors(join(outputs, c.output))
    t.deepEqual([...got.keys()].sort(), c.keys)
    const problems: Record<string, string[]> = {}
    for (const [key, want] of expected) {
      const g = got.get(key)
      if (!g) continue
      const shape = c.port_shapes?.[key] ?? want.shape
      const found =
        JSON.stringify(g.shape) !== JSON.stringify(shape)
          ? [`shape [${g.shape}], want [${shape}]`]
          : mismatches(g.values, want.values, c.tolerance!, c.atol!)
      if (found.length) problems[key] = found
    }
    t.deepEqual(problems, {}, `within ${c.tolerance} relative, ${c.atol} absolute (${c.description})`)
  })
}

/** Whether `rate` (of n trials) is within 5 standard errors of a proportion p. */
function near(rate: number, p: number, n: number) {
  return Math.abs(rate - p) <= 5 * Math.sqrt((p * (1 - p)) / n) + 1e-12
}

const read = (name: string) => readSafetensors(join(inputs, `${name}.safetensors`)).get('w')!.values

/** DARE/DELLA on s_ramp (one delta, k=1, no stock factor): kept elements are δ / (1 − p). */
function dareStats(t: import('ava').ExecutionContext, r: RandomSpec, out: Float32Array, who: string) {
  const delta = read('s_ramp')
  const n = delta.length
  const scale = r.rescale === false ? 1 : 1 - r.probability
  const eps = r.della_eps ?? 0
  // keep probability by ordinal rank of |δ| (the magnitudes are (1 + i)/n, all distinct)
  const quarters = [0, 1, 2, 3].map(() => ({ kept: 0, count: 0, p: 0 }))
  let badScale = 0
  for (let i = 0; i < n; i++) {
    const rank = Math.round(Math.abs(delta[i]) * n)
    const p = Math.min(1, Math.max(0, 1 - r.probability + (rank / n - (n + 1) / (2 * n)) * eps))
    const q = quarters[Math.min(3, Math.floor(((rank - 1) * 4) / n))]
    q.count++
    q.p += p
    if (out[i] !== 0) {
      q.kept++
      if (Math.abs(out[i] * scale - delta[i]) > 1e-5 * Math.abs(delta[i])) badScale++
    }
  }
  t.is(badScale, 0, `${who}: kept elements are δ / ${scale}`)
  for (const [i, q] of quarters.entries()) {
    t.true(
      near(q.kept / q.count, q.p / q.count, q.count),
      `${who}: quarter ${i} keeps ${q.kept / q.count}, expected ${q.p / q.count}`,
    )
  }
  return quarters.map((q) => q.kept / q.count)
}

/** dropout of the constant deltas 1, 2, 4: Σ kept / count · (1 − p)^rescale tells the subset. */
function subsetCounts(t: import('ava').ExecutionContext, r: RandomSpec, out: Float32Array, who: string) {
  const rescalar = r.probability === 1 ? 1 : (1 - r.probability) ** Number(r.rescale ?? 1)
  const value = (s: number) => (s === 0 ? 0 : s / [0, 1, 1, 2, 1, 2, 2, 3][s])
  const counts = new Array(8).fill(0)
  let undecoded = 0
  for (const o of out) {
    const v = o * rescalar
    const s = [0, 1, 2, 3, 4, 5, 6, 7].reduce((best, s) =>
      Math.abs(value(s) - v) < Math.abs(value(best) - v) ? s : best,
    )
    if (Math.abs(value(s) - v) > 1e-4) undecoded++
    counts[s]++
  }
  t.is(undecoded, 0, `${who}: every element is the mean of a subset of the deltas, rescaled`)
  return counts
}

for (const c of cases.filter((c) => c.random)) {
  const r = c.random!
  test(`random method statistics match sd-mecha: ${c.id}`, async (t) => {
    const text = withDir(c.text)
    t.is(serialize(deserialize(text)), text, 'serialize(deserialize(text)) === text')
    const ours = (await mergeText(text)).get('w')!
    const theirs = readSafetensors(join(outputs, c.output)).get('w')!
    t.deepEqual(ours.shape, theirs.shape)
    const n = theirs.values.length
    if (r.kind === 'dare') {
      const a = dareStats(t, r, ours.values, 'port')
      const b = dareStats(t, r, theirs.values, 'sd-mecha')
      // two independent samples: their difference has √2 times one standard error
      for (let i = 0; i < 4; i++) t.true(Math.abs(a[i] - b[i]) <= 5 * Math.SQRT2 * Math.sqrt(0.25 / (n / 4)))
    } else {
      const pmf =
        r.pmf ??
        [0, 1, 2, 3, 4, 5, 6, 7].map((s) => {
          const k = [0, 1, 1, 2, 1, 2, 2, 3][s]
          return (1 - r.probability) ** k * r.probability ** (3 - k)
        })
      const a = subsetCounts(t, r, ours.values, 'port')
      const b = subsetCounts(t, r, theirs.values, 'sd-mecha')
      for (let s = 0; s < 8; s++) {
        t.true(near(a[s] / n, pmf[s], n), `port: subset ${s} in ${a[s] / n} of elements, expected ${pmf[s]}`)
        t.true(near(b[s] / n, pmf[s], n), `sd-mecha: subset ${s} in ${b[s] / n} of elements, expected ${pmf[s]}`)
      }
    }
  })
}

test('random methods: the same seed gives the same bytes for any thread count, another seed other bytes', async (t) => {
  for (const id of ['rand_della', 'rand_dropout_p04_o07_e05_r10', 'rand_dropout_p06_o10_e00_r10']) {
    const c = cases.find((c) => c.id === id)!
    const text = withDir(c.text)
    const one = (await mergeText(text, { threads: 1 })).get('w')!.values
    const three = (await mergeText(text, { threads: 3 })).get('w')!.values
    t.deepEqual(Buffer.from(one.buffer), Buffer.from(three.buffer), `${id}: 1 and 3 threads`)
    t.true(text.includes('dict key=1234'), `${id}: the seed literal`)
    const other = (await mergeText(text.replace('dict key=1234', 'dict key=4321'))).get('w')!.values
    t.notDeepEqual(Buffer.from(one.buffer), Buffer.from(other.buffer), `${id}: another seed`)
  }
})

// sd-mecha's Python wrappers, as TypeScript functions: (base, ...models, options) with the
// keyword arguments in camelCase. Looked up at run time so this file type-checks without them.
type Wrapper = (...args: unknown[]) => RecipeInput
const exported = mecha as unknown as Record<string, Wrapper | undefined>
const camel = (s: string) => s.replace(/_([a-z0-9])/g, (_, ch: string) => ch.toUpperCase())

for (const c of cases.filter((c) => c.wrapper)) {
  const w = c.wrapper!
  test(`wrapper builds sd-mecha's graph: ${c.id}`, (t) => {
    const fn = exported[camel(w.name)]
    if (typeof fn !== 'function') return t.fail(`${camel(w.name)} is not exported`)
    const nodes = new Map<string, RecipeInput>()
    const node = (name: string) => {
      if (!nodes.has(name)) nodes.set(name, model(join(inputs, `${name}.safetensors`)))
      return nodes.get(name)!
    }
    const kwargs = Object.fromEntries(Object.entries(w.kwargs).map(([k, v]) => [camel(k), v]))
    t.is(serialize(fn(...w.args.map(node), kwargs)), withDir(c.text))
  })
}
