// Drives JupyterLab in Debian's headless Chromium (playwright-core, no browser download) and checks that
// the notebooks' widgets really redraw their plotly figures when moved with the keyboard / mouse.
//
//   node drive.mjs '{"scenario": "explorer"|"dashboard"|"exercise", "url": "http://127.0.0.1:PORT", "token": "...",
//                    "root": "/folder/the/server/serves", "notebook": "name.ipynb", "out": "/screenshot/dir"}'
//   node drive.mjs '{"scenario": "offline", "html": "/path/to/export.html", "out": "/screenshot/dir"}'
//     (no server: an HTML export opened from disk with the network off, see scenario 4)
//
// tests/browser/test_browser.py starts the server (conftest.py) and calls this script. Progress goes to
// stderr, one line per state; the last stdout line is `RESULT {json}`; exit code 1 on any failed check.
// Numbers are read from the DOM: `.js-plotly-plot` elements are plotly graph divs, `gd.data` their traces.
import fs from 'node:fs';
import path from 'node:path';
import { chromium } from 'playwright-core';

const options = JSON.parse(process.argv[2] ?? '{}');
const t0 = Date.now();
const log = (...args) => console.error(`[${((Date.now() - t0) / 1000).toFixed(1)} s]`, ...args);
const shots = [];

function check(condition, message) {
  if (!condition) throw new Error(`check failed: ${message}`);
}

function close(a, b, tol = 1e-9) {
  return a !== null && b !== null && Math.abs(a - b) <= tol * Math.max(1, Math.abs(a), Math.abs(b));
}

function checkPoint(actual, expected, what, tol = 1e-9) {
  check(Array.isArray(actual) && actual.length === 2 && close(actual[0], expected[0], tol)
        && close(actual[1], expected[1], tol),
        `${what}: got ${JSON.stringify(actual)}, expected ${JSON.stringify(expected)}`);
}

async function shoot(locator, name) {
  const file = path.join(options.out, name);
  await locator.scrollIntoViewIfNeeded();
  await locator.screenshot({ path: file });
  shots.push(file);
  log('screenshot', file);
}

// -- JupyterLab --------------------------------------------------------------------------------------------
async function openAndRunAll(page, notebook, workspace, timeoutMs) {
  const url = `${options.url}/lab/workspaces/${workspace}/tree/${encodeURIComponent(notebook)}`
    + `?reset&token=${options.token}`;
  await page.goto(url);
  await page.locator('.jp-NotebookPanel').waitFor({ timeout: 60_000 });
  // the status bar's kernel item reads "Python 3 (ipykernel) | Idle" once the kernel is up
  await page.locator('.jp-StatusBar-TextItem', { hasText: /\| Idle/ }).first().waitFor({ timeout: 60_000 });
  log(`${notebook} open, kernel idle; Run > Run All Cells`);
  await page.locator('.lm-MenuBar-itemLabel', { hasText: /^Run$/ }).click();
  await page.locator('.lm-Menu-item[data-command="runmenu:run-all"]').click();
  return async (done) => {  // waits for `done` (a locator) or a traceback, whichever comes first
    const traceback = page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]',
                                   { hasText: 'Traceback' });
    await done.or(traceback).first().waitFor({ timeout: timeoutMs });
    if (await traceback.count()) {
      throw new Error(`a cell raised:\n${(await traceback.first().innerText()).slice(0, 3000)}`);
    }
  };
}

/** The ipywidgets slider whose description is `label` (exact text). */
function slider(page, label) {
  const row = page.locator('.widget-slider', {
    has: page.locator('.widget-label', { hasText: new RegExp(`^${label.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}$`) }),
  });
  return { row, handles: row.locator('.noUi-handle'), readout: row.locator('.widget-readout') };
}

