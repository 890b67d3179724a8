// `mecha convert` and `mecha lora bake`: usage errors, the output dtype they keep, and real runs on
// small models holding real sdxl-kohya keys (the conversions themselves are the native core's).
import test from 'ava'
import { spawnSync } from 'node:child_process'
import { existsSync, mkdirSync, readFileSync } from 'node:fs'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'

import { randomValues, tempDir, writeSafetensors, type Dtype, type TestTensor } from './helpers.ts'

const cli = fileURLToPath(new URL('../dist/cli.js', import.meta.url))
const mecha = (...args: string[]) => spawnSync(process.execPath, [cli, ...args], { encoding: 'utf8' })

/** A safetensors file read without the library: each tensor's dtype, shape and raw bytes. */
function readTensors(path: string): Map<string, { dtype: string; shape: number[]; data: Buffer }> {
  const buf = readFileSync(path)
  const n = Number(buf.readBigUInt64LE(0))
  const header: Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] }> = JSON.parse(
    buf.subarray(8, 8 + n).toString(),
  )
  delete header.__metadata__
  return new Map(
    Object.entries(header).map(
      ([
        name,
        {
          dtype,
          shape,
          data_offsets: [start, end],
        },
      ]) => [name, { dtype, shape, data: buf.subarray(8 + n + start, 8 + n + end) }],
    ),
  )
}

/** An F32 tensor's values. */
function f32(data: Buffer): Float32Array {
  return new Float32Array(data.buffer.slice(data.byteOffset, data.byteOffset + data.length))
}

/** A tensor of `shape` with deterministic values in [-1, 1), as f32 stores them. */
function tensor(dtype: Dtype, shape: number[], seed: number): TestTensor {
  const n = shape.reduce((a, b) => a * b, 1)
  return { dtype, shape, values: randomValues(seed, n).map(Math.fround) }
}

// Real sdxl-kohya key names (the te1 and UNet keys make the file an sdxl-kohya model, not
// sdxl-kohya_but_diffusers, whose UNet keys are diffusers'); shapes as in the config.
const TE1_Q = 'te1.text_model.encoder.layers.0.self_attn.q_proj'
const PROJ_IN = 'unet.input_blocks.4.1.proj_in'
const TE2_ATTN = 'te2.text_model.encoder.layers.0.self_attn'
const TE2_PROJECTION = 'te2.text_projection.weight'

/** `up @ down` of an [m, r] and an [r, n] matrix, in float64. */
function matmul(up: readonly number[], down: readonly number[], m: number, r: number, n: number): Float64Array {
  const out = new Float64Array(m * n)
  for (let i = 0; i < m; i++)
    for (let k = 0; k < r; k++) {
      const u = up[i * r + k]
      for (let j = 0; j < n; j++) out[i * n + j] += u * down[k * n + j]
    }
  return out
}

/** A kohya LoRA of one layer: `rank` factors and, unless `alpha` is undefined, its alpha. */
function loraLayer(stem: string, rows: number, cols: number, rank: number, alpha: number | undefined, seed: number) {
  const up = tensor('F32', [rows, rank], seed)
  const down = tensor('F32', [rank, cols], seed + 1)
  const tensors: Record<string, TestTensor> = {
    [`${stem}.lora_up.weight`]: up,
    [`${stem}.lora_down.weight`]: down,
  }
  if (alpha !== undefined) tensors[`${stem}.alpha`] = { dtype: 'F32', shape: [], values: [alpha] }
  // sd-mecha: alpha / rank · up @ down, or up @ down when the file has no alpha
  const scale = alpha === undefined ? 1 : alpha / rank
  const delta = matmul(up.values, down.values, rows, rank, cols).map((x) => scale * x)
  return { tensors, delta }
}

