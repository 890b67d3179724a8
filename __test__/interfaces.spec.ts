// Interfaces (sd-mecha's is_interface / implements): a call is dispatched by its inputs' configs.
// exchange_ema for sd1-ldm, the typed error when no implementation fits, and an implementation
// registered from JavaScript for another config.
import test from 'ava'
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'

import {
  ConfigError,
  RecipeError,
  defineMergeMethod,
  exchangeEma,
  merge,
  methods,
  model,
  serialize,
  toFloat32,
} from '../dist/index.js'
import { randomValues, tempDir, writeSafetensors, type TestTensor } from './helpers.ts'

const f32 = (shape: number[], seed: number): TestTensor => ({
  dtype: 'F32',
  shape,
  values: randomValues(
    seed,
    shape.reduce((a, b) => a * b, 1),
  ).map(Math.fround),
})

// Real sd1-ldm keys: two UNet weights, their EMA copies (dots removed), and a VAE key and a text
// encoder key without one (the text encoder's name is sd1-ldm's only: without EMA keys, the
// others are sdxl-sgm's too).
const UNET = ['model.diffusion_model.out.2.weight', 'model.diffusion_model.input_blocks.0.0.bias']
const EMA = ['model_ema.diffusion_modelout2weight', 'model_ema.diffusion_modelinput_blocks00bias']
const VAE = 'first_stage_model.decoder.conv_out.bias'
const CLIP = 'cond_stage_model.transformer.text_model.final_layer_norm.bias'

function sd1(withEma: boolean) {
  const dir = tempDir()
  const path = join(dir, 'sd1.safetensors')
  const tensors: Record<string, TestTensor> = {
    [UNET[0]]: f32([4, 320, 3, 3], 1),
    [UNET[1]]: f32([320], 2),
    [VAE]: f32([3], 3),
    [CLIP]: f32([768], 6),
  }
  if (withEma) Object.assign(tensors, { [EMA[0]]: f32([4, 320, 3, 3], 4), [EMA[1]]: f32([320], 5) })
  writeSafetensors(path, tensors)
  return { path, tensors }
}

test('exchange_ema on an sd1-ldm checkpoint swaps each UNet weight with its EMA copy and keeps the rest', async (t) => {
  const { path, tensors } = sd1(true)
  const recipe = exchangeEma(model(path))
  // as in sd-mecha, whose calls dispatch when made, the finalized recipe names the implementation
  t.regex(serialize(recipe), /^merge "exchange_ema_'sd1-ldm'" &0$/m)
  const out = await merge(recipe, { outputDtype: 'f32' })
  t.deepEqual([...out.keys()].sort(), [...UNET, ...EMA, VAE, CLIP].sort())
  for (let i = 0; i < 2; i++) {
    t.deepEqual(Array.from(toFloat32(out.get(UNET[i])!)), tensors[EMA[i]].values)
    t.deepEqual(Array.from(toFloat32(out.get(EMA[i])!)), tensors[UNET[i]].values)
  }
  t.deepEqual(Array.from(toFloat32(out.get(VAE)!)), tensors[VAE].values)
  // twice is the identity
  const back = await merge(exchangeEma(exchangeEma(model(path))), { outputDtype: 'f32' })
  for (const k of [...UNET, ...EMA]) t.deepEqual(Array.from(toFloat32(back.get(k)!)), tensors[k].values)
})

const GOLDEN = fileURLToPath(new URL('./fixtures/golden/ema/', import.meta.url))

/** name → raw bytes of every tensor of a safetensors file (read without the library). */
function tensorBytes(path: string): Map<string, Buffer> {
  const buf = readFileSync(path)
  const n = Number(buf.readBigUInt64LE(0))
  const header = JSON.parse(buf.subarray(8, 8 + n).toString()) as Record<string, { data_offsets: [number, number] }>
  delete header.__metadata__
  return new Map(
    Object.entries(header).map(([k, v]) => [k, buf.subarray(8 + n + v.data_offsets[0], 8 + n + v.data_offsets[1])]),
  )
}