/** Every plotly figure inside `area`, by the start of its title: {title, traces: [{name, x, y}]}. */
async function figures(area) {
  return area.evaluate((el) => {
    const list = (v) => (v == null ? null : Array.from(v, (u) => (u === undefined ? null : u)));
    return Array.from(el.querySelectorAll('.js-plotly-plot')).map((gd) => ({
      title: gd.layout?.title?.text ?? gd.layout?.title ?? '',
      traces: (gd.data ?? []).map((t) => ({ name: t.name, x: list(t.x), y: list(t.y) })),
    }));
  });
}

function figure(figs, titleStart) {
  const found = figs.filter((f) => String(f.title).startsWith(titleStart));
  check(found.length === 1, `one figure titled "${titleStart}..." (titles: ${figs.map((f) => f.title)})`);
  return found[0];
}

function trace(fig, nameStart) {
  const found = fig.traces.filter((t) => String(t.name).startsWith(nameStart));
  check(found.length === 1, `one trace named "${nameStart}..." in "${fig.title}" `
        + `(names: ${fig.traces.map((t) => t.name)})`);
  return found[0];
}

const last = (t) => [t.x.at(-1), t.y.at(-1)];
const readoutNumbers = (text) => (text.replace(/\u2212/g, '-').match(/-?\d+(\.\d+)?/g) ?? []).map(Number);

// -- scenario 1: notebook 01's explorer ----------------------------------------------------------------------
// The explorer runs on the diagonal quadratic L = 1/2 (1.0 x^2 + 0.3 y^2) from theta0 = (-0.9, 2.4) with plain
// GD at lr = 0.3 and alpha = 1 (notebook 01's defaults), where everything has a closed form:
//   theta_n = theta0 * r^n per coordinate, r = 1 - lr h = (0.7, 0.91);
//   GXPO: r clamped to the stability clamp, q = S_K(r)/S_2(r) = (1 - r^K) / (1 - r^2) capped to [1, K/2+1],
//   (S_K = 1 + r + ... + r^(K-1); q = 1 where S_2 = 0, as gxpo_lib.extrapolation.geometric_scale)
//   theta~ = theta0 + q (theta2 - theta0) with the true theta2, then one SGD step: theta~ * (1 - lr h).
// So theta~ = theta_K and the corrective step lands on theta_(K+1) as long as no clamp binds.
const LAND = { lr: 0.3, h: [1.0, 0.3], theta0: [-0.9, 2.4] };  // lr: set to what the lr slider shows
const R = () => LAND.h.map((h) => 1 - LAND.lr * h);
const gdPoint = (n) => LAND.theta0.map((t, i) => t * R()[i] ** n);
function qOf(r, k) {  // S_K(r) / S_2(r) (S_n = 1 + r + ... + r^(n-1)); 1 where |S_2| <= 1e-8; capped
  let sk = 1;
  for (let i = 1; i < k; i += 1) sk = sk * r + 1;
  const q = Math.abs(1 + r) > 1e-8 ? sk / (1 + r) : 1;
  return Math.min(Math.max(Number.isFinite(q) ? q : 1, 1), k / 2 + 1);
}
function gxpoExpected(k, [low, high]) {
  const rc = R().map((r) => Math.min(Math.max(r, low), high));
  const q = rc.map((r) => qOf(r, k));
  const theta2 = gdPoint(2);
  const tilde = LAND.theta0.map((t, i) => t + q[i] * (theta2[i] - t));
  return { rc, q, tilde, final: tilde.map((t, i) => t * R()[i]) };
}

