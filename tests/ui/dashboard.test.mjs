// Browser tests of the dashboard (/ui): Debian's chromium, headless, driven by
// playwright-core against a real `conductor serve` that requires its token. Traffic goes
// to 127.0.0.1 only. Screenshots of every page land in target/ui-screenshots/.

import { after, before, test } from 'node:test'
import assert from 'node:assert/strict'
import { mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { chromium } from 'playwright-core'

import { REPO, startService, waitFor } from './helpers.mjs'

const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium'
const SHOTS = join(REPO, 'target', 'ui-screenshots')
const XSS_SCRIPT = '<script>alert("xss-script")</script>'
const XSS_ATTR = '"><img src=x onerror=alert("xss-attr")>'
const XSS_FILE = '<img src=x onerror=alert(7)>.txt'

let service
let context
let page
let profile
const dialogs = []

async function shot(name) {
  await page.screenshot({ path: join(SHOTS, `${name}.png`), fullPage: true })
}

/** Submits a task through the JSON API (bearer token) and returns its id. */
async function submitTask(commands, description) {
  const res = await service.native('POST', '/tasks', {
    task_type: 'isolated_execution',
    environment: 'minimal',
    description,
    commands,
  })
  assert.equal(res.status, 202, res.text)
  return res.json.task_id
}

async function taskStatus(id) {
  return (await service.native('GET', `/tasks/${id}`)).json.status
}

before(async () => {
  mkdirSync(SHOTS, { recursive: true })
  // A custom environment for the build test: one quick step on the base image.
  service = await startService({
    extraYaml:
      'security:\n  api_key_required: true\n' +
      'isolated_workspace:\n  agent_containers:\n    environments:\n' +
      '      - name: ui-build\n        description: "built by the dashboard test"\n' +
      '        dockerfile: |\n          FROM localhost/conductor/base:bookworm\n          RUN echo ui-build-step\n',
  })
  assert.ok(service.token, 'the service made its API key file')
  profile = mkdtempSync(join(tmpdir(), 'conductor-ui-chromium-'))
  context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    acceptDownloads: true,
    viewport: { width: 1280, height: 900 },
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  })
  page = context.pages()[0] ?? (await context.newPage())
  page.on('dialog', async (d) => {
    dialogs.push(d.message())
    await d.dismiss()
  })
})

after(async () => {
  await context?.close()
  if (profile) rmSync(profile, { recursive: true, force: true })
  await service?.stop()
})

test('no dashboard page is served without the token, and the CSP header is there', async () => {
  for (const path of ['/ui', '/ui/tasks', '/ui/tasks/task-x', '/ui/workspaces', '/ui/workspaces/ws-x', '/ui/environments']) {
    const res = await fetch(`${service.url}${path}`, { redirect: 'manual' })
    assert.equal(res.status, 303, path)
    assert.equal(res.headers.get('location'), '/ui/login', path)
    assert.equal(await res.text(), '', `${path} shows nothing`)
  }
  const wrong = await fetch(`${service.url}/ui`, { redirect: 'manual', headers: { Cookie: 'conductor_token=wrong' } })
  assert.equal(wrong.status, 303)
  const post = await fetch(`${service.url}/ui/tasks/task-x/cancel`, {
    method: 'POST',
    redirect: 'manual',
    headers: { 'Sec-Fetch-Site': 'same-origin' },
  })
  assert.equal(post.status, 401)
  // The JSON API wants the token too.
  assert.equal((await fetch(`${service.url}/tasks`)).status, 401)
  // A browser asking for / is sent to the dashboard.
  const root = await fetch(`${service.url}/`, { redirect: 'manual', headers: { Accept: 'text/html' } })
  assert.equal(root.status, 303)
  assert.equal(root.headers.get('location'), '/ui')

  const login = await fetch(`${service.url}/ui/login`)
  assert.equal(login.status, 200)
  const csp = login.headers.get('content-security-policy')
  assert.ok(csp, 'CSP header present')
  for (const part of ["default-src 'self'", "script-src 'self'", "style-src 'self'", "frame-ancestors 'none'", "form-action 'self'"]) {
    assert.ok(csp.includes(part), `${part} in ${csp}`)
  }
  assert.equal(login.headers.get('x-content-type-options'), 'nosniff')
  assert.equal(login.headers.get('referrer-policy'), 'no-referrer')

  // With the cookie: pages are served, and a cross-site POST is refused.
  const cookie = `conductor_token=${service.token}`
  const ok = await fetch(`${service.url}/ui`, { headers: { Cookie: cookie } })
  assert.equal(ok.status, 200)
  assert.ok(ok.headers.get('content-security-policy'))
  const cross = await fetch(`${service.url}/ui/tasks/task-x/cancel`, {
    method: 'POST',
    redirect: 'manual',
    headers: { Cookie: cookie, 'Sec-Fetch-Site': 'cross-site', Origin: 'http://evil.example' },
  })
  assert.equal(cross.status, 403)
  const crossApi = await fetch(`${service.url}/tasks/task-x/cancel`, {
    method: 'POST',
    headers: { Cookie: cookie, Origin: 'http://evil.example' },
  })
  assert.equal(crossApi.status, 403)
})

