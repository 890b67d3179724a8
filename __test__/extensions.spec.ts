import test from 'ava'
import { mkdirSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'

import {
  ConfigError,
  MergeSpaceError,
  RecipeError,
  clamp,
  configs,
  convert,
  defineMergeMethod,
  deserialize,
  dropout,
  inspect,
  rotate,
  MergeCache,
  OptionError,
  int,
  merge,
  methods,
  model,
  modelDirs,
  omitComponent,
  pickComponent,
  plan,
  serialize,
  toFloat32,
  weightedSum,
  writeRandomModel,
  type MethodValue,
} from '../dist/index.js'
import { tempDir } from './helpers.ts'

/** SD1 keys (clip_l, vae, diffuser) with every dimension capped at 3: real names, tiny tensors. */
const tinySd1 = configs
  .keys('sd1-ldm')
  .filter((k) => ['clip_l', 'vae', 'diffuser'].includes(k.component))
  .map((k) => ({
    name: k.key,
    dtype: k.dtype === 'I64' ? 'I64' : 'F32',
    shape: (k.shape ?? []).map((d) => Math.min(d, 3)),
  }))

const dir = tempDir()
const paths = { a: join(dir, 'a.safetensors'), b: join(dir, 'b.safetensors'), c: join(dir, 'c.safetensors') }
const ready = Promise.all(Object.values(paths).map((p, i) => writeRandomModel(p, tinySd1, i + 1)))
const f32 = { outputDtype: 'f32' as const }
test.before(() => ready)

async function values(recipe: Parameters<typeof merge>[0]) {
  await ready
  const result = await merge(recipe, f32)
  return new Map([...result].map(([k, t]) => [k, toFloat32(t)]))
}

test('configs: list, get, components, keys', (t) => {
  const ids = configs.list().map((c) => c.id)
  t.deepEqual(ids.slice(0, 3), ['singleton-mecha', 'sdxl-supermerger_blocks', 'sdxl-sgm'])
  t.true(ids.includes('sdxl-kohya_kohya_lora'))
  t.deepEqual(configs.components('sd1-ldm'), ['clip_l', 'vae', 'diffuser', 'ema', 'scheduler'])
  const pos = configs.keys('sd1-ldm').find((k) => k.key.endsWith('embeddings.position_ids'))!
  t.deepEqual([pos.dtype, pos.shape, pos.optional], ['I64', [1, 77], true])
  t.is(configs.get('sd1-supermerger_blocks').components.blocks.length, 26)
  t.throws(() => configs.keys('sdxl-sgn'), { instanceOf: ConfigError, message: /did you mean "sdxl-sgm"/ })
})

test('configs.register accepts sd-mecha YAML and objects', (t) => {
  const yaml = [
    'identifier: test-yaml',
    'components:',
    '  only:',
    '    w: {shape: [2], dtype: float32}',
    '    b: {shape: [2], dtype: float32, optional: true}',
  ].join('\n')
  t.is(configs.register(yaml), 'test-yaml')
  t.is(
    configs.register({
      identifier: 'test-object',
      components: { main: { x: { shape: [1], dtype: 'float16', aliases: ['old.x'] } } },
    }),
    'test-object',
  )
  t.deepEqual(configs.keys('test-object')[0].aliases, ['old.x'])
  t.throws(() => configs.register(yaml), { instanceOf: ConfigError, message: /already registered/ })
  t.throws(() => configs.register('identifier: nodash\ncomponents: {}'), { instanceOf: ConfigError })
})

test('pick_component and omit_component select whole components', async (t) => {
  const picked = await values(pickComponent(model(paths.a), 'vae'))
  t.true([...picked.keys()].every((k) => k.startsWith('first_stage_model.')))
  t.is(picked.size, configs.keys('sd1-ldm').filter((k) => k.component === 'vae').length)
  const rest = await values(omitComponent(model(paths.a), 'vae'))
  t.false([...rest.keys()].some((k) => k.startsWith('first_stage_model.')))
  await t.throwsAsync(merge(pickComponent(model(paths.a), 'unet')), {
    instanceOf: RecipeError,
    message: /valid components: clip_l, vae, diffuser/,
  })
})

test('clamp keeps values between the bounds (keyword-only stiffness)', async (t) => {
  const [a, b, c] = await Promise.all([paths.a, paths.b, paths.c].map((p) => values(model(p))))
  const clamped = await values(clamp(model(paths.a), [model(paths.b), model(paths.c)]))
  const key = 'model.diffusion_model.out.2.weight'
  clamped.get(key)!.forEach((v, i) => {
    const lo = Math.min(b.get(key)![i], c.get(key)![i])
    const hi = Math.max(b.get(key)![i], c.get(key)![i])
    t.is(v, Math.min(Math.max(a.get(key)![i], lo), hi))
  })
  t.regex(
    serialize(clamp(model(paths.a), [model(paths.b), model(paths.c)], { stiffness: 0.5 })),
    /merge "clamp" &0 &1 &2 stiffness=&5$/,
  )
})

test('convert turns block weights into per-key weights (MBW)', async (t) => {
  const blocks: Record<string, number> = { BASE: 0 }
  for (let i = 0; i < 12; i++) blocks[`IN${String(i).padStart(2, '0')}`] = 0
  blocks.M00 = 1
  for (let i = 0; i < 12; i++) blocks[`OUT${String(i).padStart(2, '0')}`] = 0
  await ready
  const alpha = convert(blocks, model(paths.a))
  const text = serialize(weightedSum(model(paths.a), model(paths.b), { alpha }))
  t.regex(
    text,
    /literal &2 model_config="sd1-supermerger_blocks" merge_space="param"\nmerge "convert_sd1_blocks_to_ldm" &3\n/,
  )
  const [mixed, a, b] = await Promise.all([
    values(weightedSum(model(paths.a), model(paths.b), { alpha })),
    values(model(paths.a)),
    values(model(paths.b)),
  ])
  for (const [key, v] of mixed) {
    const from = key.includes('.middle_block.') ? b : a
    t.deepEqual(Array.from(v), Array.from(from.get(key)!), key)
  }
  t.throws(() => convert(model(paths.a), 'flux-flux'), { instanceOf: ConfigError, message: /no chain of conversions/ })

  // an SDXL LoRA for an SD1 model: each config tried is named once (a LoRA's was repeated per
  // candidate target), and so is the target
  const lora = join(dir, 'lora-for-convert.safetensors')
  const loraKeys = configs.keys('sdxl-kohya_kohya_lora').slice(0, 6)
  writeFileSync(lora, safetensorsBytes(loraKeys.map((k) => k.key)))
  const error = t.throws(() => convert(model(lora), 'sd1-ldm'), { instanceOf: ConfigError })
  const sources = /from the recipe's config \((.*?)\) to/.exec(error!.message)![1].split(' or ')
  t.true(sources.includes('sdxl-kohya_kohya_lora'), error!.message)
  t.regex(error!.message, /to sd1-ldm/)
  t.deepEqual(sources, [...new Set(sources)], 'no config named twice')
})

/** A safetensors file of one-element f16 tensors with these names. */
function safetensorsBytes(names: string[]): Buffer {
  const header: Record<string, unknown> = {}
  names.forEach((name, i) => (header[name] = { dtype: 'F16', shape: [1], data_offsets: [2 * i, 2 * i + 2] }))
  const json = Buffer.from(JSON.stringify(header).padEnd(Math.ceil(JSON.stringify(header).length / 8) * 8, ' '))
  const length = Buffer.alloc(8)
  length.writeBigUInt64LE(BigInt(json.length))
  return Buffer.concat([length, json, Buffer.alloc(2 * names.length)])
}

test('defineMergeMethod: elementwise JavaScript methods run per chunk and match the native math', async (t) => {
  const chunks: number[] = []
  const lerp = defineMergeMethod({
    id: 'test_lerp',
    inputs: [{ name: 'a' }, { name: 'b' }, { name: 'alpha', type: 'float', default: 0.5 }],
    elementwise: true,
    cacheFactory: () => ({ calls: 0 }),
    fn: ({ a, b, alpha }, ctx) => {
      ;(ctx.cache as { calls: number }).calls++
      chunks.push(ctx.length)
      const [x, y, w] = [a as Float32Array, b as Float32Array, alpha as number]
      return x.map((v, i) => v + w * (y[i] - v))
    },
  })
  const js = await values(lerp(model(paths.a), model(paths.b), { alpha: 0.3 }))
  const native = await values(weightedSum(model(paths.a), model(paths.b), { alpha: 0.3 }))
  for (const [k, v] of native) {
    const w = js.get(k)!
    v.forEach((x, i) => t.true(Math.abs(x - w[i]) <= 1e-6 * Math.max(1, Math.abs(x)), `${k}[${i}]`))
  }
  t.true(chunks.length > 0)
  const info = methods.get('test_lerp')!
  t.deepEqual(
    info.params.map((p) => [p.name, p.hasDefault]),
    [
      ['a', false],
      ['b', false],
      ['alpha', true],
    ],
  )
  // Usable from .mecha text, like a builtin.
  const text = serialize(lerp(model(paths.a), model(paths.b)))
  t.regex(text, /merge "test_lerp" &0 &1 &4$/)
  t.is(serialize(deserialize(text)), text)
})

test('defineMergeMethod: whole-tensor methods, keyword-only params, varargs and caches', async (t) => {
  const seen = new Map<string, number>()
  const normalize = defineMergeMethod({
    id: 'test_normalize',
    inputs: [
      { name: 'models', varargs: true },
      { name: 'scale', type: 'float', default: int(2), keywordOnly: true },
    ],
    cacheFactory: () => new Map<string, number>(),
    fn: ({ models, scale }, ctx) => {
      const cache = ctx.cache as Map<string, number>
      cache.set(ctx.key, (cache.get(ctx.key) ?? 0) + 1)
      seen.set(ctx.key, ctx.length)
      const list = models as Float32Array[]
      const sum = new Float32Array(ctx.length)
      for (const m of list) m.forEach((v, i) => (sum[i] += v))
      const norm = Math.sqrt(sum.reduce((s, v) => s + v * v, 0)) || 1
      return sum.map((v) => ((scale as number) * v) / norm)
    },
  })
  const node = normalize([model(paths.a), model(paths.b)], { scale: 3 })
  t.regex(serialize(node), /merge "test_normalize" &0 &1 scale=&4$/)
  t.regex(serialize(normalize([model(paths.a)])), /dict key=2\n/) // int default written as an int
  const out = await values(node)
  const key = 'model.diffusion_model.input_blocks.0.0.weight'
  const norm = Math.sqrt(out.get(key)!.reduce((s, v) => s + v * v, 0))
  t.true(Math.abs(norm - 3) < 1e-4)
  t.is(seen.get(key), out.get(key)!.length, 'whole tensors, not chunks')
  await merge(node) // the same node object keeps its cache across merges
  t.pass()
})

test('defineMergeMethod: conversions with mapKeys are found by convert()', async (t) => {
  configs.register({
    identifier: 'sd1-test_halves',
    components: { halves: { first: { shape: [] }, second: { shape: [] } } },
  })
  defineMergeMethod({
    id: 'convert_test_halves_to_ldm',
    inputs: [{ name: 'halves', type: 'T', stateDict: true, config: 'sd1-test_halves' }],
    returns: { type: 'T', config: 'sd1-ldm' },
    isConversion: true,
    mapKeys: (key) => (key.startsWith('model.diffusion_model.input_blocks') ? 'first' : 'second'),
    fn: ({ halves }) => halves as number,
  })
  const alpha = convert({ first: 0, second: 1 }, model(paths.a))
  const mixed = await values(weightedSum(model(paths.a), model(paths.b), { alpha }))
  const [a, b] = await Promise.all([values(model(paths.a)), values(model(paths.b))])
  for (const [key, v] of mixed) {
    const from = key.startsWith('model.diffusion_model.input_blocks') ? a : b
    t.deepEqual(Array.from(v), Array.from(from.get(key)!), key)
  }
})

test('defineMergeMethod: inputs keep their own shapes, text varargs keep their place, values can be returned', async (t) => {
  // A conversion whose output key reads two input keys of other shapes: each arrives whole,
  // with its own shape.
  configs.register({
    identifier: 'sd1-test_pair',
    components: { pair: { left: { shape: [2, 3] }, right: { shape: [4] } } },
  })
  const seenShapes: unknown[] = []
  defineMergeMethod({
    id: 'convert_test_pair_to_ldm',
    inputs: [{ name: 'pair', stateDict: true, config: 'sd1-test_pair' }],
    returns: { config: 'sd1-ldm' },
    isConversion: true,
    mapKeys: (key) => (key === 'model.diffusion_model.out.2.bias' ? ['left', 'right'] : null),
    fn: ({ pair }, ctx) => {
      seenShapes.push(ctx.shapes.pair)
      const [left, right] = pair as Float32Array[]
      const total = [...left, ...right].reduce((s, v) => s + v, 0)
      return new Float32Array(ctx.length).fill(total)
    },
  })
  const pairFile = join(dir, 'pair.safetensors')
  await writeRandomModel(
    pairFile,
    [
      { name: 'left', dtype: 'F32', shape: [2, 3] },
      { name: 'right', dtype: 'F32', shape: [4] },
    ],
    9,
  )
  const pairValues = await values(model(pairFile))
  const converted = await values(convert(model(pairFile), model(paths.a)))
  const sum = [...pairValues.get('left')!, ...pairValues.get('right')!].reduce((s, v) => s + v, 0)
  const out = converted.get('model.diffusion_model.out.2.bias')!
  t.true(out.length > 0 && out.every((v) => Math.abs(v - sum) < 1e-5))
  t.deepEqual(seenShapes[0], [[2, 3], [4]])

  // Text in a varargs parameter: every parameter still receives its own value.
  const labelled = defineMergeMethod({
    id: 'test_labelled',
    inputs: [
      { name: 'labels', type: 'str', varargs: true },
      { name: 'a', keywordOnly: true },
      { name: 'gain', type: 'float', default: 1, keywordOnly: true },
    ],
    fn: ({ labels, a, gain }) => {
      t.deepEqual(labels, ['x', 'y'])
      return (a as Float32Array).map((v) => v * (gain as number))
    },
  })
  const doubled = await values(labelled(['x', 'y'], { a: model(paths.a), gain: 2 }))
  const original = await values(model(paths.a))
  const some = 'model.diffusion_model.out.2.weight'
  t.deepEqual(
    Array.from(doubled.get(some)!),
    Array.from(original.get(some)!).map((v) => Math.fround(v * 2)),
  )

  // A method returning an int feeds another method's hyper-parameter.
  const count = defineMergeMethod({
    id: 'test_count',
    inputs: [{ name: 'a', mergeSpace: 'param' }],
    returns: { type: 'int', mergeSpace: 'param' },
    fn: ({ a }) => (a as Float32Array).length,
  })
  const byCount = await values(
    weightedSum(model(paths.a), model(paths.b), { alpha: count(model(paths.a, { mergeSpace: 'param' })) }),
  )
  const b = await values(model(paths.b))
  // alpha = element count ≥ 1: keys with one element take b exactly; others extrapolate.
  const scalarKey = [...byCount.keys()].find((k) => original.get(k)!.length === 1)
  if (scalarKey) t.deepEqual(Array.from(byCount.get(scalarKey)!), Array.from(b.get(scalarKey)!))
  t.true(byCount.size > 0)
})

test('errors from JavaScript methods name the method and the key', async (t) => {
  const broken = defineMergeMethod({
    id: 'test_broken',
    inputs: [{ name: 'a' }],
    fn: () => {
      throw new Error('boom')
    },
  })
  await t.throwsAsync(merge(broken(model(paths.a))), {
    instanceOf: RecipeError,
    message: /test_broken failed on key ".*": boom/,
  })
  const short = defineMergeMethod({ id: 'test_short', inputs: [{ name: 'a' }], fn: () => new Float32Array(1) })
  await t.throwsAsync(merge(short(model(paths.a))), { message: /returned 1 values/ })
  t.throws(() => defineMergeMethod({ id: 'weighted_sum', inputs: [{ name: 'a' }], fn: () => 0 }), {
    instanceOf: RecipeError,
    message: /already registered/,
  })
  t.throws(
    () => defineMergeMethod({ id: 'test_bad', inputs: [{ name: 'a', default: 1, mergeSpace: 'weight' }], fn: () => 0 }),
    { message: /merge space must be param/ },
  )
})

test('merge spaces of JavaScript methods are inferred like builtins', async (t) => {
  const deltaOnly = defineMergeMethod({
    id: 'test_delta_only',
    inputs: [{ name: 'd', mergeSpace: 'delta' }],
    returns: { mergeSpace: 'delta' },
    fn: ({ d }) => d as Float32Array,
  })
  await t.throwsAsync(merge(deltaOnly(model(paths.a)), { strictMergeSpace: null }), { instanceOf: MergeSpaceError })
  await t.notThrowsAsync(merge(deltaOnly(model(paths.a).sub(model(paths.b))), { strictMergeSpace: 'delta' }))
})

test('modelDirs resolves relative model paths', async (t) => {
  await ready
  const sub = join(dir, 'models')
  mkdirSync(sub, { recursive: true })
  writeFileSync(join(sub, 'x.safetensors'), Buffer.alloc(0))
  modelDirs.add(dir)
  try {
    t.true(modelDirs.list().includes(dir))
    const p = plan(weightedSum(model('a.safetensors'), model('b.safetensors')))
    t.deepEqual(
      p.inputs.map((i) => i.path),
      [paths.a, paths.b],
    )
    t.is(p.config, 'sd1-ldm')
  } finally {
    modelDirs.clear()
  }
})

test('plan reports configs, keys and memory without reading data', async (t) => {
  await ready
  const p = plan(weightedSum(model(paths.a), model(paths.b), { alpha: 0.3 }), { threads: 2 })
  t.is(p.config, 'sd1-ldm')
  t.is(p.mergeSpace, 'weight')
  t.is(p.keys, tinySd1.length)
  t.is(p.threads, 2)
  t.true(p.estimatedWorkingBytes > 0)
  t.regex(p.recipe, /model_config="sd1-ldm"/)
  void ({} as MethodValue)
})

test('a null seed is chosen per merge, reported, and recorded so the stored recipe replays the output', async (t) => {
  await ready
  const noise = defineMergeMethod({
    id: 'test_seeded_offset',
    inputs: [{ name: 'a' }, { name: 'seed', type: 'int', default: null }],
    fn: ({ a, seed }) => (a as Float32Array).map((v) => v + ((seed as number) % 1000) / 1000),
  })
  const out = (name: string) => join(dir, name)
  const first = await merge(noise(model(paths.a)), { ...f32, output: out('seeded-1.safetensors') })
  const second = await merge(noise(model(paths.a)), { ...f32, output: out('seeded-2.safetensors') })
  t.is(first.seeds.length, 1)
  const [chosen] = first.seeds
  t.like(chosen, { method: 'test_seeded_offset', param: 'seed' })
  t.true(Number.isSafeInteger(chosen.seed) && chosen.seed >= 0)
  t.not(second.seeds[0].seed, chosen.seed, 'another merge picks another seed')
  t.regex(first.recipe, new RegExp(`\\b${chosen.seed}\\b`))

  const stored = (await inspect(out('seeded-1.safetensors'))).metadata
  t.is(stored['mecha_recipe'], first.recipe)
  t.deepEqual(JSON.parse(stored['mecha_seeds']), [
    { node: chosen.node ?? null, method: 'test_seeded_offset', param: 'seed', seed: chosen.seed },
  ])
  // The tensors (the header differs: only the first merge chose, so only it has `mecha_seeds`).
  const tensors = async (path: string) => [...(await merge(model(path), f32))].map(([k, v]) => [k, [...toFloat32(v)]])
  const replay = await merge(deserialize(first.recipe), { ...f32, output: out('seeded-replay.safetensors') })
  t.deepEqual(replay.seeds, [], 'the stored recipe has its seed')
  t.deepEqual(await tensors(out('seeded-replay.safetensors')), await tensors(out('seeded-1.safetensors')))
  t.notDeepEqual(await tensors(out('seeded-2.safetensors')), await tensors(out('seeded-1.safetensors')))

  const given = await merge(noise(model(paths.a), { seed: 1234 }), f32)
  t.deepEqual(given.report.seeds, [])
})

test('MergeCache: options, limits and what a merge without methods that cache leaves in it', async (t) => {
  await ready
  const cache = new MergeCache({ limit: '1M' })
  t.is(cache.limitBytes, 1 << 20)
  t.is(new MergeCache().limitBytes > 0, true)
  t.throws(() => new MergeCache({ limit: 'lots' }), { instanceOf: OptionError, message: /cache limit/ })
  await merge(weightedSum(model(paths.a), model(paths.b), { alpha: 0.3 }), { ...f32, cache })
  t.deepEqual([cache.entries, cache.bytes], [0, 0], 'elementwise methods store nothing')
  cache.clear()
})

test('a builtin random method (dropout) with seed null: a chosen seed per merge, replayable from the report', async (t) => {
  await ready
  const recipe = () => dropout(model(paths.a), model(paths.b), model(paths.c), { probability: 0.5 })
  const flat = (m: Map<string, unknown>) =>
    [...m].map(([k, v]) => [k, [...toFloat32(v as Parameters<typeof toFloat32>[0])]])
  const first = await merge(recipe(), f32)
  const second = await merge(recipe(), f32)
  t.deepEqual(
    first.report.seeds.map((s) => [s.method, s.param]),
    [['dropout', 'seed']],
  )
  t.notDeepEqual(flat(first), flat(second), 'different chosen seeds, different masks')
  const replay = await merge(deserialize(first.report.recipe), f32)
  t.deepEqual(flat(replay), flat(first))
})

test("MergeCache keeps rotate's decompositions for the next merge of the recipe with other hyper-parameters", async (t) => {
  await ready
  const flat = (m: Map<string, unknown>) =>
    [...m].map(([k, v]) => [k, [...toFloat32(v as Parameters<typeof toFloat32>[0])]])
  const cache = new MergeCache()
  const first = await merge(rotate(model(paths.a), model(paths.b), { alignment: 0.5 }), { ...f32, cache })
  const entries = cache.entries
  t.true(entries > 0 && cache.bytes > 0, 'decompositions stored')
  // another alpha: the transforms are found (no new entries), the result is a fresh merge's
  const recipe = () => rotate(model(paths.a), model(paths.b), { alignment: 0.5, alpha: 0.5 })
  const second = await merge(recipe(), { ...f32, cache })
  t.is(cache.entries, entries)
  t.deepEqual(flat(second), flat(await merge(recipe(), f32)))
  t.notDeepEqual(flat(second), flat(first))
  // the wrapper's `cache` option (sd-mecha's rotate(…, cache=…)) attaches it to the node
  const attached = new MergeCache()
  await merge(rotate(model(paths.a), model(paths.b), { alignment: 0.5, cache: attached }), f32)
  t.is(attached.entries, entries)
})
