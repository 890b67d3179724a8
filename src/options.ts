/**
 * Checks of user-supplied options at the API boundary: plain JavaScript callers get a typed
 * `OptionError` naming the option and what is allowed, never a crash or a silent default.
 */
import { availableParallelism } from 'node:os'

import { OptionError } from './errors'

/** The closest of `candidates` to `name` (edit distance at most a third of its length, min 2). */
export function nearest(name: string, candidates: Iterable<string>): string | undefined {
  let best: string | undefined
  let bestDistance = Math.max(2, Math.floor(name.length / 3)) + 1
  for (const c of candidates) {
    const d = editDistance(name.toLowerCase(), c.toLowerCase())
    if (d < bestDistance) [best, bestDistance] = [c, d]
  }
  return best
}

function editDistance(a: string, b: string): number {
  let prev = Array.from({ length: b.length + 1 }, (_, j) => j)
  for (let i = 1; i <= a.length; i++) {
    const row = [i]
    for (let j = 1; j <= b.length; j++)
      row[j] = Math.min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (a[i - 1] === b[j - 1] ? 0 : 1))
    prev = row
  }
  return prev[b.length]
}

/** " (did you mean "x"?)" or the list of valid names. */
export function suggestion(name: string, valid: readonly string[]): string {
  const near = nearest(name, valid)
  return near ? `did you mean "${near}"?` : `valid: ${valid.join(', ')}`
}

/** Refuses names outside `valid` (a typo such as `outptu` would otherwise be ignored). */
export function checkNames(given: object, valid: readonly string[], what: string): void {
  for (const name of Object.keys(given)) {
    if (!valid.includes(name)) throw new OptionError(`${what}: unknown option "${name}"; ${suggestion(name, valid)}`)
  }
}

/** Most worker threads a merge may ask for: more only adds contention and memory. */
export const maxThreads = (): number => 4 * availableParallelism()

/** Checks one option's value with `ok`; `allowed` says what would be accepted. */
export function checkValue(what: string, name: string, value: unknown, ok: (v: unknown) => boolean, allowed: string) {
  if (value !== undefined && !ok(value)) {
    const shown = typeof value === 'string' ? `"${value}"` : typeof value === 'object' ? 'an object' : String(value)
    throw new OptionError(`${what}: ${name} must be ${allowed}, got ${shown}`)
  }
}

export const isThreads = (v: unknown) => Number.isInteger(v) && (v as number) >= 0 && (v as number) <= maxThreads()
export const isSpace = (v: unknown) => v === null || v === 'weight' || v === 'delta' || v === 'param'
export const isDtypeName = (v: unknown) => typeof v === 'string' && v.length > 0
export const isBool = (v: unknown) => typeof v === 'boolean'
export const isCount = (v: unknown) => Number.isInteger(v) && (v as number) >= 1
export const isMillis = (v: unknown) => typeof v === 'number' && Number.isFinite(v) && v >= 0