test('exchange_ema gives what sd-mecha 1.1.8 gives (with its contract validation off), byte for byte', async (t) => {
  // scripts/golden/ema.py: sd-mecha's merge(exchange_ema(model(input)), validate_mm_contract=False)
  const recorded = JSON.parse(readFileSync(join(GOLDEN, 'expected.json'), 'utf8'))
  t.regex(recorded.default_contract_error, /^AssertionError: .*tried to fetch key/, 'why 1.1.8 needs the option')
  const out = await merge(exchangeEma(model(join(GOLDEN, 'input.safetensors'))), { outputDtype: 'f32' })
  const expected = tensorBytes(join(GOLDEN, 'expected.safetensors'))
  t.deepEqual([...out.keys()].sort(), recorded.keys)
  for (const [key, bytes] of expected) {
    const got = out.get(key)!
    t.true(Buffer.from(got.data.buffer, got.data.byteOffset, got.data.byteLength).equals(bytes), key)
  }
})

test('exchange_ema on a checkpoint saved without EMA weights is a ConfigError naming the missing key', async (t) => {
  const { path } = sd1(false)
  const error = await t.throwsAsync(merge(exchangeEma(model(path))), { instanceOf: ConfigError })
  t.regex(error!.message, /has no EMA copy of "model\.diffusion_model\.[^"]+" \("model_ema\.[^"]+"\)/)
  t.regex(error!.message, /needs a checkpoint saved with its EMA weights/)
})

test('an interface with no implementation for the input config is a ConfigError listing the implementations', async (t) => {
  const dir = tempDir()
  const path = join(dir, 'sdxl.safetensors')
  writeSafetensors(path, { 'some.unknown.weight': f32([4, 4], 1) })
  const error = await t.throwsAsync(merge(exchangeEma(model(path))), { instanceOf: ConfigError })
  t.regex(error!.message, /^exchange_ema: no implementation takes these inputs \("model" has no known config\)/)
  t.regex(error!.message, /implementations: exchange_ema_'sd1-ldm' \(model sd1-ldm\)/)
  t.regex(error!.message, /Convert the input to one of those configs, or register an implementation for its config$/m)
})

test('an implementation registered from JavaScript serves the interface for its config', async (t) => {
  defineMergeMethod({
    id: "test_exchange_ema_'sdxl-sgm'",
    implements: 'exchange_ema',
    inputs: [{ name: 'model', stateDict: true, config: 'sdxl-sgm' }],
    returns: { config: 'sdxl-sgm' },
    elementwise: true,
    fn: ({ model }) => (model as Float32Array).map((v) => -v),
  })
  const info = methods.get("test_exchange_ema_'sdxl-sgm'")!
  t.is(info.implements, 'exchange_ema')
  t.true(methods.get('exchange_ema')!.isInterface)
  const dir = tempDir()
  const path = join(dir, 'sdxl.safetensors')
  const w = f32([8, 16], 7)
  writeSafetensors(path, { 'model.diffusion_model.label_emb.0.0.weight': w })
  const out = await merge(exchangeEma(model(path)), { outputDtype: 'f32' })
  t.deepEqual(
    Array.from(toFloat32(out.get('model.diffusion_model.label_emb.0.0.weight')!)),
    w.values.map((v) => -v),
  )
  // the sd1 implementation still serves sd1 models
  const { path: sd1Path, tensors } = sd1(true)
  const swapped = await merge(exchangeEma(model(sd1Path)), { outputDtype: 'f32' })
  t.deepEqual(Array.from(toFloat32(swapped.get(UNET[0])!)), tensors[EMA[0]].values)
})

test('an implementation whose parameters differ from the interface is refused at registration', (t) => {
  const error = t.throws(
    () =>
      defineMergeMethod({
        id: 'test_bad_ema',
        implements: 'exchange_ema',
        inputs: [{ name: 'checkpoint', config: 'sd1-ldm' }],
        fn: ({ checkpoint }) => checkpoint as Float32Array,
      }),
    { instanceOf: RecipeError },
  )
  t.regex(error!.message, /"test_bad_ema" implements "exchange_ema", but parameter "checkpoint" differs/)
  const unknown = t.throws(
    () =>
      defineMergeMethod({
        id: 'test_bad_ema2',
        implements: 'exchange_emma',
        inputs: [{ name: 'model', config: 'sd1-ldm' }],
        fn: ({ model }) => model as Float32Array,
      }),
    { instanceOf: RecipeError },
  )
  t.regex(unknown!.message, /unknown merge method "exchange_emma"\. Did you mean "exchange_ema"\?/)
})
