import test from 'ava'
import { spawn, spawnSync } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync, truncateSync, utimesSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join } from 'node:path'

import {
  AbortError,
  InternalError,
  IoError,
  MechaError,
  MergeSpaceError,
  OptionError,
  OutputError,
  RecipeError,
  SafetensorsError,
  ShapeError,
  callMethod,
  defineMergeMethod,
  deserialize,
  inspect,
  merge,
  model,
  plan,
  serialize,
  weightedSum,
  writeRandomModel,
} from '../dist/index.js'
import { files, randomValues, tempDir, writeSafetensors } from './helpers.ts'

function twoModels() {
  const dir = tempDir()
  const a = join(dir, 'a.safetensors')
  const b = join(dir, 'b.safetensors')
  writeSafetensors(a, { w: { dtype: 'F16', shape: [4, 8], values: randomValues(1, 32) } })
  writeSafetensors(b, { w: { dtype: 'F16', shape: [4, 8], values: randomValues(2, 32) } })
  return { dir, a, b, out: join(dir, 'out.safetensors') }
}

/** Two 64 MiB models, and options that make their merge slow enough to act on mid-way. */
async function largeModels(shape = [1024, 4096], layers = 8) {
  const dir = tempDir()
  const specs = Array.from({ length: layers }, (_, i) => ({ name: `layer.${i}.weight`, dtype: 'F16', shape }))
  const [a, b] = [join(dir, 'a.safetensors'), join(dir, 'b.safetensors')]
  await Promise.all([writeRandomModel(a, specs, 1), writeRandomModel(b, specs, 2)])
  const slowly = { threads: 1, chunkElements: 4096, progressIntervalMs: 0 }
  return { dir, a, b, out: join(dir, 'out.safetensors'), slowly }
}

async function failsWith<T extends MechaError>(
  t: import('ava').ExecutionContext,
  promise: Promise<unknown>,
  Class: new (...args: never[]) => T,
): Promise<T> {
  const err = await t.throwsAsync(promise)
  t.true(err instanceof Class, `expected ${Class.name}, got ${err?.name}: ${err?.message}`)
  t.true(err instanceof MechaError)
  return err as T
}

test('a missing input file is a SafetensorsError naming it, and no output appears', async (t) => {
  const { dir, a, out } = twoModels()
  const missing = join(dir, 'missing.safetensors')
  const err = await failsWith(t, merge(weightedSum(model(a), model(missing)), { output: out }), SafetensorsError)
  t.is(err.file, missing)
  t.regex(err.message, /missing\.safetensors: file not found/)
  t.regex(err.node!, /b: model/)
  t.deepEqual(files(dir), ['a.safetensors', 'b.safetensors'])
})

test('a truncated input is a SafetensorsError that says so', async (t) => {
  const { dir, a, b, out } = twoModels()
  const bytes = readFileSync(b)
  writeFileSync(b, bytes.subarray(0, bytes.length - 10))
  const err = await failsWith(t, merge(weightedSum(model(a), model(b)), { output: out }), SafetensorsError)
  t.is(err.file, b)
  t.regex(err.message, /truncated/)
  t.deepEqual(files(dir), ['a.safetensors', 'b.safetensors'])
})

test('a header that lies about offsets is a SafetensorsError naming the tensor', async (t) => {
  const { dir, a, out } = twoModels()
  const liar = join(dir, 'liar.safetensors')
  const header = Buffer.from(
    JSON.stringify({
      w: { dtype: 'F16', shape: [4, 8], data_offsets: [0, 64] },
      x: { dtype: 'F16', shape: [2], data_offsets: [60, 64] },
    }),
  )
  const len = Buffer.alloc(8)
  len.writeBigUInt64LE(BigInt(header.length))
  writeFileSync(liar, Buffer.concat([len, header, Buffer.alloc(64)]))
  const err = await failsWith(t, merge(weightedSum(model(a), model(liar)), { output: out }), SafetensorsError)
  t.regex(err.message, /liar\.safetensors: tensor 'x' starts at data offset 60 .* overlaps/)
  t.throws(() => inspect(liar), { instanceOf: SafetensorsError })
  t.false(files(dir).includes('out.safetensors'))
})

test('mismatched shapes are a ShapeError naming both files and the key', async (t) => {
  const { dir, a, out } = twoModels()
  const other = join(dir, 'other.safetensors')
  writeSafetensors(other, { w: { dtype: 'F16', shape: [8, 4], values: randomValues(3, 32) } })
  const err = await failsWith(t, merge(weightedSum(model(a), model(other)), { output: out }), ShapeError)
  t.is(err.key, 'w')
  t.regex(err.message, /a\.safetensors has \[4, 8\] but .*other\.safetensors has \[8, 4\]/)
  t.false(files(dir).includes('out.safetensors'))
})

