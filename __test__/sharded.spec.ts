// Hugging Face sharded checkpoints through the API and the CLI: a folder or index as a model,
// `maxShardSize` outputs, `inspect` / `mecha info` on them.
import test from 'ava'
import { spawnSync } from 'node:child_process'
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'

import {
  OptionError,
  OutputError,
  SafetensorsError,
  inspect,
  merge,
  model,
  parseShardSize,
  toFloat32,
  weightedSum,
} from '../dist/index.js'
import { files, qwenTensors, tempDir, writeCheckpoint, writeSafetensors } from './helpers.ts'

const cli = fileURLToPath(new URL('../dist/cli.js', import.meta.url))
const mecha = (...args: string[]) => spawnSync(process.execPath, [cli, ...args], { encoding: 'utf8' })

const qwen = qwenTensors

test('a sharded checkpoint is a model: its folder or its index, merged with single files', async (t) => {
  const dir = tempDir()
  const folder = join(dir, 'a')
  writeCheckpoint(folder, qwen(1), 3)
  const single = join(dir, 'a.safetensors')
  writeSafetensors(single, qwen(1))
  const b = join(dir, 'b.safetensors')
  writeSafetensors(b, qwen(2))

  const fromFolder = await merge(weightedSum(model(folder), model(b), { alpha: 0.3 }), { outputDtype: 'f32' })
  const fromIndex = await merge(
    weightedSum(model(join(folder, 'model.safetensors.index.json')), model(b), { alpha: 0.3 }),
    { outputDtype: 'f32' },
  )
  const fromFile = await merge(weightedSum(model(single), model(b), { alpha: 0.3 }), { outputDtype: 'f32' })
  t.is(fromFolder.size, 23)
  for (const [k, v] of fromFile) {
    t.deepEqual([...toFloat32(fromFolder.get(k)!)], [...toFloat32(v)], k)
    t.deepEqual([...toFloat32(fromIndex.get(k)!)], [...toFloat32(v)], k)
  }

  const info = inspect(folder)
  t.is(info.files.length, 3)
  t.is(info.tensors.length, 23)
  t.is(info.layers, 2)
  t.deepEqual(info.dtypes, { BF16: 23 })
  t.is(
    info.dataBytes,
    info.tensors.reduce((s, x) => s + x.bytes, 0),
  )
  t.deepEqual([...new Set(info.tensors.map((x) => x.shard))], [0, 1, 2])
  t.is(info.config, null)
})

test('maxShardSize writes a checkpoint transformers reads: shards, index, format metadata', async (t) => {
  const dir = tempDir()
  const [a, b] = [join(dir, 'a.safetensors'), join(dir, 'b.safetensors')]
  writeSafetensors(a, qwen(1))
  writeSafetensors(b, qwen(2))
  const out = join(dir, 'merged')
  const report = await merge(weightedSum(model(a), model(b), { alpha: 0.5 }), {
    output: out,
    maxShardSize: '1KB',
    outputDtype: 'bf16',
  })
  t.is(report.keysWritten, 23)
  const listed = files(out)
  const shards = listed.filter((n) => n.endsWith('.safetensors'))
  t.true(shards.length > 2)
  t.deepEqual(listed, ['model.safetensors.index.json', ...shards].sort())
  const index = JSON.parse(readFileSync(join(out, 'model.safetensors.index.json'), 'utf8'))
  t.is(Object.keys(index.weight_map).length, 23)
  const info = inspect(out)
  t.is(index.metadata.total_size, info.dataBytes)
  for (const shard of shards) {
    const part = inspect(join(out, shard))
    t.is(part.metadata.format, 'pt')
    t.truthy(part.recipe)
    t.true(part.dataBytes <= 1000 || part.tensors.length === 1, `${shard}: ${part.dataBytes} bytes`)
  }
  // read back as one model, equal to the same merge in memory
  const memory = await merge(weightedSum(model(a), model(b), { alpha: 0.5 }), { outputDtype: 'bf16' })
  const back = await merge(weightedSum(model(out), model(out), { alpha: 0 }), { outputDtype: 'bf16' })
  for (const [k, v] of memory) t.deepEqual([...toFloat32(back.get(k)!)], [...toFloat32(v)], k)
  t.deepEqual(files(dir), ['a.safetensors', 'b.safetensors', 'merged'])
})

