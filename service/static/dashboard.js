// The /dashboard page: polls /v1/models, shows each variant's live figures side by side with
// uPlot charts of latency and throughput, and sends the form's text through /v1/compare.
"use strict";

const REFRESH_MS = 2000;
const HISTORY = 150;  // points kept per chart: five minutes at one refresh every 2 s
const COLORS = ["#1f5fbf", "#d9730d", "#2e8540", "#8e44ad", "#b3261e", "#00838f"];
const state = { models: {}, previous: null, charts: {}, series: {} };

const $ = (sel, root = document) => root.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k === "style") node.style.cssText = v; else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child));
  return node;
};
const fmt = {
  ms: (s) => (s == null ? "–" : (s * 1000).toFixed(1) + " ms"),
  mb: (b) => (b == null ? "–" : (b / 1048576).toFixed(1) + " MB"),
  num: (x, digits = 4) => (x == null ? "–" : Number(x).toFixed(digits)),
  rate: (x) => (x == null ? "–" : x.toFixed(1) + " /s"),
  pct: (x) => (x == null ? "–" : (100 * x).toFixed(1) + "%"),
};
const color = (i) => COLORS[i % COLORS.length];

// With API keys on, the page asks for one and keeps it in this tab's session storage only (gone when the
// tab closes; never in a cookie, local storage or the URL), and sends it as a bearer token.
const KEY_ITEM = "quantserve.api_key";
class NeedsKey extends Error {}
async function api(url, options = {}) {
  const key = sessionStorage.getItem(KEY_ITEM);
  const headers = { ...(options.headers || {}), ...(key ? { authorization: `Bearer ${key}` } : {}) };
  const resp = await fetch(url, { ...options, headers });
  if (resp.status === 401) {
    sessionStorage.removeItem(KEY_ITEM);
    $("#key-form").hidden = false;
    $("#key-message").textContent = key ? "that key was refused; enter another" : "this service needs an API key";
    throw new NeedsKey("an API key is needed");
  }
  return resp;
}
function useKey(event) {
  event.preventDefault();
  const input = $("#key-input");
  if (!input.value.trim()) return;
  sessionStorage.setItem(KEY_ITEM, input.value.trim());
  input.value = "";
  $("#key-form").hidden = true;
  refresh();
}

function fidelityText(fid) {
  if (!fid) return "–";
  if ("mean_cosine" in fid) return `cos ${fmt.num(fid.mean_cosine)} (min ${fmt.num(fid.min_cosine)})`;
  if ("top1_agreement" in fid) return `top-1 ${fmt.pct(fid.top1_agreement)}`;
  return JSON.stringify(fid);
}

// inputs per second since the previous refresh, per "model/variant"
function throughput(models, now) {
  const rates = {};
  const prev = state.previous;
  for (const m of models) for (const v of m.variants) {
    const key = `${m.name}/${v.name}`;
    const before = prev && prev.inputs[key];
    rates[key] = before == null ? null : Math.max(0, (v.inputs - before) / ((now - prev.time) / 1000));
  }
  state.previous = { time: now, inputs: Object.fromEntries(models.flatMap(
    (m) => m.variants.map((v) => [`${m.name}/${v.name}`, v.inputs]))) };
  return rates;
}

function cpuText(cpu) {
  if (!cpu) return "";
  const text = `CPU: ${cpu.vendor} ${cpu.model} · ${cpu.isa} · ${cpu.features.join(" ") || "no listed features"} · ` +
    `${cpu.threads} threads`;
  return cpu.emulated ? `${text} · emulating ${cpu.emulated}` : text;
}

function kernelText(k) {
  if (!k) return "–";
  return k.kernel.row === k.kernel.batch ? k.kernel.batch : `${k.kernel.batch} (one row: ${k.kernel.row})`;
}

