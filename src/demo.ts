/**
 * `npm run demo`: generates a few models with a real key layout and random values, merges them
 * with a recipe, and prints the recipe, timing, throughput and peak memory.
 *   npm run demo -- --layout sd1     (real SD 1.5 shapes, 2.1 GB per model)
 */
import { mkdirSync } from 'node:fs'
import { join, resolve } from 'node:path'
import { addDifference, merge, model, serialize, weightedSum, type Progress } from './index'
import { modelLayout, writeRandomModel, type LayoutName } from './synthetic'
import native = require('./native')

function option(name: string, fallback: string): string {
  const i = process.argv.indexOf(`--${name}`)
  return i > 0 && process.argv[i + 1] ? process.argv[i + 1] : fallback
}

const gb = (bytes: number) => `${(bytes / 1e9).toFixed(2)} GB`

async function main() {
  const layout = option('layout', 'small') as LayoutName
  const dir = resolve(option('dir', '.demo'))
  const threads = Number(option('threads', '0'))
  mkdirSync(dir, { recursive: true })

  const specs = modelLayout(layout)
  console.log(`Generating 3 random models with the ${layout} layout (${specs.length} tensors each) in ${dir}`)
  const paths = ['base', 'style', 'detail'].map((n) => join(dir, `${layout}-${n}.safetensors`))
  let started = performance.now()
  await Promise.all(paths.map((p, i) => writeRandomModel(p, specs, i + 1)))
  console.log(`  done in ${((performance.now() - started) / 1000).toFixed(2)} s\n`)

  const [base, style, detail] = paths.map((p) => model(p))
  // Blend two models, then add what a third adds on top of the base ("add difference").
  const recipe = addDifference(weightedSum(base, style, { alpha: 0.4 }), detail, base, { alpha: 0.5 })
  console.log('Recipe (.mecha):')
  console.log(serialize(recipe).replace(/^/gm, '  '))

  const output = join(dir, `${layout}-merged.safetensors`)
  const tty = process.stderr.isTTY
  started = performance.now()
  const report = await merge(recipe, {
    output,
    threads,
    onProgress: tty
      ? (p: Progress) => process.stderr.write(`\r  merging: ${p.keysDone}/${p.keysTotal} keys, ${gb(p.bytesDone)}   `)
      : undefined,
  })
  if (tty) process.stderr.write('\n')
  const seconds = report.seconds
  console.log(`\nMerged ${report.keysWritten} keys into ${output}`)
  console.log(
    `  time:        ${seconds.toFixed(3)} s (${report.threads} threads, f16 conversion: ${native.simdPath()})`,
  )
  console.log(`  read:        ${gb(report.bytesRead)} (${gb(report.bytesRead / seconds)}/s)`)
  console.log(`  written:     ${gb(report.bytesWritten)} (${gb(report.bytesWritten / seconds)}/s)`)
  console.log(`  peak memory: ${(report.peakRssBytes / 2 ** 20).toFixed(0)} MiB (process RSS during the merge)`)
  if (report.keysSkipped.length) console.log(`  skipped:     ${report.keysSkipped.length} keys`)
}

main().catch((e) => {
  console.error(e)
  process.exit(1)
})