/** An sdxl-kohya base (f32) and two LoRAs; the second in a folder whose name holds a ':'. */
function loraSetup() {
  const dir = tempDir()
  const base = join(dir, 'base.safetensors')
  const baseTensors: Record<string, TestTensor> = {
    [`${TE1_Q}.weight`]: tensor('F32', [768, 768], 1),
    [`${TE1_Q}.bias`]: tensor('F32', [768], 2),
    [`${PROJ_IN}.weight`]: tensor('F32', [640, 640], 3),
    [`${PROJ_IN}.bias`]: tensor('F32', [640], 4),
  }
  writeSafetensors(base, baseTensors)
  const te = loraLayer('lora_te1_text_model_encoder_layers_0_self_attn_q_proj', 768, 768, 4, 2, 10)
  const unet1 = loraLayer('lora_unet_input_blocks_4_1_proj_in', 640, 640, 2, 1, 20)
  const unet2 = loraLayer('lora_unet_input_blocks_4_1_proj_in', 640, 640, 2, undefined, 30)
  const lora1 = join(dir, 'lora1.safetensors')
  writeSafetensors(lora1, { ...te.tensors, ...unet1.tensors })
  mkdirSync(join(dir, 'with:colon'))
  const lora2 = join(dir, 'with:colon', 'lora2.safetensors')
  writeSafetensors(lora2, unet2.tensors)
  return { dir, base, baseTensors, lora1, lora2, deltas: { te: te.delta, unet1: unet1.delta, unet2: unet2.delta } }
}

/** Equal within 1e-5, relative to the value's magnitude where it exceeds 1. */
function closeTo(actual: ArrayLike<number>, expected: ArrayLike<number>): string | undefined {
  if (actual.length !== expected.length) return `length ${actual.length}, expected ${expected.length}`
  for (let i = 0; i < expected.length; i++)
    if (!(Math.abs(actual[i] - expected[i]) <= 1e-5 * Math.max(1, Math.abs(expected[i]))))
      return `element ${i} is ${actual[i]}, expected ${expected[i]}`
  return undefined
}

// ---------------------------------------------------------------------------------------------
// Usage: refused before any file is read (exit 2, one line, no stack trace).

test('mecha lora without a subcommand, or with an unknown one, prints the lora usage and exits 2', (t) => {
  const cases: [string[], RegExp][] = [
    [['lora'], /^mecha: lora needs a subcommand: bake, extract\n\nUsage: mecha lora <subcommand>/],
    [
      ['lora', 'bak', 'a.safetensors'],
      /^mecha: lora has no subcommand "bak"; did you mean "bake"\?\n\nUsage: mecha lora /,
    ],
    [
      ['lora', 'extrakt', 'a.safetensors'],
      /^mecha: lora has no subcommand "extrakt"; did you mean "extract"\?\n\nUsage: mecha lora /,
    ],
    [['lora', '--json'], /^mecha: lora needs a subcommand: bake, extract\n/],
    [['help', 'lora', 'bak'], /^mecha: lora has no subcommand "bak"; did you mean "bake"\?/],
  ]
  for (const [args, message] of cases) {
    const r = mecha(...args)
    t.is(r.status, 2, `${args.join(' ')}: ${r.stderr}`)
    t.regex(r.stderr, message, args.join(' '))
    t.regex(r.stderr, /\n  bake <base\.safetensors> <lora\.safetensors>\[:alpha\]\.\.\. -o <out\.safetensors>/)
    t.is(r.stdout, '')
  }
})

