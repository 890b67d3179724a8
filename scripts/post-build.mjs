// After `tsc`: add the ESM entry point and make the CLI executable, and place the freshly built
// addon in its per-platform npm package folder.
import { chmodSync, copyFileSync, existsSync, readdirSync, writeFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'

const root = join(dirname(fileURLToPath(import.meta.url)), '..')
const dist = join(root, 'dist')

// ESM entry: explicit named re-exports of the CommonJS build, so `import { merge } from 'sd-mecha'`
// works without relying on Node's CommonJS export detection.
const names = Object.keys(createRequire(import.meta.url)(join(dist, 'index.js'))).filter((n) => n !== '__esModule')
writeFileSync(join(dist, 'index.mjs'), `import cjs from './index.js'\nexport const { ${names.join(', ')} } = cjs\n`)
writeFileSync(join(dist, 'index.d.mts'), `export * from './index.js'\n`)
chmodSync(join(dist, 'cli.js'), 0o755)

for (const file of readdirSync(root).filter((f) => /^sd-mecha\..+\.node$/.test(f))) {
  const abi = file.slice('sd-mecha.'.length, -'.node'.length)
  const dir = join(root, 'npm', abi)
  if (existsSync(dir)) copyFileSync(join(root, file), join(dir, file))
}
