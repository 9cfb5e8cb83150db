// The swarmserve dashboard: polls /api/swarm and /api/stats, and chats through the router's
// OpenAI-compatible API (/v1/chat/completions, streamed as server-sent events). No libraries:
// the page must work offline, from the router alone.
"use strict";

const $ = (id) => document.getElementById(id);
const REFRESH_MS = 2000;
const SVG = "http://www.w3.org/2000/svg";

function cell(row, content, className) {
  const td = row.insertCell();
  if (className) td.className = className;
  if (content instanceof Node) td.appendChild(content); else td.textContent = content ?? "—";
  return td;
}

function badges(items) {
  const span = document.createElement("span");
  for (const item of items) {
    const b = document.createElement("span");
    b.className = "badge";
    b.textContent = item;
    span.appendChild(b);
  }
  return span;
}

function renderMembers(view) {
  $("router-id").textContent = "router " + view.router.slice(0, 16);
  const body = $("members").tBodies[0];
  body.replaceChildren();
  const models = new Set();
  for (const m of view.members) {
    const row = body.insertRow();
    row.dataset.nodeId = m.node_id;
    row.className = "member";
    cell(row, m.node_id.slice(0, 16) + (m.self ? " (this router)" : ""), "node").title = `${m.node_id} at ${m.address}`;
    cell(row, badges(m.roles));
    cell(row, m.state, "state-" + m.state);
    cell(row, m.models.join(", ") || "—");
    cell(row, m.load ? `${m.load.running}/${m.load.slots} running, ${m.load.queued} queued, ${m.load.tokens_per_second} tok/s` : "—");
    if (m.reputation) {
      const r = m.reputation;
      const text = `${r.score.toFixed(2)} (${r.verdicts} verdicts)` + (r.convicted ? " convicted" : r.trusted ? "" : " untrusted");
      cell(row, text, r.trusted ? "" : "untrusted");
    } else cell(row, "—");
    cell(row, m.credits ? `${m.credits.available} available, ${m.credits.bonded} staked` : "—");
    if (m.state === "alive") m.models.forEach((name) => models.add(name));
  }
  $("member-count").textContent = `${view.members.length} members`;
  const select = $("model");
  const chosen = select.value;
  const names = [...models].sort();
  if (names.join() !== [...select.options].map((o) => o.value).join()) {
    select.replaceChildren(...names.map((n) => new Option(n, n)));
    if (names.includes(chosen)) select.value = chosen;
  }
}

function svgElement(parent, name, attributes, text) {
  const element = document.createElementNS(SVG, name);
  Object.entries(attributes).forEach(([k, v]) => element.setAttribute(k, v));
  if (text !== undefined) element.textContent = text;
  parent.appendChild(element);
  return element;
}

// A bar per step, in the element's own pixels (so that text is not stretched).
function drawBars(svg, points, value, failed, label) {
  svg.replaceChildren();
  const width = svg.clientWidth || 300, height = svg.clientHeight || 140;
  const left = 48, bottom = height - 16, top = 8;
  const values = points.map(value);
  const highest = Math.max(0, ...values.filter((v) => v != null));
  const step = (width - left) / points.length;
  svgElement(svg, "line", { x1: left, y1: bottom, x2: width, y2: bottom, class: "axis" });
  svgElement(svg, "line", { x1: left, y1: top, x2: left, y2: bottom, class: "axis" });
  svgElement(svg, "text", { x: 4, y: top + 8 }, highest ? label(highest) : "");
  svgElement(svg, "text", { x: 4, y: bottom }, "0");
  svgElement(svg, "text", { x: left, y: height - 3 }, "−5 min");
  svgElement(svg, "text", { x: width - 24, y: height - 3 }, "now");
  if (!highest) return;
  points.forEach((p, i) => {
    const v = values[i];
    if (!v) return;
    const h = Math.max(1, (v / highest) * (bottom - top));
    svgElement(svg, "rect", {
      x: left + i * step + 1, y: bottom - h, width: Math.max(1, step - 2), height: h,
      class: failed && failed(p) ? "bar failed" : "bar",
    });
  });
}

function renderStats(stats) {
  const points = stats.series;
  drawBars($("chart-rate"), points, (p) => p.requests_per_s, (p) => p.failed > 0, (t) => t.toFixed(2));
  drawBars($("chart-ttft"), points, (p) => p.ttft_p50_s, null, (t) => t.toFixed(2) + " s");
  $("in-flight").textContent = `${stats.in_flight} in flight`;
}

async function refresh() {
  try {
    const [swarm, stats] = await Promise.all([fetch("/api/swarm"), fetch("/api/stats")]);
    renderMembers(await swarm.json());
    renderStats(await stats.json());
    $("refreshed").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (error) {
    $("refreshed").textContent = "router unreachable: " + error;
  }
}

function status(text, className) {
  const line = $("answer-status");
  line.replaceChildren();
  const span = document.createElement("span");
  span.className = className || "";
  span.textContent = text;
  line.appendChild(span);
}

// Reads server-sent events from a fetch response: yields each `data:` payload.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) if (line.startsWith("data: ")) yield line.slice(6);
    }
  }
}

async function chat(event) {
  event.preventDefault();
  const answer = $("answer");
  answer.replaceChildren();
  answer.dataset.state = "streaming";
  $("send").disabled = true;
  status("opening a circuit…");
  const headers = { "content-type": "application/json" };
  const key = $("api-key").value || localStorage.getItem("swarmserve-api-key");
  if (key) headers.authorization = "Bearer " + key;
  let text = "", final = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers,
      body: JSON.stringify({
        model: $("model").value,
        messages: [{ role: "user", content: $("prompt").value }],
        max_tokens: Number($("max-tokens").value),
        stream: true,
        swarmserve: { hops: Number($("hops").value) },
      }),
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      if (response.status === 401) $("key-label").hidden = false;
      throw new Error(`${response.status}: ${body.error ? body.error.message : response.statusText}`);
    }
    if (key) localStorage.setItem("swarmserve-api-key", key);
    for await (const data of events(response)) {
      if (data === "[DONE]") break;
      const message = JSON.parse(data);
      if (message.error) throw new Error(message.error.message);
      const delta = message.choices && message.choices[0] && message.choices[0].delta;
      if (delta && delta.content) {
        const token = document.createElement("span");
        token.className = "token";
        token.textContent = delta.content;
        answer.appendChild(token);
        text += delta.content;
        status(`streaming: ${answer.childElementCount} tokens`);
      }
      if (message.swarmserve) final = message.swarmserve;
    }
    if (!final) throw new Error("the stream ended without the swarmserve summary");
    answer.dataset.state = "done";
    const check = await fetch("/api/check-receipt", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ swarmserve: final, text }),
    });
    const verdict = await check.json();
    const route = `served by ${final.served_by.slice(0, 16)} through ${final.hops} hops`;
    if (verdict.checked) {
      answer.dataset.receipt = "checked";
      status(`${route} · ${verdict.tokens} tokens · receipt checked ✓ (signed by the serving node, co-signed by the router)`, "checked");
    } else {
      answer.dataset.receipt = "failed";
      status(`${route} · receipt did NOT check: ${verdict.reason}`, "error");
    }
  } catch (error) {
    answer.dataset.state = "error";
    status(String(error.message || error), "error");
  } finally {
    $("send").disabled = false;
    refresh();
  }
}

$("chat-form").addEventListener("submit", chat);
refresh();
setInterval(refresh, REFRESH_MS);
