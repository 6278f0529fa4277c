// The verispec playground: streams completions with the server's provenance extension
// (verispec: {provenance: true}) and shows where every token came from.
// Plain browser JavaScript, no build step, nothing loaded from elsewhere.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const HEALTH_POLL_MS = 2000;
  const TICK_MS = 100;
  const MAX_CHOICE_K = 12;
  const ORIGIN_NAMES = {
    draft: "Draft token",
    recovered: "Recovered token",
    bonus: "Bonus token",
    target: "Target token",
  };

  /** An error to show in the page, in words. `gone`: the server could not be reached. */
  class PlaygroundError extends Error {
    constructor(message, { gone = false } = {}) {
      super(message);
      this.gone = gone;
    }
  }

  const state = { config: null, controller: null, busy: false, healthTimer: null };

  // -- messages ------------------------------------------------------------------------

  function showError(error) {
    const box = $("error");
    box.textContent = error instanceof Error ? error.message : String(error);
    box.hidden = false;
    if (error instanceof PlaygroundError && error.gone) watchHealth();
  }

  function clearError() {
    $("error").hidden = true;
    $("error").textContent = "";
  }

  function setStatus(text) {
    $("run-status").textContent = text;
  }

  // -- the server's settings and health --------------------------------------------------

  async function loadConfig() {
    let response;
    try {
      response = await fetch("/playground/config");
    } catch {
      throw gone();
    }
    if (!response.ok) throw await apiError(response);
    const config = await response.json();
    state.config = config;
    const draftLabel = config.draft ? ` (${config.draft})` : "";
    const names = {
      model: `draft model${draftLabel}`,
      "prompt-lookup": "prompt lookup",
      hybrid: `hybrid: prompt lookup or draft model${draftLabel}`,
      none: "no drafter",
    };
    const serverDrafter = names[config.drafter] || config.drafter;
    const k = config.num_draft_tokens === "auto" ? "adaptive" : config.num_draft_tokens;
    $("pair").textContent =
      `Target: ${config.target} · drafter: ${serverDrafter} · draft length: ${k}`;
    const select = $("drafter");
    for (const option of Array.from(select.options)) {
      if (option.value && !config.drafters.includes(option.value)) {
        option.disabled = true;
        option.textContent += " (not on this server)";
      }
    }
    if (config.drafters.includes(config.drafter)) {
      select.value = config.drafter;
    } else {
      const own = new Option(`the server's: ${config.drafter}`, "");
      select.add(own, 0);
      select.value = "";
    }
    const lengths = $("draft-length");
    lengths.options[0].textContent =
      config.num_draft_tokens === "auto" ? "adaptive" : `server's (${config.num_draft_tokens})`;
    for (let i = 1; i <= MAX_CHOICE_K; i++) lengths.add(new Option(String(i), String(i)));
    if (config.drafter === "none") lengths.value = "4";
    $("max-tokens").value = String(config.max_tokens);
    $("max-tokens").max = String(config.max_tokens_limit);
    $("chat").checked = config.chat;
    $("api-key-field").hidden = !config.api_key;
  }

  function gone() {
    return new PlaygroundError(
      `The server at ${location.host} cannot be reached (stopped or restarting?). ` +
        "This page reconnects by itself when it is back.",
      { gone: true },
    );
  }

  function watchHealth() {
    if (state.healthTimer !== null) return;
    $("server-status").textContent = "Server unreachable: waiting for it…";
    state.healthTimer = setInterval(async () => {
      try {
        const response = await fetch("/health", { cache: "no-store" });
        if (!response.ok) return;
      } catch {
        return;
      }
      clearInterval(state.healthTimer);
      state.healthTimer = null;
      $("server-status").textContent = "The server is back.";
      clearError();
      if (state.config === null) {
        loadConfig().catch(showError);
      }
    }, HEALTH_POLL_MS);
  }

  async function apiError(response) {
    let message = "";
    try {
      const body = await response.json();
      message = (body.error && body.error.message) || "";
    } catch {
      message = "";
    }
    message = message || response.statusText || "no details";
    switch (response.status) {
      case 400:
        return new PlaygroundError(`The server rejected the request: ${message}`);
      case 401:
        return new PlaygroundError(`The server needs a valid API key: ${message}`);
      case 429: {
        const wait = response.headers.get("Retry-After") || "a few";
        return new PlaygroundError(
          `The server is busy (its queue is full). Try again in ${wait} s. (${message})`,
        );
      }
      case 503:
        return new PlaygroundError(`The server is shutting down: ${message}`, { gone: true });
      default:
        return new PlaygroundError(`Server error ${response.status}: ${message}`);
    }
  }

  // -- reading the form ----------------------------------------------------------------

  function number(id, label) {
    const text = $(id).value.trim();
    if (text === "") throw new PlaygroundError(`${label} is empty: enter a number.`);
    const value = Number(text);
    if (!Number.isFinite(value)) throw new PlaygroundError(`${label} must be a number.`);
    return value; // out of range goes to the server, whose message names the limits
  }

  function readSettings() {
    const prompt = $("prompt").value;
    if (!prompt.trim()) throw new PlaygroundError("The prompt is empty: type something first.");
    const length = $("draft-length").value;
    return {
      prompt,
      drafter: $("drafter").value || null,
      numDraftTokens: length === "" ? null : Number(length),
      temperature: number("temperature", "Temperature"),
      topP: number("top-p", "Top-p"),
      maxTokens: number("max-tokens", "Max tokens"),
      chat: $("chat").checked,
    };
  }

  function requestBody(settings, drafter) {
    const verispec = { provenance: true };
    if (drafter) verispec.drafter = drafter;
    if (settings.numDraftTokens !== null && drafter !== "none") {
      verispec.num_draft_tokens = settings.numDraftTokens;
    }
    const body = {
      stream: true,
      max_tokens: settings.maxTokens,
      temperature: settings.temperature,
      top_p: settings.topP,
      verispec,
    };
    if (settings.seed !== undefined) body.seed = settings.seed;
    if (settings.chat) body.messages = [{ role: "user", content: settings.prompt }];
    else body.prompt = settings.prompt;
    return body;
  }

  // -- streaming -----------------------------------------------------------------------

  /** POST a streamed completion; call onChunk for every parsed chunk. */
  async function stream(settings, body, signal, onChunk) {
    const url = settings.chat ? "/v1/chat/completions" : "/v1/completions";
    const headers = { "Content-Type": "application/json" };
    const key = $("api-key").value;
    if (key) headers.Authorization = `Bearer ${key}`;
    let response;
    try {
      response = await fetch(url, { method: "POST", headers, body: JSON.stringify(body), signal });
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw gone();
    }
    if (!response.ok) throw await apiError(response);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      let read;
      try {
        read = await reader.read();
      } catch (error) {
        if (error.name === "AbortError") throw error;
        throw new PlaygroundError(
          "The connection to the server was lost in the middle of the answer.",
          { gone: true },
        );
      }
      if (read.done) break;
      buffer += decoder.decode(read.value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") return;
          const chunk = JSON.parse(data);
          if (chunk.error) {
            throw new PlaygroundError(`The server stopped the answer: ${chunk.error.message}`);
          }
          onChunk(chunk);
        }
      }
    }
    throw new PlaygroundError("The answer ended early: the server closed the stream.");
  }

  function chunkText(chunk) {
    const choice = chunk.choices && chunk.choices[0];
    if (!choice) return "";
    if (choice.delta) return choice.delta.content || "";
    return choice.text || "";
  }

  // -- tokens --------------------------------------------------------------------------

  /** The text of one generation, one span per token, marked by origin. */
  class TokenView {
    constructor(element) {
      this.element = element;
      this.reset();
      element.addEventListener("keydown", (event) => this.onKey(event));
    }

    reset() {
      if (this.element.contains(document.activeElement)) document.activeElement.blur();
      $("tooltip").hidden = true;
      this.element.textContent = "";
      this.spans = new Map();
      this.text = "";
    }

    add(chunk) {
      const provenance = chunk.verispec;
      if (!provenance) {
        const text = chunkText(chunk);
        if (text) this.element.append(text);
        this.text += text;
        return;
      }
      for (const piece of provenance.pieces) {
        this.text += piece.text;
        const existing = this.spans.get(piece.index);
        if (existing) {
          existing.textContent += piece.text;
          continue;
        }
        const span = document.createElement("span");
        span.className = `tok origin-${piece.origin}`;
        span.textContent = piece.text;
        span.tabIndex = this.spans.size === 0 ? 0 : -1;
        span.piece = piece;
        this.spans.set(piece.index, span);
        this.element.append(span);
      }
    }

    onKey(event) {
      const keys = ["ArrowLeft", "ArrowRight", "Home", "End"];
      if (!keys.includes(event.key) || !event.target.classList.contains("tok")) return;
      const spans = Array.from(this.element.querySelectorAll(".tok"));
      const at = spans.indexOf(event.target);
      let next = at;
      if (event.key === "ArrowLeft") next = Math.max(0, at - 1);
      if (event.key === "ArrowRight") next = Math.min(spans.length - 1, at + 1);
      if (event.key === "Home") next = 0;
      if (event.key === "End") next = spans.length - 1;
      event.preventDefault();
      event.target.tabIndex = -1;
      spans[next].tabIndex = 0;
      spans[next].focus();
    }
  }

  function percent(value) {
    return `${(100 * value).toFixed(value > 0 && value < 0.1 ? 1 : 0)}%`;
  }

  function describe(piece) {
    const name = ORIGIN_NAMES[piece.origin] || piece.origin;
    const where = `position ${piece.position} of target pass ${piece.target_pass}`;
    const probs =
      piece.p_target !== undefined && piece.p_draft !== undefined
        ? `p_target ${piece.p_target.toFixed(3)}, p_draft ${piece.p_draft.toFixed(3)}`
        : null;
    const lines = [`${name}, ${where}.`];
    if (piece.origin === "draft") {
      lines.push(
        probs
          ? `Accepted: ${probs}; kept with probability ` +
              `${percent(Math.min(1, piece.p_target / piece.p_draft))}.`
          : "Accepted: the target's own choice (greedy).",
      );
    } else if (piece.origin === "recovered") {
      const rejected =
        piece.rejected !== undefined ? ` ${JSON.stringify(piece.rejected)}` : "";
      lines.push(
        probs
          ? `Replaces the rejected draft token${rejected} (${probs}; kept with probability ` +
              `${percent(Math.min(1, piece.p_target / piece.p_draft))}).`
          : `Replaces the rejected draft token${rejected}: the target chose otherwise.`,
      );
    } else if (piece.origin === "bonus") {
      lines.push(`All ${piece.position - 1} draft tokens accepted; the target added this one.`);
    } else {
      lines.push("Nothing was drafted in this pass.");
    }
    return lines.join(" ");
  }

  function setUpTooltip() {
    const tip = $("tooltip");
    let owner = null;
    const show = (span) => {
      if (!span.piece) return;
      owner = span;
      tip.textContent = describe(span.piece);
      tip.hidden = false;
      span.setAttribute("aria-describedby", "tooltip");
      const box = span.getBoundingClientRect();
      const left = Math.min(box.left + window.scrollX, window.scrollX + innerWidth - 340);
      tip.style.left = `${Math.max(4, left)}px`;
      tip.style.top = `${box.bottom + window.scrollY + 6}px`;
    };
    const hide = (span) => {
      if (owner !== span) return;
      tip.hidden = true;
      span.removeAttribute("aria-describedby");
      owner = null;
    };
    const isToken = (node) => node instanceof HTMLElement && node.classList.contains("tok");
    document.addEventListener("mouseover", (e) => isToken(e.target) && show(e.target));
    document.addEventListener("mouseout", (e) => isToken(e.target) && hide(e.target));
    document.addEventListener("focusin", (e) => isToken(e.target) && show(e.target));
    document.addEventListener("focusout", (e) => isToken(e.target) && hide(e.target));
  }

  // -- figures -------------------------------------------------------------------------

  class Figures {
    constructor() {
      this.reset();
    }

    reset() {
      this.started = performance.now();
      this.ended = null;
      this.tokens = 0;
      this.passes = 0;
      this.drafted = 0;
      this.accepted = 0;
      this.draftedAt = [];
      this.acceptedAt = [];
    }

    add(chunk) {
      if (!chunk.verispec) return;
      for (const pass of chunk.verispec.passes) {
        this.passes += 1;
        this.tokens += pass.tokens;
        this.drafted += pass.drafted;
        this.accepted += pass.accepted;
        for (let i = 0; i < pass.drafted; i++) {
          this.draftedAt[i] = (this.draftedAt[i] || 0) + 1;
          this.acceptedAt[i] = (this.acceptedAt[i] || 0) + (i < pass.accepted ? 1 : 0);
        }
      }
    }

    stop() {
      if (this.ended === null) this.ended = performance.now();
    }

    get seconds() {
      return ((this.ended ?? performance.now()) - this.started) / 1000;
    }

    get tokensPerSecond() {
      return this.seconds > 0 ? this.tokens / this.seconds : 0;
    }

    get acceptance() {
      return this.drafted ? this.accepted / this.drafted : null;
    }

    get meanAcceptedLength() {
      return this.passes ? this.tokens / this.passes : null;
    }

    byPosition() {
      return this.draftedAt.map((n, i) => ({ position: i + 1, drafted: n, rate: this.acceptedAt[i] / n }));
    }
  }

  function renderFigures(figures) {
    $("fig-tps").textContent = figures.passes ? figures.tokensPerSecond.toFixed(1) : "–";
    $("fig-tokens").textContent = figures.passes ? String(figures.tokens) : "–";
    $("fig-passes").textContent = figures.passes ? String(figures.passes) : "–";
    const acceptance = figures.acceptance;
    $("fig-acceptance").textContent =
      acceptance === null ? (figures.passes ? "nothing drafted" : "–") : percent(acceptance);
    const mal = figures.meanAcceptedLength;
    $("fig-mal").textContent = mal === null ? "–" : mal.toFixed(2);
    renderChart(figures.byPosition());
  }

  const SVG = "http://www.w3.org/2000/svg"; // an XML namespace name, not a download

  function svg(tag, attributes, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function renderChart(rows) {
    const chart = $("chart");
    chart.textContent = "";
    chart.style.display = rows.length ? "" : "none";
    const summary = $("chart-summary");
    if (!rows.length) {
      summary.textContent = "Nothing drafted.";
      return;
    }
    const [width, height, left, bottom, top] = [320, 150, 34, 22, 8];
    const plot = height - bottom - top;
    const step = (width - left - 4) / Math.max(rows.length, 4);
    for (const tick of [0, 0.5, 1]) {
      const y = top + plot * (1 - tick);
      chart.append(svg("line", { x1: left, x2: width, y1: y, y2: y, class: "grid" }));
      chart.append(svg("text", { x: left - 4, y: y + 4, class: "axis", "text-anchor": "end" },
        `${tick * 100}%`));
    }
    rows.forEach((row, i) => {
      const x = left + i * step + step * 0.15;
      const h = plot * row.rate;
      const bar = svg("rect", {
        x, y: top + plot - h, width: step * 0.7, height: Math.max(h, 0.5), class: "bar",
      });
      bar.append(svg("title", {},
        `position ${row.position}: ${percent(row.rate)} of ${row.drafted} drafted`));
      chart.append(bar);
      chart.append(svg("text", {
        x: x + step * 0.35, y: height - 6, class: "axis", "text-anchor": "middle",
      }, String(row.position)));
    });
    summary.textContent = "Accepted: " +
      rows.map((r) => `position ${r.position}: ${percent(r.rate)} of ${r.drafted} drafted`)
        .join("; ") + ".";
  }

  // -- runs ----------------------------------------------------------------------------

  function setBusy(busy) {
    state.busy = busy;
    $("generate").disabled = busy;
    $("race").disabled = busy;
    $("stop").disabled = !busy;
    $("output").setAttribute("aria-busy", String(busy));
  }

  /** One streamed generation into a view, with figures and a ticking display. */
  async function runInto(settings, drafter, view, figures, tick, signal) {
    view.reset();
    figures.reset();
    let reason = null;
    const timer = setInterval(tick, TICK_MS);
    try {
      await stream(settings, requestBody(settings, drafter), signal, (chunk) => {
        view.add(chunk);
        figures.add(chunk);
        const choice = chunk.choices && chunk.choices[0];
        if (choice && choice.finish_reason) reason = choice.finish_reason;
      });
    } finally {
      figures.stop();
      clearInterval(timer);
      tick();
    }
    return reason;
  }

  async function generate() {
    if (state.busy) return;
    clearError();
    let settings;
    try {
      settings = readSettings();
    } catch (error) {
      showError(error);
      return;
    }
    const figures = state.figures;
    state.controller = new AbortController();
    setBusy(true);
    setStatus("Generating…");
    try {
      const reason = await runInto(settings, settings.drafter, state.mainView, figures,
        () => renderFigures(figures), state.controller.signal);
      const why = reason === "length" ? "the max tokens limit" : "a stop (end of text)";
      let note = "";
      if (figures.drafted === 0 && settings.drafter !== "none") {
        note = settings.numDraftTokens === null
          ? " Nothing was drafted: the server's policy found that speculation does not pay " +
            "here; pick a fixed draft length to see it anyway."
          : " Nothing was drafted: the drafter found no proposal.";
      }
      setStatus(
        `Done: ${figures.tokens} tokens in ${figures.seconds.toFixed(2)} s, ended by ${why}.${note}`,
      );
    } catch (error) {
      if (error.name === "AbortError") {
        setStatus(`Stopped after ${figures.tokens} tokens.`);
      } else {
        setStatus("Failed.");
        showError(error);
      }
    } finally {
      setBusy(false);
      state.controller = null;
    }
  }

  function laneTick(lane, figures) {
    return () => {
      $(`clock-${lane}`).textContent = `${figures.seconds.toFixed(2)} s`;
      $(`figures-${lane}`).textContent = figures.passes
        ? `${figures.tokens} tokens · ${figures.tokensPerSecond.toFixed(1)} tokens/s · ` +
          `${figures.passes} target passes`
        : "waiting…";
    };
  }

  async function race() {
    if (state.busy) return;
    clearError();
    let settings;
    try {
      settings = readSettings();
      if (settings.drafter === "none") {
        throw new PlaygroundError(
          "Pick a drafter (draft model or prompt lookup) to race against plain decoding.",
        );
      }
    } catch (error) {
      showError(error);
      return;
    }
    if (settings.temperature > 0) settings.seed = Math.floor(Math.random() * 2 ** 31);
    const verdict = $("race-verdict");
    const spec = { view: state.specView, figures: new Figures() };
    const plain = { view: state.plainView, figures: new Figures() };
    for (const [name, lane] of [["spec", spec], ["plain", plain]]) {
      lane.view.reset();
      $(`clock-${name}`).textContent = "0.00 s";
      $(`figures-${name}`).textContent = "–";
    }
    state.controller = new AbortController();
    setBusy(true);
    verdict.textContent = "Racing: speculation on…";
    try {
      const signal = state.controller.signal;
      await runInto(settings, settings.drafter, spec.view, spec.figures,
        laneTick("spec", spec.figures), signal);
      verdict.textContent = "Racing: speculation off…";
      await runInto(settings, "none", plain.view, plain.figures,
        laneTick("plain", plain.figures), signal);
      const speedup = plain.figures.seconds / spec.figures.seconds;
      const same = spec.view.text === plain.view.text;
      let outcome;
      if (settings.temperature === 0) {
        outcome = same
          ? "The texts are identical, as greedy decoding guarantees."
          : "The texts differ: this should not happen under greedy decoding.";
      } else {
        outcome = "Sampling (temperature > 0): the texts may differ; both follow the " +
          "target's distribution exactly.";
      }
      verdict.dataset.identical = String(same);
      verdict.textContent =
        `Speedup ×${speedup.toFixed(2)} (${spec.figures.seconds.toFixed(2)} s vs ` +
        `${plain.figures.seconds.toFixed(2)} s). ${outcome}`;
    } catch (error) {
      if (error.name === "AbortError") {
        verdict.textContent = "Race stopped.";
      } else {
        verdict.textContent = "Race failed.";
        showError(error);
      }
    } finally {
      setBusy(false);
      state.controller = null;
    }
  }

  function stop() {
    if (state.controller) state.controller.abort();
  }

  // -- wiring --------------------------------------------------------------------------

  document.addEventListener("DOMContentLoaded", () => {
    state.mainView = new TokenView($("output"));
    state.specView = new TokenView($("output-spec"));
    state.plainView = new TokenView($("output-plain"));
    state.figures = new Figures();
    setUpTooltip();
    $("form").addEventListener("submit", (event) => {
      event.preventDefault();
      generate();
    });
    $("prompt").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        generate();
      }
    });
    document.addEventListener("keydown", (event) => {
      if (event.key === "Escape" && state.busy) stop();
    });
    $("race").addEventListener("click", race);
    $("stop").addEventListener("click", stop);
    loadConfig()
      .then(() => {
        document.body.dataset.ready = "true";
      })
      .catch(showError);
  });
})();
