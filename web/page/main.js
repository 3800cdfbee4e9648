// The demo page: opens the engine, runs the chosen call on "run", and with `?suite` in the
// address runs the conformance slice instead. The headless-Chromium driver (`wflash-web
// test`) reads the `data-status` attributes set here.
import init, { adapter, run_demo, run_suite } from "./pkg/wflash_web.js";

const $ = (id) => document.getElementById(id);
// The browser's name for its WebGPU adapter (set in main).
let adapterName = "";

function spec() {
  const form = new FormData($("spec"));
  const num = (k) => Number(form.get(k));
  return {
    variant: form.get("variant"),
    dtype: form.get("dtype"),
    batch: num("batch"),
    heads: num("heads"),
    kv_heads: num("kv_heads"),
    seq: num("seq"),
    dim: num("dim"),
    causal: form.get("causal") === "on",
    runs: num("runs"),
  };
}

async function demo(event) {
  event.preventDefault();
  const result = $("result");
  result.dataset.status = "running";
  $("run").disabled = true;
  $("verdict").textContent = "running…";
  try {
    const r = JSON.parse(await run_demo(JSON.stringify(spec())));
    $("case").textContent = r.case;
    $("first").textContent = `${r.first_ms.toFixed(1)} ms`;
    $("time").textContent = `${r.median_ms.toFixed(2)} ms (${r.times_ms.length} runs)`;
    $("gflops").textContent = r.gflops.toFixed(2);
    $("error").textContent = r.outputs
      .map((o) => `${o.name} ${o.max_abs_err.toExponential(2)} (≤ ${o.bound.toExponential(2)})`)
      .join(", ");
    $("verdict").textContent = `${r.pass ? "pass" : "FAIL"}: worst error/bound ${r.worst_ratio.toFixed(3)}`;
    $("chart").innerHTML = r.chart_svg;
    result.dataset.status = r.pass ? "pass" : "fail";
  } catch (e) {
    $("verdict").textContent = `error: ${e}`;
    result.dataset.status = "error";
  } finally {
    $("run").disabled = false;
  }
}

async function suite() {
  const section = $("suite");
  section.hidden = false;
  section.dataset.status = "running";
  const log = $("suite-log");
  try {
    // `?suite=A-B` runs cases A..B (1-based, inclusive) only.
    const range = (new URLSearchParams(location.search).get("suite") || "").split("-").map(Number);
    const [first, last] = range.length === 2 && range[0] >= 1 ? range : [1, 1e9];
    const report = (line) => { log.textContent += line + "\n"; };
    const s = JSON.parse(await run_suite(report, first - 1, last - first + 1));
    $("suite-summary").textContent =
      `${s.cases - s.failed}/${s.cases} cases passed on ${adapterName} (${s.adapter}) in ${s.seconds.toFixed(0)} s; ` +
      `worst error/bound ${s.worst_ratio.toFixed(3)}` +
      (s.left_out.length ? `; left out: ${s.left_out.join(", ")}` : "");
    section.dataset.status = s.failed === 0 ? "pass" : "fail";
  } catch (e) {
    $("suite-summary").textContent = `error: ${e}`;
    section.dataset.status = "error";
  }
}

// What the browser itself says of its WebGPU adapter (wgpu's view of it leaves the name empty).
async function browserAdapter() {
  const a = navigator.gpu && (await navigator.gpu.requestAdapter());
  if (!a) return "none";
  const i = a.info || {};
  return [i.vendor, i.architecture, i.device, i.description].filter((x) => x).join(" ") || "unnamed";
}

// Fields named in the address (`?seq=2048&heads=8&causal=0`) preset the form.
function presetForm() {
  const params = new URLSearchParams(location.search);
  for (const el of $("spec").elements) {
    if (!el.name || !params.has(el.name)) continue;
    const value = params.get(el.name);
    if (el.type === "checkbox") el.checked = value !== "0" && value !== "false";
    else el.value = value;
  }
}

async function main() {
  presetForm();
  await init();
  try {
    adapterName = await browserAdapter();
    $("adapter").textContent = `adapter: ${adapterName} — wflash: ${await adapter()}`;
  } catch (e) {
    $("adapter").textContent = `no WebGPU adapter: ${e}`;
    document.body.dataset.status = "no-adapter";
    return;
  }
  $("spec").addEventListener("submit", demo);
  $("run").disabled = false;
  document.body.dataset.status = "ready";
  if (new URLSearchParams(location.search).has("suite")) {
    await suite();
  }
}

main();
