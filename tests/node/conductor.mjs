// The Node test suites' harness (tests/ui, tests/e2b/js): a real `conductor serve` on a free
// loopback port, with its own data directory and configuration.
//
// The service is the repository's built binary (`target/debug/conductor`, or
// `$CONDUCTOR_BIN`), started with its own data directory under
// `target/tmp/<tmp>/` and a configuration naming its port (the same shape as
// clients/python/tests/conftest.py). A missing binary or a service that does not
// come up is a failure, not a skip. At the end every workspace the tests left is
// removed through conductor's native API, the service is stopped with SIGTERM,
// `conductor reconcile` cleans what a failed test may have left in the engine, and
// the data directory is deleted.

import { spawn, spawnSync } from 'node:child_process'
import { existsSync, mkdirSync, mkdtempSync, openSync, closeSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { createServer } from 'node:net'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import { setTimeout as sleep } from 'node:timers/promises'

export const REPO = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..')
export const BINARY = process.env.CONDUCTOR_BIN || join(REPO, 'target', 'debug', 'conductor')
const START_TIMEOUT_MS = 120_000
const STOP_TIMEOUT_MS = 60_000

/** A free TCP port on 127.0.0.1. */
export async function freePort() {
  return await new Promise((resolvePort, reject) => {
    const srv = createServer()
    srv.unref()
    srv.on('error', reject)
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address()
      srv.close(() => resolvePort(port))
    })
  })
}

/** A running conductor service. */
export class Service {
  constructor({ url, port, base, configPath, proc }) {
    this.url = url
    this.port = port
    this.base = base
    this.configPath = configPath
    this.proc = proc
    this.exited = null
    this.token = null
    proc.on('exit', (code, signal) => {
      this.exited = { code, signal }
    })
  }

  logTail(lines = 60) {
    try {
      const text = readFileSync(join(this.base, 'service.log'), 'utf8')
      return text.split('\n').slice(-lines).join('\n')
    } catch {
      return '(no service log)'
    }
  }

  /** A request to conductor's native API (Bearer token when the service has one). */
  async native(method, path, body) {
    const headers = {}
    if (this.token) headers.Authorization = `Bearer ${this.token}`
    if (body !== undefined) headers['Content-Type'] = 'application/json'
    const res = await fetch(`${this.url}${path}`, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: AbortSignal.timeout(120_000),
    })
    const text = await res.text()
    let json
    try {
      json = text ? JSON.parse(text) : undefined
    } catch {
      json = undefined
    }
    return { status: res.status, json, text }
  }

  /** The live workspaces, as conductor's native `GET /workspaces` lists them. */
  async workspaces(query = '') {
    const res = await this.native('GET', `/workspaces${query}`)
    if (res.status !== 200) throw new Error(`GET /workspaces${query}: ${res.status} ${res.text}`)
    return res.json.workspaces ?? []
  }

  /** Removes the live workspaces (data included); errors are ignored. */
  async removeWorkspaces() {
    try {
      for (const w of await this.workspaces()) {
        await this.native('DELETE', `/workspaces/${encodeURIComponent(w.id)}?keep_volumes=false`).catch(() => {})
      }
    } catch {
      // the service may already be gone
    }
  }

  /** Removes what the tests left, stops the service with SIGTERM, deletes its data. */
  async stop() {
    if (this.exited === null) {
      await this.removeWorkspaces()
      const exited = new Promise((r) => this.proc.once('exit', r))
      this.proc.kill('SIGTERM')
      const timer = new AbortController()
      const timedOut = await Promise.race([
        exited.then(() => false),
        sleep(STOP_TIMEOUT_MS, true, { signal: timer.signal }).catch(() => false),
      ])
      timer.abort()
      if (timedOut && this.exited === null) {
        this.proc.kill('SIGKILL')
        await exited
      }
    }
    // Whatever a failed test left in the engine (workspaces, sidecars): reconcile.
    spawnSync(BINARY, ['reconcile', '--config', this.configPath], {
      stdio: 'ignore',
      timeout: STOP_TIMEOUT_MS,
    })
    rmSync(this.base, { recursive: true, force: true })
  }
}

/**
 * Starts `conductor serve` with its own data directory and waits for `/health`.
 * `extraYaml` is appended to the configuration.
 */
export async function startService({ extraYaml = '', tmp = 'node' } = {}) {
  if (!existsSync(BINARY)) {
    throw new Error(`${BINARY} does not exist; build it first with \`cargo build --bin conductor\``)
  }
  const root = join(REPO, 'target', 'tmp', tmp)
  mkdirSync(root, { recursive: true })
  const base = mkdtempSync(join(root, `conductor-${tmp}-`))
  const port = await freePort()
  const configPath = join(base, 'config.yaml')
  writeFileSync(
    configPath,
    `storage:\n  base_path: ${base}\n` +
      `network:\n  bind_address: 127.0.0.1\n  api_port: ${port}\n` +
      'task_execution:\n  shutdown_grace_period: 5\n' +
      extraYaml,
  )
  const log = openSync(join(base, 'service.log'), 'w')
  const proc = spawn(BINARY, ['serve', '--config', configPath, '--port', String(port)], {
    stdio: ['ignore', log, log],
  })
  closeSync(log)
  const service = new Service({ url: `http://127.0.0.1:${port}`, port, base, configPath, proc })
  const deadline = Date.now() + START_TIMEOUT_MS
  for (;;) {
    if (service.exited !== null) {
      const tail = service.logTail()
      await service.stop()
      throw new Error(`conductor serve exited with ${JSON.stringify(service.exited)}:\n${tail}`)
    }
    try {
      const res = await fetch(`${service.url}/health`, { signal: AbortSignal.timeout(2000) })
      await res.arrayBuffer()
      if (res.status === 200) break
    } catch {
      // not up yet
    }
    if (Date.now() > deadline) {
      const tail = service.logTail()
      await service.stop()
      throw new Error(`conductor serve did not answer /health within ${START_TIMEOUT_MS / 1000} s:\n${tail}`)
    }
    await sleep(200)
  }
  const keyFile = join(base, 'config', 'api-key')
  if (existsSync(keyFile)) service.token = readFileSync(keyFile, 'utf8').trim()
  return service
}

/** Polls `fn` until it returns a truthy value or `timeoutMs` passes; returns the last value. */
export async function waitFor(fn, { timeoutMs = 30_000, intervalMs = 250 } = {}) {
  const deadline = Date.now() + timeoutMs
  let value
  for (;;) {
    value = await fn()
    if (value || Date.now() > deadline) return value
    await sleep(intervalMs)
  }
}
