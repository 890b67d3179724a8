// Tensor data crosses into JavaScript as external buffers, or as copies where the runtime refuses
// external buffers (Electron). MECHA_COPY_BUFFERS=1 forces the copies; both paths must give the
// same values, for merge results and for the arguments of JavaScript methods.
import test from 'ava'
import { spawnSync } from 'node:child_process'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'

import { tempDir, writeSafetensors } from './helpers.ts'

const entry = fileURLToPath(new URL('../dist/index.js', import.meta.url))

function run(a: string, b: string, env: Record<string, string>) {
  const script = `
    const { defineMergeMethod, merge, model, toFloat32, weightedSum } = require(${JSON.stringify(entry)})
    const twice = defineMergeMethod({
      id: 'buffers_twice', inputs: [{ name: 'a' }], elementwise: true,
      fn: ({ a }) => a.map((v) => 2 * v),
    })
    ;(async () => {
      const merged = await merge(twice(weightedSum(model(${JSON.stringify(a)}), model(${JSON.stringify(b)}))), { outputDtype: 'f32' })
      const w = merged.get('w')
      console.log(JSON.stringify({ values: [...toFloat32(w)], shape: w.shape, f16: [...(await merge(model(${JSON.stringify(a)}))).get('w').data] }))
    })().catch((e) => { console.error(e); process.exit(1) })`
  const r = spawnSync(process.execPath, ['-e', script], { encoding: 'utf8', env: { ...process.env, ...env } })
  if (r.status !== 0) throw new Error(r.stderr)
  return JSON.parse(r.stdout)
}

test('merge results and JavaScript method arguments are the same when copied (the Electron path)', (t) => {
  const dir = tempDir()
  const [a, b] = [join(dir, 'a.safetensors'), join(dir, 'b.safetensors')]
  writeSafetensors(a, { w: { dtype: 'F16', shape: [2, 3], values: [0, 1, 2, 3, 4, 5] } })
  writeSafetensors(b, { w: { dtype: 'F16', shape: [2, 3], values: [2, 3, 4, 5, 6, 7] } })
  const external = run(a, b, {})
  const copied = run(a, b, { MECHA_COPY_BUFFERS: '1' })
  t.deepEqual(external.values, [2, 4, 6, 8, 10, 12]) // 2 · (a + b) / 2
  t.deepEqual(external.shape, [2, 3])
  t.deepEqual(copied, external)
  t.is(copied.f16.length, 6) // raw f16 bits of an unconverted output, copied too
})