function checkExplorerState(figs, k, clamp) {
  const paths = figure(figs, 'one update from theta0');
  const scale = figure(figs, 'geometric scale');
  const expected = gxpoExpected(k, clamp);
  check(String(paths.title).includes(`K = ${k},`), `paths title names K = ${k}: "${paths.title}"`);
  const gd = trace(paths, 'true GD path');
  check(gd.name.startsWith(`true GD path: ${k + 1} steps`), `GD trace name for K = ${k}: "${gd.name}"`);
  check(gd.x.length === k + 2, `the true GD path has K+2 = ${k + 2} points, got ${gd.x.length}`);
  gd.x.forEach((x, n) => checkPoint([x, gd.y[n]], gdPoint(n), `GD point theta_${n}`));
  const jump = trace(paths, 'GXPO jump');
  const corrective = trace(paths, 'GXPO corrective');
  checkPoint([jump.x[0], jump.y[0]], LAND.theta0, 'GXPO jump starts at theta0');
  checkPoint(last(jump), expected.tilde, `GXPO's extrapolated point theta~ (K = ${k}, clamp ${clamp})`);
  checkPoint(last(corrective), expected.final, 'GXPO after its corrective step');
  checkPoint(last(trace(paths, `theta_${k + 1}`)), gdPoint(k + 1), `the target star theta_${k + 1}`);

  check(trace(scale, `K=${k}: raw`) && trace(scale, `K=${k}: clamped`), `q(r) curves for K = ${k}`);
  const step = trace(scale, "this step's (r, q)");
  checkPoint(step.x, expected.rc, "this step's r (clamped)");
  checkPoint(step.y, expected.q, "this step's q");
  const clampTrace = trace(scale, 'stability clamp');
  check(close(clampTrace.x[0], clamp[0], 1e-9) && close(clampTrace.x.at(-1), clamp[1], 1e-9),
        `clamp lines at r = ${clamp}: got x = ${JSON.stringify(clampTrace.x)}`);
  // the curve the rule uses is q(r) with r clamped: constant = q(r_max) to the right of r_max
  const used = trace(scale, `K=${k}: clamped`);
  used.x.forEach((r, i) => {
    check(close(used.y[i], qOf(Math.min(Math.max(r, clamp[0]), clamp[1]), k), 1e-9),
          `used q(r) at r = ${r}: ${used.y[i]} vs ${qOf(Math.min(Math.max(r, clamp[0]), clamp[1]), k)}`);
  });
  return { k, clamp, tilde: last(jump), final: last(corrective), gd_points: gd.x.length, q: step.y };
}

async function waitForFigures(page, area, k, clamp, what) {
  // poll the DOM until the figures show this state (a redraw arrives after the kernel recomputes)
  const deadline = Date.now() + 30_000;
  for (;;) {
    try {
      return checkExplorerState(await figures(area), k, clamp);
    } catch (error) {
      if (Date.now() > deadline) throw new Error(`${what}: the figures did not redraw: ${error.message}`);
      await page.waitForTimeout(200);
    }
  }
}

