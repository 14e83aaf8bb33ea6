// The invitation page of presenced in Debian's Chromium (headless, driven by playwright-core),
// for tests/test_invites.py. Argument: a JSON object {url, username, password, resolve,
// timeoutMs}: the invitation link as the CLI printed it; `resolve` is its host name, mapped to
// 127.0.0.1 so that the link is opened unchanged. The form is filled through its labels.
// On stdout: "step button <href of the xmpp: button>", then "step registered <JID shown>".
// Exit 0 when both happened, 1 otherwise.
import { chromium } from 'playwright-core';

const opts = JSON.parse(process.argv[2]);
const timeout = opts.timeoutMs || 30000;
const step = (text) => console.log(`step ${text}`);

const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync',
         '--ignore-certificate-errors',
         `--host-resolver-rules=MAP ${opts.resolve} 127.0.0.1`],
  timeout,
});
let ok = false;
try {
  const context = await browser.newContext({ ignoreHTTPSErrors: true });
  const page = await context.newPage();
  page.setDefaultTimeout(timeout);
  page.on('pageerror', (err) => console.error(`pageerror: ${err}`));
  const response = await page.goto(opts.url);
  if (response.status() !== 200) throw new Error(`the page answered ${response.status()}`);
  const button = page.getByRole('link', { name: 'Open in your app' });
  step(`button ${await button.getAttribute('href')}`);
  await page.getByLabel('Username').fill(opts.username);
  await page.getByLabel('Password', { exact: true }).fill(opts.password);
  await page.getByLabel('Password (again)').fill(opts.password);
  await page.getByRole('button', { name: 'Create account' }).click();
  const done = page.locator('#done strong');
  await done.waitFor();
  step(`registered ${await done.textContent()}`);
  ok = true;
} catch (err) {
  console.error(`failed: ${err && err.stack ? err.stack : err}`);
} finally {
  await browser.close().catch(() => {});
}
process.exit(ok ? 0 : 1);
