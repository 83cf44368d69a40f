// Test fixtures of the dashboard's browser tests: the Node suites' conductor harness
// (tests/node/conductor.mjs), here with a token required by default.
import * as conductor from '../node/conductor.mjs'

export const { REPO, BINARY, freePort, Service, waitFor } = conductor

/** Starts `conductor serve` (token required unless `extraYaml` says otherwise). */
export function startService({ extraYaml = 'security:\n  api_key_required: true\n' } = {}) {
  return conductor.startService({ extraYaml, tmp: 'ui' })
}
