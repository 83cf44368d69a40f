// End-to-end tests of conductor's E2B-compatible API with the official, unmodified
// `e2b` JS SDK (2.51.0), using only its public API. The SDK is pointed at a real
// `conductor serve` through E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY.
//
// One sandbox ("shared", template python-dev) is used by the command and file tests;
// the lifecycle tests (setTimeout, kill) and the auth test make their own.

import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { createHash, randomBytes, randomUUID } from 'node:crypto'

import {
  AuthenticationError,
  CommandExitError,
  FileNotFoundError,
  InvalidArgumentError,
  NotFoundError,
  Sandbox,
  SandboxError,
  SandboxNotFoundError,
  TimeoutError,
} from 'e2b'

import { describeError, rejection, startService, useServiceEnv, waitFor } from './helpers.mjs'

const RUN = `js-${randomUUID().slice(0, 8)}`
const API_KEY = 'e2b_conductor_js_tests'
const SHARED_ENVS = { E2B_JS_VAR: 'hello-env', E2B_JS_OTHER: 'with spaces and $dollar' }
const SHARED_METADATA = { suite: RUN, role: 'shared', 'team name': 'a b&c=d/é %' }

let service
let sharedPromise

/** The shared python-dev sandbox, created once by whichever test needs it first. */
function shared() {
  if (!sharedPromise) {
    sharedPromise = Sandbox.create('python-dev', { envs: SHARED_ENVS, metadata: SHARED_METADATA })
    sharedPromise.catch(() => {})
  }
  return sharedPromise
}

/** Whether a SandboxNotFoundError says the sandbox is gone (polling helper). */
async function isGone(sandboxId) {
  try {
    await Sandbox.getInfo(sandboxId)
    return false
  } catch (err) {
    if (err instanceof SandboxNotFoundError) return true
    throw err
  }
}

/** The command lines of the sandbox's processes, read from /proc (no procps needed). */
async function processLines(sbx) {
  const r = await sbx.commands.run(
    'for p in /proc/[0-9]*; do [ -r "$p/cmdline" ] && tr "\\0" " " < "$p/cmdline" && echo; done; true',
  )
  return r.stdout.split('\n').filter(Boolean)
}

const sha256 = (buf) => createHash('sha256').update(buf).digest('hex')

before(async () => {
  service = await startService()
  useServiceEnv(service, API_KEY)
})

after(async () => {
  if (sharedPromise) {
    const sbx = await sharedPromise.catch(() => undefined)
    await sbx?.kill().catch(() => {})
  }
  if (service) await service.stop()
})