function variantCard(model, v, i, rate) {
  const shadow = v.shadow_agreement || {};
  const shadowText = shadow.inputs ? `${fmt.num(shadow.mean)} over ${shadow.inputs}` : "none yet";
  const row = (label, cls, value) => [el("dt", {}, label), el("dd", { class: cls }, value)];
  const lat = v.latency_seconds || {};
  const degraded = Boolean(v.degraded);
  return el("div", { class: "card variant" + (degraded ? " degraded" : ""), "data-model": model.name,
                     "data-variant": v.name, style: `--accent:${color(i)}` },
    el("h3", {}, v.name, " ", el("span", { class: "strategy" }, `${v.strategy} · ${v.runtime}`)),
    el("dl", {},
      ...row("state", "state", v.state === "degraded" ? `degraded: ${v.degraded}`
        : (v.state || "serving") + (degraded ? ` (degraded: ${v.degraded})` : "")),
      ...row("int8 kernel", "kernel", kernelText(v.kernels)),
      ...row("p50 latency", "p50", fmt.ms(lat.p50)),
      ...row("p90 / p99", "p99", `${fmt.ms(lat.p90)} / ${fmt.ms(lat.p99)}`),
      ...row("throughput", "throughput", rate == null ? "–" : fmt.rate(rate)),
      ...row("requests", "requests", v.requests),
      ...row("weights", "weights", fmt.mb(v.weight_bytes)),
      ...row("memory (RSS growth)", "memory", fmt.mb(v.memory_bytes)),
      ...row("fidelity at start-up", "fidelity", fidelityText(v.startup_fidelity)),
      ...row("shadow agreement", "shadow", shadowText)));
}

function makeChart(target, title, unit, names) {
  const series = [{}].concat(names.map((n, i) => ({ label: n, stroke: color(i), width: 2, spanGaps: true,
    value: (u, x) => (x == null ? "–" : x.toFixed(1) + " " + unit) })));
  const width = Math.max(360, target.clientWidth - 12);
  return new uPlot({ title, width, height: 200, series, scales: { x: { time: true } },
    axes: [{}, { label: unit, size: 60 }] }, [[], ...names.map(() => [])], target);
}

function renderModel(m, rates, now) {
  let section = $(`.model[data-model="${m.name}"]`);
  const names = m.variants.map((v) => v.name);
  if (!section) {
    section = el("div", { class: "model", "data-model": m.name },
      el("h2", {}, m.name, " ", el("span", { class: "task" }, `${m.task} · default ${m.default_variant}` +
        (m.baseline ? ` · baseline ${m.baseline}` : ""))),
      el("div", { class: "variants" }),
      el("div", { class: "charts" }, el("div", { class: "chart latency" }), el("div", { class: "chart rate" })));
    $("#models").append(section);
    state.series[m.name] = { x: [], latency: names.map(() => []), rate: names.map(() => []) };
    state.charts[m.name] = {
      latency: makeChart($(".chart.latency", section), "p50 latency per variant", "ms", names),
      rate: makeChart($(".chart.rate", section), "throughput per variant (inputs/s)", "/s", names),
    };
  }
  $(".variants", section).replaceChildren(...m.variants.map((v, i) => variantCard(m, v, i, rates[`${m.name}/${v.name}`])));
  const s = state.series[m.name];
  s.x.push(now / 1000);
  m.variants.forEach((v, i) => {
    const p50 = v.latency_seconds && v.latency_seconds.p50;
    s.latency[i].push(p50 == null ? null : p50 * 1000);
    s.rate[i].push(rates[`${m.name}/${v.name}`]);
  });
  if (s.x.length > HISTORY) { s.x.shift(); s.latency.forEach((a) => a.shift()); s.rate.forEach((a) => a.shift()); }
  state.charts[m.name].latency.setData([s.x, ...s.latency]);
  state.charts[m.name].rate.setData([s.x, ...s.rate]);
}

