// Smoke test of the built package under Node, Bun and Deno (plain ES module, no TypeScript):
//   node __test__/runtimes/smoke.mjs
//   bun __test__/runtimes/smoke.mjs
//   deno run -A __test__/runtimes/smoke.mjs
// It loads the addon through dist/index.mjs, merges small safetensors files written here byte by
// byte (to a file and in memory), runs a JavaScript merge method, cancels a merge, and runs the
// `mecha` CLI with the same runtime. One line per check, `ok N - name` or `not ok N - name: why`;
// exits 1 if any failed. scripts/test-all.mjs runs it with each runtime and counts the lines.
import { spawnSync } from 'node:child_process'
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import process from 'node:process'
import { fileURLToPath } from 'node:url'

const runtime = globalThis.Deno ? 'deno' : process.versions.bun ? 'bun' : 'node'
const version = runtime === 'deno' ? globalThis.Deno.version.deno : process.versions[runtime]
console.log(`# sd-mecha smoke test under ${runtime} ${version}`)

let count = 0
let failures = 0
async function check(name, fn) {
  count++
  try {
    await fn()
    console.log(`ok ${count} - ${name}`)
  } catch (error) {
    failures++
    const why = error instanceof Error ? `${error.name}: ${error.message}` : String(error)
    console.log(`not ok ${count} - ${name}: ${why.split('\n').join('\n# ')}`)
  }
}

function assert(condition, message) {
  if (!condition) throw new Error(message)
}

function assertValues(actual, expected, what) {
  const got = Array.from(actual)
  const same = got.length === expected.length && got.every((v, i) => v === expected[i])
  assert(same, `${what}: expected [${expected}], got [${got}]`)
}

// safetensors, written and read independently of the library: an 8-byte little-endian header
// length, the JSON header, then the tensors' bytes. Only F32 is needed here.
function writeSafetensors(path, tensors, metadata) {
  const header = metadata ? { __metadata__: metadata } : {}
  const chunks = []
  let offset = 0
  for (const [name, { shape, values }] of Object.entries(tensors)) {
    const data = new Uint8Array(Float32Array.from(values).buffer)
    header[name] = { dtype: 'F32', shape, data_offsets: [offset, offset + data.length] }
    chunks.push(data)
    offset += data.length
  }
  const json = new TextEncoder().encode(JSON.stringify(header))
  const bytes = new Uint8Array(8 + json.length + offset)
  new DataView(bytes.buffer).setBigUint64(0, BigInt(json.length), true)
  bytes.set(json, 8)
  let at = 8 + json.length
  for (const c of chunks) {
    bytes.set(c, at)
    at += c.length
  }
  writeFileSync(path, bytes)
}

function readSafetensors(path) {
  const bytes = new Uint8Array(readFileSync(path))
  const length = Number(new DataView(bytes.buffer, bytes.byteOffset).getBigUint64(0, true))
  const header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + length)))
  const tensors = {}
  for (const [name, t] of Object.entries(header)) {
    if (name === '__metadata__') continue
    assert(t.dtype === 'F32', `${name} is ${t.dtype}, expected F32`)
    const [start, end] = t.data_offsets
    const data = bytes.slice(8 + length + start, 8 + length + end)
    tensors[name] = { shape: t.shape, values: new Float32Array(data.buffer) }
  }
  return { metadata: header.__metadata__ ?? {}, tensors }
}

const dir = mkdtempSync(join(tmpdir(), `mecha-smoke-${runtime}-`))
const a = join(dir, 'a.safetensors')
const b = join(dir, 'b.safetensors')
writeSafetensors(a, { w: { shape: [2, 2], values: [1, 8, 3, 6] } }, { note: 'smoke' })
writeSafetensors(b, { w: { shape: [2, 2], values: [5, 2, 7, 4] } })
// a + 0.25 · (b − a), exact in f16 and f32
const weighted = [2, 6.5, 4, 5.5]

let mecha
await check('the package loads through dist/index.mjs and the addon answers', async () => {
  mecha = await import('../../dist/index.mjs')
  assert(typeof mecha.merge === 'function', 'merge is not exported')
  assert(mecha.default?.merge === mecha.merge, 'the default export is not the whole API')
  const ids = mecha.methods.list().map((m) => m.id)
  assert(ids.includes('weighted_sum'), `methods.list() has no weighted_sum (${ids.length} methods)`)
})
if (!mecha) {
  rmSync(dir, { recursive: true, force: true })
  console.log(`1..${count}`)
  process.exit(1)
}
const { AbortError, MergedModel, defineMergeMethod, merge, model, toFloat32, weightedSum } = mecha

await check('merge(weightedSum(a, b, { alpha }), { output }) writes the merged values', async () => {
  const output = join(dir, 'weighted.safetensors')
  const report = await merge(weightedSum(model(a), model(b), { alpha: 0.25 }), { output, outputDtype: 'f32' })
  assert(report.keysWritten === 1, `keysWritten is ${report.keysWritten}`)
  const { tensors, metadata } = readSafetensors(output)
  assert(JSON.stringify(tensors.w?.shape) === '[2,2]', `shape ${JSON.stringify(tensors.w?.shape)}`)
  assertValues(tensors.w.values, weighted, 'w')
  assert(/weighted_sum/.test(metadata.mecha_recipe ?? ''), 'the recipe is not in the metadata')
})