describe('sandbox creation', () => {
  test("Sandbox.create('python-dev', { envs, metadata }): envs reach commands, metadata comes back", async () => {
    const sbx = await shared()
    assert.equal(typeof sbx.sandboxId, 'string')
    assert.ok(sbx.sandboxId.length > 0)

    const r = await sbx.commands.run('printf "%s|%s" "$E2B_JS_VAR" "$E2B_JS_OTHER"')
    assert.equal(r.stdout, 'hello-env|with spaces and $dollar')
    assert.equal(r.exitCode, 0)

    const info = await sbx.getInfo()
    assert.equal(info.sandboxId, sbx.sandboxId)
    assert.deepEqual(info.metadata, SHARED_METADATA)
    assert.equal(info.state, 'running')
    assert.equal(info.templateId, 'python-dev')
    assert.equal(typeof info.envdVersion, 'string')
    assert.ok(info.cpuCount > 0 && info.memoryMB > 0, `cpuCount ${info.cpuCount}, memoryMB ${info.memoryMB}`)
    assert.ok(info.startedAt instanceof Date && !Number.isNaN(info.startedAt.getTime()), `startedAt ${info.startedAt}`)
    assert.ok(info.endAt instanceof Date && info.endAt > info.startedAt, `endAt ${info.endAt} after startedAt ${info.startedAt}`)

    const items = await Sandbox.list({ query: { metadata: { suite: RUN, role: 'shared' } } }).nextItems()
    const mine = items.find((s) => s.sandboxId === sbx.sandboxId)
    assert.ok(mine, `Sandbox.list() by metadata lists ${sbx.sandboxId}: ${JSON.stringify(items)}`)
    assert.deepEqual(mine.metadata, SHARED_METADATA)
  })

  test('the sandbox is a conductor workspace (native GET /workspaces, agent_id "e2b")', async () => {
    const sbx = await shared()
    const workspaces = await service.workspaces()
    const w = workspaces.find((x) => x.id === sbx.sandboxId)
    assert.ok(w, `GET /workspaces lists ${sbx.sandboxId}: ${JSON.stringify(workspaces.map((x) => x.id))}`)
    assert.equal(w.agent_id, 'e2b')
    assert.equal(w.environment, 'python-dev')
    assert.equal(w.state, 'running')
    const byAgent = await service.workspaces('?agent_id=e2b')
    assert.ok(byAgent.some((x) => x.id === sbx.sandboxId))
  })

  test('commands run as uid 1000 in /workspace', async () => {
    const sbx = await shared()
    const r = await sbx.commands.run('id -u; pwd')
    assert.equal(r.stdout, '1000\n/workspace\n')
    const named = await sbx.commands.run('id -u', { user: 'user' })
    assert.equal(named.stdout, '1000\n', "the SDK's default user name is the workspace user")
  })

  test("user 'root' is refused with InvalidArgumentError (unary, streaming and HTTP calls)", async () => {
    const sbx = await shared()
    const calls = {
      // plain HTTP (GET /files?username=root)
      'files.read': () => sbx.files.read('/workspace/x.txt', { user: 'root' }),
      // unary Connect RPC (filesystem.Filesystem/ListDir)
      'files.list': () => sbx.files.list('/workspace', { user: 'root' }),
      // server-streaming Connect RPC (process.Process/Start)
      'commands.run': () => sbx.commands.run('id -u', { user: 'root' }),
      // server-streaming Connect RPC (filesystem.Filesystem/WatchDir)
      'files.watchDir': async () => {
        const h = await sbx.files.watchDir('/workspace', () => {}, { user: 'root' })
        await h.stop()
      },
    }
    const wrong = []
    for (const [name, call] of Object.entries(calls)) {
      const err = await rejection(call, `${name} as root must be refused`).catch((e) => e)
      if (!(err instanceof InvalidArgumentError)) wrong.push(`${name}: ${describeError(err)}`)
    }
    assert.deepEqual(wrong, [], 'every call as root rejects with InvalidArgumentError')
  })
})

