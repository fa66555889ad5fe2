// fgplugin explore: plain JavaScript, no build step; talks to the JSON endpoints of fgplugin/web/app.py.
"use strict";

const state = { info: null, photo: null, seq: 0, shown: 0, prefix: "", offset: 0 };
const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") e.textContent = v; else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}

async function api(path, body) {
  const opts = body === undefined ? {} : { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  let resp;
  try { resp = await fetch(path, opts); } catch (e) { throw new Error("the explore server does not answer (" + e.message + ")"); }
  let data = null;
  try { data = await resp.json(); } catch (e) { /* not JSON: reported below */ }
  if (!resp.ok) {
    const err = data && data.error ? data.error : { message: "HTTP " + resp.status, cause: "internal" };
    const ex = new Error(err.message); ex.cause = err.cause; throw ex;
  }
  return data;
}

function showError(message, cause) {
  const box = $("error");
  box.textContent = (cause ? cause.replace("_", " ") + " error: " : "") + message;
  box.hidden = false;
}
function clearError() { $("error").hidden = true; $("error").textContent = ""; }
const imageUrl = (id, size) => "/api/image?id=" + encodeURIComponent(id) + "&size=" + (size || 200);

// -- set-up ------------------------------------------------------------------------------------
async function init() {
  try {
    state.info = await api("/api/info");
  } catch (e) { showError(e.message, e.cause); $("store-line").textContent = "store unavailable"; return; }
  const info = state.info;
  $("store-line").textContent = info.store + " · " + info.documents + " items · model " + (info.model_version || "?").slice(0, 12)
    + (info.labels ? " · labels from the catalog" : "");
  buildAttributes(info.attributes);
  buildFilters(info.metadata);
  if (!info.image_queries) { $("photo").disabled = true; $("photo").title = "no encoder: start with --model EXPORT_DIR"; }
  await listItems(true);
  $("query-form").addEventListener("submit", (ev) => { ev.preventDefault(); search(); });
  $("find").addEventListener("input", () => listItems(true));
  $("find").addEventListener("keydown", (ev) => { if (ev.key === "Enter") { ev.preventDefault(); listItems(true); } });
  $("more-items").addEventListener("click", () => listItems(false));
  $("like-id").addEventListener("input", () => { if ($("like-id").value) clearPhoto(); });
  $("photo").addEventListener("change", readPhoto);
  $("clear-photo").addEventListener("click", clearPhoto);
  for (const id of ["k", "mode"]) $(id).addEventListener("change", autoSearch);
  document.body.dataset.ready = "1";
}

function buildAttributes(attributes) {
  const box = $("attributes");
  attributes.forEach((a, i) => {
    const check = el("input", { type: "checkbox", id: "attr-" + a.name, checked: i === 0 });
    const slider = el("input", { type: "range", id: "weight-" + a.name, min: "0", max: "1", step: "0.05", value: "1",
      "aria-label": "weight of " + a.name });
    const out = el("output", { id: "wout-" + a.name, for: "weight-" + a.name, text: "1.00" });
    slider.addEventListener("input", () => { out.textContent = Number(slider.value).toFixed(2); });
    slider.addEventListener("change", () => { check.checked = Number(slider.value) > 0 || check.checked; autoSearch(); });
    check.addEventListener("change", autoSearch);
    box.append(el("div", { class: "attr", title: a.description || a.values.join(", ") },
      el("label", { for: "attr-" + a.name }, check, a.name), slider, out));
  });
}

function buildFilters(metadata) {
  const box = $("filters");
  for (const [field, type] of Object.entries(metadata)) {
    const id = "f-" + field;
    if (type === "float" || type === "integer" || type === "date") {
      const kind = type === "date" ? "date" : "number";
      const lo = el("input", { type: kind, id: id + "-min", step: type === "float" ? "any" : null, "aria-label": field + " from" });
      const hi = el("input", { type: kind, id: id + "-max", step: type === "float" ? "any" : null, "aria-label": field + " to" });
      for (const x of [lo, hi]) x.addEventListener("change", autoSearch);
      box.append(el("label", { for: id + "-min", text: field + " (" + type + ": from, to)" }), el("div", { class: "range" }, lo, hi));
    } else if (type === "boolean") {
      const yes = el("input", { type: "checkbox", id: id + "-true" }), no = el("input", { type: "checkbox", id: id + "-false" });
      for (const x of [yes, no]) x.addEventListener("change", autoSearch);
      box.append(el("div", { class: "label", text: field }),
        el("div", { class: "bools", role: "group", "aria-label": field },
          el("label", { for: id + "-true" }, yes, "true"), el("label", { for: id + "-false" }, no, "false")));
    } else if (type === "keyword") {
      const sel = el("select", { id: id, multiple: true, size: "4" });
      sel.addEventListener("change", autoSearch);
      box.append(el("label", { for: id, text: field + " (any of)" }), sel);
      api("/api/values?field=" + encodeURIComponent(field)).then((data) => {
        for (const v of data.values) sel.append(el("option", { value: v.value, text: v.value + " (" + v.count + ")" }));
      }).catch((e) => showError(e.message, e.cause));
    }
  }
}

// -- the reference -----------------------------------------------------------------------------
async function listItems(fresh) {
  const prefix = $("find").value.trim();
  if (fresh) { state.offset = 0; }
  const asked = prefix;
  let data;
  try { data = await api("/api/items?limit=24&offset=" + state.offset + "&prefix=" + encodeURIComponent(prefix)); }
  catch (e) { showError(e.message, e.cause); return; }
  if ($("find").value.trim() !== asked) return; // a newer prefix was typed meanwhile
  const list = $("item-list");
  if (fresh) list.replaceChildren();
  for (const it of data.items) {
    const b = el("button", { type: "button", class: "item", "data-id": it.id, "aria-pressed": "false", title: it.id },
      el("img", { src: imageUrl(it.id, 96), alt: "", loading: "lazy" }), it.id);
    b.addEventListener("click", () => pick(it.id));
    list.append(el("li", {}, b));
  }
  state.offset += data.items.length;
  $("more-items").hidden = data.items.length < 24;
  list.dataset.count = String(list.children.length);
}

function pick(id) {
  $("like-id").value = id;
  clearPhoto();
  for (const b of document.querySelectorAll("#item-list button")) b.setAttribute("aria-pressed", String(b.dataset.id === id));
  search();
}

function readPhoto() {
  const file = $("photo").files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    state.photo = reader.result; // a data: URI; the server takes it as base64
    $("like-id").value = "";
    $("clear-photo").hidden = false;
    search();
  };
  reader.onerror = () => showError("cannot read " + file.name, "image");
  reader.readAsDataURL(file);
}