test('mecha help convert, help lora and help lora bake, also as --help', (t) => {
  for (const command of ['convert', 'lora', 'lora bake', 'lora extract']) {
    const help = mecha('help', ...command.split(' '))
    t.is(help.status, 0, help.stderr)
    t.regex(help.stdout, new RegExp(`^Usage: mecha ${command} `))
    t.true(help.stdout.endsWith('\n'))
    t.is(mecha(...command.split(' '), '--help').stdout, help.stdout)
    t.is(mecha(...command.split(' '), '-h').stdout, help.stdout)
  }
  const convert = mecha('help', 'convert').stdout
  t.regex(convert, /--to <config>/)
  t.regex(
    convert,
    /--output-dtype <dtype> .*\(default: the input's float\n +dtype when all its float tensors share one, else f16\)/,
  )
  t.notRegex(convert, /--strict-merge-space|--fallback-model/)
  const bake = mecha('help', 'lora', 'bake').stdout
  t.regex(bake, /default: the base's float/)
  t.regex(bake, /C:\\loras\\style\.safetensors/)
  t.regex(mecha('help', 'lora').stdout, /mecha help lora bake/)
  t.regex(mecha('help', 'lora').stdout, /mecha help lora extract/)
  const extract = mecha('help', 'lora', 'extract').stdout
  t.regex(extract, /--rank <r> +rank of each layer's LoRA \(default 8\)/)
  t.regex(extract, /--algorithm <a> +lora \(default: up, down, alpha\) or lokr/)
  const top = mecha('--help').stdout
  t.regex(top, /\n  mecha convert <in\.safetensors> --to <config> -o <out\.safetensors>/)
  t.regex(top, /\n  mecha lora bake <base\.safetensors> <lora\.safetensors>\[:alpha\]\.\.\. -o <out\.safetensors>/)
  const extra = mecha('help', 'lora', 'bake', 'more')
  t.is(extra.status, 2)
  t.regex(extra.stderr, /help takes one command name, but was also given: more/)
})

test('mecha convert and lora bake refuse mistakes on the command line with one line and exit 2', (t) => {
  const dir = tempDir()
  const input = join(dir, 'in.safetensors')
  writeSafetensors(input, { [`${TE1_Q}.bias`]: tensor('F32', [768], 1) })
  const out = join(dir, 'out.safetensors')
  const cases: [string[], RegExp][] = [
    [['convert'], /convert needs a safetensors file/],
    [['convert', input, '-o', out], /convert needs --to <config>, e.g\. --to sdxl-sgm/],
    [['convert', input, '--to', 'sdxl-sgm'], /convert needs -o <out\.safetensors>/],
    [['convert', input, '--to'], /--to needs a value/],
    [
      ['convert', input, '--to', 'sdxl-sgmm', '-o', out],
      /--to: unknown model config "sdxl-sgmm"; did you mean "sdxl-sgm"\?/,
    ],
    [
      ['convert', input, '--to', 'sd1_ldm', '-o', out],
      /--to: unknown model config "sd1_ldm"; did you mean "sd1-ldm"\?/,
    ],
    [
      ['convert', input, 'more.safetensors', '--to', 'sdxl-sgm', '-o', out],
      /convert takes one safetensors file, but was also given: more\.safetensors/,
    ],
    [
      ['convert', input, '--to', 'sdxl-sgm', '-o', out, '--too', 'x'],
      /convert has no option --too; did you mean --to\?/,
    ],
    [
      ['convert', input, '--to', 'sdxl-sgm', '-o', out, '--fallback-model', input],
      /convert has no option --fallback-model; it takes --to, --output/,
    ],
    [['convert', input, '--to', 'sdxl-sgm', '-o', out, '--threads', '-1'], /--threads must be a non-negative integer/],
    [['convert', input, '--to', 'sdxl-sgm', '-o', out, '--memory', 'lots'], /--memory: "lots" is not a size/],
    [['lora', 'bake'], /lora bake needs a base model and at least one LoRA/],
    [
      ['lora', 'bake', input, '-o', out],
      /lora bake needs at least one LoRA after the base model \(.*in\.safetensors\)/,
    ],
    [['lora', 'bake', input, 'lora.safetensors:0.5'], /lora bake needs -o <out\.safetensors>/],
    [
      ['lora', 'bake', input, 'lora.safetensors:strong', '-o', out],
      /LoRA lora\.safetensors:strong: the alpha after ":" must be a number, got "strong"/,
    ],
    [
      ['lora', 'bake', input, 'lora.safetensors:', '-o', out],
      /LoRA lora\.safetensors:: the alpha after ":" must be a number, got ""/,
    ],
    [['lora', 'bake', input, 'lora.safetensors:1e999', '-o', out], /the alpha after ":" must be a number, got "1e999"/],
    [['lora', 'bake', input, ':0.5', '-o', out], /LoRA :0\.5: no path before the alpha/],
    [
      ['lora', 'bake', input, 'lora.safetensors', '-o', out, '--alpha', '2'],
      /lora bake has no option --alpha; it takes --output/,
    ],
    [
      ['lora', 'bake', input, 'lora.safetensors', '-o', out, '--ouput-dtype', 'f16'],
      /lora bake has no option --ouput-dtype; did you mean --output-dtype\?/,
    ],
  ]
  for (const [args, message] of cases) {
    const r = mecha(...args)
    t.is(r.status, 2, `${args.join(' ')}: ${r.stderr}`)
    t.regex(r.stderr, message, args.join(' '))
    t.notRegex(r.stderr, /\n\s+at /, `no stack trace for ${args.join(' ')}`)
  }
  t.false(existsSync(out))
})

test('mecha convert and lora bake report unreadable inputs with their type and exit 1', (t) => {
  const dir = tempDir()
  const missing = join(dir, 'missing.safetensors')
  const out = join(dir, 'out.safetensors')
  for (const args of [
    ['convert', missing, '--to', 'sdxl-sgm', '-o', out],
    ['lora', 'bake', missing, join(dir, 'lora.safetensors'), '-o', out],
  ]) {
    const r = mecha(...args)
    t.is(r.status, 1, r.stderr)
    t.regex(r.stderr, /^mecha: SafetensorsError: .*missing\.safetensors: file not found/)
  }
  t.false(existsSync(out))
})

test('mecha convert to the config a model is in copies it, keeping its float dtype unless told otherwise', (t) => {
  const dir = tempDir()
  // bf16 throughout (f16, the merge default, would change every value), plus an integer tensor
  const input = join(dir, 'bf16.safetensors')
  writeSafetensors(input, {
    [`${TE1_Q}.weight`]: tensor('BF16', [768, 768], 1),
    [`${PROJ_IN}.bias`]: tensor('BF16', [640], 2),
    'te1.text_model.embeddings.position_ids': {
      dtype: 'I64',
      shape: [1, 77],
      values: Array.from({ length: 77 }, (_, i) => i),
    },
  })
  const out = join(dir, 'out.safetensors')
  const r = mecha('convert', input, '--to', 'sdxl-kohya', '-o', out, '--json')
  t.is(r.status, 0, r.stderr)
  const report = JSON.parse(r.stdout)
  t.like(report, { output: out, keysWritten: 3, keysSkipped: [], seeds: [] })
  t.regex(
    report.recipe,
    /^version 0\.1\.0\nmodel ".*bf16\.safetensors" model_config="sdxl-kohya" merge_space="weight"$/,
  )
  const before = readTensors(input)
  const after = readTensors(out)
  t.deepEqual([...after.keys()].sort(), [...before.keys()].sort())
  for (const [name, x] of before) {
    t.is(after.get(name)!.dtype, x.dtype, name)
    t.true(after.get(name)!.data.equals(x.data), `${name} is byte-identical`)
  }

  // --output-dtype wins; float tensors of several dtypes give f16, the merge default
  const f32Out = join(dir, 'f32.safetensors')
  t.is(mecha('convert', input, '--to', 'sdxl-kohya', '-o', f32Out, '-q', '--output-dtype', 'f32').status, 0)
  t.is(readTensors(f32Out).get(`${TE1_Q}.weight`)!.dtype, 'F32')
  const mixed = join(dir, 'mixed.safetensors')
  writeSafetensors(mixed, { [`${TE1_Q}.bias`]: tensor('F32', [768], 3), [`${PROJ_IN}.bias`]: tensor('BF16', [640], 4) })
  const mixedOut = join(dir, 'mixed-out.safetensors')
  const m = mecha('convert', mixed, '--to', 'sdxl-kohya', '-o', mixedOut)
  t.is(m.status, 0, m.stderr)
  t.regex(m.stdout, /^wrote .*mixed-out\.safetensors\n  2 keys, /)
  t.deepEqual(
    [...readTensors(mixedOut).values()].map((x) => x.dtype),
    ['F16', 'F16'],
  )
})

// ---------------------------------------------------------------------------------------------
// Real conversions (the native core's kohya ↔ sgm conversions and LoRA bakes).

test('mecha lora bake adds each LoRA times its alpha to the base, keeping its dtype', (t) => {
  const { dir, base, baseTensors, lora1, lora2, deltas } = loraSetup()
  const out = join(dir, 'baked.safetensors')
  // lora2 lies in "with:colon/": the ':' in the folder is part of the path, the last one its alpha
  const r = mecha('lora', 'bake', base, `${lora1}:0.5`, `${lora2}:-0.25`, '-o', out, '--json')
  t.is(r.status, 0, r.stderr)
  const report = JSON.parse(r.stdout)
  t.like(report, { output: out, keysWritten: 4, keysSkipped: [], nonFiniteOutputs: [], seeds: [] })
  for (const field of ['bytesRead', 'bytesWritten', 'seconds', 'peakRssBytes', 'threads', 'memoryBudget'])
    t.is(typeof report[field], 'number', field)
  t.regex(report.recipe, /merge "add_difference" /)
  t.regex(report.recipe, /lora2\.safetensors"/)

  const merged = readTensors(out)
  t.deepEqual([...merged.keys()].sort(), Object.keys(baseTensors).sort(), 'a LoRA adds no key')
  for (const x of merged.values()) t.is(x.dtype, 'F32', "the base's dtype")
  const te = baseTensors[`${TE1_Q}.weight`].values.map((x, i) => x + 0.5 * deltas.te[i])
  t.is(closeTo(f32(merged.get(`${TE1_Q}.weight`)!.data), te), undefined, 'te1 q_proj: base + 0.5·(2/4)·up@down')
  const unet = baseTensors[`${PROJ_IN}.weight`].values.map((x, i) => x + 0.5 * deltas.unet1[i] - 0.25 * deltas.unet2[i])
  t.is(
    closeTo(f32(merged.get(`${PROJ_IN}.weight`)!.data), unet),
    undefined,
    'proj_in: base + 0.5·(1/2)·up1@down1 − 0.25·up2@down2 (no alpha in the file: scale 1)',
  )
  for (const key of [`${TE1_Q}.bias`, `${PROJ_IN}.bias`])
    t.deepEqual(Array.from(f32(merged.get(key)!.data)), baseTensors[key].values, `${key}: no LoRA touches it`)

  // the default alpha is 1; the text report names the output
  const once = join(dir, 'once.safetensors')
  const plain = mecha('lora', 'bake', base, lora1, '-o', once)
  t.is(plain.status, 0, plain.stderr)
  t.regex(plain.stdout, /^wrote .*once\.safetensors\n  4 keys, /)
  const teOnce = baseTensors[`${TE1_Q}.weight`].values.map((x, i) => x + deltas.te[i])
  t.is(closeTo(f32(readTensors(once).get(`${TE1_Q}.weight`)!.data), teOnce), undefined, 'alpha 1')
})

test('mecha lora bake refuses to write over one of its inputs', (t) => {
  const { base, lora1 } = loraSetup()
  const before = readFileSync(base)
  for (const output of [base, lora1]) {
    const r = mecha('lora', 'bake', base, lora1, '-o', output)
    t.is(r.status, 1, r.stderr)
    t.regex(r.stderr, /OutputError: refusing to write the output to .*: it is one of the merge's inputs/)
  }
  t.true(readFileSync(base).equals(before))
})

test('mecha convert sdxl-kohya → sdxl-sgm → sdxl-kohya gives back every tensor byte for byte', (t) => {
  const dir = tempDir()
  const kohya = join(dir, 'kohya.safetensors')
  const tensors: Record<string, TestTensor> = {
    [`${TE1_Q}.weight`]: tensor('BF16', [768, 768], 1),
    [`${PROJ_IN}.bias`]: tensor('BF16', [640], 2),
    [TE2_PROJECTION]: tensor('BF16', [1280, 1280], 3),
  }
  ;['q', 'k', 'v'].forEach((p, i) => {
    tensors[`${TE2_ATTN}.${p}_proj.weight`] = tensor('BF16', [1280, 1280], 10 + i)
    tensors[`${TE2_ATTN}.${p}_proj.bias`] = tensor('BF16', [1280], 20 + i)
  })
  writeSafetensors(kohya, tensors)
  const sgm = join(dir, 'sgm.safetensors')
  const there = mecha('convert', kohya, '--to', 'sdxl-sgm', '-o', sgm, '--json')
  t.is(there.status, 0, there.stderr)
  // sdxl-sgm's missing-key handler completes the text encoders the file has (docs/differences.md):
  // position ids and the pruned CLIP-L layer 11 / CLIP-G resblock 31
  const filledByHandler = (key: string) =>
    key.endsWith('.position_ids') || /\.(encoder\.layers\.(11|31)|resblocks\.31)\./.test(key)
  const mid = readTensors(sgm)
  const filled = [...mid.keys()].filter(filledByHandler)
  t.true(filled.length > 0)
  t.like(JSON.parse(there.stdout), { output: sgm, keysWritten: 5 + filled.length, keysSkipped: [] })

  // in sgm: q, k and v are one in_proj key, and text_projection is transposed
  const input = readTensors(kohya)
  const inProj = 'conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj'
  t.deepEqual(
    [...mid.keys()].filter((k) => !filledByHandler(k)).sort(),
    [
      'conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight',
      `${inProj}_bias`,
      `${inProj}_weight`,
      'conditioner.embedders.1.model.text_projection',
      'model.diffusion_model.input_blocks.4.1.proj_in.bias',
    ].sort(),
  )
  t.deepEqual(mid.get(`${inProj}_weight`)!.shape, [3840, 1280])
  t.deepEqual(mid.get(`${inProj}_bias`)!.shape, [3840])
  for (const [k, x] of mid) t.is(x.dtype, k.endsWith('.position_ids') ? 'I64' : 'BF16', k)
  const qkv = (suffix: string) =>
    Buffer.concat(['q', 'k', 'v'].map((p) => input.get(`${TE2_ATTN}.${p}_proj.${suffix}`)!.data))
  t.true(mid.get(`${inProj}_weight`)!.data.equals(qkv('weight')), 'in_proj_weight is q, k, v stacked')
  t.true(mid.get(`${inProj}_bias`)!.data.equals(qkv('bias')), 'in_proj_bias is q, k, v stacked')
  const projection = input.get(TE2_PROJECTION)!.data
  const transposed = mid.get('conditioner.embedders.1.model.text_projection')!.data
  for (const [i, j] of [
    [0, 1],
    [1, 0],
    [5, 1277],
    [1279, 3],
  ])
    t.is(transposed.readUInt16LE(2 * (i * 1280 + j)), projection.readUInt16LE(2 * (j * 1280 + i)), `[${i}, ${j}]`)

  const back = join(dir, 'back.safetensors')
  const r = mecha('convert', sgm, '--to', 'sdxl-kohya', '-o', back, '-q')
  t.is(r.status, 0, r.stderr)
  const output = readTensors(back)
  t.deepEqual([...output.keys()].filter((k) => !filledByHandler(k)).sort(), [...input.keys()].sort())
  for (const [name, x] of input) {
    const y = output.get(name)!
    t.is(y.dtype, x.dtype, name)
    t.deepEqual(y.shape, x.shape, name)
    t.true(y.data.equals(x.data), `${name} is byte-identical`)
  }
})

// ---------------------------------------------------------------------------------------------
// mecha lora extract: sdxl-sgm checkpoints in, a kohya LoRA out, which bakes back into the base.

const SGM_PROJ_IN = 'model.diffusion_model.input_blocks.4.1.proj_in'
const SGM_TE1_Q = 'conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj'

/** An sdxl-sgm base and a tuned copy whose two weights differ by rank-2 products (f32). */
function extractSetup() {
  const dir = tempDir()
  const layers = [
    { key: `${SGM_PROJ_IN}.weight`, rows: 640, cols: 640, stem: 'lora_unet_input_blocks_4_1_proj_in' },
    { key: `${SGM_TE1_Q}.weight`, rows: 768, cols: 768, stem: 'lora_te1_text_model_encoder_layers_0_self_attn_q_proj' },
  ]
  const base: Record<string, TestTensor> = { [`${SGM_PROJ_IN}.bias`]: tensor('F32', [640], 9) }
  const tuned: Record<string, TestTensor> = { [`${SGM_PROJ_IN}.bias`]: base[`${SGM_PROJ_IN}.bias`] }
  layers.forEach(({ key, rows, cols }, l) => {
    const b = tensor('F32', [rows, cols], 40 + l)
    const delta = matmul(
      tensor('F32', [rows, 2], 50 + l).values,
      tensor('F32', [2, cols], 60 + l).values,
      rows,
      2,
      cols,
    )
    base[key] = b
    tuned[key] = { dtype: 'F32', shape: [rows, cols], values: b.values.map((x, i) => Math.fround(x + delta[i])) }
  })
  const paths = { base: join(dir, 'base.safetensors'), tuned: join(dir, 'tuned.safetensors') }
  writeSafetensors(paths.base, base)
  writeSafetensors(paths.tuned, tuned)
  return { dir, ...paths, layers, tunedTensors: tuned }
}

test('mecha lora extract writes a kohya LoRA of tuned − base that mecha lora bake turns back into tuned', (t) => {
  const { dir, base, tuned, layers, tunedTensors } = extractSetup()
  const lora = join(dir, 'lora.safetensors')
  const r = mecha('lora', 'extract', base, tuned, '--rank', '2', '--exact', '-o', lora, '--json')
  t.is(r.status, 0, r.stderr)
  const report = JSON.parse(r.stdout)
  t.like(report, { output: lora, keysWritten: 6, seeds: [] })
  t.regex(report.recipe, /\nmerge "convert_'sdxl-sgm'_to_'sdxl-kohya'" &0\n/)
  t.regex(report.recipe, /\nmerge "extract_lora_'sdxl-kohya_kohya_lora'" &\d+ &\d+ &\d+ &\d+ &\d+$/)
  t.regex(report.recipe, /\ndict key=false\n/, 'use_approximate_basis=False')
  const written = readTensors(lora)
  for (const { stem, rows, cols } of layers) {
    t.deepEqual(written.get(`${stem}.lora_up.weight`)?.shape, [rows, 2])
    t.deepEqual(written.get(`${stem}.lora_down.weight`)?.shape, [2, cols])
    t.deepEqual(Array.from(f32(written.get(`${stem}.alpha`)!.data)), [2])
    t.is(written.get(`${stem}.lora_up.weight`)?.dtype, 'F32', "the base's dtype")
  }
  const baked = join(dir, 'baked.safetensors')
  const b = mecha('lora', 'bake', base, lora, '-o', baked, '-q')
  t.is(b.status, 0, b.stderr)
  const result = readTensors(baked)
  for (const { key } of layers) {
    const got = f32(result.get(key)!.data)
    const want = tunedTensors[key].values
    let worst = 0
    for (let i = 0; i < want.length; i++) worst = Math.max(worst, Math.abs(got[i] - want[i]))
    t.true(worst < 1e-4, `${key}: the rank-2 difference is rebuilt (max error ${worst})`)
  }

  // the randomised SVD (the default) reports the seed it chose; --seed makes it repeatable
  const approx = mecha('lora', 'extract', base, tuned, '--rank', '2', '-o', join(dir, 'approx.safetensors'))
  t.is(approx.status, 0, approx.stderr)
  t.regex(approx.stdout, /extract_kohya_lora drew from seed \d+ \(approximate_basis_seed was null/)
  const seeded = [1, 2].map((i) => {
    const out = join(dir, `seeded${i}.safetensors`)
    t.is(mecha('lora', 'extract', base, tuned, '--seed', '5', '-o', out, '-q').status, 0)
    return readFileSync(out)
  })
  t.true(seeded[0].equals(seeded[1]), 'the same seed gives the same file')
  // LoKr and LyCORIS names
  const lokr = join(dir, 'lokr.safetensors')
  const k = mecha('lora', 'extract', base, tuned, '--algorithm', 'lokr', '--naming', 'lycoris', '-o', lokr, '-q')
  t.is(k.status, 0, k.stderr)
  t.true(readTensors(lokr).has('lycoris_unet_input_blocks_4_1_proj_in.lokr_w1'))
})

test('mecha lora extract refuses mistakes with one line (exit 2) and models of two architectures with a ConfigError', (t) => {
  const { dir, base, tuned } = extractSetup()
  const out = join(dir, 'out.safetensors')
  const cases: [string[], RegExp][] = [
    [['lora', 'extract', base, '-o', out], /lora extract needs a base model and a tuned model/],
    [['lora', 'extract', base, tuned], /lora extract needs -o <out\.safetensors>/],
    [
      ['lora', 'extract', base, tuned, base, '-o', out],
      /lora extract takes a base model and a tuned model, but was also given/,
    ],
    [['lora', 'extract', base, tuned, '--rank', '0', '-o', out], /--rank must be an integer ≥ 1, got 0/],
    [['lora', 'extract', base, tuned, '--rank', 'x', '-o', out], /--rank must be an integer ≥ 1, got x/],
    [['lora', 'extract', base, tuned, '--algorithm', 'loha', '-o', out], /--algorithm must be lora or lokr, got loha/],
    [['lora', 'extract', base, tuned, '--layout', 'sdxl-sgm', '-o', out], /--layout must be sdxl-kohya or/],
    [
      ['lora', 'extract', base, tuned, '--kronecker-ratio', '2', '-o', out],
      /--kronecker-ratio must be a number from 0 to 1/,
    ],
    [
      ['lora', 'extract', base, tuned, '--rnak', '2', '-o', out],
      /lora extract has no option --rnak; did you mean --rank\?/,
    ],
    [
      ['lora', 'extract', base, tuned, '--rank-ratio', '1.5', '-o', out],
      /--rank-ratio must be a number from 0 to 1, got 1\.5/,
    ],
    [
      ['lora', 'extract', base, tuned, '--rank', '4', '--rank-ratio', '0.5', '-o', out],
      /give --rank or --rank-ratio, not both/,
    ],
  ]
  for (const [args, message] of cases) {
    const r = mecha(...args)
    t.is(r.status, 2, `${args.join(' ')}: ${r.stderr}`)
    t.regex(r.stderr, message, args.join(' '))
  }
  // an SD 1 model against an SDXL one: no chain of conversions between them
  const sd1 = join(dir, 'sd1.safetensors')
  writeSafetensors(sd1, { 'model.diffusion_model.input_blocks.1.1.proj_in.weight': tensor('F32', [320, 320, 1, 1], 3) })
  const r = mecha('lora', 'extract', sd1, tuned, '-o', out)
  t.is(r.status, 1, r.stderr)
  t.regex(
    r.stderr,
    /ConfigError: extractLora: the base is sd1-ldm but tuned is sdxl-sgm; a LoRA is the difference of two models of one architecture/,
  )
  t.false(existsSync(out))
})