describe('commands', () => {
  test('run: stdout, stderr and exitCode', async () => {
    const sbx = await shared()
    const r = await sbx.commands.run('echo out; echo err >&2; echo more-out')
    assert.equal(r.exitCode, 0)
    assert.equal(r.stdout, 'out\nmore-out\n')
    assert.equal(r.stderr, 'err\n')
  })

  test("a non-zero exit rejects with the SDK's CommandExitError", async () => {
    const sbx = await shared()
    const err = await rejection(() => sbx.commands.run('echo partial; echo boom >&2; exit 3'))
    assert.ok(err instanceof CommandExitError, describeError(err))
    assert.ok(err instanceof SandboxError)
    assert.equal(err.exitCode, 3)
    assert.equal(err.stderr, 'boom\n')
    assert.equal(err.stdout, 'partial\n')
  })

  test('run with cwd', async () => {
    const sbx = await shared()
    await sbx.commands.run('mkdir -p /workspace/cwd-test/inner')
    const abs = await sbx.commands.run('pwd', { cwd: '/workspace/cwd-test/inner' })
    assert.equal(abs.stdout, '/workspace/cwd-test/inner\n')
    const def = await sbx.commands.run('pwd')
    assert.equal(def.stdout, '/workspace\n')
  })

  test('run with envs (and they override the sandbox envs)', async () => {
    const sbx = await shared()
    const r = await sbx.commands.run('printf "%s|%s|%s" "$A" "$B" "$E2B_JS_VAR"', {
      envs: { A: '1', B: 'two words', E2B_JS_VAR: 'overridden' },
    })
    assert.equal(r.stdout, '1|two words|overridden')
    const after = await sbx.commands.run('printf "%s|%s" "$A" "$E2B_JS_VAR"')
    assert.equal(after.stdout, '|hello-env', 'per-command envs do not leak into later commands')
  })

  test("timeoutMs: sleep 30 with timeoutMs 2000 rejects with the SDK's TimeoutError, quickly", async () => {
    const sbx = await shared()
    const started = Date.now()
    const err = await rejection(() => sbx.commands.run('sleep 30', { timeoutMs: 2000 }))
    const elapsed = Date.now() - started
    assert.ok(err instanceof TimeoutError, describeError(err))
    assert.ok(elapsed < 10_000, `rejected after ${elapsed} ms`)
    assert.ok(elapsed >= 1500, `rejected after only ${elapsed} ms`)
    // As envd does with Connect-Timeout-Ms, the command itself is stopped, too.
    const stopped = await waitFor(async () => !(await processLines(sbx)).some((l) => l.includes('sleep 30')), {
      timeoutMs: 5000,
    })
    assert.ok(stopped, 'no "sleep 30" left in the sandbox')
    const next = await sbx.commands.run('echo still-usable')
    assert.equal(next.stdout, 'still-usable\n', 'the sandbox runs commands after a timed-out one')
  })

  test('onStdout streams: the first chunk arrives before the command ends', async () => {
    const sbx = await shared()
    const started = Date.now()
    const chunks = []
    let firstAt
    const r = await sbx.commands.run('echo first; sleep 3; echo second', {
      onStdout: (data) => {
        chunks.push(data)
        if (firstAt === undefined && chunks.join('').includes('first')) firstAt = Date.now()
      },
    })
    const endedAt = Date.now()
    assert.equal(r.stdout, 'first\nsecond\n')
    assert.equal(chunks.join(''), 'first\nsecond\n')
    assert.ok(firstAt !== undefined, 'onStdout got "first"')
    assert.ok(endedAt - firstAt >= 2000, `first chunk at +${firstAt - started} ms, end at +${endedAt - started} ms`)
  })

  test('background: true, then handle.kill() and the process is gone', async () => {
    const sbx = await shared()
    const marker = 'sleep 4242'
    const handle = await sbx.commands.run(marker, { background: true })
    assert.equal(typeof handle.pid, 'number')
    assert.ok(handle.pid > 0, `pid ${handle.pid}`)

    const listed = await sbx.commands.list()
    assert.ok(listed.some((p) => p.pid === handle.pid), `commands.list() has ${handle.pid}: ${JSON.stringify(listed)}`)
    assert.ok((await processLines(sbx)).some((l) => l.includes(marker)), 'the process runs in the sandbox')

    assert.equal(await handle.kill(), true)
    const err = await rejection(() => handle.wait(), 'a killed command does not succeed')
    assert.ok(err instanceof CommandExitError, describeError(err))
    assert.notEqual(err.exitCode, 0)

    const gone = await waitFor(async () => !(await sbx.commands.list()).some((p) => p.pid === handle.pid), {
      timeoutMs: 10_000,
    })
    assert.ok(gone, 'commands.list() no longer has the killed command')
    const lines = await processLines(sbx)
    assert.ok(!lines.some((l) => l.includes(marker)), `no "${marker}" left: ${JSON.stringify(lines)}`)
    assert.equal(await sbx.commands.kill(handle.pid), false, 'killing it again finds nothing')
  })

  test('stdin: sendStdin to a background cat, closeStdin, output read back', async () => {
    const sbx = await shared()
    let out = ''
    const handle = await sbx.commands.run('cat', { background: true, stdin: true, onStdout: (d) => (out += d) })
    await sbx.commands.sendStdin(handle.pid, 'hello\n')
    const echoed = await waitFor(() => out.includes('hello\n'), { timeoutMs: 10_000 })
    assert.ok(echoed, `cat echoed the input, got ${JSON.stringify(out)}`)
    await sbx.commands.sendStdin(handle.pid, 'world\n')
    await sbx.commands.closeStdin(handle.pid)
    const r = await handle.wait()
    assert.equal(r.exitCode, 0)
    assert.equal(r.stdout, 'hello\nworld\n')
  })
})