function clearPhoto() { state.photo = null; $("photo").value = ""; $("clear-photo").hidden = true; }

// -- the query ---------------------------------------------------------------------------------
function currentQuery() {
  const attributes = {};
  for (const a of state.info.attributes) {
    if ($("attr-" + a.name).checked) attributes[a.name] = Number($("weight-" + a.name).value);
  }
  const filters = [];
  for (const [field, type] of Object.entries(state.info.metadata)) {
    const id = "f-" + field;
    if (type === "float" || type === "integer" || type === "date") {
      const lo = $(id + "-min").value, hi = $(id + "-max").value, f = { field };
      const num = (v) => (type === "date" ? v : Number(v));
      if (lo !== "") f.gte = num(lo);
      if (hi !== "") f.lte = type === "date" ? hi + "T23:59:59" : num(hi);
      if (lo !== "" || hi !== "") filters.push(f);
    } else if (type === "boolean") {
      const y = $(id + "-true").checked, n = $(id + "-false").checked;
      if (y !== n) filters.push({ field, is: y });
    } else if (type === "keyword") {
      const vals = Array.from($(id).selectedOptions).map((o) => o.value);
      if (vals.length) filters.push({ field, any: vals });
    }
  }
  const q = { attributes, filters, k: Number($("k").value) || 12, mode: $("mode").value };
  if (state.photo) q.image = state.photo; else q.like_id = $("like-id").value.trim();
  return q;
}

function autoSearch() { if (state.photo || $("like-id").value.trim()) search(); }

async function search() {
  const q = currentQuery();
  if (!q.image && !q.like_id) { showError("pick an item, type its id or upload a photo first", "query"); return; }
  const seq = ++state.seq;
  const results = $("results");
  results.dataset.state = "loading";
  let data;
  try { data = await api("/api/search", q); }
  catch (e) {
    if (seq !== state.seq) return;
    showError(e.message, e.cause);
    results.dataset.state = "error"; results.dataset.seq = String(seq);
    return;
  }
  if (seq !== state.seq) return; // an answer to an older query
  clearError();
  render(q, data);
  results.dataset.state = "done";
  results.dataset.seq = String(seq);
}