test('log in', async () => {
  await page.goto(`${service.url}/ui`)
  assert.ok(page.url().endsWith('/ui/login'), page.url())
  await shot('login')
  await page.fill('#token', 'not-the-token')
  await page.click('form.login button')
  assert.match(await page.textContent('.error'), /not the token/)
  await page.fill('#token', service.token)
  await page.click('form.login button')
  await page.waitForURL(`${service.url}/ui`)
  assert.ok(!page.url().includes(service.token), 'the token is never in the URL')
  const cookies = await context.cookies(service.url)
  const c = cookies.find((c) => c.name === 'conductor_token')
  assert.ok(c, 'session cookie set')
  assert.equal(c.httpOnly, true)
  assert.equal(c.sameSite, 'Strict')
  assert.equal(await page.textContent('h1'), 'Overview')
})

test('a task appears in the list and its output streams in live', async () => {
  await page.goto(`${service.url}/ui/tasks`)
  // The first sleep leaves time to open the page before the output starts.
  const id = await submitTask(['sleep 4', 'for i in 1 2 3; do echo line$i; sleep 1; done'], 'count to three')
  // The list refreshes itself.
  await page.waitForSelector(`a[href="/ui/tasks/${id}"]`, { timeout: 10_000 })
  await shot('tasks')
  await page.click(`a[href="/ui/tasks/${id}"]`)
  await page.waitForURL(`${service.url}/ui/tasks/${id}`)
  assert.equal(await page.getAttribute('#log', 'data-follow'), 'true', `opened while it runs (${await taskStatus(id)})`)
  const log = page.locator('#log')
  // Seen while the task runs: line1 without line3, then line3, all without a reload.
  const partial = await waitFor(async () => {
    const text = await log.textContent()
    return text.includes('line1') && !text.includes('line3') ? text : null
  }, { timeoutMs: 90_000, intervalMs: 100 })
  assert.ok(partial, `saw the output grow (status ${await taskStatus(id)})`)
  await page.waitForFunction(() => document.querySelector('#log').textContent.includes('line3'), null, { timeout: 30_000 })
  await page.waitForFunction(() => document.querySelector('#task-head .badge')?.textContent === 'succeeded', null, { timeout: 30_000 })
  const text = await log.textContent()
  assert.ok(text.indexOf('line1') < text.indexOf('line2') && text.indexOf('line2') < text.indexOf('line3'), text)
  assert.equal(text.split('line1').length, 2, `each line once: ${text}`)
  assert.match(await page.textContent('table.commands'), /for i in 1 2 3/)
  await shot('task')
})

test('cancel a running task, then retry it', async () => {
  const id = await submitTask(['echo started', 'sleep 300'], 'sleeps')
  await page.goto(`${service.url}/ui/tasks/${id}`)
  await page.waitForFunction(() => document.querySelector('#log').textContent.includes('started'), null, { timeout: 90_000 })
  await page.click('#cancel')
  await page.waitForURL(`${service.url}/ui/tasks/${id}`)
  await page.waitForFunction(() => document.querySelector('#task-head .badge')?.textContent === 'cancelled', null, { timeout: 30_000 })
  assert.equal(await taskStatus(id), 'cancelled')
  assert.ok(await page.isVisible('#retry'), 'a finished task offers retry')
  // Retry submits the same commands as a new task and opens its page.
  await page.click('#retry')
  await page.waitForURL((url) => url.pathname.startsWith('/ui/tasks/') && !url.pathname.endsWith(id))
  const retried = page.url().split('/').pop()
  assert.notEqual(retried, id)
  assert.match(await page.textContent('#task-head'), /sleeps/)
  const cancelled = await service.native('POST', `/tasks/${retried}/cancel`)
  assert.equal(cancelled.status, 200, cancelled.text)
})