async function explorer(page) {
  const finished = await openAndRunAll(page, options.notebook, 'explorer', 170_000);
  await finished(page.locator('.jp-OutputArea-output', { hasText: '"runtime_s"' }));
  log('all cells ran');
  const K = slider(page, 'K (lookahead)');
  const clamp = slider(page, 'stability clamp r');
  const area = page.locator('.jp-OutputArea', { has: K.row });
  const box = area.locator('.widget-vbox').first();
  const states = {};

  const k0 = Number(await K.readout.innerText());
  const clamp0 = readoutNumbers(await clamp.readout.innerText());
  check(k0 === 5 && clamp0.length === 2 && clamp0[0] === -2 && clamp0[1] === 3,
        `the explorer starts at the notebook's defaults K = 5, clamp [-2, 3]: got ${k0}, ${clamp0}`);
  // Scroll the explorer into view as a reader would, then take the learning rate the kernel used from the
  // figure (the first GD step: theta1 = theta0 (1 - lr h)) and check it is the one the lr slider shows, to
  // the readout's precision. (A FloatLogSlider with step 0.05 in the exponent cannot show the notebook's
  // lr = 0.3: it shows 10 ** -0.5 = 0.316, and once on screen it sends that value to the kernel;
  // test_browser.py compares the lr used with the notebook's.)
  await box.scrollIntoViewIfNeeded();
  const shown = {};
  for (const [name, label] of [['lr', 'learning rate'], ['tau', 'gate tau'], ['omega', 'gate omega'],
                               ['alpha', 'alpha'], ['noise', 'gradient noise']]) {
    shown[name] = await slider(page, label).readout.innerText();
  }
  const decimals = (shown.lr.split('.')[1] ?? '').length;
  const lrShown = Number(shown.lr);
  const lrUsed = async () => {
    const gd = trace(figure(await figures(area), 'one update from theta0'), 'true GD path');
    return (LAND.theta0[0] - gd.x[1]) / (LAND.h[0] * LAND.theta0[0]);
  };
  const lrDeadline = Date.now() + 30_000;
  while (Math.abs((await lrUsed()) - lrShown) > 0.5 * 10 ** -decimals + 1e-12) {
    check(Date.now() < lrDeadline, `the figures use the learning rate the slider shows (${shown.lr}); `
          + `they use ${await lrUsed()}`);
    await page.waitForTimeout(200);
  }
  LAND.lr = await lrUsed();
  log(`the explorer shows ${JSON.stringify(shown)}; its figures use lr = ${LAND.lr}`);
  states.initial = await waitForFigures(page, area, 5, [-2, 3], 'initial state');
  await shoot(box, '01-explorer-initial-K5.png');

  // K: three ArrowRight presses on the slider handle, 5 -> 8
  await K.handles.first().focus();
  for (let i = 0; i < 3; i += 1) await page.keyboard.press('ArrowRight');
  await page.waitForFunction((el) => el.textContent.trim() === '8', await K.readout.elementHandle(),
                             { timeout: 10_000 });
  states.k8 = await waitForFigures(page, area, 8, [-2, 3], 'after K -> 8');
  const moved = Math.hypot(states.k8.tilde[0] - states.initial.tilde[0], states.k8.tilde[1] - states.initial.tilde[1]);
  check(moved > 0.3, `the extrapolated point moved with K (by ${moved})`);
  log(`K 5 -> 8: theta~ ${JSON.stringify(states.initial.tilde)} -> ${JSON.stringify(states.k8.tilde)} (= theta_8)`);
  await shoot(box, '02-explorer-K8.png');

  // stability clamp: the upper handle down from 3.00 to 0.80 (PageDown, then ArrowDown), so it binds on
  // the second coordinate (r = 0.91) but not on the first (r = 0.7)
  const upper = clamp.handles.nth(1);
  await upper.focus();
  const upperValue = async () => Number(await upper.getAttribute('aria-valuenow'));
  for (let i = 0; i < 60 && (await upperValue()) > 1.0 + 1e-9; i += 1) await page.keyboard.press('PageDown');
  for (let i = 0; i < 60 && (await upperValue()) > 0.8 + 1e-9; i += 1) await page.keyboard.press('ArrowDown');
  check(close(await upperValue(), 0.8, 1e-6), `clamp's upper handle at 0.80, got ${await upperValue()}`);
  await page.waitForFunction((el) => /0\.80\s*$/.test(el.textContent), await clamp.readout.elementHandle(),
                             { timeout: 10_000 });
  const clampShown = readoutNumbers(await clamp.readout.innerText());
  check(clampShown[0] === -2 && clampShown[1] === 0.8, `clamp readout shows [-2, 0.8]: "${await clamp.readout.innerText()}"`);
  states.clamp = await waitForFigures(page, area, 8, [-2, 0.8], 'after clamp -> [-2, 0.8]');
  check(close(states.clamp.tilde[0], states.k8.tilde[0], 1e-12), 'x of theta~ unchanged (r = 0.7 is inside)');
  check(states.clamp.tilde[1] - states.k8.tilde[1] > 0.2,
        `y of theta~ moved away from theta_8 (the clamp binds): ${states.k8.tilde[1]} -> ${states.clamp.tilde[1]}`);
  const readout = await area.locator('.widget-html', { hasText: 'clamped ratios' }).innerText();
  check(/clamped ratios: 0\.5/.test(readout), `the explorer's readout counts 1 of 2 ratios clamped: "${readout}"`);
  log(`clamp [-2, 3] -> [-2, 0.8]: theta~ ${JSON.stringify(states.clamp.tilde)}; q ${JSON.stringify(states.clamp.q)}`);
  await shoot(box, '03-explorer-K8-clamp0.8.png');
  return { states, readout, shown_settings: shown, used_lr: LAND.lr };
}

