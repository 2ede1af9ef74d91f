// cd4ml web page: pick a store, a product, a day and promotion; show the forecast and a chart. No dependencies.
"use strict";
const $ = (id) => document.getElementById(id);
let catalog = null;

function say(text) { const m = $("message"); m.textContent = text; m.hidden = !text; }

function number(text) {            // "12 — Quito" → 12; anything else → null
  const m = /^\s*(\d+)\b/.exec(text || "");
  return m ? Number(m[1]) : null;
}

async function getJSON(url, options) {
  const r = await fetch(url, options);
  let body = null;
  try { body = await r.json(); } catch (e) { body = null; }
  if (!r.ok) {
    const detail = body && (body.error && body.detail ? body.detail.map((d) => d.msg).join("; ") : body.error);
    throw new Error(detail || `HTTP ${r.status}`);
  }
  return body;
}

async function start() {
  try {
    catalog = await getJSON("catalog");
    const info = await getJSON("info");
    $("model").textContent = `model version ${info.champion.version} · history up to ${catalog.history_end}` +
      ` · forecasts ${catalog.grid} ${catalog.first_date} … ${catalog.last_date}`;
  } catch (e) { say(`Could not load the catalog: ${e.message}`); return; }
  $("stores").innerHTML = catalog.stores.map((s) => `<option value="${s.store_nbr} — ${s.city} (type ${s.type})">`).join("");
  $("items").innerHTML = catalog.items.map((i) => `<option value="${i.item_nbr} — ${i.family}">`).join("");
  catalog.storeSet = new Set(catalog.stores.map((s) => s.store_nbr));
  catalog.itemSet = new Set(catalog.items.map((i) => i.item_nbr));
  const d = $("date");              // only the catalog's days: every day, or every week for weekly data
  d.min = catalog.first_date; d.max = catalog.last_date; d.step = catalog.step_days; d.value = catalog.first_date;
  $("dates").innerHTML = catalog.dates.map((day) => `<option value="${day}">`).join("");
  $("ask").addEventListener("submit", (ev) => { ev.preventDefault(); forecast(); });
}

function choice() {                 // the form's values, or an error message naming the bad one
  const store = number($("store").value), item = number($("item").value), date = $("date").value;
  if (store === null || !catalog.storeSet.has(store)) return { error: `Unknown store "${$("store").value}": pick one from the list.` };
  if (item === null || !catalog.itemSet.has(item)) return { error: `Unknown product "${$("item").value}": pick one from the list.` };
  const unit = catalog.step_days === 1 ? "days" : "weeks";
  if (!date || date < catalog.first_date || date > catalog.last_date)
    return { error: `Date "${date}" is outside ${catalog.first_date} … ${catalog.last_date}: the model forecasts up to ${catalog.max_horizon} ${unit} after the history.` };
  if (!catalog.dates.includes(date))
    return { error: `Date "${date}" is not a forecast day: the model forecasts ${catalog.grid}; next: ${catalog.dates.find((day) => day > date)}.` };
  return { store, item, date, promo: $("promo").checked };
}

async function forecast() {
  say(""); $("answer").hidden = true; $("chart-box").hidden = true; $("cold").hidden = true;
  const c = choice();
  if (c.error) { say(c.error); return; }
  const row = { date: c.date, store_nbr: c.store, item_nbr: c.item, onpromotion: c.promo };
  try {
    const res = await getJSON("predict", { method: "POST", headers: { "Content-Type": "application/json" },
                                           body: JSON.stringify({ rows: [row] }) });
    $("units").textContent = res.predictions[0].toFixed(1);
    $("cold").hidden = !res.cold_start[0];   // never sold here: forecast from its hierarchy, no interval (null quantiles)
    $("what").textContent = `store ${c.store}, item ${c.item} on ${c.date}${c.promo ? " (on promotion)" : ""} · model ${res.model_version}`;
    $("answer").hidden = false;
    const hist = await getJSON(`history?store_nbr=${c.store}&item_nbr=${c.item}&onpromotion=${c.promo}`);
    const day = hist.forecast.find((f) => f.date === c.date);
    $("range").textContent = hist.interval && day && banded(day) ? ` (${label(hist.interval)} interval ${day.low.toFixed(1)} – ${day.high.toFixed(1)})` : "";
    draw(hist, c.date);
  } catch (e) { say(e.message); }
}

function banded(f) {                // a forecast day with both ends of its interval (a cold start has none: null)
  return Number.isFinite(f.low) && Number.isFinite(f.high);
}

function label(interval) {          // [0.1, 0.9] → "10–90 %"
  return `${Math.round(interval[0] * 100)}–${Math.round(interval[1] * 100)} %`;
}

function draw(hist, target) {       // bars: actual (blue), forecast (red), the chosen day (yellow); the model's interval as a band
  const svg = $("chart"), W = 720, H = 260, left = 36, bottom = 24, top = 10;
  const points = hist.actual.map((a) => ({ date: a.date, v: a.unit_sales, kind: "actual" }))
    .concat(hist.forecast.map((f) => ({ date: f.date, v: f.prediction, kind: f.date === target ? "target" : "forecast" })));
  const band = hist.interval && hist.forecast.every(banded) ? hist.forecast : [];   // all days or none: no gaps, no NaN
  const max = Math.max(1, ...points.map((p) => p.v), ...band.map((f) => f.high));
  const bw = (W - left) / points.length;
  const y = (v) => H - bottom - (v / max) * (H - bottom - top);
  let out = `<line class="axis" x1="${left}" y1="${H - bottom}" x2="${W}" y2="${H - bottom}"/>`;
  out += `<line class="axis" x1="${left}" y1="${top}" x2="${left}" y2="${H - bottom}"/>`;
  out += `<text x="2" y="${top + 8}">${max.toFixed(0)}</text><text x="2" y="${H - bottom}">0</text>`;
  points.forEach((p, i) => {
    const x = left + i * bw, h = H - bottom - y(p.v);
    out += `<rect class="${p.kind}" data-date="${p.date}" x="${(x + 1).toFixed(1)}" y="${y(p.v).toFixed(1)}" width="${Math.max(1, bw - 2).toFixed(1)}" height="${h.toFixed(1)}"><title>${p.date}: ${p.v.toFixed(1)}</title></rect>`;
    if (i % (catalog.step_days === 1 ? 7 : 2) === 0 && x < W - 30) out += `<text x="${x.toFixed(1)}" y="${H - 8}">${p.date.slice(5)}</text>`;
  });
  if (band.length) {                // from the low end to the high end of each forecast day, through the bars' centres
    const x = (j) => (left + (hist.actual.length + j + 0.5) * bw).toFixed(1);
    const edge = (end) => band.map((f, j) => `${x(j)},${y(f[end]).toFixed(1)}`);
    out += `<polygon class="band" points="${edge("high").concat(edge("low").reverse()).join(" ")}"><title>${label(hist.interval)} interval</title></polygon>`;
  }
  svg.innerHTML = out;
  $("band-legend").hidden = !band.length;
  $("band-legend").lastChild.textContent = band.length ? ` ${label(hist.interval)} interval` : "";
  $("chart-box").hidden = false;
}

start();