test('output with markup stays inert text', async () => {
  const id = await submitTask(
    ['sleep 2', `printf '%s\\n' '${XSS_SCRIPT}'`, `printf '%s\\n' '${XSS_ATTR}'`],
    XSS_ATTR,
  )
  await page.goto(`${service.url}/ui/tasks/${id}`)
  // Streamed in live…
  await page.waitForFunction((s) => document.querySelector('#log').textContent.includes(s), XSS_ATTR, { timeout: 90_000 })
  await page.waitForFunction(() => document.querySelector('#task-head .badge')?.textContent === 'succeeded', null, { timeout: 30_000 })
  // …and rendered by the server after a reload.
  await page.reload()
  const text = await page.textContent('#log')
  assert.ok(text.includes(XSS_SCRIPT), text)
  assert.ok(text.includes(XSS_ATTR), text)
  assert.equal(await page.locator('main img').count(), 0, 'no element was injected')
  assert.equal(await page.locator('main script').count(), 0, 'no script was injected')
  assert.deepEqual(dialogs, [])
  await shot('task-xss')
})

test('workspace page: files, download, upload, exec, snapshot and restore', async () => {
  const created = await service.native('POST', '/workspaces', { agent_id: 'ui-test', environment: 'minimal' })
  assert.equal(created.status, 201, created.text)
  const ws = created.json.workspace_id
  const put = async (path, body) => {
    const res = await fetch(`${service.url}/workspaces/${ws}/files?path=${encodeURIComponent(path)}`, {
      method: 'PUT',
      headers: { Authorization: `Bearer ${service.token}` },
      body,
    })
    assert.equal(res.status, 200, await res.text())
  }
  await put('hello.txt', 'original\n')
  await put(XSS_FILE, 'x')

  await page.goto(`${service.url}/ui/workspaces`)
  await page.waitForSelector(`a[href="/ui/workspaces/${ws}"]`)
  await shot('workspaces')
  await page.click(`a[href="/ui/workspaces/${ws}"]`)
  await page.waitForURL(`${service.url}/ui/workspaces/${ws}`)
  const names = await page.locator('table.files td.name').allTextContents()
  assert.ok(names.includes(XSS_FILE), JSON.stringify(names))
  assert.equal(await page.locator('main img').count(), 0)
  await shot('workspace')

  // Download.
  const [download] = await Promise.all([
    page.waitForEvent('download'),
    page.click('table.files a.download:text-is("hello.txt")'),
  ])
  assert.equal(readFileSync(await download.path(), 'utf8'), 'original\n')

  // Upload (a name with markup: shown as text).
  const uploaded = 'up<b>load<i>.txt'
  await page.setInputFiles('#upload', { name: uploaded, mimeType: 'text/plain', buffer: Buffer.from('uploaded\n') })
  await page.click('#upload-form button')
  await page.waitForSelector('.notice', { timeout: 10_000 }).catch(async () => {
    throw new Error(`no notice after the upload: ${page.url()} ${await page.textContent('main')}`)
  })
  assert.equal(await page.textContent('.notice'), 'File uploaded.')
  assert.ok((await page.locator('table.files td.name').allTextContents()).includes(uploaded))
  assert.equal(await page.locator('main b, main i').count(), 0)
  const got = await fetch(`${service.url}/workspaces/${ws}/files?path=${encodeURIComponent(uploaded)}`, {
    headers: { Authorization: `Bearer ${service.token}` },
  })
  assert.equal(await got.text(), 'uploaded\n')

  // Snapshot, change, restore.
  await page.fill('#snapshot-name', 'before')
  await page.click('#snapshot-form button')
  await page.waitForSelector('.notice')
  assert.equal(await page.textContent('.notice'), 'Snapshot created.')
  assert.ok((await page.locator('table.snapshots code').allTextContents()).includes('before'))

  await page.fill('#command', 'echo changed > /workspace/hello.txt && cat /workspace/hello.txt')
  await page.click('form.exec button')
  await page.waitForSelector('#exec-stdout')
  assert.equal(await page.textContent('#exec-stdout'), 'changed\n')

  await page.click('button[data-snapshot="before"]')
  await page.waitForSelector('.notice')
  assert.equal(await page.textContent('.notice'), 'Snapshot restored.')
  await page.fill('#command', `cat /workspace/hello.txt; printf '%s\\n' '${XSS_ATTR}'`)
  await page.click('form.exec button')
  await page.waitForSelector('#exec-stdout')
  assert.equal(await page.textContent('#exec-stdout'), `original\n${XSS_ATTR}\n`)
  assert.equal(await page.locator('main img').count(), 0)
  assert.deepEqual(dialogs, [])
  await shot('workspace-exec')

  // Run and follow: the first line is on the page before the command has ended.
  await page.fill('#live-command', `for i in 1 2 3; do echo step$i; sleep 1; done; printf '%s\\n' '${XSS_ATTR}'`)
  await page.click('#exec-live-form button')
  await page.waitForFunction(() => document.getElementById('exec-live').textContent.includes('step1'))
  const early = await page.textContent('#exec-live')
  assert.ok(!early.includes('step3'), `the output came all at once: ${early}`)
  await page.waitForFunction(() => document.getElementById('exec-live').dataset.done === 'true', null, { timeout: 30_000 })
  const live = await page.textContent('#exec-live')
  assert.ok(live.includes(`step3\n${XSS_ATTR}\n[exit code 0 after`), live)
  assert.equal(await page.locator('main img').count(), 0)
  assert.deepEqual(dialogs, [])

  // Fork into two copies: the first copy's page, with the source's files.
  await page.fill('#fork-count', '2')
  await page.click('#fork-form button')
  await page.waitForSelector('.notice')
  assert.match(await page.textContent('.notice'), /^Forked/)
  const copy = new URL(page.url()).pathname.split('/').pop()
  assert.notEqual(copy, ws)
  assert.ok((await page.locator('table.files td.name').allTextContents()).includes('hello.txt'))
  const listed = await service.native('GET', '/workspaces?agent_id=ui-test')
  assert.equal(listed.json.workspaces.length, 3, listed.text)
  // The copy names its source; the source lists both copies.
  assert.equal(await page.textContent('#forked-from code'), ws)
  await page.goto(`${service.url}/ui/workspaces/${ws}`)
  const forks = await page.locator('table.forks code').allTextContents()
  assert.equal(forks.length, 2, JSON.stringify(forks))
  assert.ok(forks.includes(copy), JSON.stringify(forks))
})

