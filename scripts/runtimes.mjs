// Finds the Bun and Deno executables installed from the npm registry as devDependencies (`bun`,
// `deno`), so the smoke test can run under them on every CI platform.
//
// Both wrapper packages list one package per platform as optionalDependencies, each holding that
// platform's executable; npm installs only the one matching this machine. Their postinstall
// scripts then move (Bun) or hard-link (Deno) it into the wrapper, but npm may skip install
// scripts (`--ignore-scripts`, or npm 11's `allowScripts`), so the executable is looked up here in
// the platform package first and in the wrapper second, and never taken from PATH: the versions
// run are the ones package-lock.json pins.
//
//   node scripts/runtimes.mjs bun     prints the path of the executable (exit 1 and why, if none)
import { existsSync, readFileSync, statSync } from 'node:fs'
import { createRequire } from 'node:module'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'

const require = createRequire(import.meta.url)
const exe = process.platform === 'win32' ? '.exe' : ''

function isMusl() {
  if (process.platform !== 'linux') return false
  const report = process.report?.getReport?.()
  const header = typeof report === 'string' ? JSON.parse(report).header : report?.header
  return !header?.glibcVersionRuntime
}

/** The platform package and the executable's path inside it, as the wrapper's own installer names them. */
function platformPackage(name) {
  const { platform, arch } = process
  if (arch !== 'x64' && arch !== 'arm64') return undefined
  if (name === 'bun') {
    const os = { darwin: 'darwin', linux: 'linux', win32: 'windows' }[platform]
    if (!os) return undefined
    const musl = isMusl() ? '-musl' : ''
    return { pkg: `@oven/bun-${os}-${arch === 'arm64' ? 'aarch64' : 'x64'}${musl}`, file: `bin/bun${exe}` }
  }
  if (!['darwin', 'linux', 'win32'].includes(platform) || isMusl()) return undefined
  return { pkg: `@deno/${platform}-${arch}${platform === 'linux' ? '-glibc' : ''}`, file: `deno${exe}` }
}

// A real executable, not the wrapper's placeholder (Bun ships a 450-byte shell script there).
const isExecutable = (path) => existsSync(path) && statSync(path).size > 1 << 20

/** `{ path, version }` of the `bun` or `deno` devDependency's executable; throws saying why if none. */
export function findRuntime(name) {
  let wrapperDir
  try {
    wrapperDir = dirname(require.resolve(`${name}/package.json`))
  } catch {
    throw new Error(`the "${name}" devDependency is not installed (run npm ci)`)
  }
  const { version } = JSON.parse(readFileSync(join(wrapperDir, 'package.json'), 'utf8'))
  const tried = []
  const platform = platformPackage(name)
  if (platform) {
    try {
      const pkgDir = dirname(createRequire(join(wrapperDir, 'package.json')).resolve(`${platform.pkg}/package.json`))
      const path = join(pkgDir, platform.file)
      if (isExecutable(path)) return { path, version }
      tried.push(path)
    } catch {
      tried.push(`${platform.pkg} (not installed)`)
    }
  }
  const installed = join(wrapperDir, name === 'bun' ? `bin/bun.exe` : `deno${exe}`) // where postinstall puts it
  if (isExecutable(installed)) return { path: installed, version }
  tried.push(installed)
  throw new Error(
    `no ${name} ${version} executable for ${process.platform}-${process.arch}; looked at ${tried.join(', ')}`,
  )
}

/** The command line that runs an ES module script with `runtime` (node, bun or deno). */
export function runtimeCommand(runtime, script, args = []) {
  if (runtime === 'node') return { cmd: process.execPath, args: [script, ...args], version: process.versions.node }
  const { path, version } = findRuntime(runtime)
  // Deno's sandbox: the smoke reads and writes temporary files, runs the CLI, and loads the addon
  // (Node-API modules need --allow-ffi); -A grants all of it.
  return { cmd: path, args: runtime === 'deno' ? ['run', '-A', script, ...args] : [script, ...args], version }
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  if (!['bun', 'deno'].includes(process.argv[2])) {
    console.error('usage: node scripts/runtimes.mjs bun|deno')
    process.exit(2)
  }
  try {
    console.log(findRuntime(process.argv[2]).path)
  } catch (error) {
    console.error(error.message)
    process.exit(1)
  }
}
