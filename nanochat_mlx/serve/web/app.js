// The chat page: conversations in localStorage, replies streamed from /v1/chat/completions (SSE).
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = "nanochat.conversations", SETTINGS = "nanochat.settings";
const FIELDS = ["temperature", "top_k", "top_p", "max_tokens", "seed", "system", "api_key"];

const state = {
  conversations: JSON.parse(localStorage.getItem(STORE) || "[]"),
  current: null,
  model: null,
  controller: null,
};

function save() { localStorage.setItem(STORE, JSON.stringify(state.conversations)); }
function conversation() { return state.conversations.find((c) => c.id === state.current); }

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

// --- settings -----------------------------------------------------------------------------------
function loadSettings() {
  const saved = JSON.parse(localStorage.getItem(SETTINGS) || "{}");
  for (const f of FIELDS) if (saved[f] !== undefined) $(f).value = saved[f];
  for (const f of FIELDS) $(f).addEventListener("change", () => {
    localStorage.setItem(SETTINGS, JSON.stringify(Object.fromEntries(FIELDS.map((k) => [k, $(k).value]))));
    if (f === "api_key") connect();
  });
  $("settings-toggle").addEventListener("click", () => {
    const open = $("settings").hidden;
    $("settings").hidden = !open;
    $("settings-toggle").setAttribute("aria-expanded", String(open));
  });
}

function sampling() {
  const number = (id) => ($(id).value === "" ? undefined : Number($(id).value));
  return { temperature: number("temperature"), top_k: number("top_k"), top_p: number("top_p"),
           max_tokens: number("max_tokens"), seed: number("seed") };
}

// --- the model ----------------------------------------------------------------------------------
async function connect() {
  $("model").textContent = "connecting…";
  for (;;) {
    try {
      const health = await fetch("/health");
      if (health.ok) break;
      $("model").textContent = "loading the model…";
    } catch (e) { $("model").textContent = "server unreachable, retrying…"; }
    await new Promise((r) => setTimeout(r, 1000));
  }
  const r = await fetch("/v1/models", { headers: headers() });
  if (!r.ok) { showError(await errorText(r)); $("model").textContent = "no access"; return; }
  state.model = (await r.json()).data[0].id;
  $("model").textContent = state.model;
  $("model").title = state.model;
  hideError();
}

async function errorText(r) { return (await apiError(r)).message; }
async function apiError(r) {
  try { return (await r.json()).error; } catch (e) { return { message: `HTTP ${r.status}` }; }
}
function showError(text) { $("error").textContent = text; $("error").hidden = false; }
function hideError() { $("error").hidden = true; }

// --- rendering ----------------------------------------------------------------------------------
function renderSidebar() {
  const list = $("conversations");
  list.replaceChildren(...state.conversations.map((c) => {
    const li = document.createElement("li");
    const open = document.createElement("button");
    open.type = "button";
    open.textContent = c.title || "New chat";
    open.className = "open";
    if (c.id === state.current) open.setAttribute("aria-current", "true");
    open.addEventListener("click", () => { state.current = c.id; renderAll(); $("prompt").focus(); });
    const del = document.createElement("button");
    del.type = "button";
    del.className = "delete";
    del.textContent = "×";
    del.setAttribute("aria-label", `Delete “${open.textContent}”`);
    del.addEventListener("click", () => {
      state.conversations = state.conversations.filter((x) => x.id !== c.id);
      if (state.current === c.id) state.current = state.conversations[0]?.id ?? null;
      save(); renderAll();
    });
    li.append(open, del);
    return li;
  }));
}

function messageElement(m) {
  const el = document.createElement("article");
  el.className = `message ${m.role}`;
  const who = document.createElement("h2");
  who.className = "visually-hidden";
  who.textContent = m.role === "user" ? "You said" : "nanochat said";
  const body = document.createElement("div");
  body.className = "body";
  el.append(who, body);
  fill(el, m);
  return el;
}

function fill(el, m) {
  const body = el.querySelector(".body");
  if (m.role === "user") body.textContent = m.content;
  else body.innerHTML = Markdown.render(m.display ?? m.content) + (m.tools || []).map((t) =>
    `<p class="tool">calculator: <code>${Markdown.escape(t.expression)}</code> = <code>${Markdown.escape(String(t.output ?? "error"))}</code></p>`).join("");
  if (m.stopped) body.insertAdjacentHTML("beforeend", '<p class="muted">(stopped)</p>');
}

function renderLog() {
  const c = conversation();
  const elements = c ? c.messages.map(messageElement) : [];
  if (c?.skip) elements.splice(c.skip, 0, forgotten(c.skip));
  $("log").replaceChildren(...elements);
  $("log").scrollTop = $("log").scrollHeight;
}