function render(q, data) {
  const attrs = Object.keys(q.attributes);
  const weights = attrs.map((a) => a + "=" + q.attributes[a]).join(", ");
  $("summary").replaceChildren(el("span", { text: data.hits.length + " hits by " + weights + " · " + data.mode
    + (data.total_candidates == null ? "" : " · " + data.total_candidates + " candidates") + " · " + data.took_ms + " ms" }),
    ...data.notes.map((n) => el("div", { class: "note", text: n })));
  const qlabels = data.query.labels || {};
  const qpanel = $("query-panel");
  const qimg = q.image ? el("img", { src: q.image, alt: "uploaded photo" }) : el("img", { src: imageUrl(q.like_id, 280), alt: "query item " + q.like_id });
  const qinfo = el("div", {}, el("div", { class: "id", text: q.image ? "uploaded photo" : "query: " + q.like_id }),
    labelTable(attrs, qlabels, null));
  const qpanels = el("div", { class: "panels" });
  qinfo.append(attentionButton("Attention on the query", attrs, q.image ? { image: q.image } : { id: q.like_id }, qpanels), qpanels);
  if (!state.info.attention) qinfo.append(el("div", { class: "note", text: state.info.attention_note }));
  qpanel.replaceChildren(qimg, qinfo);

  const grid = $("grid");
  grid.replaceChildren();
  data.hits.forEach((h) => {
    const rows = attrs.map((a) => {
      const c = h.cosines[a];
      if (c === undefined) return el("tr", {}, el("td", { text: a }), el("td", { class: "n", text: "missing" }), el("td"));
      const w = Math.max(0, Math.min(1, (c + 1) / 2)) * 100;
      return el("tr", {}, el("td", { text: a }), el("td", { class: "n", text: c.toFixed(3) }),
        el("td", { style: "width:40%" }, el("div", { class: "bar", style: "width:" + w.toFixed(0) + "%" })));
    });
    const meta = Object.entries(h.metadata).slice(0, 5).map(([k, v]) => el("tr", {}, el("td", { text: k }), el("td", { colspan: "2", text: shown(v) })));
    const panels = el("div", { class: "panels" });
    grid.append(el("article", { class: "card", "data-id": h.id, "data-score": String(h.score) },
      el("img", { src: imageUrl(h.id, 200), alt: h.id, loading: "lazy" }),
      el("span", { class: "score", text: h.score.toFixed(4) }), el("span", { class: "id", text: "#" + h.rank + " " + h.id }),
      el("table", {}, ...rows, ...meta), labelTable(attrs, h.labels || {}, qlabels),
      attentionButton("Attention", attrs, { id: h.id }, panels), panels));
  });
  if (!data.hits.length) grid.append(el("p", { text: "No item matched." }));
}

// a date at midnight UTC reads as the day
const shown = (v) => String(v).replace(/T00:00:00(\.0+)?Z$/, "");

function labelTable(attrs, labels, compare) {
  if (!labels || !Object.keys(labels).length) return null;
  const rows = attrs.map((a) => {
    const v = labels[a];
    const same = compare && compare[a] != null && compare[a] === v;
    return el("tr", {}, el("td", { text: a + " label" }), el("td", { class: same ? "same" : null, text: v == null ? "—" : v }));
  });
  return el("table", { class: "labels" }, ...rows);
}

function attentionButton(text, attrs, ref, target) {
  const info = state.info;
  const b = el("button", { type: "button", class: "qbtn", disabled: !info.attention, title: info.attention ? null : info.attention_note, text });
  b.addEventListener("click", async () => {
    b.disabled = true;
    try {
      const data = await api("/api/attention", Object.assign({ attributes: attrs }, ref));
      target.replaceChildren(...data.panels.map((p) => el("figure", {}, el("img", { src: p.image, alt: "attention of " + p.attribute }),
        el("figcaption", { text: p.attribute }))));
      if (!data.panels.length) target.replaceChildren(el("div", { class: "note", text: data.reason }));
    } catch (e) { showError(e.message, e.cause); }
    b.disabled = false;
  });
  return b;
}

init();