test('overview and environments render', async () => {
  await page.goto(`${service.url}/ui/environments`)
  assert.ok((await page.locator('table.environments code').allTextContents()).includes('minimal'))
  await shot('environments')
  await page.goto(`${service.url}/ui`)
  await page.waitForSelector('#queue-depth')
  const overview = await page.textContent('main')
  for (const part of ['Warm pools', 'host CPUs', 'host memory available / total', 'data disk free / total']) {
    assert.ok(overview.includes(part), part)
  }
  await shot('overview')
  assert.deepEqual(dialogs, [])
})

test('build an environment from its page and follow the progress', async () => {
  await page.goto(`${service.url}/ui/environments`)
  await page.click('button[data-build="ui-build"]')
  await page.waitForURL(`${service.url}/ui/environments/ui-build/build`)
  // The page re-reads its live part every 3 s until the build is over.
  await page.waitForSelector('#build-result', { timeout: 180_000 })
  assert.match(await page.textContent('#build-live'), /succeeded/)
  assert.match(await page.textContent('#build-log'), /STEP 1\/\d+: FROM/)
  await shot('environment-build')
  await page.goto(`${service.url}/ui/environments`)
  assert.equal(await page.textContent('button[data-build="ui-build"]'), 'Rebuild')
  assert.deepEqual(dialogs, [])
})