await check('merge(recipe) without output is a MergedModel of f16 tensors', async () => {
  const result = await merge(weightedSum(model(a), model(b), { alpha: 0.25 }))
  assert(result instanceof MergedModel, 'not a MergedModel')
  assert(result.size === 1 && result.report.keysWritten === 1, `${result.size} tensors`)
  const w = result.get('w')
  assert(w.dtype === 'F16' && JSON.stringify(w.shape) === '[2,2]', `w is ${w.dtype} ${JSON.stringify(w.shape)}`)
  assertValues(toFloat32(w), weighted, 'w')
})

await check('a JavaScript merge method (defineMergeMethod) computes each key', async () => {
  const calls = []
  const scaledMax = defineMergeMethod({
    id: 'smoke_scaled_max',
    inputs: [{ name: 'a' }, { name: 'b' }, { name: 'scale', type: 'float', default: 1 }],
    elementwise: true,
    fn: ({ a, b, scale }, context) => {
      calls.push(context.key)
      return a.map((x, i) => scale * Math.max(x, b[i]))
    },
  })
  assert(
    mecha.methods.list().some((m) => m.id === 'smoke_scaled_max'),
    'the method is not in methods.list()',
  )
  const result = await merge(scaledMax(model(a), model(b), { scale: 0.5 }), { outputDtype: 'f32' })
  assertValues(toFloat32(result.get('w')), [2.5, 4, 3.5, 3], 'w')
  assert(calls.length >= 1 && calls.every((k) => k === 'w'), `called for ${JSON.stringify(calls)}`)
})

await check('an aborted AbortSignal rejects the merge with AbortError and writes no file', async () => {
  // Large enough (24 keys of 1 MiB per model, one thread, small chunks) to still be running when
  // the first progress report arrives and aborts it.
  const big = mkdtempSync(join(dir, 'abort-'))
  const keys = Array.from({ length: 24 }, (_, k) => `layer.${k}.weight`)
  for (const [file, sign] of [
    ['a.safetensors', 1],
    ['b.safetensors', -1],
  ]) {
    const values = Float32Array.from({ length: 256 * 1024 }, (_, i) => sign * ((i % 97) / 97))
    writeSafetensors(join(big, file), Object.fromEntries(keys.map((k) => [k, { shape: [256, 1024], values }])))
  }
  const [bigA, bigB] = [join(big, 'a.safetensors'), join(big, 'b.safetensors')]
  const output = join(big, 'out.safetensors')
  const controller = new AbortController()
  let progress = 0
  const outcome = await merge(weightedSum(model(bigA), model(bigB)), {
    output,
    threads: 1,
    chunkElements: 4096,
    progressIntervalMs: 0,
    signal: controller.signal,
    onProgress: () => {
      progress++
      controller.abort()
    },
  }).then(
    (report) => ({ report }),
    (error) => ({ error }),
  )
  assert(outcome.error, `the merge resolved (${outcome.report?.keysWritten} keys) instead of rejecting`)
  assert(outcome.error instanceof AbortError, `rejected with ${outcome.error.name}: ${outcome.error.message}`)
  assert(progress >= 1, 'no progress was reported')
  const left = readdirSync(big).sort().join(', ')
  assert(left === 'a.safetensors, b.safetensors', `the folder holds ${left}`)
  // Already aborted: refused before anything starts.
  const early = await merge(weightedSum(model(a), model(b)), { output, signal: AbortSignal.abort() }).catch((e) => e)
  assert(early instanceof AbortError, `an already aborted signal gave ${early?.name}`)
  assert(!existsSync(output), 'an output file appeared')
})

// The CLI run by this same runtime (Deno needs `run -A` for the files and the addon).
const cli = fileURLToPath(new URL('../../dist/cli.js', import.meta.url))
function mechaCli(...args) {
  const argv = runtime === 'deno' ? ['run', '-A', cli, ...args] : [cli, ...args]
  const r = spawnSync(process.execPath, argv, { encoding: 'utf8', env: { ...process.env, NO_COLOR: '1' } })
  if (r.error) throw r.error
  assert(r.status === 0, `mecha ${args.join(' ')} exited ${r.status}: ${r.stderr.trim()}`)
  return r.stdout
}

await check(`mecha info (the CLI under ${runtime}) summarizes a file`, () => {
  const out = mechaCli('info', a)
  assert(/1 tensors/.test(out) && /F32×1/.test(out), `unexpected output:\n${out}`)
  assert(/note: smoke/.test(out), `the metadata is missing:\n${out}`)
  const info = JSON.parse(mechaCli('info', a, '--json'))
  assert(info.tensors === 1, `--json says ${info.tensors} tensors`)
})

await check(`mecha merge (the CLI under ${runtime}) runs a JSON recipe`, () => {
  const recipe = join(dir, 'recipe.json')
  writeFileSync(
    recipe,
    JSON.stringify({
      nodes: [
        { model: a },
        { model: b },
        { merge: 'weighted_sum', args: [{ node: 0 }, { node: 1 }], kwargs: { alpha: 0.25 } },
      ],
    }),
  )
  const output = join(dir, 'cli.safetensors')
  const report = JSON.parse(mechaCli('merge', recipe, '-o', output, '--output-dtype', 'f32', '--json'))
  assert(report.keysWritten === 1, `keysWritten is ${report.keysWritten}`)
  assertValues(readSafetensors(output).tensors.w.values, weighted, 'w')
})

rmSync(dir, { recursive: true, force: true })
console.log(`1..${count}`)
process.exit(failures ? 1 : 0)