describe('files', () => {
  test('write and read text; relative paths resolve against /workspace', async () => {
    const sbx = await shared()
    const info = await sbx.files.write('notes/hello.txt', 'hello files\nsecond line\n')
    assert.equal(info.name, 'hello.txt')
    assert.equal(info.path, '/workspace/notes/hello.txt')
    assert.equal(await sbx.files.read('/workspace/notes/hello.txt'), 'hello files\nsecond line\n')
    assert.equal(await sbx.files.read('notes/hello.txt'), 'hello files\nsecond line\n')
    const cat = await sbx.commands.run('cat /workspace/notes/hello.txt; stat -c %u /workspace/notes/hello.txt')
    assert.equal(cat.stdout, 'hello files\nsecond line\n1000\n')
    // Overwrite, and an empty file.
    await sbx.files.write('/workspace/notes/hello.txt', 'replaced')
    assert.equal(await sbx.files.read('/workspace/notes/hello.txt'), 'replaced')
    await sbx.files.write('/workspace/notes/empty.txt', '')
    assert.equal(await sbx.files.read('/workspace/notes/empty.txt'), '')
  })

  test("read with { format: 'bytes' }", async () => {
    const sbx = await shared()
    const data = new Uint8Array(256 * 4)
    for (let i = 0; i < data.length; i++) data[i] = i % 256
    await sbx.files.write('/workspace/bin/all-bytes.bin', data)
    const back = await sbx.files.read('/workspace/bin/all-bytes.bin', { format: 'bytes' })
    assert.ok(back instanceof Uint8Array, `bytes is a Uint8Array, got ${back?.constructor?.name}`)
    assert.equal(back.length, data.length)
    assert.deepEqual(Buffer.from(back), Buffer.from(data))
  })

  test('makeDir, list and exists', async () => {
    const sbx = await shared()
    assert.equal(await sbx.files.makeDir('/workspace/listing/deep/er'), true)
    assert.equal(await sbx.files.makeDir('/workspace/listing/deep/er'), false, 'an existing directory gives false')
    await sbx.files.write('/workspace/listing/a.txt', 'aaa')
    await sbx.files.write('/workspace/listing/b.txt', 'bbbbb')
    const entries = await sbx.files.list('/workspace/listing')
    const byName = Object.fromEntries(entries.map((e) => [e.name, e]))
    assert.deepEqual(Object.keys(byName).sort(), ['a.txt', 'b.txt', 'deep'])
    assert.equal(byName['a.txt'].type, 'file')
    assert.equal(byName['a.txt'].path, '/workspace/listing/a.txt')
    assert.equal(byName['b.txt'].size, 5)
    assert.equal(byName.deep.type, 'dir')
    assert.equal(byName.deep.path, '/workspace/listing/deep')

    assert.equal(await sbx.files.exists('/workspace/listing/a.txt'), true)
    assert.equal(await sbx.files.exists('/workspace/listing/deep'), true)
    assert.equal(await sbx.files.exists('/workspace/listing/nope.txt'), false)
  })

  test('rename', async () => {
    const sbx = await shared()
    await sbx.files.write('/workspace/mv/src.txt', 'moving')
    const entry = await sbx.files.rename('/workspace/mv/src.txt', '/workspace/mv/dst.txt')
    assert.equal(entry.name, 'dst.txt')
    assert.equal(entry.path, '/workspace/mv/dst.txt')
    assert.equal(await sbx.files.exists('/workspace/mv/src.txt'), false)
    assert.equal(await sbx.files.read('/workspace/mv/dst.txt'), 'moving')
  })

  test('remove (a file and a directory)', async () => {
    const sbx = await shared()
    await sbx.files.write('/workspace/rm/dir/f.txt', 'x')
    await sbx.files.write('/workspace/rm/g.txt', 'y')
    await sbx.files.remove('/workspace/rm/g.txt')
    assert.equal(await sbx.files.exists('/workspace/rm/g.txt'), false)
    await sbx.files.remove('/workspace/rm/dir')
    assert.equal(await sbx.files.exists('/workspace/rm/dir'), false)
    assert.equal(await sbx.files.exists('/workspace/rm'), true)
  })

  test('a 50 MB round trip (random bytes, sha256)', async () => {
    const sbx = await shared()
    const data = randomBytes(50 * 1024 * 1024)
    const digest = sha256(data)
    await sbx.files.write('/workspace/big.bin', data)
    const inside = await sbx.commands.run('sha256sum /workspace/big.bin; stat -c %s /workspace/big.bin')
    assert.equal(inside.stdout, `${digest}  /workspace/big.bin\n${data.length}\n`)
    const back = await sbx.files.read('/workspace/big.bin', { format: 'bytes' })
    assert.equal(back.length, data.length)
    assert.equal(sha256(back), digest)
    await sbx.files.remove('/workspace/big.bin')
  })

  test('watchDir: creating a file in it delivers an event', async () => {
    const sbx = await shared()
    await sbx.files.makeDir('/workspace/watched')
    const events = []
    const handle = await sbx.files.watchDir('/workspace/watched', (e) => events.push(e))
    try {
      await sbx.files.write('/workspace/watched/new.txt', 'fresh')
      const got = await waitFor(() => events.some((e) => e.name === 'new.txt'), { timeoutMs: 10_000 })
      assert.ok(got, `an event for new.txt arrived: ${JSON.stringify(events)}`)
      const types = events.filter((e) => e.name === 'new.txt').map((e) => e.type)
      assert.ok(
        types.some((t) => t === 'create' || t === 'write'),
        `create/write event for new.txt: ${JSON.stringify(types)}`,
      )
    } finally {
      await handle.stop()
    }
  })
})