test('writing over an input is refused', async (t) => {
  const { a, b } = twoModels()
  const before = readFileSync(a)
  const err = await failsWith(t, merge(weightedSum(model(a), model(b)), { output: a }), OutputError)
  t.regex(err.message, /one of the merge's inputs/)
  t.true(readFileSync(a).equals(before))
})

test('merge-space violations are MergeSpaceErrors with the node path', async (t) => {
  const { a, b } = twoModels()
  const err = await failsWith(t, merge(model(a).add(model(b))), MergeSpaceError)
  t.regex(err.message, /add_difference input "b" requires delta/)
  t.is(err.node, `add_difference > b: model "${b}"`)
  // a delta at the root needs permission
  await failsWith(t, merge(model(a).sub(model(b))), MergeSpaceError)
  await t.notThrowsAsync(merge(model(a).sub(model(b)), { strictMergeSpace: 'delta' }))
})

test('unknown methods and bad arguments are RecipeErrors', async (t) => {
  const { a, b } = twoModels()
  const unknown = await failsWith(t, merge(callMethod('weighted_summ', [model(a), model(b)], {})), RecipeError)
  t.regex(unknown.message, /unknown merge method "weighted_summ"\. Did you mean "weighted_sum"\?/)
  const arity = await failsWith(t, merge(callMethod('subtract', [model(a)], {})), RecipeError)
  t.regex(arity.message, /subtract\(\): missing required argument "b"/)
  const kw = await failsWith(t, merge(callMethod('weighted_sum', [model(a), model(b)], { alfa: 0.5 })), RecipeError)
  t.regex(kw.message, /unknown parameter "alfa" \(did you mean "alpha"\?\)/)
  const dtype = await failsWith(t, merge(model(a).to({ dtype: 'float17' })), RecipeError)
  t.regex(dtype.message, /unknown dtype "float17"/)
})

test('an already aborted signal fails fast', async (t) => {
  const { a, b, out } = twoModels()
  await failsWith(t, merge(weightedSum(model(a), model(b)), { output: out, signal: AbortSignal.abort() }), AbortError)
})

test('cancelling mid-merge leaves no file at the output path', async (t) => {
  const { dir, a, b, out, slowly } = await largeModels()
  const controller = new AbortController()
  let progressSeen = 0
  const err = await failsWith(
    t,
    merge(weightedSum(model(a), model(b)), {
      output: out,
      ...slowly,
      signal: controller.signal,
      onProgress: (p) => {
        progressSeen++
        if (p.keysDone >= 1) controller.abort()
      },
    }),
    AbortError,
  )
  t.regex(err.message, /cancelled/)
  t.true(progressSeen >= 1)
  t.deepEqual(files(dir), ['a.safetensors', 'b.safetensors'])
})

test('progress is reported and reaches the total', async (t) => {
  const { a, b, out } = twoModels()
  const seen: number[] = []
  const report = await merge(weightedSum(model(a), model(b)), {
    output: out,
    progressIntervalMs: 0,
    onProgress: (p) => seen.push(p.keysDone / p.keysTotal),
  })
  t.is(report.keysWritten, 1)
  t.is(seen.at(-1), 1)
})

test('inputs holding NaN are treated as missing, as sd-mecha does by default', async (t) => {
  const { dir, a, b } = twoModels()
  const nan = join(dir, 'nan.safetensors')
  const values = randomValues(3, 32)
  values[5] = NaN
  writeSafetensors(nan, { w: { dtype: 'F16', shape: [4, 8], values } })
  const skipped = await merge(weightedSum(model(nan), model(b)))
  t.is(skipped.size, 0)
  t.regex(skipped.report.keysSkipped[0].reason, /non-finite values .* in .*nan\.safetensors/)
  const filled = await merge(model(nan).or(model(a)))
  t.deepEqual(filled.get('w')!.data, (await merge(model(a))).get('w')!.data)
  const kept = await merge(weightedSum(model(nan), model(b)), { omitNonFiniteInputs: false })
  t.deepEqual(kept.report.nonFiniteOutputs, ['w'])
})

test('a merge that produces no keys is refused, saying why, unless allowEmpty is set', async (t) => {
  const { dir, a, out } = twoModels()
  const other = join(dir, 'other.safetensors')
  writeSafetensors(other, { v: { dtype: 'F16', shape: [2], values: randomValues(3, 2) } })
  const recipe = weightedSum(model(a), model(other), { alpha: 0.5 })
  const err = await failsWith(t, merge(recipe, { output: out }), RecipeError)
  t.regex(
    err.message,
    /produces no output keys \(2 skipped: 1 key\(s\): missing from .*other\.safetensors; 1 key\(s\): missing from .*a\.safetensors\)/,
  )
  t.regex(err.message, /allowEmpty/)
  t.deepEqual(files(dir).sort(), ['a.safetensors', 'b.safetensors', 'other.safetensors'])
  const report = await merge(recipe, { output: out, allowEmpty: true })
  t.is(report.keysWritten, 0)
  t.deepEqual((await inspect(out)).tensors, [])
})

test('a throwing onProgress cancels the merge, which rejects with that error and leaves nothing', async (t) => {
  const { dir, a, b, out } = twoModels()
  const thrown = new Error('progress handler failed')
  const err = await t.throwsAsync(
    merge(weightedSum(model(a), model(b)), {
      output: out,
      progressIntervalMs: 0,
      onProgress: () => {
        throw thrown
      },
    }),
  )
  t.is(err, thrown)
  t.deepEqual(files(dir).sort(), ['a.safetensors', 'b.safetensors'])
  t.is((await merge(weightedSum(model(a), model(b)), { output: out })).keysWritten, 1, 'the process carries on')
})

test('a throwing JavaScript method fails the merge with a RecipeError whose cause is what it threw', async (t) => {
  const { dir, a, out } = twoModels()
  const thrown = new RangeError('bad input')
  const broken = defineMergeMethod({
    id: 'test_throws_cause',
    inputs: [{ name: 'a' }],
    fn: () => {
      throw thrown
    },
  })
  const err = await failsWith(t, merge(broken(model(a)), { output: out }), RecipeError)
  t.regex(err.message, /test_throws_cause failed on key "w": bad input/)
  t.is((err as Error & { cause?: unknown }).cause, thrown)
  t.deepEqual(files(dir).sort(), ['a.safetensors', 'b.safetensors'])
})

test.serial('a panic in any native entry point is an InternalError, never a crash or a hang', async (t) => {
  const { dir, a, b, out } = twoModels()
  const recipe = weightedSum(model(a), model(b))
  const text = serialize(recipe)
  const cases: [string, () => unknown][] = [
    ['merge', () => merge(recipe, { output: out })],
    ['plan', () => plan(recipe)],
    ['serialize', () => serialize(recipe)],
    ['deserialize', () => deserialize(text)],
    ['inspect', () => inspect(a)],
  ]
  for (const [entry, call] of cases) {
    process.env.MECHA_INJECT_PANIC = entry
    try {
      const err = await t.throwsAsync(async () => call())
      t.true(err instanceof InternalError, `${entry}: ${err?.name}: ${err?.message}`)
      t.regex(err!.message, new RegExp(`internal error in ${entry}: injected panic`))
    } finally {
      delete process.env.MECHA_INJECT_PANIC
    }
  }
  t.deepEqual(files(dir).sort(), ['a.safetensors', 'b.safetensors'])
  t.is((await merge(recipe, { output: out })).keysWritten, 1)
})

test('options are checked at the boundary: unknown names get the closest one, bad values say what is allowed', async (t) => {
  const { a, b, out } = twoModels()
  const recipe = weightedSum(model(a), model(b))
  const cases: [Record<string, unknown>, RegExp][] = [
    [{ outptu: out }, /unknown option "outptu"; did you mean "output"\?/],
    [{ threads: -1 }, /threads must be an integer from 0 \(one per CPU\) to \d+, got -1/],
    [{ threads: 1e6 }, /threads must be an integer/],
    [{ threads: 1.5 }, /threads must be an integer/],
    [{ outputDtype: 7 }, /outputDtype must be a dtype name/],
    [{ strictMergeSpace: 'wieght' }, /strictMergeSpace must be 'weight', 'delta', 'param' or null, got "wieght"/],
    [{ signal: {} }, /signal must be an AbortSignal/],
    [{ memoryBudget: -5 }, /memoryBudget must be a positive number of bytes/],
    [{ memoryBudget: 'lots' }, /memoryBudget: "lots" is not a size/],
    [{ allowEmpty: 'yes' }, /allowEmpty must be true or false/],
    [{ cache: {} }, /cache must be a MergeCache/],
    [{ onProgress: 3 }, /onProgress must be a function/],
  ]
  for (const [options, message] of cases) {
    const err = await failsWith(t, merge(recipe, { output: out, ...options } as never), OptionError)
    t.regex(err.message, message)
  }
  t.throws(() => plan(recipe, { output: out } as never), {
    instanceOf: OptionError,
    message: /plan: unknown option "output"/,
  })
  const err = await failsWith(t, merge(recipe, { outputDtype: 'f17' } as never), MechaError)
  t.regex(err.message, /outputDtype/)
  t.deepEqual(files(dirname(out)).sort(), ['a.safetensors', 'b.safetensors'])
})

test('a typo in a hyper-parameter name (plain JavaScript) is refused with the closest name', (t) => {
  const { a, b } = twoModels()
  t.throws(() => weightedSum(model(a), model(b), { alhpa: 0.3 } as never), {
    instanceOf: RecipeError,
    message: /weighted_sum\(\): unknown parameter "alhpa"; did you mean "alpha"\?/,
  })
})

test('a merge killed with SIGKILL leaves a temporary file that the next merge into the folder removes', async (t) => {
  const { dir, a, b, out } = twoModels()
  // A child merges through a JavaScript method that never returns, so it is killed mid-merge.
  const script = join(dir, 'hang.mjs')
  writeFileSync(
    script,
    `import { defineMergeMethod, merge, model } from ${JSON.stringify(new URL('../dist/index.js', import.meta.url).href)}
const hang = defineMergeMethod({ id: 'test_hang', inputs: [{ name: 'a' }], fn: () => { for (;;) {} } })
await merge(hang(model(${JSON.stringify(a)})), { output: ${JSON.stringify(join(dir, 'killed.safetensors'))} })`,
  )
  const child = spawn(process.execPath, [script], { stdio: 'ignore' })
  const partial = () => files(dir).filter((f) => f.endsWith('.partial'))
  for (let i = 0; i < 200 && partial().length === 0; i++) await new Promise((r) => setTimeout(r, 50))
  t.is(partial().length, 1, 'the killed merge had started writing')
  child.kill('SIGKILL')
  await new Promise((r) => child.once('exit', r))
  const [left] = partial()
  t.regex(left, /^\.killed\.safetensors\.\d+-\d+\.partial$/)
  // Idle for over a minute (a live merge in another PID namespace is left alone until then).
  const old = new Date(Date.now() - 120_000)
  utimesSync(join(dir, left), old, old)
  await merge(weightedSum(model(a), model(b)), { output: out })
  t.deepEqual(partial(), [])
  t.false(files(dir).includes('killed.safetensors'))
})

test('8 concurrent merges in one process give the bytes of the same merges run one by one', async (t) => {
  const { dir, a, b } = twoModels()
  const alphas = [0, 0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 1]
  const path = (mode: string, i: number) => join(dir, `${mode}-${i}.safetensors`)
  for (const [i, alpha] of alphas.entries())
    await merge(weightedSum(model(a), model(b), { alpha }), { output: path('one', i) })
  await Promise.all(
    alphas.map((alpha, i) => merge(weightedSum(model(a), model(b), { alpha }), { output: path('all', i) })),
  )
  for (const i of alphas.keys())
    t.true(readFileSync(path('all', i)).equals(readFileSync(path('one', i))), `alpha ${alphas[i]}`)
})

test('an input truncated while it is read is a SafetensorsError naming it, and leaves no output', async (t) => {
  const { dir, a, b, out, slowly } = await largeModels()
  let truncated = false
  const err = await failsWith(
    t,
    merge(weightedSum(model(a), model(b)), {
      output: out,
      ...slowly,
      onProgress: () => {
        // 64 MiB are still to be read: cut b down to its header and a little data.
        if (!truncated) truncateSync(b, 64 * 1024)
        truncated = true
      },
    }),
    SafetensorsError,
  )
  t.true(truncated)
  t.is(err.file, b)
  t.regex(err.message, /b\.safetensors: reading tensor data failed .*truncated during the merge/)
  t.deepEqual(files(dir), ['a.safetensors', 'b.safetensors'])
})

// A 1 MiB tmpfs to fill up. Mounting needs root and a kernel that allows it here; the disk-full
// test is skipped otherwise.
function smallTmpfs(): string | undefined {
  if (process.platform !== 'linux' || process.getuid?.() !== 0) return undefined
  const dir = mkdtempSync(join(tmpdir(), 'mecha-full-'))
  const r = spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', dir], { stdio: 'ignore' })
  if (r.status === 0) return dir
  rmSync(dir, { recursive: true, force: true })
  return undefined
}
const fullDisk = smallTmpfs()
test.after.always(() => {
  if (fullDisk) {
    spawnSync('umount', [fullDisk], { stdio: 'ignore' })
    rmSync(fullDisk, { recursive: true, force: true })
  }
})

;(fullDisk ? test.serial : test.skip)(
  'a full disk is an IoError naming the output path, and leaves nothing there',
  async (t) => {
    const { a, b } = await largeModels([1024, 1024], 1) // 2 MiB of output, 1 MiB of disk
    const out = join(fullDisk!, 'out.safetensors')
    const err = await failsWith(t, merge(weightedSum(model(a), model(b)), { output: out }), IoError)
    t.is(err.file, out)
    // refused when the space is reserved, before any tensor is read
    t.regex(err.message, /reserving space for .*out\.safetensors .*No space left on device/)
    t.deepEqual(files(fullDisk!), [])
    // The space was given back: a merge that fits still succeeds there.
    const small = twoModels()
    await merge(weightedSum(model(small.a), model(small.b)), { output: out })
    t.deepEqual(files(fullDisk!), ['out.safetensors'])
  },
)
