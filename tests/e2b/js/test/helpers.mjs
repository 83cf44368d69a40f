// Test fixtures of the E2B JS SDK suite: the Node suites' conductor harness
// (tests/node/conductor.mjs), plus what the SDK tests need.
import * as conductor from '../../../node/conductor.mjs'

export const { REPO, BINARY, freePort, Service } = conductor

/** Starts `conductor serve` with its own data directory under target/tmp/e2b-js/. */
export function startService({ extraYaml = '' } = {}) {
  return conductor.startService({ extraYaml, tmp: 'e2b-js' })
}

/** Polls `fn` until it returns a truthy value (20 s by default). */
export function waitFor(fn, { timeoutMs = 20_000, intervalMs = 250 } = {}) {
  return conductor.waitFor(fn, { timeoutMs, intervalMs })
}

/**
 * Points the SDK at `service` through its environment variables (the contract):
 * E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY.
 */
export function useServiceEnv(service, apiKey) {
  process.env.E2B_API_URL = service.url
  process.env.E2B_SANDBOX_URL = service.url
  process.env.E2B_API_KEY = apiKey
  delete process.env.E2B_DEBUG
  delete process.env.E2B_DOMAIN
}

/**
 * Runs `fn`, expects it to reject, and returns the error (fails when it resolves).
 */
export async function rejection(fn, message = 'expected a rejection') {
  try {
    await fn()
  } catch (err) {
    return err
  }
  throw new Error(message)
}

/** A short description of an error for assertion messages. */
export function describeError(err) {
  if (!(err instanceof Error)) return String(err)
  return `${err.constructor?.name ?? 'Error'}(name=${err.name}, statusCode=${err.statusCode}): ${err.message}`
}