describe('errors', () => {
  test('reading a missing file: NotFoundError (FileNotFoundError)', async () => {
    const sbx = await shared()
    const err = await rejection(() => sbx.files.read('/workspace/does/not/exist.txt'))
    assert.ok(err instanceof NotFoundError, describeError(err))
    assert.ok(err instanceof FileNotFoundError, describeError(err))
  })

  test('a path outside /workspace: InvalidArgumentError', async () => {
    const sbx = await shared()
    // Uploads of 192 KiB are included (alternately multipart and octet-stream, sixteen
    // times): a refused upload must still be answered cleanly, not with the connection
    // closed under a client that is still sending the body (`fetch failed`, EPIPE).
    // E2B's envd (Go net/http) reads up to 256 KiB of an unread body before it answers.
    const body = new Uint8Array(192 * 1024).fill(65)
    const calls = {
      'files.write /etc/passwd': () => sbx.files.write('/etc/passwd', 'root::0:0::/root:/bin/bash\n'),
      'files.write ../escape.txt': () => sbx.files.write('../escape.txt', 'x'),
      'files.read /etc/hostname': () => sbx.files.read('/etc/hostname'),
      'files.list /etc': () => sbx.files.list('/etc'),
      'files.makeDir /tmp/outside': () => sbx.files.makeDir('/tmp/outside'),
      'files.rename into /tmp': () => sbx.files.rename('/workspace/notes/hello.txt', '/tmp/hello.txt'),
    }
    for (let i = 0; i < 16; i++) {
      const useOctetStream = i % 2 === 1
      calls[`files.write 192 KiB /etc/big-${i}.bin (${useOctetStream ? 'octet-stream' : 'multipart'})`] = () =>
        sbx.files.write(`/etc/big-${i}.bin`, body, { useOctetStream })
    }
    const wrong = []
    for (const [name, call] of Object.entries(calls)) {
      const err = await rejection(call, `${name} must be refused`).catch((e) => e)
      if (!(err instanceof InvalidArgumentError)) {
        wrong.push(`${name}: ${describeError(err)}${err?.cause ? ` (cause: ${err.cause.code ?? err.cause.message})` : ''}`)
      }
    }
    assert.deepEqual(wrong, [], 'every call outside /workspace rejects with InvalidArgumentError')
    // Nothing was written.
    const check = await sbx.commands.run(
      'grep -c "^root::0:0::" /etc/passwd || true; ls /escape.txt /tmp/outside /tmp/hello.txt /etc/big-0.bin 2>&1 | grep -c "No such file" || true',
    )
    assert.equal(check.stdout, '0\n4\n')
  })

  test('an unknown template: HTTP 404, which the SDK raises as a SandboxError with statusCode 404', async () => {
    const err = await rejection(() => Sandbox.create('no-such-template-js'))
    // The SDK's createSandbox passes every status but 401/429/503 to
    // apiErrorFromCode(status, message, SandboxError): a 404 is a plain SandboxError.
    assert.ok(err instanceof SandboxError, describeError(err))
    assert.equal(err.name, 'SandboxError', describeError(err))
    assert.equal(err.statusCode, 404, describeError(err))
    assert.match(err.message, /^404: /)
  })

  test('a wrong API key against a server that requires one: AuthenticationError', async () => {
    const auth = await startService({ extraYaml: 'security:\n  api_key_required: true\n' })
    try {
      assert.ok(auth.token, 'the auth server wrote <base>/config/api-key')
      const conn = { apiUrl: auth.url, sandboxUrl: auth.url }
      const bad = await rejection(() => Sandbox.create('python-dev', { ...conn, apiKey: 'e2b_wrong_key' }))
      assert.ok(bad instanceof AuthenticationError, describeError(bad))
      const badList = await rejection(() => Sandbox.list({ ...conn, apiKey: 'e2b_wrong_key' }).nextItems())
      assert.ok(badList instanceof AuthenticationError, describeError(badList))

      // The right key works, envd calls included.
      const sbx = await Sandbox.create('python-dev', { ...conn, apiKey: auth.token })
      try {
        const r = await sbx.commands.run('echo authed')
        assert.equal(r.stdout, 'authed\n')
        await sbx.files.write('/workspace/a.txt', 'a')
        assert.equal(await sbx.files.read('/workspace/a.txt'), 'a')
      } finally {
        assert.equal(await sbx.kill(), true)
      }
    } finally {
      await auth.stop()
    }
  })
})

