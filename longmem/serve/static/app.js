// The chat page: plain JavaScript against the server's own API (no build step, nothing from a CDN).
"use strict";
const $ = (id) => document.getElementById(id);
const history = [];  // this page's conversation, sent whole with every request (the API is stateless)

$("key").value = localStorage.getItem("longmem-key") || "";
$("key").addEventListener("change", () => { localStorage.setItem("longmem-key", $("key").value); refresh(); });

function headers() {
  const h = { "Content-Type": "application/json" };
  if ($("key").value) h["Authorization"] = "Bearer " + $("key").value;
  return h;
}

async function api(method, path, body) {
  const r = await fetch(path, { method, headers: headers(), body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await r.json();
  if (!r.ok) throw new Error(data.error ? data.error.message : r.statusText);
  return data;
}

async function refresh(select) {
  try {
    const models = await api("GET", "/v1/models");
    $("model").textContent = models.data[0].id;
    const memories = await api("GET", "/v1/memories");
    const picker = $("memory"), keep = select !== undefined ? select : picker.value;
    picker.replaceChildren(new Option("(no memory)", ""));
    for (const m of memories.data) picker.add(new Option(m.error ? `${m.name} (unusable)` : `${m.name} (${m.tokens} tokens)`, m.name));
    picker.value = keep;
    showInfo(memories.data.find((m) => m.name === picker.value));
  } catch (e) { status(e.message); }
}

function showInfo(m) {
  $("memory-info").textContent = m ? (m.error || `${m.tokens} tokens from ${m.sources.length} source(s), ${(m.bytes / 1e6).toFixed(1)} MB`) : "";
}

function status(text) { $("status").textContent = text; }

function turn(role, text) {
  const div = document.createElement("div");
  div.className = "turn " + role;
  div.textContent = text;
  $("log").append(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

async function send(event) {
  event.preventDefault();
  const text = $("message").value.trim();
  if (!text) return;
  $("message").value = "";
  $("send").disabled = true;
  turn("user", text);
  history.push({ role: "user", content: text });
  const out = turn("assistant", "");
  const body = { model: $("model").textContent, messages: history, stream: true, temperature: 0 };
  if ($("memory").value) { body.memory = $("memory").value; body.remember = $("remember").checked; }
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    if (!r.ok) throw new Error((await r.json()).error.message);
    const reader = r.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {  // one server-sent event
        const line = buffer.slice(0, cut).replace(/^data: /, "");
        buffer = buffer.slice(cut + 2);
        if (line === "[DONE]") continue;
        const chunk = JSON.parse(line);
        if (chunk.error) throw new Error(chunk.error.message);
        out.textContent += chunk.choices[0].delta.content || "";
      }
    }
    history.push({ role: "assistant", content: out.textContent });
    if (body.remember) refresh();
  } catch (e) {
    out.className = "turn error";
    out.textContent = e.message;
    history.pop();
  } finally {
    $("send").disabled = false;
  }
}

async function addDocument() {
  const name = $("new-name").value.trim() || $("memory").value;
  const text = $("document").value;
  if (!name) return status("pick a memory or type a new memory's name");
  if (!text.trim()) return status("paste some text first");
  $("add").disabled = true;
  status(`adding to ${name}…`);
  try {
    const r = await api("POST", `/v1/memories/${encodeURIComponent(name)}/documents`,
                        { text, source: $("source").value || "chat page" });
    status(`added ${r.tokens_added} tokens to ${name} (${r.tokens} stored)`);
    $("document").value = "";
    $("new-name").value = "";
    await refresh(name);
  } catch (e) { status(e.message); }
  finally { $("add").disabled = false; }
}

$("ask").addEventListener("submit", send);
$("message").addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) send(e); });
$("memory").addEventListener("change", () => refresh());
$("add").addEventListener("click", addDocument);
refresh();
