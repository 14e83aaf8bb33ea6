// The admin web page (/admin) in Debian's Chromium (headless, driven by playwright-core), for
// tests/test_admin_web.py. Argument: a JSON object
//   {origin, jid, password, newJid, newPassword, screenshot, accountsScreenshot, timeoutMs}
// Logs in as the admin, adds newJid with newPassword on the accounts page, opens the overview
// and checks its four graphs are drawn (SVG with a title each), then saves a screenshot of the
// overview. Every other origin is blocked. Protocol with the test, one line each on stdout:
// "step <name>"; exit 0 when everything happened, 1 otherwise.
import { chromium } from 'playwright-core';

const opts = JSON.parse(process.argv[2]);
const timeout = opts.timeoutMs || 30000;
const step = (name) => console.log(`step ${name}`);

const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync',
         '--ignore-certificate-errors'],
  timeout,
});
let ok = false;
try {
  const context = await browser.newContext({ ignoreHTTPSErrors: true,
                                             viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  page.setDefaultTimeout(timeout);
  page.on('console', (msg) => console.error(`console.${msg.type()}: ${msg.text()}`));
  page.on('pageerror', (err) => console.error(`pageerror: ${err}`));
  await context.route('**/*', (route) => {
    const url = new URL(route.request().url());
    return url.origin === opts.origin ? route.continue() : route.abort('blockedbyclient');
  });
  // Not logged in: the page sends us to the login form.
  await page.goto(`${opts.origin}/admin/accounts`);
  await page.locator('input[name="password"]').waitFor();
  if (!page.url().endsWith('/admin/login')) throw new Error(`not the login page: ${page.url()}`);
  await page.fill('input[name="jid"]', opts.jid);
  await page.fill('input[name="password"]', opts.password);
  await Promise.all([page.waitForURL(`${opts.origin}/admin`), page.click('button:has-text("Log in")')]);
  await page.locator('h1:has-text("Overview")').waitFor();
  step('logged-in');
  await page.click('header a:has-text("Accounts")');
  await page.locator('h1:has-text("Accounts")').waitFor();
  const add = page.locator('fieldset:has(legend:has-text("Add an account"))');
  await add.locator('input[name="jid"]').fill(opts.newJid);
  await add.locator('input[name="password"]').fill(opts.newPassword);
  await add.locator('input[name="password2"]').fill(opts.newPassword);
  await add.locator('button').click();
  await page.locator(`.notice:has-text(${JSON.stringify(`added ${opts.newJid}`)})`).waitFor();
  await page.locator(`td:has-text(${JSON.stringify(opts.newJid)})`).first().waitFor();
  if (opts.accountsScreenshot) await page.screenshot({ path: opts.accountsScreenshot, fullPage: true });
  step('added');
  await page.click('header a:has-text("Overview")');
  await page.locator('h1:has-text("Overview")').waitFor();
  const graphs = page.locator('svg.graph');
  const count = await graphs.count();
  if (count !== 4) throw new Error(`${count} graphs instead of 4`);
  for (let i = 0; i < count; i++) {
    const box = await graphs.nth(i).boundingBox();
    if (!box || box.width < 200 || box.height < 100) throw new Error(`graph ${i} not drawn: ${JSON.stringify(box)}`);
    const title = await graphs.nth(i).locator('title').textContent();
    console.log(`graph ${title}`);
  }
  await page.screenshot({ path: opts.screenshot, fullPage: true });
  step('graphs');
  ok = true;
} catch (err) {
  console.error(`failed: ${err && err.stack ? err.stack : err}`);
  console.error(`last page: ${await (await browser.contexts()[0]?.pages()[0])?.content().catch(() => '')}`);
} finally {
  await browser.close().catch(() => {});
}
process.exit(ok ? 0 : 1);
