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
// `default` (the whole API as one object) cannot be destructured into a const, so it is exported apart.
// The CommonJS build is loaded with require(), not `import cjs from './index.js'`: a default import
// of a module marked `__esModule` is `module.exports` in Node and Deno but `module.exports.default`
// in Bun, whose `import mecha from 'sd-mecha'` was then undefined.
const names = Object.keys(createRequire(import.meta.url)(join(dist, 'index.js'))).filter(
  (n) => n !== '__esModule' && n !== 'default',
)
writeFileSync(
  join(dist, 'index.mjs'),
  `import { createRequire } from 'node:module'\nconst cjs = createRequire(import.meta.url)('./index.js')\nexport const { ${names.join(', ')} } = cjs\nexport default cjs.default\n`,
)
writeFileSync(join(dist, 'index.d.mts'), `export * from './index.js'\nexport { default } from './index.js'\n`)
chmodSync(join(dist, 'cli.js'), 0o755)

for (const file of readdirSync(root).filter((f) => /^sd-mecha\..+\.node$/.test(f))) {
  const abi = file.slice('sd-mecha.'.length, -'.node'.length)
  const dir = join(root, 'npm', abi)
  if (existsSync(dir)) copyFileSync(join(root, file), join(dir, file))
}
