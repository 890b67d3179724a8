// One mergeMany() sweep with this library, in its own process so the benchmark measures its wall
// time and peak RSS alone. usage: sweep-once.mjs <a> <b> <out-template with {alpha}> <alpha,alpha,…> [threads] [method]
// Prints the reports.
import { callMethod, mergeMany, model } from '../dist/index.js'

const [a, b, template, alphas, threads = '0', method = 'weighted_sum'] = process.argv.slice(2)
const jobs = alphas.split(',').map((alpha) => ({
  recipe: callMethod(method, [model(a), model(b)], { alpha: Number(alpha) }),
  output: template.replace('{alpha}', alpha),
}))
const embedRecipe = process.env.MECHA_BENCH_EMBED_RECIPE // 'none': no recipe, so no input hashing
const reports = await mergeMany(jobs, { threads: Number(threads), ...(embedRecipe ? { embedRecipe } : {}) })
console.log(JSON.stringify(reports.map((r) => ({ ...r, recipe: undefined }))))