describe('lifecycle', () => {
  test('Sandbox.list(): the paginator, with and without a metadata query', async () => {
    const sbx = await shared()
    const paginator = Sandbox.list({ query: { metadata: { suite: RUN } } })
    assert.equal(paginator.hasNext, true)
    const page = await paginator.nextItems()
    assert.ok(Array.isArray(page))
    const mine = page.find((s) => s.sandboxId === sbx.sandboxId)
    assert.ok(mine, `listed by metadata: ${JSON.stringify(page)}`)
    assert.deepEqual(mine.metadata, SHARED_METADATA)
    assert.equal(mine.state, 'running')
    for (const s of page) assert.equal(s.metadata.suite, RUN, `only matching sandboxes: ${JSON.stringify(s)}`)

    const none = await Sandbox.list({ query: { metadata: { suite: `${RUN}-nobody` } } }).nextItems()
    assert.deepEqual(none, [])

    const all = []
    const everything = Sandbox.list()
    while (everything.hasNext) all.push(...(await everything.nextItems()))
    assert.ok(all.some((s) => s.sandboxId === sbx.sandboxId), 'the unfiltered list has it too')
  })

  test('Sandbox.list() by metadata with spaces and reserved characters', async () => {
    const sbx = await shared()
    // The SDK encodes each key and value, then the pairs, then the query parameter
    // (E2B's API decodes all three times).
    for (const metadata of [{ 'team name': 'a b&c=d/é %' }, { suite: RUN, 'team name': 'a b&c=d/é %' }]) {
      const items = await Sandbox.list({ query: { metadata } }).nextItems()
      assert.deepEqual(
        items.map((s) => s.sandboxId),
        [sbx.sandboxId],
        `Sandbox.list({ query: { metadata: ${JSON.stringify(metadata)} } })`,
      )
    }
    const none = await Sandbox.list({ query: { metadata: { 'team name': 'a b&c=d/é' } } }).nextItems()
    assert.deepEqual(none, [], 'a different value matches nothing')
  })

  test('Sandbox.list({ limit: 1 }): pages through nextToken', async () => {
    const sbx = await shared()
    const second = await Sandbox.create('minimal', { metadata: { suite: RUN, role: 'page' } })
    try {
      const paginator = Sandbox.list({ limit: 1, query: { metadata: { suite: RUN } } })
      const pages = []
      while (paginator.hasNext && pages.length < 5) pages.push(await paginator.nextItems())
      assert.equal(pages.length, 2, `two pages of one: ${JSON.stringify(pages)}`)
      assert.ok(pages.every((p) => p.length === 1), `one sandbox a page: ${JSON.stringify(pages)}`)
      assert.equal(paginator.hasNext, false)
      assert.deepEqual(pages.flat().map((s) => s.sandboxId).sort(), [sbx.sandboxId, second.sandboxId].sort())
    } finally {
      await second.kill()
    }
  })

  test('Sandbox.connect(id), then a command', async () => {
    const sbx = await shared()
    const again = await Sandbox.connect(sbx.sandboxId)
    assert.equal(again.sandboxId, sbx.sandboxId)
    await sbx.files.write('/workspace/connect.txt', 'seen from the other handle')
    const r = await again.commands.run('cat /workspace/connect.txt')
    assert.equal(r.stdout, 'seen from the other handle')
    const err = await rejection(() => Sandbox.connect('no-such-sandbox-js'))
    assert.ok(err instanceof SandboxNotFoundError, describeError(err))
  })

  test('setTimeout(3000): the sandbox is gone afterwards', async () => {
    const sbx = await Sandbox.create('minimal', { metadata: { suite: RUN, role: 'timeout' } })
    try {
      const r = await sbx.commands.run('echo alive')
      assert.equal(r.stdout, 'alive\n')
      await sbx.setTimeout(3000)
      const info = await sbx.getInfo()
      assert.ok(info.endAt.getTime() - Date.now() < 10_000, `endAt ${info.endAt.toISOString()} is about 3 s away`)
      const started = Date.now()
      const gone = await waitFor(() => isGone(sbx.sandboxId), { timeoutMs: 20_000, intervalMs: 500 })
      assert.ok(gone, 'the sandbox is gone within 20 s')
      // The expired workspace is removed too (the removal may finish a little later).
      const left = Math.max(1000, 20_000 - (Date.now() - started))
      const removed = await waitFor(async () => !(await service.workspaces()).some((w) => w.id === sbx.sandboxId), {
        timeoutMs: left,
        intervalMs: 500,
      })
      const states = (await service.workspaces()).filter((w) => w.id === sbx.sandboxId).map((w) => w.state)
      assert.ok(removed, `its workspace is removed too, still listed as ${JSON.stringify(states)}`)
    } finally {
      await sbx.kill().catch(() => {})
    }
  })

  test('kill() (the default template)', async () => {
    const sbx = await Sandbox.create({ metadata: { suite: RUN, role: 'kill' } })
    const r = await sbx.commands.run('python3 -c "print(6*7)"')
    assert.equal(r.stdout, '42\n', 'the default template "base" is python-dev')
    assert.equal(await sbx.kill(), true)
    assert.equal(await isGone(sbx.sandboxId), true)
    assert.ok(!(await service.workspaces()).some((w) => w.id === sbx.sandboxId), 'its workspace is removed')
    assert.equal(await Sandbox.kill(sbx.sandboxId), false, 'killing it again finds nothing')
    // envd of a sandbox that is gone answers 502 (E2B's proxy does): the SDK makes that
    // a SandboxNotFoundError when a command starts.
    const err = await rejection(() => sbx.commands.run('true'), 'a killed sandbox runs nothing')
    assert.ok(err instanceof SandboxNotFoundError, describeError(err))
  })
})
