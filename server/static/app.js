// Live canvas page: plain JS, no build step, talks only to this server.
//
// Endpoints: GET /ui/config (model, canvas length, default diffusion parameters, auth),
// POST /ui/detokenize (token id -> text, cached here), and the public API:
// POST /v1/completions or /v1/chat/completions with stream, stream_drafts and include_usage.
//
// Each draft chunk's `diffusion` object carries the positions changed since the previous draft
// and their new token ids; the page keeps one token id per canvas position, and how many steps
// each position has been stable, and draws them. Committed text comes from the ordinary deltas.
//
// Test hooks: window.__canvasHistory (one entry per draft: canvas, step, max_steps, ids, draft),
// window.__ui (running, done, text, usage, finishReason, error), #grid[data-canvas][data-step].
"use strict";

(function () {
  const KEY_STORE = "diffusion-ui-api-key";
  const PARAMS = ["max_tokens", "max_denoising_steps", "entropy_bound", "t_min", "t_max",
                  "stability_threshold", "confidence_threshold"];
  const INT_PARAMS = new Set(["max_tokens", "max_denoising_steps", "stability_threshold", "seed"]);
  const SUDOKU_RE = /^[0-9.]{81}$/;
  const PRELOAD_VOCAB = 4096;  // the server's limit of ids per /ui/detokenize request

  const $ = (id) => document.getElementById(id);
  const texts = new Map();      // token id -> text (from /ui/detokenize)
  const specials = new Set();   // token ids that are special tokens
  const pending = new Set();    // ids being fetched
  let vocabulary = null;        // the model and vocabulary size the texts belong to (a restart may change them)
  let vocabEpoch = 0;           // bumped when they change: answers fetched for the old ones are dropped
  let config = null;
  let run = null;
  let renderQueued = false;
  let configTimer = null;  // the next /ui/config check, if one is scheduled

  window.__canvasHistory = [];
  window.__ui = { running: false, done: false, text: "", usage: null, finishReason: null, error: null };

  // ---------------------------------------------------------------- config, key, defaults
  // A header carries printable ASCII only: a key pasted with anything else (a zero-width space, a
  // typographic quote) would make every request fail before it is sent.
  function keyProblem(key) {
    return /^[\x21-\x7e]*$/.test(key) ? null : "the API key has a character a key cannot have (printable ASCII only)";
  }

  function authHeaders() {
    const key = $("api-key").value.trim();
    return key && !keyProblem(key) ? { Authorization: "Bearer " + key } : {};
  }

  function checkConfigIn(ms) {
    clearTimeout(configTimer);
    configTimer = setTimeout(loadConfig, ms);
  }

  async function loadConfig() {
    clearTimeout(configTimer);
    configTimer = null;
    const problem = keyProblem($("api-key").value.trim());
    if (problem) {
      setStatus(problem, "bad");
      return;
    }
    let cfg;
    try {
      const r = await fetch("/ui/config", { headers: authHeaders(), cache: "no-store" });
      cfg = await r.json();
      if (!r.ok && typeof cfg.authorized !== "boolean") {  // the server is busy or failing: say so, retry
        const detail = cfg.error && cfg.error.message ? ": " + cfg.error.message : "";
        setStatus("server error " + r.status + detail, "bad");
        checkConfigIn(3000);
        return;
      }
    } catch (e) {
      setStatus("server unreachable", "bad");
      checkConfigIn(2000);
      return;
    }
    $("key-hint").textContent = cfg.auth_required ? (cfg.authorized ? "(accepted)" : "(required)") : "(not required)";
    if (!cfg.authorized) {
      setStatus("API key required", "bad");
      return;
    }
    const first = config === null || !config.authorized;
    config = cfg;
    $("model").textContent = cfg.model || "unknown model";
    if (cfg.status !== "ready") {
      setStatus(cfg.status, cfg.status === "loading" ? "muted" : "bad");
      if (cfg.status === "loading") checkConfigIn(1000);
      return;
    }
    setStatus("ready · canvas " + cfg.canvas_length, "ok");
    const served = [cfg.model, cfg.vocab_size].join("\u0000");
    if (vocabulary !== null && vocabulary !== served) forgetTexts();  // the server restarted on another model
    vocabulary = served;
    if (first || PARAMS.every((p) => $("p-" + p).value === "")) fillDefaults();
    // A small vocabulary (a byte or character tokenizer) is fetched whole, once: every cell can
    // then be drawn at the step it changes. Larger ones are fetched id by id as they appear.
    if (cfg.vocab_size && cfg.vocab_size <= PRELOAD_VOCAB && texts.size < cfg.vocab_size) {
      ensureTexts(Array.from({ length: cfg.vocab_size }, (_, i) => i));
    }
  }

  function fillDefaults() {
    const d = (config && config.defaults) || {};
    for (const p of PARAMS) $("p-" + p).value = d[p] === null || d[p] === undefined ? "" : d[p];
  }

  function setStatus(text, kind) {
    const el = $("server-status");
    el.textContent = text;
    el.className = "badge " + (kind || "muted");
  }

  // ---------------------------------------------------------------- token texts
  function forgetTexts() {
    texts.clear();
    specials.clear();
    pending.clear();
    vocabEpoch += 1;
    document.body.dataset.textsKnown = "0";
  }

  function ensureTexts(ids) {
    const missing = [...new Set(ids)].filter((i) => !texts.has(i) && !pending.has(i));
    if (!missing.length) return;
    const epoch = vocabEpoch;
    missing.forEach((i) => pending.add(i));
    fetch("/ui/detokenize", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify({ ids: missing }),
    }).then(async (r) => {
      const body = await r.json().catch(() => ({}));
      if (!r.ok) throw new Error((body.error && body.error.message) || r.status + " " + r.statusText);
      if (epoch !== vocabEpoch) return;  // the old vocabulary's texts
      missing.forEach((id, k) => {
        texts.set(id, body.texts[k]);
        if (body.special && body.special[k]) specials.add(id);
      });
    }).catch((e) => {  // said where no run's own error is shown
      if ($("error").hidden && epoch === vocabEpoch) showError("The token texts could not be fetched: " + e.message);
    }).finally(() => {
      if (epoch !== vocabEpoch) return;
      missing.forEach((i) => pending.delete(i));
      document.body.dataset.textsKnown = String(texts.size);
      scheduleRender();
    });
  }

  // What a token's text looks like in a cell: newline ↵, tab ⇥, space ␣, other control
  // characters as \xNN, an empty decode as ∅.
  function shown(t) {
    if (t === "") return "∅";
    return t.replace(/[\x00-\x1f\x7f]/g, (ch) => ch === "\n" ? "↵" : ch === "\t" ? "⇥"
      : "\\x" + ch.charCodeAt(0).toString(16).padStart(2, "0")).replace(/ /g, "␣");
  }

  // ---------------------------------------------------------------- request
  function readParams() {
    const body = {};
    for (const p of PARAMS.concat(["seed"])) {
      const raw = $("p-" + p).value.trim();
      if (raw === "") continue;
      const v = Number(raw);
      if (!Number.isFinite(v)) throw new Error(p + " must be a number");
      body[p] = INT_PARAMS.has(p) ? Math.trunc(v) : v;
    }
    if ($("p-ignore_eos").checked) body.ignore_eos = true;
    return body;
  }

  function mode() {
    return document.querySelector("input[name=mode]:checked").value;
  }

  function sudokuGrid(prompt) {
    const t = prompt.trim();
    return SUDOKU_RE.test(t) ? t : null;
  }

  function updatePromptInfo() {
    const grid = sudokuGrid($("prompt").value);
    $("prompt-info").textContent = grid ? "Sudoku grid detected: the board view follows the stream." : "";
    $("board-wrap").hidden = !grid;
    if (!grid || (run && run.running)) return;
    // the last run's board while its grid is the prompt, else the new grid's givens
    renderBoard(run && run.grid === grid ? run : { grid, committedText: "", canvasCommitted: true, ids: [], age: [] });
  }

  async function start(ev) {
    ev.preventDefault();
    if (run && run.running) return;
    showError(null);
    let params;
    try {
      params = readParams();
    } catch (e) {
      showError(e.message);
      return;
    }
    let prompt = $("prompt").value;
    const grid = sudokuGrid(prompt);
    if (grid) prompt = grid;
    const chat = mode() === "chat";
    const body = {
      ...params, stream: true, stream_drafts: true, stream_options: { include_usage: true },
      ...(chat ? { messages: [{ role: "user", content: prompt }] } : { prompt }),
    };
    if (config && config.model) body.model = config.model;
    run = {
      chat, grid, running: true, done: false, controller: new AbortController(),
      canvas: -1, step: 0, maxSteps: 0, ids: [], age: [], canvasCommitted: false,
      committedText: "", drafts: 0, t0: performance.now(), tFirstDraft: null, tFirstText: null,
      tEnd: null, usage: null, finishReason: null, stepsSeen: 0,
    };
    window.__canvasHistory = [];
    window.__ui = { running: true, done: false, text: "", usage: null, finishReason: null, error: null };
    $("board-wrap").hidden = !grid;
    $("run").disabled = true;
    $("run").dataset.state = "running";
    $("stop").disabled = false;
    $("output").textContent = "";
    resetUsage();
    render();

    try {
      const resp = await fetch(chat ? "/v1/chat/completions" : "/v1/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "text/event-stream", ...authHeaders() },
        body: JSON.stringify(body),
        signal: run.controller.signal,
      }).catch((e) => {  // no answer at all (refused, reset): a TypeError whose message names no cause
        throw e.name === "AbortError" ? e : new Error("the server could not be reached (" + e.message + ")");
      });
      if (!resp.ok) {
        let msg = resp.status + " " + resp.statusText;
        try { msg = (await resp.json()).error.message || msg; } catch (e) { /* not JSON */ }
        throw new Error(msg);
      }
      await readStream(resp.body);
    } catch (e) {
      if (e.name !== "AbortError") {
        showError(e.message);
        window.__ui.error = e.message;
        loadConfig();  // the badge says whether the server is still there
      } else {
        showError("stopped");
      }
    } finally {
      finish();
    }
  }

  async function readStream(stream) {
    const reader = stream.getReader();
    const dec = new TextDecoder();
    let buf = "";
    let sawDone = false;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, i);
        buf = buf.slice(i + 2);
        for (const line of block.split("\n")) {
          if (!line.startsWith("data: ")) continue;  // ": ping" keep-alive comments
          const payload = line.slice(6);
          if (payload === "[DONE]") { sawDone = true; continue; }
          onChunk(JSON.parse(payload));
        }
      }
    }
    if (!sawDone) throw new Error("the stream ended before [DONE]");
  }

  function onChunk(c) {
    if (c.error) throw new Error(c.error.message || "stream error");
    if (c.usage) run.usage = c.usage;
    for (const ch of c.choices || []) {
      if (ch.index !== 0) continue;
      if (ch.diffusion) onDraft(ch.diffusion);
      const text = run.chat ? (ch.delta && ch.delta.content) || "" : ch.text || "";
      if (text) onText(text);
      if (ch.finish_reason) {
        run.finishReason = ch.finish_reason;
        run.canvasCommitted = true;
      }
    }
    scheduleRender();
  }

  function onDraft(d) {
    const now = performance.now();
    if (run.tFirstDraft === null) run.tFirstDraft = now;
    if (d.canvas !== run.canvas) {
      const n = (config && config.canvas_length) || 0;
      run.canvas = d.canvas;
      run.ids = new Array(n).fill(null);
      run.age = new Array(n).fill(0);
      run.canvasCommitted = false;
    }
    for (let p = 0; p < run.age.length; p++) run.age[p] += 1;
    d.changed.forEach((p, k) => {
      while (run.ids.length <= p) { run.ids.push(null); run.age.push(0); }
      run.ids[p] = d.changed_token_ids[k];
      run.age[p] = 0;
    });
    run.step = d.step;
    run.maxSteps = d.max_steps;
    run.drafts += 1;
    ensureTexts(d.changed_token_ids);
    window.__canvasHistory.push({ canvas: d.canvas, step: d.step, max_steps: d.max_steps, draft: d.draft, ids: run.ids.slice() });
    const grid = $("grid");
    grid.dataset.canvas = String(d.canvas);
    grid.dataset.step = String(d.step);
  }

  function onText(text) {
    if (run.tFirstText === null) run.tFirstText = performance.now();
    run.committedText += text;
    run.canvasCommitted = true;
    window.__ui.text = run.committedText;
  }

  function finish() {
    if (!run) return;
    run.running = false;
    run.done = true;
    run.tEnd = performance.now();  // a stopped or failed run's last canvas stays a draft
    $("run").disabled = false;
    $("run").dataset.state = "done";
    $("stop").disabled = true;
    render();
    Object.assign(window.__ui, {
      running: false, done: true, text: run.committedText, usage: run.usage, finishReason: run.finishReason,
    });
  }

  function stop() {
    if (run && run.running) run.controller.abort();
  }

  function showError(msg) {
    const el = $("error");
    el.hidden = !msg;
    el.textContent = msg || "";
  }

  // ---------------------------------------------------------------- rendering
  function scheduleRender() {
    if (renderQueued) return;
    renderQueued = true;
    requestAnimationFrame(() => { renderQueued = false; render(); });
  }

  function ageClass(age, committed) {
    return committed ? "committed" : "age-" + Math.min(age, 3);
  }

  function render() {
    if (!run) return;
    $("canvas-index").textContent = run.canvas < 0 ? "–" : String(run.canvas);
    $("step").textContent = run.step ? String(run.step) : "–";
    $("max-steps").textContent = run.maxSteps ? String(run.maxSteps) : "–";
    renderGrid();
    if (run.grid) renderBoard(run);
    $("output").textContent = run.committedText;
    renderUsage();
  }

  function renderGrid() {
    const grid = $("grid");
    while (grid.children.length < run.ids.length) {
      const cell = document.createElement("div");
      const pos = document.createElement("span");
      pos.className = "pos";
      pos.textContent = String(grid.children.length);
      const tok = document.createElement("span");
      tok.className = "tok";
      cell.append(pos, tok);
      grid.append(cell);
    }
    while (grid.children.length > run.ids.length) grid.lastChild.remove();
    run.ids.forEach((id, p) => {
      const cell = grid.children[p];
      const tok = cell.lastChild;
      const known = id !== null && texts.has(id);
      const t = known ? texts.get(id) : null;
      const special = id !== null && specials.has(id);
      let cls = "cell " + ageClass(run.age[p], run.canvasCommitted);
      if (!known) cls += " pending";
      if (special) cls += " special";
      else if (t !== null && /[\x00-\x1f\x7f]/.test(t)) cls += " ctrl";
      cell.className = cls;
      tok.textContent = id === null ? "" : known ? shown(t) : "·";
      cell.dataset.id = id === null ? "" : String(id);
      cell.title = id === null ? "pos " + p : "pos " + p + " · id " + id + (known ? " · " + JSON.stringify(t) : "")
        + (run.canvasCommitted ? " · committed" : " · stable for " + run.age[p] + " step(s)");
    });
  }

  // The board reads the completion's first 81 characters: committed text, then (while the current
  // canvas is still denoising) the text of each canvas position, coloured by that position's age.
  function renderBoard(r) {
    const seq = Array.from(r.committedText, (ch) => ({ ch, cls: "committed" }));
    if (!r.canvasCommitted) {
      r.ids.forEach((id, p) => {
        const cls = ageClass(r.age[p], false);
        if (id === null || !texts.has(id) || specials.has(id)) { seq.push({ ch: "", cls }); return; }
        for (const ch of Array.from(texts.get(id))) seq.push({ ch, cls });
      });
    }
    const board = $("board");
    if (board.children.length !== 81) {
      board.textContent = "";
      for (let k = 0; k < 81; k++) board.append(document.createElement("div"));
    }
    for (let k = 0; k < 81; k++) {
      const cell = board.children[k];
      const pos = " r" + Math.floor(k / 9) + " c" + (k % 9);
      const given = r.grid[k];
      if (given >= "1" && given <= "9") {
        cell.className = "bcell given" + pos;
        cell.textContent = given;
        continue;
      }
      // a digit as the cell's value; anything else the model wrote there small and grey
      const e = seq[k];
      const digit = e && /^[1-9]$/.test(e.ch) ? e.ch : "";
      cell.className = "bcell " + (e ? e.cls : "") + (digit ? "" : " other") + pos;
      cell.textContent = digit || (e && e.ch ? shown(e.ch) : "");
    }
    board.dataset.step = String(r.step || 0);
    markConflicts(board);
  }

  // Digits that repeat in a row, column or box: the generated ones are marked; the status line
  // says whether the grid is a solution.
  function markConflicts(board) {
    const value = (k) => board.children[k].textContent;
    const bad = new Set();
    const units = [];
    for (let i = 0; i < 9; i++) {
      units.push([...Array(9).keys()].map((j) => i * 9 + j));
      units.push([...Array(9).keys()].map((j) => j * 9 + i));
      units.push([...Array(9).keys()].map((j) => (Math.floor(i / 3) * 3 + Math.floor(j / 3)) * 9 + (i % 3) * 3 + (j % 3)));
    }
    for (const unit of units) {
      const seen = new Map();
      for (const k of unit) {
        const v = value(k);
        if (!/^[1-9]$/.test(v)) continue;
        if (seen.has(v)) { bad.add(k); bad.add(seen.get(v)); } else seen.set(v, k);
      }
    }
    let filled = 0;
    let conflicts = 0;
    for (let k = 0; k < 81; k++) {
      const cell = board.children[k];
      if (/^[1-9]$/.test(value(k))) filled += 1;
      const c = bad.has(k) && !cell.classList.contains("given");
      cell.classList.toggle("conflict", c);
      if (c) conflicts += 1;
    }
    const status = $("board-status");
    const solved = filled === 81 && bad.size === 0;
    status.className = "board-status" + (solved ? " solved" : "");
    status.textContent = solved ? "solved" : filled + "/81 cells filled" + (conflicts ? ", " + conflicts + " in conflict" : "");
    board.dataset.solved = String(solved);
  }

  function resetUsage() {
    for (const id of ["u-prompt_tokens", "u-completion_tokens", "u-denoising_steps", "u-canvases", "u-finish",
                      "t-elapsed", "t-first-draft", "t-first-text", "t-drafts", "t-rate"]) $(id).textContent = "–";
  }

  function secs(t) {
    return t === null ? "–" : ((t - run.t0) / 1000).toFixed(3) + " s";
  }

  function renderUsage() {
    const u = run.usage || {};
    for (const k of ["prompt_tokens", "completion_tokens", "denoising_steps", "canvases"]) {
      $("u-" + k).textContent = u[k] === undefined ? "–" : String(u[k]);
    }
    $("u-finish").textContent = run.finishReason || "–";
    const end = run.tEnd === null ? performance.now() : run.tEnd;
    $("t-elapsed").textContent = ((end - run.t0) / 1000).toFixed(3) + " s" + (run.running ? " …" : "");
    $("t-first-draft").textContent = secs(run.tFirstDraft);
    $("t-first-text").textContent = secs(run.tFirstText);
    $("t-drafts").textContent = String(run.drafts);
    const dt = (end - run.t0) / 1000;
    $("t-rate").textContent = run.drafts && dt > 0 ? (run.drafts / dt).toFixed(1) : "–";
  }

  // ---------------------------------------------------------------- wiring
  function init() {
    const saved = localStorage.getItem(KEY_STORE);
    if (saved) $("api-key").value = saved;
    $("api-key").addEventListener("change", () => {
      const key = $("api-key").value.trim();
      if (key && !keyProblem(key)) localStorage.setItem(KEY_STORE, key); else localStorage.removeItem(KEY_STORE);
      loadConfig();
    });
    $("form").addEventListener("submit", start);
    $("stop").addEventListener("click", stop);
    $("reset").addEventListener("click", (e) => { e.preventDefault(); fillDefaults(); });
    $("prompt").addEventListener("input", updatePromptInfo);
    window.addEventListener("focus", () => { if (!(run && run.running)) loadConfig(); });
    document.querySelectorAll("input[name=mode]").forEach((el) => el.addEventListener("change", updatePromptInfo));
    updatePromptInfo();
    loadConfig();
  }

  init();
})();