// -- scenario 2: notebook 02's live dashboard -------------------------------------------------------------
function readRows(file) {
  if (!fs.existsSync(file)) return [];
  return fs.readFileSync(file, 'utf8').split('\n').filter((l) => l.trim()).map((l) => JSON.parse(l))
    .filter((r) => r.kind === 'train');
}

const NEW_TAU = 1;

async function dashboard(page) {
  const finished = await openAndRunAll(page, options.notebook, 'dashboard', 120_000);
  const start = page.locator('.widget-button', { hasText: 'Start' });
  const stop = page.locator('.widget-button', { hasText: 'Stop' });
  // the last cell (test_browser.py's) lengthens the run to options.steps; Start only once it has run
  await finished(page.locator('.jp-OutputArea-output', { hasText: `${options.steps_line} ${options.steps}` }));
  await start.waitFor({ timeout: 10_000 });
  log(`dashboard shown; the live run has ${options.steps} steps`);
  const area = page.locator('.jp-OutputArea', { has: start });
  const box = area.locator('.widget-vbox').first();
  const status = area.locator('.widget-html').last();
  const tau = slider(page, 'tau (shutoff)');
  // notebook 02's tau = 0.5; the log slider (step 0.05 in the exponent) shows 10 ** -0.3 = 0.501 (recorded,
  // test_browser.py compares it with the notebook's value)
  const tauShownAtStart = await tau.readout.innerText();
  check(Math.abs(Number(tauShownAtStart) - 0.5) < 0.01, `tau starts near notebook 02's 0.5: "${tauShownAtStart}"`);
  const rewardPoints = async () => {
    const fig = (await figures(area))[0];
    return trace(fig, 'reward').x.length;
  };
  check((await rewardPoints()) === 0, 'the figure starts empty');
  await shoot(box, '01-dashboard-idle.png');

  await start.click();
  await page.waitForFunction((el) => el.textContent.startsWith('running'), await status.elementHandle(),
                             { timeout: 20_000 });
  const folder = (await status.innerText()).match(/running \w+ in (.+)$/)[1].trim();
  const metrics = path.resolve(options.root, folder, 'metrics.jsonl');
  log(`Start clicked: "${await status.innerText()}"`);
  const growth = [];
  // wait for the first training step to reach the figure
  const deadline1 = Date.now() + 150_000;
  while ((await rewardPoints()) < 1) {
    check(Date.now() < deadline1, 'a first training step within 150 s');
    check(!(await status.innerText()).includes('error'), `the run failed: ${await status.innerText()}`);
    await page.waitForTimeout(250);
  }
  const before = await rewardPoints();
  growth.push(before);
  log(`${before} step(s) in the figure; tau -> 1 by typing into the slider's readout`);
  await shoot(box, '02-dashboard-running-tau-start.png');

  // tau: type 1 into the log slider's (editable) readout, Enter. (1 = 10 ** 0 is on the slider's grid of
  // 10 ** (0.05 n); a value off it is snapped: typing 2 sends 10 ** 0.3 = 1.995.)
  await tau.readout.click();
  await page.keyboard.press('Control+A');
  await page.keyboard.type(String(NEW_TAU));
  await page.keyboard.press('Enter');
  await page.waitForFunction((el) => el.textContent.startsWith('queued') && el.textContent.includes("'tau': "),
                             await status.elementHandle(), { timeout: 10_000 });
  const queuedTau = Number((await status.innerText()).match(/'tau': ([-+0-9.e]+)/)[1]);
  check(close(queuedTau, NEW_TAU, 1e-9), `the kernel queued tau = ${NEW_TAU}: "${await status.innerText()}"`);
  const shownTau = Number(await tau.readout.innerText());
  check(close(shownTau, NEW_TAU, 1e-9), `tau readout shows ${NEW_TAU}: "${await tau.readout.innerText()}"`);
  const doneAtChange = readRows(metrics).length;  // steps logged when the kernel queued the change
  log(`status: "${await status.innerText()}"; ${doneAtChange} step(s) logged at that moment`);

  // the next steps: wait until 2 steps beyond those are in the file and in the figure
  const deadline2 = Date.now() + 150_000;
  for (;;) {
    const rows = readRows(metrics);
    const points = await rewardPoints();
    if (points !== growth.at(-1)) growth.push(points);
    if (rows.length >= doneAtChange + 2 && points >= doneAtChange + 2) break;
    check(Date.now() < deadline2, `2 more steps within 150 s (have ${rows.length} rows, ${points} points)`);
    check(!(await status.innerText()).includes('error'), `the run failed: ${await status.innerText()}`);
    await page.waitForTimeout(250);
  }
  await shoot(box, '03-dashboard-running-tau1.png');
  await stop.click();
  await page.waitForFunction((el) => el.textContent.startsWith('finished'), await status.elementHandle(),
                             { timeout: 150_000 });
  log(`Stop clicked: "${await status.innerText()}"`);
  const rows = readRows(metrics);
  const fig = (await figures(area))[0];
  growth.push(trace(fig, 'reward').x.length);
  await shoot(box, '04-dashboard-stopped.png');

  // metrics.jsonl: the old tau up to the step the change was queued at, the new one from the step after
  const taus = rows.map((r) => r.tau);
  check(rows.every((r, i) => r.step === i + 1), `train rows are steps 1..${rows.length}`);
  check(rows.length < options.steps, `Stop ended the ${options.steps}-step run early (${rows.length} steps)`);
  const first = taus.findIndex((t) => close(t, NEW_TAU, 1e-9));
  const tauBefore = taus[0];
  check(Math.abs(tauBefore - 0.5) < 0.01, `the run starts with tau near 0.5: ${JSON.stringify(taus)}`);
  check(first >= before, `steps seen before the change keep the old tau: ${JSON.stringify(taus)}`);
  check(first >= 0 && first <= doneAtChange + 1,
        `the new tau is logged by step ${doneAtChange + 2} at the latest: ${JSON.stringify(taus)}`);
  check(taus.slice(0, first).every((t) => t === tauBefore) && taus.slice(first).every((t) => close(t, NEW_TAU, 1e-9)),
        `tau is ${tauBefore} then ${NEW_TAU} in metrics.jsonl: ${JSON.stringify(taus)}`);
  check(taus.length - first >= 2, `at least 2 steps ran with tau = ${NEW_TAU}: ${JSON.stringify(taus)}`);
  // the figure: one point per logged step, the tau trace shows the change
  const reward = trace(fig, 'reward');
  const tauTrace = trace(fig, 'tau');
  check(JSON.stringify(reward.x) === JSON.stringify(rows.map((r) => r.step)),
        `reward trace x = the logged steps: ${JSON.stringify(reward.x)}`);
  rows.forEach((r, i) => check(close(reward.y[i], r.reward_mean, 1e-9), `reward of step ${r.step}`));
  check(JSON.stringify(tauTrace.y) === JSON.stringify(taus), `tau trace = the logged tau: ${JSON.stringify(tauTrace.y)}`);
  check(growth.every((n, i) => i === 0 || n > growth[i - 1]) && growth.at(-1) > growth[0],
        `the figure grew: ${growth}`);
  return { metrics, taus, tau_shown_at_start: tauShownAtStart, first_new_tau_step: first + 1, steps_before_change: before,
           steps_logged_at_change: doneAtChange, figure_points: growth, status: await status.innerText() };
}

