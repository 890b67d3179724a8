// randperm, rebasin and balance_attention through the TypeScript API, on one CLIP-L layer of an
// sdxl-sgm checkpoint (real key names and shapes). The native tests (crates/mecha-core/tests/
// permutations.rs, balance.rs) check every block kind; this checks the builders, dispatch and
// that attention computes the same.
import test from 'ava'
import { join } from 'node:path'

import {
  balanceAttention,
  merge,
  methods,
  model,
  randperm,
  rebasin,
  toFloat32,
  type MergedModel,
} from '../dist/index.js'
import { randomValues, tempDir, writeSafetensors, type TestTensor } from './helpers.ts'

const LAYER = 'conditioner.embedders.0.transformer.text_model.encoder.layers.0.'
const WIDTH = 768
const f32 = (shape: number[], seed: number, scale = 1): TestTensor => ({
  dtype: 'F32',
  shape,
  values: randomValues(
    seed,
    shape.reduce((a, b) => a * b, 1),
  ).map((v) => Math.fround(scale * v)),
})

function clipLayer(seed: number) {
  const tensors: Record<string, TestTensor> = {}
  ;['q', 'k', 'v', 'out'].forEach((p, i) => {
    // q and k of unequal scale, so that balancing has something to do
    tensors[`${LAYER}self_attn.${p}_proj.weight`] = f32([WIDTH, WIDTH], seed + i, p === 'k' ? 3 : 1)
    tensors[`${LAYER}self_attn.${p}_proj.bias`] = f32([WIDTH], seed + 10 + i)
  })
  tensors[`${LAYER}mlp.fc1.weight`] = f32([3072, WIDTH], seed + 20)
  tensors[`${LAYER}mlp.fc1.bias`] = f32([3072], seed + 21)
  tensors[`${LAYER}mlp.fc2.weight`] = f32([WIDTH, 3072], seed + 22)
  tensors[`${LAYER}mlp.fc2.bias`] = f32([WIDTH], seed + 23)
  const path = join(tempDir(), `clip-${seed}.safetensors`)
  writeSafetensors(path, tensors)
  return { path, tensors }
}

type Weights = (name: string) => ArrayLike<number>

/** softmax(q·kᵀ/8)·v per 64-wide head, then out_proj, for a few token vectors; in f64. */
function attention(w: Weights, tokens: number[][]): number[][] {
  const project = (p: string, x: number[]) => {
    const [weight, bias] = [w(`${LAYER}self_attn.${p}_proj.weight`), w(`${LAYER}self_attn.${p}_proj.bias`)]
    return Array.from({ length: WIDTH }, (_, i) => {
      let s = bias[i]
      for (let j = 0; j < WIDTH; j++) s += weight[i * WIDTH + j] * x[j]
      return s
    })
  }
  const [q, k, v] = ['q', 'k', 'v'].map((p) => tokens.map((x) => project(p, x)))
  const mixed = tokens.map((_, t) => {
    const out = new Array<number>(WIDTH).fill(0)
    for (let h = 0; h < WIDTH / 64; h++) {
      const logits = tokens.map((_, s) => {
        let d = 0
        for (let c = h * 64; c < (h + 1) * 64; c++) d += q[t][c] * k[s][c]
        return d / 8
      })
      const top = Math.max(...logits)
      const e = logits.map((l) => Math.exp(l - top))
      const sum = e.reduce((a, b) => a + b, 0)
      for (let c = h * 64; c < (h + 1) * 64; c++) out[c] = e.reduce((acc, p, s) => acc + (p / sum) * v[s][c], 0)
    }
    return out
  })
  return mixed.map((x) => project('out', x))
}

const fromModel =
  (m: MergedModel): Weights =>
  (name) =>
    toFloat32(m.get(name)!)
const fromTensors =
  (t: Record<string, TestTensor>): Weights =>
  (name) =>
    t[name].values

function maxRelative(a: number[][], b: number[][]): number {
  let worst = 0
  a.forEach((row, i) =>
    row.forEach((x, j) => (worst = Math.max(worst, Math.abs(x - b[i][j]) / Math.max(1, Math.abs(b[i][j]))))),
  )
  return worst
}

const tokens = [1, 2, 3].map((s) => randomValues(100 + s, WIDTH))

test('randperm reorders the heads and hidden units of a CLIP-L layer without changing what its attention computes', async (t) => {
  const { path, tensors } = clipLayer(1)
  const out = await merge(randperm(model(path), { seed: 7 }), { outputDtype: 'f32' })
  t.deepEqual(out.report.seeds, [])
  const q = toFloat32(out.get(`${LAYER}self_attn.q_proj.weight`)!)
  t.notDeepEqual(Array.from(q), tensors[`${LAYER}self_attn.q_proj.weight`].values, 'q is permuted')
  t.true(maxRelative(attention(fromModel(out), tokens), attention(fromTensors(tensors), tokens)) < 1e-4)
  // rebasin lines the permuted copy back up with the original: every key comes back exactly
  const permutedPath = join(tempDir(), 'permuted.safetensors')
  await merge(randperm(model(path), { seed: 7 }), { output: permutedPath, outputDtype: 'f32' })
  const back = await merge(rebasin(model(permutedPath), model(path)), { outputDtype: 'f32' })
  for (const [name, tensor] of Object.entries(tensors))
    t.deepEqual(Array.from(toFloat32(back.get(name)!)), tensor.values, name)
})

test('balance_attention equalises q and k per head and keeps the attention output', async (t) => {
  const { path, tensors } = clipLayer(2)
  const out = await merge(balanceAttention(model(path)), { outputDtype: 'f32' })
  t.true(maxRelative(attention(fromModel(out), tokens), attention(fromTensors(tensors), tokens)) < 1e-4)
  // per head, ‖[Wq|bq]‖ = ‖[Wk|bk]‖ afterwards (they differed threefold before)
  const norm = (w: Weights, p: string, h: number) => {
    const [weight, bias] = [w(`${LAYER}self_attn.${p}_proj.weight`), w(`${LAYER}self_attn.${p}_proj.bias`)]
    let s = 0
    for (let r = h * 64; r < (h + 1) * 64; r++) {
      s += bias[r] ** 2
      for (let c = 0; c < WIDTH; c++) s += weight[r * WIDTH + c] ** 2
    }
    return Math.sqrt(s)
  }
  for (const h of [0, 11]) {
    const [q, k] = [norm(fromModel(out), 'q', h), norm(fromModel(out), 'k', h)]
    t.true(Math.abs(q - k) < 1e-3 * q, `head ${h}: ${q} vs ${k}`)
    t.true(norm(fromTensors(tensors), 'k', h) > 2 * norm(fromTensors(tensors), 'q', h))
  }
})

test('the three are interfaces with an sdxl-sgm implementation each', (t) => {
  for (const id of ['randperm', 'rebasin', 'balance_attention']) {
    t.true(methods.get(id)?.isInterface, id)
    t.deepEqual(
      methods
        .list()
        .filter((m) => m.implements === id)
        .map((m) => m.id),
      [`${id}_'sdxl-sgm'`],
    )
  }
})
