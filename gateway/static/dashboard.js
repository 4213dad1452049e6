// The QMesh dashboard: reads dashboard/data every second and draws it; the playground streams an answer through
// the gateway's own /v1/chat/completions. Values from the mesh are inserted as text only (never as HTML): worker
// and model names come from the network.
"use strict";

(() => {
  const POLL_MS = 1000;
  const RETRY_MS = 2000;
  const STALE_S = 3; // older data than this is shown as stale (the gateway samples every second)
  const KEY_STORAGE = "qmesh-api-key";
  const SVG = "http://www.w3.org/2000/svg"; // a namespace name, not an address the page loads

  let apiKey = sessionStorage.getItem(KEY_STORAGE) || "";
  let timer = null;
  let lastSeq = null; // the newest request on the previous render: later ones are highlighted as they arrive
  let requestsShown = ""; // what the requests table shows, so an unchanged log is not redrawn every second
  let playing = null; // the AbortController of the playground's request in flight

  const $ = (id) => document.getElementById(id);

  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(props)) {
      if (name === "class") node.className = value;
      else node.setAttribute(name, value);
    }
    for (const child of children) node.append(child instanceof Node ? child : String(child ?? ""));
    return node;
  }

  function authHeaders(extra = {}) {
    return apiKey ? { ...extra, Authorization: `Bearer ${apiKey}` } : extra;
  }

  const isNumber = (v) => typeof v === "number" && Number.isFinite(v);
  const fixed = (v, digits = 1) => (isNumber(v) ? v.toFixed(digits) : "-");
  const percent = (v) => (isNumber(v) ? `${Math.round(v)}%` : "-");
  const share = (v) => (isNumber(v) ? `${Math.round(v * 100)}%` : "-");
  const seconds = (s) => (isNumber(s) ? (s < 1 ? `${Math.round(s * 1000)} ms` : `${s.toFixed(2)} s`) : "-");
  const ago = (s) => (isNumber(s) ? (s < 90 ? `${s.toFixed(1)} s ago` : `${Math.round(s / 60)} min ago`) : "-");
  const clock = (t) => new Date(t * 1000).toLocaleTimeString([], { hour12: false });

  // ------------------------------------------------------------------------------------------------ polling

  function schedule(delay) {
    clearTimeout(timer);
    timer = setTimeout(poll, delay);
  }

  async function poll() {
    let delay = RETRY_MS; // unless the data arrives: then the usual pace, or none while a key is needed
    try {
      const response = await fetch("dashboard/data", { headers: authHeaders(), cache: "no-store" });
      if (response.status === 401) {
        askForKey(apiKey ? "That key was not accepted. Enter another:" : "This gateway needs an API key.");
        delay = null; // polling resumes once a key is entered
      } else if (!response.ok) {
        setStatus("error", `the gateway answered ${response.status}`);
      } else {
        const data = await response.json();
        $("key-section").hidden = true;
        render(data);
        delay = POLL_MS;
      }
    } catch (err) {
      setStatus("error", `no data from the gateway (${err.message})`);
    } finally {
      if (delay !== null) schedule(delay);
    }
  }

  function askForKey(message) {
    setStatus("error", "API key needed");
    $("key-message").textContent = message;
    $("key-section").hidden = false;
    $("key").focus();
  }

  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    apiKey = $("key").value.trim();
    sessionStorage.setItem(KEY_STORAGE, apiKey);
    $("key").value = "";
    setStatus("connecting", "connecting…");
    schedule(0);
  });

  function setStatus(state, text) {
    const status = $("status");
    status.dataset.state = state;
    status.textContent = text;
  }

  // ------------------------------------------------------------------------------------------------ rendering

  function render(data) {
    $("broker").textContent = data.broker ? `broker ${data.broker}` : "";
    const age = isNumber(data.sampled_at) ? Math.max(0, data.now - data.sampled_at) : null;
    if (data.error) {
      setStatus("error", age === null ? data.error : `${data.error} (data from ${ago(age)})`);
    } else {
      setStatus(age === null || age > STALE_S ? "stale" : "live", `live · updated ${ago(age)}`);
    }
    renderTiles(data);
    renderCharts(data.history, data.now, data.interval_s);
    renderWorkers(data.workers);
    renderModels(data.models);
    renderRequests(data.requests);
    renderPlaygroundModels(data.models);
  }

  function renderTiles(data) {
    const busy = data.models.reduce((n, m) => n + m.busy, 0);
    const slots = data.models.reduce((n, m) => n + m.slots, 0);
    const speed = data.workers.reduce((n, w) => n + (isNumber(w.tokens_per_second) ? w.tokens_per_second : 0), 0);
    $("tile-workers").textContent = data.workers.length;
    $("tile-slots").textContent = `${busy}/${slots}`;
    $("tile-queued").textContent = data.models.reduce((n, m) => n + m.queued, 0);
    $("tile-tps").textContent = speed.toFixed(1);
  }

  function fill(table, rows, emptyId) {
    table.tBodies[0].replaceChildren(...rows);
    $(emptyId).hidden = rows.length > 0;
  }

  function meter(busy, slots) {
    const bar = el("span");
    bar.style.width = `${slots ? Math.min(100, (100 * busy) / slots) : 0}%`;
    return el("span", { class: "meter", "aria-hidden": "true" }, bar);
  }

  function renderWorkers(workers) {
    const rows = workers.map((w) =>
      el(
        "tr",
        { "data-worker": w.name },
        el("td", {}, w.name),
        el("td", {}, w.host || "-"),
        el("td", {}, w.model || "-"),
        el("td", { class: "slots" }, `${w.busy}/${w.slots}`, meter(w.busy, w.slots)),
        el("td", { class: "num" }, fixed(w.tokens_per_second)),
        el("td", { class: "num" }, share(w.prompt_cache_hit_ratio)),
        el("td", { class: "num" }, percent(w.cpu_percent)),
        el("td", { class: "num" }, percent(w.memory_percent)),
        el("td", {}, ago(w.last_seen_s)),
        el("td", {}, el("span", { class: `badge ${w.state}` }, w.state)),
      ),
    );
    fill($("workers"), rows, "workers-empty");
  }

  function renderModels(models) {
    const rows = models.map((m) =>
      el(
        "tr",
        { "data-model": m.name },
        el("td", {}, m.name),
        el("td", {}, ...(m.sha256.length ? m.sha256.map((h) => el("code", { title: h }, `${h.slice(0, 12)}… `)) : ["-"])),
        el("td", {}, ...(m.capabilities.length ? m.capabilities.map((c) => el("span", { class: "chip" }, c)) : ["-"])),
        el("td", { title: m.workers.join("\n") }, m.workers.length),
        el("td", { class: "slots" }, `${m.busy}/${m.slots}`, meter(m.busy, m.slots)),
        el("td", { class: "num" }, m.queued),
        el("td", { class: "num" }, isNumber(m.context) ? m.context : "-"),
      ),
    );
    fill($("models"), rows, "models-empty");
  }

  function renderRequests(requests) {
    const shown = `${requests.length}:${requests.length ? requests[0].seq : 0}`;
    if (shown === requestsShown) return;
    requestsShown = shown;
    const rows = requests.map((r) => {
      const ok = r.outcome === "ok";
      const row = el(
        "tr",
        { "data-seq": r.seq },
        el("td", {}, clock(r.ended_at)),
        el("td", {}, r.model),
        el("td", { class: "worker" }, r.worker || "-"),
        el("td", {}, el("span", { class: `badge ${ok ? "ok" : "error"}` }, r.outcome)),
        el("td", { class: "num" }, seconds(r.queue_wait_s)),
        el("td", { class: "num" }, seconds(r.ttft_s)),
        el("td", { class: "num tokens" }, r.tokens),
        el("td", { class: "num" }, fixed(r.tokens_per_second)),
        el("td", { class: "num" }, r.prompt_tokens ? `${r.cached_tokens}/${r.prompt_tokens}` : "-"),
        el("td", { class: "num" }, r.failovers),
      );
      if (lastSeq !== null && r.seq > lastSeq) row.classList.add("new");
      return row;
    });
    if (requests.length) lastSeq = Math.max(lastSeq ?? 0, requests[0].seq);
    $("requests-count").textContent = requests.length ? `(last ${requests.length})` : "";
    fill($("requests"), rows, "requests-empty");
  }

  // ------------------------------------------------------------------------------------------------ charts

  function svg(tag, attributes) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
    return node;
  }

  function niceCeiling(value) {
    if (value <= 1) return 1;
    const magnitude = 10 ** Math.floor(Math.log10(value));
    return [1, 2, 2.5, 5, 10].map((step) => step * magnitude).find((nice) => nice >= value);
  }

  // series: [{key, cls}] (cls: the line's colour in the CSS); history: columns {seconds, t: [...], key: [...]}. A gap in sampling breaks the line.
  function drawChart(target, history, series, now, interval) {
    const width = target.clientWidth || 600;
    const height = target.clientHeight || 170;
    const pad = { left: 34, right: 8, top: 8, bottom: 18 };
    // The whole window once it is full; until then what there is, but at least a minute.
    const span = Math.min(history.seconds, Math.max(60, history.t.length ? now - history.t[0] : 0));
    const start = now - span;
    const top = niceCeiling(Math.max(0, ...series.flatMap((s) => history[s.key])));
    const x = (t) => pad.left + ((t - start) / span) * (width - pad.left - pad.right);
    const y = (v) => height - pad.bottom - (v / top) * (height - pad.top - pad.bottom);
    const nodes = [];
    for (const value of [0, top / 2, top]) {
      nodes.push(svg("line", { class: "grid", x1: pad.left, x2: width - pad.right, y1: y(value), y2: y(value) }));
      const label = svg("text", { class: "axis", x: pad.left - 4, y: y(value) + 3, "text-anchor": "end" });
      label.textContent = Number.isInteger(value) ? value : value.toFixed(1);
      nodes.push(label);
    }
    const step = [10, 15, 30, 60, 120].find((seconds) => span / seconds <= 6) ?? 300;
    for (let back = 0; back <= span; back += step) {
      const label = svg("text", { class: "axis", x: x(now - back), y: height - 4, "text-anchor": "middle" });
      label.textContent = back === 0 ? "now" : back % 60 === 0 ? `-${back / 60}m` : `-${back}s`;
      if (back === 0) label.setAttribute("text-anchor", "end");
      nodes.push(label);
    }
    for (const { key, cls } of series) {
      let points = [];
      const flush = () => {
        if (points.length) nodes.push(svg("polyline", { class: `series ${cls}`, points: points.join(" ") }));
        points = [];
      };
      history.t.forEach((t, i) => {
        if (i > 0 && t - history.t[i - 1] > 3 * interval) flush();
        points.push(`${x(t).toFixed(1)},${y(history[key][i]).toFixed(1)}`);
      });
      flush();
    }
    target.setAttribute("viewBox", `0 0 ${width} ${height}`);
    target.replaceChildren(...nodes);
  }

  function latest(history, key) {
    const values = history[key];
    return values.length ? values[values.length - 1] : null;
  }

  function renderCharts(history, now, interval) {
    drawChart($("chart-tokens"), history, [{ key: "tokens_per_second", cls: "tokens" }], now, interval);
    const queue = [
      { key: "busy", cls: "busy" },
      { key: "queued", cls: "queued" },
    ];
    drawChart($("chart-queue"), history, queue, now, interval);
    $("legend-tokens").textContent = fixed(latest(history, "tokens_per_second"));
    $("legend-queued").textContent = latest(history, "queued") ?? "-";
    $("legend-busy").textContent = latest(history, "busy") ?? "-";
  }

  // ------------------------------------------------------------------------------------------------ playground

  function renderPlaygroundModels(models) {
    // Models that can chat: those whose workers announce "chat", or announce nothing (before capabilities).
    const names = models
      .filter((m) => m.workers.length && (!m.capabilities.length || m.capabilities.includes("chat")))
      .map((m) => m.name);
    const select = $("play-model");
    const current = [...select.options].map((o) => o.value);
    if (names.join("\n") === current.join("\n")) return;
    const chosen = select.value;
    select.replaceChildren(...names.map((name) => el("option", { value: name }, name)));
    if (names.includes(chosen)) select.value = chosen;
  }

  // The data of each server-sent event of a fetch response, as it arrives.
  async function* serverSentEvents(body) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).trimStart())
          .join("\n");
        if (data) yield data;
      }
    }
  }

  async function errorOf(response) {
    const body = await response.json().catch(() => null);
    return body?.error?.message || `the gateway answered ${response.status}`;
  }

  async function play(event) {
    event.preventDefault();
    const model = $("play-model").value;
    const prompt = $("play-prompt").value.trim();
    if (!model || !prompt) return;
    const answer = $("answer");
    const stats = $("play-stats");
    answer.textContent = "";
    answer.dataset.state = "waiting";
    stats.textContent = "";
    playing = new AbortController();
    $("play-send").disabled = true;
    $("play-stop").disabled = false;
    const started = performance.now();
    let firstAt = null;
    let usage = null;
    try {
      const response = await fetch("v1/chat/completions", {
        method: "POST",
        headers: authHeaders({ "Content-Type": "application/json" }),
        body: JSON.stringify({
          model,
          messages: [{ role: "user", content: prompt }],
          max_tokens: Number($("play-max").value) || 128,
          stream: true,
          stream_options: { include_usage: true },
        }),
        signal: playing.signal,
      });
      if (response.status === 401) askForKey("This gateway needs an API key.");
      if (!response.ok) throw new Error(await errorOf(response));
      for await (const data of serverSentEvents(response.body)) {
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const delta = chunk.choices?.[0]?.delta?.content;
        if (delta) {
          firstAt ??= performance.now();
          answer.dataset.state = "streaming";
          answer.textContent += delta;
        }
        if (chunk.usage) usage = chunk.usage;
      }
      answer.dataset.state = "done";
      const parts = [];
      if (firstAt !== null) parts.push(`first token after ${seconds((firstAt - started) / 1000)}`);
      if (usage) {
        const cached = usage.prompt_tokens_details?.cached_tokens ?? 0;
        parts.push(`${usage.completion_tokens} tokens`, `prompt ${usage.prompt_tokens} (${cached} cached)`);
      }
      parts.push(`${seconds((performance.now() - started) / 1000)} in all`);
      stats.textContent = parts.join(" · ");
    } catch (err) {
      if (err.name === "AbortError") {
        answer.dataset.state = "stopped";
        stats.textContent = "stopped";
      } else {
        answer.dataset.state = "error";
        answer.textContent += (answer.textContent ? "\n" : "") + err.message;
      }
    } finally {
      playing = null;
      $("play-send").disabled = false;
      $("play-stop").disabled = true;
    }
  }

  $("play-form").addEventListener("submit", play);
  $("play-stop").addEventListener("click", () => playing?.abort());

  poll();
})();