function fillModelSelect(models) {
  const select = $("#compare-model");
  if (select.options.length === models.length) return;
  select.replaceChildren(...models.map((m) => el("option", { value: m.name }, `${m.name} (${m.task})`)));
}

// The process's resident memory, live, from the Prometheus text at /metrics (all variants of
// every model share this one process).
async function refreshProcessMemory() {
  const text = await (await api("/metrics", { cache: "no-store" })).text();
  const match = text.match(/^process_resident_memory_bytes (\S+)$/m);
  $("#process-memory").textContent = match ? `process memory ${fmt.mb(Number(match[1]))} · ` : "";
}

async function refresh() {
  const status = $("#status");
  refreshProcessMemory().catch(() => { $("#process-memory").textContent = ""; });
  try {
    const resp = await api("/v1/models", { cache: "no-store" });
    const body = await resp.json();
    const now = Date.now();
    const rates = throughput(body.models, now);
    body.models.forEach((m) => { state.models[m.name] = m; renderModel(m, rates, now); });
    fillModelSelect(body.models);
    $("#cpu").textContent = cpuText(body.cpu);
    status.textContent = (body.ready ? "ready" : "loading models…") + " · updated " + new Date(now).toLocaleTimeString();
    status.parentElement.classList.toggle("down", !body.ready);
  } catch (err) {
    status.textContent = err instanceof NeedsKey ? "waiting for an API key" : "cannot reach the service: " + err;
    status.parentElement.classList.add("down");
  }
}

function outputList(task, result) {
  if (task === "classify") {
    return el("ol", { class: "outputs" }, ...result.labels.map((l) =>
      el("li", {}, el("span", { class: "label" }, l.label), el("span", {}, fmt.pct(l.score)))));
  }
  const vec = result.embedding;
  const norm = Math.sqrt(vec.reduce((a, x) => a + x * x, 0));
  return el("div", { class: "outputs" }, el("div", {}, `${vec.length} dimensions, norm ${norm.toFixed(3)}`),
    el("div", { class: "vector" }, "[" + vec.slice(0, 8).map((x) => x.toFixed(4)).join(", ") + ", …]"));
}

async function compare(event) {
  event.preventDefault();
  const model = $("#compare-model").value, text = $("#compare-text").value;
  const button = $("#compare-send"), error = $("#compare-error"), results = $("#compare-results");
  button.disabled = true; error.textContent = "";
  try {
    const resp = await api("/v1/compare", { method: "POST", headers: { "content-type": "application/json" },
      body: JSON.stringify({ model, inputs: [text] }) });
    const body = await resp.json();
    if (!resp.ok) throw new Error(body.error ? body.error.message : resp.statusText);
    results.replaceChildren(...body.variants.map((v, i) => {
      const agree = v.per_input_agreement ? v.per_input_agreement[0] : null;
      const agreeText = agree == null ? "–" : body.task === "classify" ? (agree ? "same top label" : "different top label")
        : `cosine ${agree.toFixed(4)}`;
      return el("div", { class: "card result", "data-variant": v.variant, style: `--accent:${color(i)}` },
        el("h3", {}, v.variant, " ", el("span", { class: "strategy" }, v.strategy)),
        el("dl", {},
          el("dt", {}, "latency"), el("dd", { class: "latency" }, fmt.ms(v.latency_seconds)),
          el("dt", {}, "queue / inference"), el("dd", {}, `${fmt.ms(v.queue_seconds)} / ${fmt.ms(v.inference_seconds)}`),
          el("dt", {}, `vs ${body.baseline || "baseline"}`), el("dd", { class: "agreement" }, agreeText)),
        outputList(body.task, v.results[0]));
    }));
  } catch (err) {
    error.textContent = String(err.message || err);
  } finally {
    button.disabled = false;
  }
}

$("#compare-form").addEventListener("submit", compare);
$("#key-form").addEventListener("submit", useKey);
refresh();
setInterval(refresh, REFRESH_MS);
