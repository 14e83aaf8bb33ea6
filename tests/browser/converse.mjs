// Converse.js 14 in Debian's Chromium (headless, driven by playwright-core), for
// tests/test_browser.py. Argument: a JSON object
//   {domain, jid, password, contact, serverOrigin, expect, reply, timeoutMs, transport}
// transport "bosh": host-meta is given without its WebSocket link, so Converse uses BOSH.
// The page is served from https://chat.test (files of node_modules/converse.js, answered inside
// the browser); https://<domain>/.well-known/host-meta is fetched from the presenced under test
// (serverOrigin), so Converse finds the WebSocket URL through XEP-0156; every other outside
// host is blocked so that nothing waits on the closed network.
// Protocol with the test, one line each on stdout: "step <name>", then the test acts;
// stdin gets "go" lines. Exit 0 when everything happened, 1 otherwise.
import { chromium } from 'playwright-core';
import { readFile } from 'node:fs/promises';
import { createInterface } from 'node:readline';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const dist = path.join(here, 'node_modules', 'converse.js', 'dist');
const opts = JSON.parse(process.argv[2]);
const timeout = opts.timeoutMs || 30000;
const lines = createInterface({ input: process.stdin });
const waiting = [];
lines.on('line', (line) => { const w = waiting.shift(); if (w) w(line); });
const nextLine = () => new Promise((resolve) => waiting.push(resolve));
const step = (name) => console.log(`step ${name}`);

const PAGE = `<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>presenced test</title>
<link rel="stylesheet" href="/dist/converse.min.css">
<script type="module" src="/dist/converse.min.js"></script>
<script type="module">
  window.converse.initialize({
    assets_path: '/dist/',
    jid: ${JSON.stringify(opts.jid)},
    password: ${JSON.stringify(opts.password)},
    auto_login: true,
    discover_connection_methods: true,
    view_mode: 'fullscreen',
    persistent_store: 'sessionStorage',
    play_sounds: false,
    show_desktop_notifications: false,
    allow_non_roster_messaging: true,
    loglevel: 'info',
  });
</script></head><body class="converse-fullscreen"></body></html>`;

const TYPES = { '.js': 'text/javascript', '.css': 'text/css', '.json': 'application/json',
  '.wasm': 'application/wasm', '.svg': 'image/svg+xml', '.png': 'image/png',
  '.ico': 'image/x-icon', '.woff2': 'font/woff2', '.woff': 'font/woff', '.ttf': 'font/ttf',
  '.mp3': 'audio/mpeg', '.ogg': 'audio/ogg', '.map': 'application/json' };

const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync',
         '--ignore-certificate-errors',
         // The page's origin (https://chat.test, answered inside the browser) counts as public:
         // without this, Local Network Access checks block its WebSocket to 127.0.0.1.
         '--disable-features=LocalNetworkAccessChecks,BlockInsecurePrivateNetworkRequests,' +
           'PrivateNetworkAccessSendPreflights,PrivateNetworkAccessRespectPreflightResults'],
  // launch() gives the browser a fresh temporary profile (--user-data-dir) of its own.
  timeout,
});
let ok = false;
try {
  const context = await browser.newContext({ ignoreHTTPSErrors: true });
  const page = await context.newPage();
  page.setDefaultTimeout(timeout);
  page.on('console', (msg) => {
    if (msg.type() === 'error' || msg.type() === 'warning') {
      console.error(`console.${msg.type()}: ${msg.text()}`);
    }
  });
  page.on('pageerror', (err) => console.error(`pageerror: ${err}`));
  await context.route('**/*', async (route) => {
    const url = new URL(route.request().url());
    if (url.origin === 'https://chat.test') {
      if (url.pathname === '/' || url.pathname === '/index.html') {
        return route.fulfill({ status: 200, contentType: 'text/html', body: PAGE });
      }
      if (url.pathname.startsWith('/dist/')) {
        const file = path.join(dist, path.normalize(url.pathname.slice('/dist/'.length)));
        if (file.startsWith(dist)) {
          try {
            const body = await readFile(file);
            return route.fulfill({ status: 200, body,
              contentType: TYPES[path.extname(file)] || 'application/octet-stream' });
          } catch { /* 404 below */ }
        }
      }
      return route.fulfill({ status: 404, body: 'not found' });
    }
    if (url.origin === `https://${opts.domain}` && url.pathname.startsWith('/.well-known/host-meta')) {
      // XEP-0156: the domain's host-meta is the one the server under test serves.
      const response = await route.fetch({ url: opts.serverOrigin + url.pathname });
      if (opts.transport !== 'bosh') return route.fulfill({ response });
      // BOSH: the same document without its WebSocket link, so Converse picks BOSH.
      const body = (await response.text()).replace(/<Link[^>]*websocket[^>]*\/>/g, '');
      return route.fulfill({ response, body });
    }
    if (url.origin === opts.serverOrigin) return route.continue();
    return route.abort('blockedbyclient');
  });
  await page.goto('https://chat.test/');
  // Logged in over the WebSocket found through host-meta; the TCP contact is shown online.
  const contact = page.locator(
    `li.current-xmpp-contact[data-status="online"]:has-text(${JSON.stringify(opts.contact)})`);
  await contact.first().waitFor();
  // Open the chat with the contact (in fullscreen mode a message alone only marks it unread).
  await contact.first().locator('a.open-chat').click();
  await page.locator('converse-chat textarea.chat-textarea').first().waitFor();
  step('contact-online');
  await nextLine();
  // A message from the TCP contact arrives and is shown.
  await page.locator(`.chat-msg__text:has-text(${JSON.stringify(opts.expect)})`).first().waitFor();
  step('received');
  const textarea = page.locator('converse-chat textarea.chat-textarea').first();
  await textarea.fill(opts.reply);
  await textarea.press('Enter');
  step('sent');
  await nextLine();
  ok = true;
} catch (err) {
  console.error(`failed: ${err && err.stack ? err.stack : err}`);
} finally {
  await browser.close().catch(() => {});
  lines.close();
}
process.exit(ok ? 0 : 1);