// -- main ----------------------------------------------------------------------------------------------------
// -- scenario 3: an exercise of notebook 01, answered wrong and then right --------------------------------
// The notebook (built by test_browser.py) holds notebook 01's parameters cell with fill_solutions = False,
// its setup cell and its first exercise cell, verbatim. The blank is line 2 of the exercise cell
// (`answer = ...`): the driver selects that line, types an answer over it, runs the cell (Ctrl+Enter) and
// reads the check's printed line, once with `options.wrong`, then with `options.right`.
async function exercise(page) {
  const cell = page.locator('.jp-CodeCell', { hasText: `exercises['${options.exercise}']` }).first();
  const output = cell.locator('.jp-OutputArea-output');
  const finished = await openAndRunAll(page, options.notebook, 'exercise', 170_000);
  await finished(output.filter({ hasText: 'not yet' }));
  await cell.scrollIntoViewIfNeeded();
  const feedback = { blank: (await output.innerText()).trim() };
  log(`all cells ran; the blank gives: ${feedback.blank}`);
  await shoot(cell, '01-exercise-blank.png');
  const expected = { wrong: /^not yet: you gave/, right: /^right:/ };
  for (const [i, name] of ['wrong', 'right'].entries()) {
    await cell.locator('.cm-content').click();
    await page.keyboard.press('Control+Home');
    await page.keyboard.press('ArrowDown');
    await page.keyboard.press('Home');
    await page.keyboard.press('Shift+End');
    await page.keyboard.type(`answer = ${options[name]}`);
    await page.keyboard.press('Control+Enter');
    await page.waitForFunction(([el, pattern]) => new RegExp(pattern).test(el.innerText.trim()),
                               [await output.elementHandle(), expected[name].source], { timeout: 30_000 });
    feedback[name] = (await output.innerText()).trim();
    log(`typed answer = ${options[name]}: ${feedback[name]}`);
    await shoot(cell, `0${i + 2}-exercise-${name}.png`);
  }
  return { feedback, source: await cell.locator('.cm-content').innerText() };
}

