// LLM checkpoints: Hugging Face sharded models in, a sharded model out.
//
//   node --import tsx examples/guide/llm-checkpoints.mts <model-a> <model-b> [--out merged] [--max-shard-size 5GB]
//
// A model is a folder (with its model.safetensors.index.json), the index itself, or one
// .safetensors file.
import { readdirSync } from 'node:fs'
import { parseArgs } from 'node:util'
import { inspect, merge, model, weightedSum } from 'sd-mecha'

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    out: { type: 'string', default: 'merged' },
    'max-shard-size': { type: 'string', default: '5GB' },
  },
})
const [pathA, pathB] = positionals
if (!pathA || !pathB) throw new Error('usage: llm-checkpoints.mts <model-a> <model-b> [--out folder]')

// 1. A checkpoint reads as one state dict; every shard's header is checked against the index.
for (const path of [pathA, pathB]) {
  const info = inspect(path)
  console.log(
    `${path}: ${info.tensors.length} tensors in ${info.files.length} file(s), ` +
      `${info.layers ?? 0} layers, ${info.dataBytes} bytes, config ${info.config ?? 'structural'}`,
  )
}

// 2. Merge and write shards of at most --max-shard-size, with their index: the folder appears
//    whole when the merge completes, as transformers' save_pretrained lays it out.
const report = await merge(weightedSum(model(pathA), model(pathB), { alpha: 0.5 }), {
  output: values.out,
  maxShardSize: values['max-shard-size'],
  outputDtype: 'bf16',
})
console.log(`wrote ${report.keysWritten} keys to ${values.out}: ${readdirSync(values.out).sort().join(' ')}`)
