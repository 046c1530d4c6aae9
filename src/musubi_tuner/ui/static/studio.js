// The studio's pages: forms made from the commands' own parsers, jobs polled from the server. No framework.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
const fileUrl = (path) => "/files?path=" + encodeURIComponent(path);

async function api(method, url, body) {
  const init = { method, headers: { "X-Musubi-Studio": "1" } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(url, init);
  const data = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) throw Object.assign(new Error(data.error || `HTTP ${response.status}`), { status: response.status });
  return data;
}

async function waitTask(id, everyMs = 500) {
  for (;;) {
    const t = await api("GET", `/api/tasks/${id}`);
    if (t.state === "done") return t.result;
    if (t.state !== "running") throw new Error(t.error || t.state);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

function debounce(fn, ms = 300) {
  let timer;
  return (...args) => { clearTimeout(timer); timer = setTimeout(() => fn(...args), ms); };
}

// ---------------------------------------------------------------- command forms (from argparse)

function renderForm(root, groups, values, openTitles) {
  root.innerHTML = "";
  for (const group of groups) {
    const details = document.createElement("details");
    details.open = openTitles.includes(group.title);
    details.innerHTML = `<summary>${esc(group.title)}</summary><div class="fields"></div>`;
    const grid = $(".fields", details);
    for (const f of group.fields) {
      const id = `f-${f.name}`;
      const v = values[f.name];
      let input;
      if (f.kind === "flag") {
        input = `<input type="checkbox" id="${id}" data-name="${f.name}" ${v ? "checked" : ""}>`;
      } else if (f.kind === "choice") {
        const opts = [`<option value="">${f.default ? "default: " + esc(f.default) : "(not set)"}</option>`]
          .concat(f.choices.map((c) => `<option ${String(v) === c ? "selected" : ""}>${esc(c)}</option>`));
        input = `<select id="${id}" data-name="${f.name}">${opts.join("")}</select>`;
      } else if (f.kind === "list") {
        input = `<textarea id="${id}" data-name="${f.name}" rows="1" placeholder="one per line">${esc(v ?? "")}</textarea>`;
      } else {
        input = `<input type="text" id="${id}" data-name="${f.name}" value="${esc(v ?? "")}" placeholder="${esc(f.default)}">`;
      }
      grid.insertAdjacentHTML("beforeend", `<label for="${id}" title="${esc(f.help)}">${esc(f.flag)}</label>${input}<div class="help">${esc(f.help)}</div>`);
    }
    root.appendChild(details);
  }
}

function formValues(root) {
  const values = {};
  for (const el of root.querySelectorAll("[data-name]")) {
    if (el.type === "checkbox") { if (el.checked) values[el.dataset.name] = true; }
    else if (el.value.trim() !== "") values[el.dataset.name] = el.value;
  }
  return values;
}

function setField(name, value) {
  const el = document.getElementById(`f-${name}`);
  if (!el) return;
  if (el.type === "checkbox") el.checked = !!value; else el.value = value;
  el.dispatchEvent(new Event("input", { bubbles: true }));
}

// A form whose command line is shown (copyable) as it changes. Returns {values()} once loaded.
// The form's values are kept for the tab (sessionStorage): a reload or Back drew the demo's values again beside a run
// started with others (fuzz_ao 4); "Reset form" draws the defaults.
async function commandForm(command, formRoot, commandEl, openTitles) {
  const spec = await api("GET", `/api/form/${command}`);
  const key = `studio-form-${command}`;
  let kept = null;
  try { kept = JSON.parse(sessionStorage.getItem(key)); } catch (e) { kept = null; }
  renderForm(formRoot, spec.groups, kept || spec.values, openTitles);
  const reset = Object.assign(document.createElement("button"), { className: "secondary", id: "reset-form", textContent: "Reset form",
    title: "the form's starting values (the demo's, where it has them)" });
  reset.addEventListener("click", () => { sessionStorage.removeItem(key); renderForm(formRoot, spec.groups, spec.values, openTitles); refresh(); });
  formRoot.before(reset);
  // the inputs the command would not find are said under it as they are typed (Start refuses them): they were the
  // command's own error, in a failed job seconds after Start (fuzz_ao 5)
  const missingEl = Object.assign(document.createElement("div"), { className: "error missing" });
  commandEl.after(missingEl);
  let asked = 0;  // only the answer to the latest request is shown: an earlier one may arrive last
  const refresh = debounce(async () => {
    const mine = ++asked;
    try {
      const values = formValues(formRoot);
      sessionStorage.setItem(key, JSON.stringify(values));
      const r = await api("POST", `/api/command/${command}`, { values });
      if (mine === asked) { commandEl.className = "command"; commandEl.textContent = r.shown; missingEl.textContent = r.missing.join("\n"); }
    } catch (e) { if (mine === asked) { commandEl.className = "command error"; commandEl.textContent = "error: " + e.message; missingEl.textContent = ""; } }
  });
  formRoot.addEventListener("input", refresh);
  formRoot.addEventListener("change", refresh);
  refresh();
  return { values: () => formValues(formRoot) };
}

// ---------------------------------------------------------------- jobs

// A page's list of runs, read again every few seconds so that each says its state now (a list drawn once said
// "starting" of runs long ended: fuzz_ao 4). A click shows that run; `pick(id)` shows one and marks it. The first run
// shown is `first(jobs)`'s.
async function runsList(root, kind, label, show, first) {
  let current = null, drawn = null;
  async function draw() {
    const { jobs } = await api("GET", `/api/jobs?kind=${kind}`);
    const html = jobs.map((j) => `<button class="secondary${j.id === current ? " current" : ""}" data-job="${esc(j.id)}">${label(j)}</button>`).join("")
      || `<span class="muted">none yet</span>`;
    if (html !== drawn) { root.innerHTML = html; drawn = html; }
    return jobs;
  }
  function pick(id) { current = id; show(id); draw().catch(() => {}); }
  root.addEventListener("click", (e) => { const b = e.target.closest("button"); if (b) pick(b.dataset.job); });
  const id = first(await draw());
  if (id) pick(id);
  (function poll() { setTimeout(() => draw().catch(() => {}).finally(poll), 3000); })();
  return pick;
}

function curveSvg(train, validation, width = 560, height = 220) {
  const m = 34, pts = train.concat(validation);
  if (!pts.length) return `<svg width="${width}" height="${height}" class="curve"><text x="${m}" y="${height / 2}" fill="#667">no loss recorded yet</text></svg>`;
  const steps = pts.map((p) => p[0]);
  const s0 = Math.min(...steps), s1 = Math.max(Math.max(...steps), s0 + 1);
  // each series on its own scale, at least 1% of its value tall: a change in the fourth digit stays a flat line
  const scale = (series) => { const v = series.map((p) => p[1]); const lo = Math.min(...v); return [lo, Math.max(Math.max(...v), lo + Math.abs(lo) * 0.01, lo + 1e-9)]; };
  const line = (series, cls, color, [lo, hi]) => {
    const xy = series.map(([s, v]) => [(m + (s - s0) / (s1 - s0) * (width - 2 * m)).toFixed(1), (height - m - (v - lo) / (hi - lo) * (height - 2 * m)).toFixed(1)]);
    return series.length > 1 ? `<polyline class="${cls}" points="${xy.map((p) => p.join(",")).join(" ")}" fill="none" stroke="${color}" stroke-width="1.5"/>`
      : `<circle class="${cls}" cx="${xy[0][0]}" cy="${xy[0][1]}" r="3" fill="${color}"/>`;
  };
  let svg = `<svg width="${width}" height="${height}" class="curve" viewBox="0 0 ${width} ${height}"><rect x="${m}" y="${m}" width="${width - 2 * m}" height="${height - 2 * m}" fill="none" stroke="#ccd"/>`;
  if (train.length) { const sc = scale(train); svg += line(train, "train", "#2d5bd7", sc) + `<text x="2" y="${m}" font-size="10">${sc[1].toFixed(3)}</text><text x="2" y="${height - m}" font-size="10">${sc[0].toFixed(3)}</text>`; }
  if (validation.length) { const sc = scale(validation); svg += line(validation, "validation", "#e07a10", sc) + `<text x="${width - m + 2}" y="${m}" font-size="10" fill="#c55a00">${sc[1].toFixed(3)}</text><text x="${width - m + 2}" y="${height - m}" font-size="10" fill="#c55a00">${sc[0].toFixed(3)}</text>`; }
  svg += `<text x="${m}" y="${height - 8}" font-size="11">step ${s0}</text><text x="${width - m}" y="${height - 8}" font-size="11" text-anchor="end">step ${s1}</text>`;
  svg += `<text x="${m}" y="20" font-size="11">training loss (blue, left scale)${validation.length ? "; validation loss (orange, right scale)" : ""}</text></svg>`;
  return svg;
}

function clock(seconds) {
  if (seconds == null) return "?";
  seconds = Math.round(seconds);
  const h = Math.floor(seconds / 3600), m = Math.floor(seconds / 60) % 60, s = seconds % 60;
  return (h ? h + ":" + String(m).padStart(2, "0") : m) + ":" + String(s).padStart(2, "0");
}

function progressHtml(records) {
  return records.filter((r) => !r.closed).slice(-2).map((r) => {
    const pct = r.total ? Math.min(100, 100 * r.n / r.total) : 0;
    return `<div class="progress"><span>${esc(r.desc)} ${r.n}${r.total ? "/" + r.total : ""} ${esc(r.unit)} · ${clock(r.elapsed)} elapsed · ETA <span class="eta">${clock(r.remaining)}</span>${r.postfix ? " · " + esc(r.postfix) : ""}</span><div class="bar"><div style="width:${pct}%"></div></div></div>`;
  }).join("");
}

// Shows job `id` in `root`, polling while it runs; `extra(detail)` renders the page's own parts. A part of the panel is
// redrawn only when it changed, so players and open sections stay as they are. Returns a stop function.
function watchJob(root, id, extra) {
  let stopped = false;
  root.innerHTML = `<div class="job-head"></div><div class="job-notice"></div><pre class="command"></pre><div class="job-progress"></div><div class="job-extra"></div>
    <details><summary>log</summary><pre class="log"></pre></details>`;
  const parts = { head: $(".job-head", root), notice: $(".job-notice", root), command: $(".command", root), progress: $(".job-progress", root), extra: $(".job-extra", root), log: $(".log", root) };
  let failures = 0;
  const shownHtml = {};
  const put = (name, html) => { if (shownHtml[name] !== html) { parts[name].innerHTML = html; shownHtml[name] = html; } };
  // One handler per panel, this run's: each run shown added its own listener to the same panel, so one Stop or Resume
  // acted on every run shown since the page loaded. A refusal is said on the panel, not dropped.
  root.onclick = async (event) => {
    const button = event.target;
    if (button.id !== "stop" && button.id !== "resume") return;
    button.disabled = true;
    try {
      if (button.id === "stop") await api("POST", `/api/jobs/${id}/stop`);
      else {
        const j = await api("POST", `/api/jobs/${id}/resume`);
        root.dispatchEvent(new CustomEvent("job-started", { detail: j, bubbles: true }));
      }
    } catch (e) {
      put("notice", `<p class="error" id="job-notice">${esc(e.message)}</p>`);
    } finally {
      button.disabled = false;
    }
  };
  async function tick() {
    if (stopped) return;
    let d;
    try { d = await api("GET", `/api/jobs/${id}`); } catch (e) {
      // One failed poll (the studio restarting, a moment of load) ended the view for good, its Stop button gone: the
      // run is still shown as last read, the failure said, and the poll tried again, less often, until it answers.
      if (e.status === 404) { put("head", `<p class="error">${esc(e.message)}</p>`); return; }
      failures += 1;
      const wait = Math.min(10, 2 ** (failures - 1));
      put("notice", `<p class="error" id="job-notice">the studio is not answering (${esc(e.message)}): trying again in ${wait} s</p>`);
      if (!stopped) setTimeout(tick, wait * 1000);
      return;
    }
    if (stopped) return;
    failures = 0;
    put("notice", "");
    root.dataset.state = d.state;
    root.dataset.job = d.id;
    put("head", `<div class="ds-head"><div><span class="state ${d.state}" id="job-state">${esc(d.state)}</span> ${esc(d.title)} <span class="muted">${esc(d.id)}${d.returncode != null ? " · exit status " + d.returncode : ""}${d.resumed_from ? " · resumes " + esc(d.resumed_from) : ""}</span></div>
      <div>${d.state === "running" ? `<button class="secondary" id="stop">Stop</button>` : ""}${d.resumable ? ` <button class="secondary" id="resume">Resume</button>` : ""}</div></div>`);
    put("command", d.shown.map((s) => "$ " + esc(s)).join("\n"));
    put("progress", progressHtml(d.progress));
    if (extra) put("extra", extra(d));
    // the page shows the log's last lines; what is above them is said, with the whole file a click away (fuzz_ao 3)
    put("log", (d.log_skipped ? `<a class="log-cut" href="${fileUrl(d.log_path)}" target="_blank">the first ${Math.ceil(d.log_skipped / 1024)} KB of the log are not shown: open the whole log</a>\n` : "") + esc(d.log));
    if (d.state === "running" || d.state === "starting") setTimeout(tick, 1000);
    else root.dispatchEvent(new CustomEvent("job-ended", { detail: d, bubbles: true }));
  }
  tick();
  return () => { stopped = true; };
}