// Where a long chat's oldest turns left the model's context: they stay on the page, unsent.
function forgotten(count) {
  const el = document.createElement("p");
  el.className = "muted forgotten";
  el.textContent = `The model no longer sees the ${count} message${count === 1 ? "" : "s"} above (its context is full).`;
  return el;
}

function renderAll() { renderSidebar(); renderLog(); }

// --- sending ------------------------------------------------------------------------------------
function newChat() {
  const c = { id: `${Date.now()}-${Math.random().toString(36).slice(2, 8)}`, title: "", messages: [] };
  state.conversations.unshift(c);
  state.current = c.id;
  save(); renderAll();
  $("prompt").focus();
  return c;
}

function busy(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
  $("log").setAttribute("aria-busy", String(on));
}

// The reply's request, dropping the oldest turn (a user message and its reply) while the server
// says the conversation is over the model's context: the page's chat then goes on, as the TUI's does.
async function request(c, reply) {
  const system = $("system").value.trim();
  for (;;) {
    const history = c.messages.slice(c.skip || 0, -1).map(({ role, content }) => ({ role, content }));
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: state.controller.signal,
      body: JSON.stringify({ model: state.model, stream: true, stream_options: { include_usage: true },
                             messages: system ? [{ role: "system", content: system }, ...history] : history,
                             ...sampling() }),
    });
    if (r.ok) return r;
    const error = await apiError(r);
    if (error.code !== "context_length_exceeded" || history.length < 3) throw new Error(error.message);
    c.skip = (c.skip || 0) + 2;
    renderLog();
  }
}

async function send(text) {
  const c = conversation() || newChat();
  if (!c.title) c.title = text.slice(0, 40);
  c.messages.push({ role: "user", content: text });
  const reply = { role: "assistant", content: "", tools: [] };
  c.messages.push(reply);
  const skipped = c.skip;
  save(); renderAll();
  state.controller = new AbortController();
  busy(true); hideError();
  const started = performance.now();
  let first = null, chunks = 0, pending = false;
  const el = () => $("log").lastElementChild;
  const repaint = () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => { pending = false; fill(el(), reply); $("log").scrollTop = $("log").scrollHeight; });
  };
  try {
    const r = await request(c, reply);
    const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      const events = buffer.split("\n\n");
      buffer = events.pop();
      for (const event of events) {
        const data = event.replace(/^data: /, "");
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage && first) {
          const seconds = (performance.now() - first) / 1000;
          if (seconds > 0 && chunk.usage.completion_tokens > 1)
            $("speed").textContent = `${((chunk.usage.completion_tokens - 1) / seconds).toFixed(1)} tok/s`;
        }
        const delta = chunk.choices?.[0]?.delta;
        if (!delta) continue;
        if (delta.content) {
          first = first || performance.now();
          chunks += 1;
          reply.content += delta.content;
          // The prose alone (the calculator call is drawn from nanochat_tool_call instead).
          reply.display = (reply.display ?? "") + (delta.nanochat_text ?? delta.content);
          const seconds = (performance.now() - first) / 1000;
          if (seconds > 0.2) $("speed").textContent = `${(chunks / seconds).toFixed(1)} tok/s`;
        }
        if (delta.nanochat_tool_call) reply.tools.push(delta.nanochat_tool_call);
        repaint();
      }
    }
  } catch (e) {
    if (e.name === "AbortError") reply.stopped = true;
    else showError(e.message || String(e));
  } finally {
    state.controller = null;
    busy(false);
    if (!reply.content && !reply.stopped) {
      // Nothing came back (an error): the message goes back to the box, so a retry sends it again.
      c.messages.splice(-2, 2);
      c.skip = skipped;
      if (!$("prompt").value) $("prompt").value = text;
      renderLog();
    } else fill(el(), reply);
    save();
    $("speed").title = `time to first token ${first ? ((first - started) / 1000).toFixed(2) : "-"} s`;
    $("prompt").focus();
  }
}

// --- wiring -------------------------------------------------------------------------------------
window.addEventListener("DOMContentLoaded", () => {
  loadSettings();
  state.current = state.conversations[0]?.id ?? null;
  renderAll();
  connect();
  $("new-chat").addEventListener("click", newChat);
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || state.controller) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("composer").requestSubmit(); }
  });
  $("stop").addEventListener("click", () => state.controller?.abort());
  document.addEventListener("keydown", (e) => { if (e.key === "Escape" && state.controller) state.controller.abort(); });
  $("prompt").focus();
});
