/**
 * A virtual merged model: `iterate()` streams the merged tensors in output order without writing
 * a file, for apps that feed them to an inference runtime or upload them.
 */
import native = require('./native')
import { AbortError, OptionError, errorFromNative } from './errors'
import { tensorFromBytes, type DtypeName, type SafetensorsDtype, type Tensor } from './dtypes'
import {
  cacheFor,
  checkMergeOptions,
  guardedProgress,
  mergeOptionNames,
  nativeOptions,
  parseBytes,
  registerRunning,
  withFallbackModel,
  type MergeOptions,
  type MergeReport,
} from './merge'
import { toWireWithNodes, type RecipeInput } from './recipe'

/** Options of {@link iterate}: `merge()`'s engine options, with no output to write. */
export interface IterateOptions extends Omit<MergeOptions, 'output' | 'maxShardSize' | 'embedRecipe' | 'allowEmpty'> {
  /** Dtype the floating-point tensors are delivered in (default `'f16'`; `outputDtype` is the same option). */
  dtype?: DtypeName
  /**
   * Bytes of finished tensors the engine may hold ahead of the consumer (default 64 MiB); beyond
   * that it waits for the consumer to take one. A key larger than this is still computed, one at
   * a time. A number of bytes or a size such as `'256M'`.
   */
  bufferSize?: number | string
}

/** One merged tensor of {@link iterate}. */
export interface MergedTensor {
  key: string
  tensor: Tensor
}

/** `merge()`'s options but those about an output file, and the stream's own. */
const iterateOptionNames = [
  ...mergeOptionNames.filter((n) => !['output', 'maxShardSize', 'embedRecipe', 'allowEmpty'].includes(n)),
  'dtype',
  'bufferSize',
]

/**
 * Merges the recipe and yields each merged tensor in output order (the order `merge()` writes
 * them), as soon as it and the ones before it are computed: `for await (const { key, tensor } of
 * iterate(recipe, { dtype: 'f16' }))`. Memory stays bounded: the engine computes ahead of the
 * consumer by at most `bufferSize`, then waits for it. Leaving the loop (`break`, `return`, an
 * exception) or aborting `signal` stops the merge. The generator's return value is the merge's
 * report. An input tensor holding NaN or infinity fails the iteration (with `omitNonFiniteInputs`,
 * the default, a merge would plan again without it, which cannot take back tensors already
 * delivered): the tensors before it are delivered, that one is not.
 */
export async function* iterate(
  recipe: RecipeInput,
  options: IterateOptions = {},
): AsyncGenerator<MergedTensor, MergeReport, undefined> {
  checkMergeOptions(options, 'iterate', iterateOptionNames)
  const { dtype, bufferSize, fallbackModel, signal, onProgress, ...rest } = options
  if (dtype !== undefined && rest.outputDtype !== undefined && dtype !== rest.outputDtype)
    throw new OptionError(`iterate: dtype ('${dtype}') and outputDtype ('${rest.outputDtype}') disagree; give one`)
  checkMergeOptions({ outputDtype: dtype }, 'iterate')
  const buffer = bufferSize === undefined ? 64 * 2 ** 20 : parseBytes(bufferSize, 'bufferSize')
  if (signal?.aborted) throw new AbortError('the merge was cancelled before it started')
  const { wire, objects } = toWireWithNodes(withFallbackModel(recipe, fallbackModel))
  const { context, states, release } = registerRunning([objects])
  let stream: native.MergeStream | undefined
  const { progress, error: progressError } = guardedProgress(onProgress, () => stream?.cancel())
  stream = native.mergeStream(
    JSON.stringify(wire),
    nativeOptions({ ...rest, outputDtype: dtype ?? rest.outputDtype }, context),
    buffer,
    cacheFor(options, objects),
    progress,
  )
  const current = stream
  const onAbort = () => current.cancel()
  signal?.addEventListener('abort', onAbort, { once: true })
  let finished = false
  try {
    for (;;) {
      const item = await current.next()
      const thrown = progressError()
      if (thrown) throw thrown.error
      // Tensors computed before the abort are not delivered after it.
      if (signal?.aborted) throw new AbortError('the iteration was cancelled; the merge stopped')
      if (item.error) {
        const error = errorFromNative(item.error)
        const callbackError = states.find((s) => s.callbackError)?.callbackError
        if (callbackError) Object.defineProperty(error, 'cause', { value: callbackError.error })
        throw error
      }
      if (item.done || !item.tensor) {
        finished = true
        return current.report as MergeReport
      }
      const t = item.tensor
      yield { key: t.name, tensor: tensorFromBytes(t.dtype as SafetensorsDtype, t.shape, t.data) }
    }
  } finally {
    if (!finished) current.cancel() // the consumer left early: stop computing
    signal?.removeEventListener('abort', onAbort)
    release()
  }
}