// -- scenario 5: an implement-it exercise, its function written over the blank -----------------------------
// The notebook holds notebook 01's parameters and setup cells and one implement-it cell (its function's body
// is `...`). After Run All the check says "fill in the blank"; the driver then replaces the whole cell with
// `options.wrong_code`, runs it, and with `options.right_code`, reading the check's line each time.
async function implement(page) {
  const cell = page.locator('.jp-CodeCell', { hasText: `exercises['${options.exercise}']` }).first();
  const output = cell.locator('.jp-OutputArea-output');
  const finished = await openAndRunAll(page, options.notebook, 'implement', 170_000);
  await finished(output.filter({ hasText: 'not yet' }));
  await cell.scrollIntoViewIfNeeded();
  const feedback = { blank: (await output.innerText()).trim() };
  log(`all cells ran; the blank gives: ${feedback.blank}`);
  await shoot(cell, '01-implement-blank.png');
  const expected = { wrong: /^not yet:/, right: /^right:/ };
  for (const [i, name] of ['wrong', 'right'].entries()) {
    await cell.locator('.cm-content').click();
    await page.keyboard.press('Control+a');
    await page.keyboard.insertText(options[`${name}_code`]);   // inserted whole: no auto-indent on the way
    await page.keyboard.press('Control+Enter');
    await page.waitForFunction(([el, pattern]) => new RegExp(pattern).test(el.innerText.trim()),
                               [await output.elementHandle(), expected[name].source], { timeout: 60_000 });
    feedback[name] = (await output.innerText()).trim();
    log(`wrote the ${name} implementation: ${feedback[name]}`);
    await shoot(cell, `0${i + 2}-implement-${name}.png`);
  }
  return { feedback, source: await cell.locator('.cm-content').innerText() };
}

