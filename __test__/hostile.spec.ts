// A corpus of hostile inputs (issue 7): broken safetensors files, malformed `.mecha` text and API
// misuse. Each case must end in one of the package's typed errors whose message names the file,
// line or option involved: never a crash, a hang, an untyped error or a file at the output path.
import test from 'ava'
import { execFileSync } from 'node:child_process'
import { existsSync, mkdirSync, symlinkSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'

import {
  MechaError,
  OptionError,
  OutputError,
  ParseError,
  RecipeError,
  SafetensorsError,
  callMethod,
  deserialize,
  inspect,
  merge,
  model,
  weightedSum,
} from '../dist/index.js'
import { files, tempDir, writeSafetensors } from './helpers.ts'

const dir = tempDir()
const good = join(dir, 'good.safetensors')
writeSafetensors(good, { w: { dtype: 'F32', shape: [2], values: [1, 2] } })

/** A file made of an 8-byte length, then `header` bytes (a string or raw), then `data` zero bytes. */
function raw(name: string, header: string | Buffer, data = 0, declared?: bigint): string {
  const body = typeof header === 'string' ? Buffer.from(header, 'utf8') : header
  const length = Buffer.alloc(8)
  length.writeBigUInt64LE(declared ?? BigInt(body.length))
  const path = join(dir, name)
  writeFileSync(path, Buffer.concat([length, body, Buffer.alloc(data)]))
  return path
}
const entry = (dtype: unknown, shape: unknown, offsets: unknown) =>
  JSON.stringify({ w: { dtype, shape, data_offsets: offsets } })

const files_: [string, () => string][] = [
  ['an empty file', () => raw('empty.safetensors', Buffer.alloc(0), 0, 0n).replace(/$/, '')],
  [
    'seven bytes',
    () => (writeFileSync(join(dir, 'seven.safetensors'), Buffer.alloc(7)), join(dir, 'seven.safetensors')),
  ],
  ['a header longer than the file', () => raw('long.safetensors', '{}', 0, 1000n)],
  ['a header length of 2^62', () => raw('huge.safetensors', '{}', 0, 1n << 62n)],
  ['a header that is not UTF-8', () => raw('latin1.safetensors', Buffer.from([0x7b, 0xff, 0xfe, 0x7d]))],
  ['a JSON array header', () => raw('array.safetensors', '[]')],
  ['a JSON string header', () => raw('string.safetensors', '"w"')],
  ['a JSON number header', () => raw('number.safetensors', '42')],
  ['truncated JSON', () => raw('trunc-json.safetensors', '{"w": {"dtype": "F32"')],
  ['a header of spaces', () => raw('spaces.safetensors', '        ')],
  ['a header with a NUL byte', () => raw('nul.safetensors', Buffer.from('{"w\u0000":1}'))],
  [
    'a missing dtype',
    () => raw('no-dtype.safetensors', JSON.stringify({ w: { shape: [2], data_offsets: [0, 8] } }), 8),
  ],
  ['an unknown dtype', () => raw('dtype.safetensors', entry('F17', [2], [0, 8]), 8)],
  ['a numeric dtype', () => raw('dtype-num.safetensors', entry(3, [2], [0, 8]), 8)],
  [
    'a missing shape',
    () => raw('no-shape.safetensors', JSON.stringify({ w: { dtype: 'F32', data_offsets: [0, 8] } }), 8),
  ],
  ['a negative dimension', () => raw('neg.safetensors', entry('F32', [-2], [0, 8]), 8)],
  ['a fractional dimension', () => raw('frac.safetensors', entry('F32', [1.5], [0, 8]), 8)],
  [
    'a shape whose element count overflows',
    () => raw('overflow.safetensors', entry('F32', [2 ** 40, 2 ** 40], [0, 8]), 8),
  ],
  ['a shape that is a string', () => raw('shape-str.safetensors', entry('F32', '2', [0, 8]), 8)],
  ['missing data offsets', () => raw('no-offsets.safetensors', JSON.stringify({ w: { dtype: 'F32', shape: [2] } }), 8)],
  ['three data offsets', () => raw('offsets3.safetensors', entry('F32', [2], [0, 8, 16]), 16)],
  ['reversed offsets', () => raw('reversed.safetensors', entry('F32', [2], [8, 0]), 8)],
  ['offsets past the end of the file', () => raw('past.safetensors', entry('F32', [2], [0, 8]), 4)],
  ['offsets that disagree with the shape', () => raw('size.safetensors', entry('F32', [3], [0, 8]), 8)],
  [
    'overlapping tensors',
    () =>
      raw(
        'overlap.safetensors',
        JSON.stringify({
          a: { dtype: 'F32', shape: [2], data_offsets: [0, 8] },
          b: { dtype: 'F32', shape: [2], data_offsets: [4, 12] },
        }),
        12,
      ),
  ],
  [
    'a hole between tensors',
    () =>
      raw(
        'hole.safetensors',
        JSON.stringify({
          a: { dtype: 'F32', shape: [2], data_offsets: [0, 8] },
          b: { dtype: 'F32', shape: [2], data_offsets: [12, 20] },
        }),
        20,
      ),
  ],
  [
    'a tensor named twice',
    () =>
      raw(
        'twice.safetensors',
        '{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"w":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}',
        16,
      ),
  ],
  ['a tensor entry that is a string', () => raw('entry-str.safetensors', JSON.stringify({ w: 'F32' }))],
  ['metadata that is not an object', () => raw('meta.safetensors', JSON.stringify({ __metadata__: [1] }))],
  ['a metadata value that is not text', () => raw('meta-num.safetensors', JSON.stringify({ __metadata__: { a: 1 } }))],
  ['a missing file', () => join(dir, 'missing.safetensors')],
  [
    'a folder',
    () => (mkdirSync(join(dir, 'folder.safetensors'), { recursive: true }), join(dir, 'folder.safetensors')),
  ],
  [
    'a FIFO',
    () => {
      const p = join(dir, 'pipe.safetensors')
      if (!existsSync(p)) execFileSync('mkfifo', [p])
      return p
    },
  ],
  ['a device', () => '/dev/zero'],
  [
    'a symlink loop',
    () => {
      const p = join(dir, 'loop.safetensors')
      if (!existsSync(join(dir, 'loop2.safetensors'))) {
        symlinkSync(p, join(dir, 'loop2.safetensors'))
        symlinkSync(join(dir, 'loop2.safetensors'), p)
      }
      return p
    },
  ],
]

for (const [what, make] of files_) {
  test(`hostile file: ${what}`, async (t) => {
    const path = make()
    const out = join(dir, `out-${files_.findIndex(([w]) => w === what)}.safetensors`)
    const err = await t.throwsAsync(merge(weightedSum(model(path), model(good)), { output: out }))
    t.true(err instanceof SafetensorsError, `${err?.name}: ${err?.message}`)
    t.true(err!.message.includes(path), err!.message)
    t.false(existsSync(out))
    // inspect() reads the same way, synchronously
    t.throws(() => inspect(path), { instanceOf: SafetensorsError })
  })
}

const texts: [string, string, RegExp][] = [
  ['empty text', '', /version/],
  ['no version line', 'model "a.safetensors"', /version/],
  ['an unknown version', 'version 9.9.9\nmodel "a"', /9\.9\.9/],
  ['an unknown instruction', 'version 0.1.0\nfrobnicate 1', /line 2/],
  ['a reference to a later line', 'version 0.1.0\nmerge "weighted_sum" &1 &1', /line 2/],
  ['a reference out of range', 'version 0.1.0\nmodel "a"\nmerge "weighted_sum" &0 &99', /line 3/],
  ['an unterminated string', 'version 0.1.0\nmodel "a', /line 2/],
  ['a bad number', 'version 0.1.0\ndict key=1.2.3', /line 2/],
  ['an unknown method', 'version 0.1.0\nmodel "a"\nmerge "weighted_summ" &0 &0', /weighted_summ/],
  ['too few arguments', 'version 0.1.0\nmodel "a"\nmerge "weighted_sum" &0', /line 3|missing/],
  ['an unknown keyword', 'version 0.1.0\nmodel "a"\nmerge "weighted_sum" &0 &0 alhpa=&0', /alhpa/],
  ['a merge without a method', 'version 0.1.0\nmerge', /line 2/],
  ['binary garbage', 'version 0.1.0\n\u0000\u0001\u0002', /line 2/],
  ['a dict without a key', 'version 0.1.0\ndict =1', /line 2/],
  ['a literal of a missing line', 'version 0.1.0\nliteral &5', /line 2/],
]
for (const [what, text, message] of texts) {
  test(`hostile .mecha text: ${what}`, (t) => {
    const err = t.throws(() => deserialize(text))
    t.true(err instanceof ParseError || err instanceof RecipeError, `${err?.name}: ${err?.message}`)
    t.regex(err!.message, message)
  })
}

const misuse: [string, () => unknown, new (...args: never[]) => MechaError | Error, RegExp][] = [
  ['model("")', () => model(''), TypeError, /non-empty/],
  ['model(42)', () => model(42 as never), TypeError, /non-empty string/],
  ['an unknown method id', () => merge(callMethod('no_such_method', [model(good)], {})), RecipeError, /no_such_method/],
  ['options that are not an object', () => merge(model(good), 5 as never), OptionError, /options must be an object/],
  ['threads NaN', () => merge(model(good), { threads: NaN }), OptionError, /threads/],
  ['an empty output path', () => merge(model(good), { output: '' }), OptionError, /output/],
  [
    'an output in a missing folder',
    () => merge(model(good), { output: join(dir, 'nope', 'x.safetensors') }),
    OutputError,
    /does not exist/,
  ],
  [
    'an output over an input',
    () => merge(weightedSum(model(good), model(good)), { output: good }),
    OutputError,
    /input/,
  ],
  ['an output that is a folder', () => merge(model(good), { output: dir }), OutputError, /folder/],
  ['a recipe that is undefined', () => merge(undefined as never), TypeError, /unsupported recipe value/],
]
for (const [what, call, Class, message] of misuse) {
  test(`API misuse: ${what}`, async (t) => {
    const err = await t.throwsAsync(async () => call())
    t.true(err instanceof Class, `${err?.name}: ${err?.message}`)
    t.regex(err!.message, message)
  })
}

test.after('nothing was written anywhere by the hostile cases', (t) => {
  t.deepEqual(
    files(dir).filter((f) => f.startsWith('out-') || f.endsWith('.partial')),
    [],
  )
})