test('shard sizes are read as transformers reads them, and bad ones are refused', async (t) => {
  t.is(parseShardSize('5GB'), 5e9)
  t.is(parseShardSize('2GiB'), 2 * 2 ** 30)
  t.is(parseShardSize('500MB'), 5e8)
  t.is(parseShardSize('10kb'), 1e4)
  t.is(parseShardSize(4096), 4096)
  t.is(parseShardSize('4096'), 4096)
  t.is(parseShardSize('200B'), 200)
  for (const bad of ['5 gigs', '-1GB', '0', 'GB', '1.5XB', '5G', '2KiBB'])
    t.throws(() => parseShardSize(bad), { instanceOf: OptionError })
  const dir = tempDir()
  const a = join(dir, 'a.safetensors')
  writeSafetensors(a, qwen(1))
  await t.throwsAsync(merge(model(a), { maxShardSize: '5GB' }), {
    instanceOf: OptionError,
    message: /maxShardSize needs output/,
  })
  await t.throwsAsync(merge(model(a), { output: join(dir, 'o'), maxShardSize: 'lots' }), { instanceOf: OptionError })
  // a folder that holds other files is left as it is, and so is one holding an input
  const other = join(dir, 'other')
  mkdirSync(other)
  writeFileSync(join(other, 'notes.txt'), 'mine')
  await t.throwsAsync(merge(model(a), { output: other, maxShardSize: '1KB' }), {
    instanceOf: OutputError,
    message: /new or empty folder/,
  })
  t.deepEqual(files(other), ['notes.txt'])
  await t.throwsAsync(merge(model(a), { output: dir, maxShardSize: '1KB' }), {
    instanceOf: OutputError,
    message: /holds one of the merge's inputs/,
  })
  t.deepEqual(files(dir), ['a.safetensors', 'other'])
  // a damaged checkpoint names the shard
  const broken = join(dir, 'broken')
  writeCheckpoint(broken, qwen(1), 2)
  writeFileSync(join(broken, 'model-00002-of-00002.safetensors'), 'not safetensors')
  t.throws(() => inspect(broken), { instanceOf: SafetensorsError, message: /model-00002-of-00002\.safetensors/ })
})

test('mecha merge --max-shard-size and mecha info on a checkpoint', (t) => {
  const dir = tempDir()
  const folder = join(dir, 'a')
  writeCheckpoint(folder, qwen(1), 2)
  writeSafetensors(join(dir, 'b.safetensors'), qwen(2))
  const recipe = join(dir, 'r.json')
  writeFileSync(
    recipe,
    JSON.stringify({
      nodes: [
        { model: folder },
        { model: join(dir, 'b.safetensors') },
        { merge: 'weighted_sum', args: [{ node: 0 }, { node: 1 }], kwargs: { alpha: 0.5 } },
      ],
    }),
  )
  const out = join(dir, 'out')
  const r = mecha('merge', recipe, '-o', out, '--max-shard-size', '1KB', '--quiet')
  t.is(r.status, 0, r.stderr)
  t.true(files(out).includes('model.safetensors.index.json'))
  const info = mecha('info', out)
  t.is(info.status, 0, info.stderr)
  t.regex(info.stdout, /23 tensors, .* of data, in \d+ shards/)
  t.regex(info.stdout, /layers: 2/)
  t.regex(info.stdout, /dtypes: F16×23/) // the CLI writes f16 by default
  const bad = mecha('merge', recipe, '-o', join(dir, 'x'), '--max-shard-size', 'huge')
  t.is(bad.status, 2, bad.stderr)
  t.regex(bad.stderr, /not a size/)
})
