// The packed tarball installs into an empty project with no Rust toolchain and works through
// require, import and the `mecha` bin.
import test from 'ava'
import { execFileSync } from 'node:child_process'
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'

import { tempDir } from './helpers.ts'

const root = fileURLToPath(new URL('..', import.meta.url))
const npm = process.platform === 'win32' ? 'npm.cmd' : 'npm'

test('npm pack installs and runs in an empty folder', (t) => {
  const dir = tempDir()
  const packed = JSON.parse(
    execFileSync(npm, ['pack', '--json', '--pack-destination', dir], { cwd: root, encoding: 'utf8' }),
  )
  const tarball = join(dir, packed[0].filename)
  const files: string[] = packed[0].files.map((f: { path: string }) => f.path)
  t.true(files.includes('dist/index.js') && files.includes('dist/index.mjs') && files.includes('index.js'))
  t.false(files.some((f) => f.startsWith('src/') || f.startsWith('crates/')))
  t.true(files.includes('LICENSE'), 'the license travels with the package')

  const app = join(dir, 'app')
  mkdirSync(app)
  writeFileSync(join(app, 'package.json'), JSON.stringify({ name: 'app', version: '1.0.0', private: true }))
  const env = {
    ...process.env,
    PATH: process.env
      .PATH!.split(':')
      .filter((p) => !p.includes('.cargo'))
      .join(':'),
  }
  execFileSync(npm, ['install', '--offline', '--no-audit', '--no-fund', tarball], { cwd: app, env, stdio: 'pipe' })

  const cjs = execFileSync(
    process.execPath,
    ['-e', "const m = require('sd-mecha'); console.log(typeof m.merge, typeof m.weightedSum)"],
    { cwd: app, encoding: 'utf8' },
  )
  t.is(cjs.trim(), 'function function')
  const esm = execFileSync(
    process.execPath,
    [
      '--input-type=module',
      '-e',
      "import mecha, { merge, methods } from 'sd-mecha'; console.log(typeof merge, methods.list().length > 5, mecha.merge === merge)",
    ],
    { cwd: app, encoding: 'utf8' },
  )
  t.is(esm.trim(), 'function true true')
  const cjsDefault = execFileSync(
    process.execPath,
    ['-e', "const m = require('sd-mecha'); console.log(m.default.weightedSum === m.weightedSum)"],
    { cwd: app, encoding: 'utf8' },
  )
  t.is(cjsDefault.trim(), 'true')
  const help = execFileSync(npm, ['exec', '--offline', '--', 'mecha', '--help'], { cwd: app, env, encoding: 'utf8' })
  t.regex(help, /Usage:/)
})

test('engines says what is tested, and no locked dependency refuses that Node (npm ci has no engine warnings)', (t) => {
  const semver = createRequire(import.meta.url)('semver')
  const manifest = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8'))
  t.is(manifest.engines.node, '>= 20', 'CI runs Node 20; README and engines say so')
  t.true(semver.satisfies(process.versions.node, manifest.engines.node))
  const lock = JSON.parse(readFileSync(join(root, 'package-lock.json'), 'utf8'))
  const refusing = Object.entries(lock.packages as Record<string, { engines?: { node?: string } }>)
    .filter(([, p]) => typeof p.engines?.node === 'string')
    .filter(([, p]) => !semver.satisfies(process.versions.node, p.engines!.node, { includePrerelease: true }))
    .map(([name, p]) => `${name} (${p.engines!.node})`)
  t.deepEqual(refusing, [], 'pin these in package.json "overrides"')
})