// -- scenario 4: an offline HTML export (gxpo_lib.html_export) opened from disk with the network off ------
// The context is offline and every request that is not a file:// URL is aborted and recorded, so a page
// that needs a CDN shows it both ways: its figures stay blank and `blocked` names what it asked for.
async function offline(page) {
  const blocked = [];
  const errors = [];
  await page.context().setOffline(true);
  await page.route('**/*', (route) => {
    const url = route.request().url();
    if (url.startsWith('file:') || url.startsWith('data:')) return route.continue();
    blocked.push(url);
    return route.abort('internetdisconnected');
  });
  page.on('pageerror', (error) => errors.push(error.message));
  await page.goto(`file://${options.html}`, { waitUntil: 'load', timeout: 120_000 });
  log('page loaded; waiting for the figures to draw');
  // every plotly graph div must have drawn its SVG (a figure that never drew has no .main-svg)
  await page.waitForFunction(() => {
    const divs = [...document.querySelectorAll('.plotly-graph-div')];
    return divs.length > 0 && divs.every((gd) => gd.querySelector('svg.main-svg'));
  }, null, { timeout: 60_000 }).catch(() => log('not every figure drew an SVG'));
  const facts = await page.evaluate(() => {
    const divs = [...document.querySelectorAll('.plotly-graph-div')];
    const points = (t) => ['x', 'y', 'z', 'values'].reduce((n, k) => n + ((t[k] && t[k].length) || 0), 0);
    const drawn = divs.filter((gd) => gd.querySelector('svg.main-svg') && (gd.data || []).some((t) => points(t) > 0)
                                     && gd.querySelectorAll('.trace, .heatmaplayer image, .contourlayer path').length > 0);
    const maths = [...document.querySelectorAll('math')];
    const typeset = maths.filter((m) => typeof MathMLElement !== 'undefined' && m instanceof MathMLElement
                                        && m.getBoundingClientRect().width > 0);
    // raw TeX left for a script that never came: $...$ or $$...$$ in rendered markdown
    const prose = [...document.querySelectorAll('.jp-MarkdownCell .jp-RenderedMarkdown, .jp-RenderedMarkdown')]
      .map((e) => e.innerText).join('\n');
    const text = document.body.innerText;
    return {
      figures: divs.length,
      drawn: drawn.length,
      maths: maths.length,
      typeset: typeset.length,
      raw_tex: (prose.match(/\$[^$\n]{1,200}\$/g) || []).slice(0, 5),
      widget_repr: text.includes('VBox(children=') || text.includes('HBox(children='),
      frozen_bars: (text.match(/(^|\s)0%\|/gm) || []).length,
      widget_snapshots: document.querySelectorAll('.gxpo-widget').length,
      progress: [...document.querySelectorAll('.gxpo-widget progress')].map((p) => [p.value, p.max]),
    };
  });
  log('facts', JSON.stringify(facts), 'blocked', blocked.length, 'errors', errors.length);
  await page.screenshot({ path: path.join(options.out, 'offline-page.png') });
  shots.push(path.join(options.out, 'offline-page.png'));
  const first = page.locator('.plotly-graph-div').first();
  if (await first.count()) await shoot(first, 'offline-figure.png');
  const widget = page.locator('.gxpo-widget').first();
  if (await widget.count()) await shoot(widget, 'offline-widget.png');
  const formula = page.locator('math[display="block"]').first();
  if (await formula.count()) await shoot(formula, 'offline-math.png');
  return { ...facts, blocked, errors };
}

const scenarios = { explorer, dashboard, exercise, offline, implement };
const browser = await chromium.launch({
  executablePath: process.env.GXPO_CHROMIUM || '/usr/bin/chromium', headless: true, args: ['--no-sandbox'],
});
let failed = false;
try {
  const context = await browser.newContext({ viewport: { width: 1500, height: 1500 } });
  const page = await context.newPage();
  page.on('pageerror', (error) => log('page error:', error.message));
  check(options.scenario in scenarios, `scenario is one of ${Object.keys(scenarios)}: ${options.scenario}`);
  fs.mkdirSync(options.out, { recursive: true });
  try {
    const result = await scenarios[options.scenario](page);
    console.log(`RESULT ${JSON.stringify({ scenario: options.scenario, seconds: (Date.now() - t0) / 1000, screenshots: shots, ...result })}`);
  } catch (error) {
    failed = true;
    log(error.stack ?? String(error));
    const file = path.join(options.out, `failure-${options.scenario}.png`);
    await page.screenshot({ path: file, fullPage: true }).catch(() => {});
    log('page at failure:', file);
  }
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
