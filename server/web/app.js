// a8w8-serve chat page: plain JavaScript, no build step. It talks only to this server's own
// OpenAI-compatible API (relative URLs, so it also works behind a path prefix). Model output is rendered
// by markdown-it with raw HTML disabled and reasoning is inserted as text: nothing the model writes
// becomes markup of its own.
"use strict";

(() => {
  const STORAGE = { chats: "a8w8.chats", settings: "a8w8.settings", apiKey: "a8w8.apiKey", current: "a8w8.current" };
  const HEALTH_RETRY_MS = 2000; // how often the page asks again while the server loads its model
  const TITLE_CHARS = 48; // a chat's title is the start of its first message
  const NEAR_BOTTOM_PX = 80; // follow the stream only while the reader is at the end of the conversation
  // Sampling left empty is left out of the request: the server's defaults (the model's generation config) apply.
  // Max tokens has a default so that a runaway answer ends by itself; empty means "until the model stops".
  const DEFAULT_SETTINGS = { systemPrompt: "", temperature: "", topP: "", maxTokens: "1024", thinking: "default", extraBody: "" };
  // 2: max tokens defaults to 1024. Settings saved before held maxTokens "" as the old default, not as a choice.
  const SETTINGS_VERSION = 2;

  const $ = (id) => document.getElementById(id);
  const el = {
    app: $("app"), sidebar: $("sidebar"), scrim: $("scrim"), chatList: $("chat-list"), newChat: $("new-chat"),
    openSettings: $("open-settings"), toggleSidebar: $("toggle-sidebar"), modelName: $("model-name"),
    status: $("server-status"), messages: $("messages"), composer: $("composer"), input: $("input"),
    send: $("send"), stop: $("stop"), settings: $("settings"), settingsForm: $("settings-form"),
    settingsError: $("settings-error"), settingsCancel: $("settings-cancel"), keyDialog: $("api-key-dialog"),
    keyForm: $("api-key-form"), keyReason: $("api-key-reason"), keyInput: $("api-key-input"),
  };

  const md = window.markdownit({ html: false, linkify: true, breaks: false });
  const defaultLinkOpen = md.renderer.rules.link_open || ((tokens, i, options, env, self) => self.renderToken(tokens, i, options));
  md.renderer.rules.link_open = (tokens, i, options, env, self) => {
    tokens[i].attrSet("target", "_blank");
    tokens[i].attrSet("rel", "noopener noreferrer");
    return defaultLinkOpen(tokens, i, options, env, self);
  };

  // ---- state kept in localStorage ----
  function load(key, fallback) {
    try {
      const raw = localStorage.getItem(key);
      return raw === null ? fallback : JSON.parse(raw);
    } catch (e) {
      return fallback;
    }
  }
  function loadSettings() {
    const saved = load(STORAGE.settings, {});
    if (saved && saved.version !== SETTINGS_VERSION && saved.maxTokens === "") delete saved.maxTokens;
    return Object.assign({}, DEFAULT_SETTINGS, saved, { version: SETTINGS_VERSION });
  }
  const state = {
    chats: load(STORAGE.chats, []),
    settings: loadSettings(),
    apiKey: localStorage.getItem(STORAGE.apiKey) || "",
    currentId: localStorage.getItem(STORAGE.current),
    model: null,
    maxModelLen: null,
    streaming: null, // {controller, message} while an answer streams
  };
  // Every write to localStorage goes through here: a full quota (a few MB per origin) is reported, and the
  // page goes on with what it holds in memory.
  function store(key, value) {
    try {
      if (value === null) localStorage.removeItem(key);
      else localStorage.setItem(key, value);
    } catch (e) {
      setStatus("not saved: browser storage full (delete old chats)", true);
    }
  }
  function saveChats() {
    store(STORAGE.chats, JSON.stringify(state.chats));
    store(STORAGE.current, state.currentId);
  }
  function currentChat() {
    return state.chats.find((c) => c.id === state.currentId) || null;
  }
  function newChat() {
    const chat = { id: `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`, title: "New chat", messages: [] };
    state.chats.unshift(chat);
    state.currentId = chat.id;
    saveChats();
    return chat;
  }

  // ---- HTTP ----
  function headers() {
    const h = { "Content-Type": "application/json" };
    if (state.apiKey) h.Authorization = `Bearer ${state.apiKey}`;
    return h;
  }
  async function errorText(response) {
    let message = response.statusText || "request failed";
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) message = body.error.message;
    } catch (e) { /* not JSON: keep the status text */ }
    return `Error ${response.status}: ${message}`;
  }
  function askApiKey(reason) {
    el.keyReason.textContent = reason;
    el.keyInput.value = state.apiKey;
    return new Promise((resolve) => {
      const onSubmit = (event) => {
        event.preventDefault();
        const key = el.keyInput.value.trim();
        if (!key) return;
        el.keyForm.removeEventListener("submit", onSubmit);
        state.apiKey = key;
        store(STORAGE.apiKey, key);
        el.keyDialog.close();
        resolve(key);
      };
      el.keyForm.addEventListener("submit", onSubmit);
      if (!el.keyDialog.open) el.keyDialog.showModal();
      el.keyInput.focus();
    });
  }
  // fetch that asks for the API key (once per refusal) when the server answers 401.
  async function apiFetch(path, init) {
    for (;;) {
      const response = await fetch(path, Object.assign({}, init, { headers: headers() }));
      if (response.status !== 401) return response;
      const message = await errorText(response);
      await askApiKey(state.apiKey ? `The server refused this key (${message}). Enter another one.` : "This server asks for an API key.");
    }
  }

  function setStatus(text, bad) {
    el.status.textContent = text;
    el.status.classList.toggle("bad", !!bad);
  }
  async function connect() {
    try {
      const health = await fetch("health");
      if (!health.ok) {
        let detail = "loading";
        try { detail = (await health.json()).status || detail; } catch (e) { /* keep */ }
        setStatus(`server ${detail}…`, false);
        setTimeout(connect, HEALTH_RETRY_MS);
        return;
      }
      const response = await apiFetch("v1/models", { method: "GET" });
      if (!response.ok) {
        setStatus(await errorText(response), true);
        setTimeout(connect, HEALTH_RETRY_MS);
        return;
      }
      const models = await response.json();
      state.model = models.data[0].id;
      state.maxModelLen = models.data[0].max_model_len || null;
      el.modelName.textContent = state.model;
      el.modelName.title = models.data[0].max_model_len ? `context ${models.data[0].max_model_len} tokens` : "";
      setStatus("ready", false);
      updateComposer();
    } catch (e) {
      setStatus("server unreachable, retrying…", true);
      setTimeout(connect, HEALTH_RETRY_MS);
    }
  }

  // ---- the request ----
  function numberSetting(value) {
    return value === "" || value === null || value === undefined ? undefined : Number(value);
  }
  function requestBody(chat) {
    const s = state.settings;
    const messages = [];
    if (s.systemPrompt.trim()) messages.push({ role: "system", content: s.systemPrompt });
    for (const m of chat.messages) {
      if (m.error && !m.content) continue; // an error shown in the page is not part of the conversation
      messages.push({ role: m.role, content: m.content });
    }
    const body = { model: state.model, messages, stream: true, stream_options: { include_usage: true } };
    const temperature = numberSetting(s.temperature), topP = numberSetting(s.topP), maxTokens = numberSetting(s.maxTokens);
    if (temperature !== undefined) body.temperature = temperature;
    if (topP !== undefined) body.top_p = topP;
    if (maxTokens !== undefined) body.max_tokens = maxTokens;
    if (s.thinking !== "default") body.chat_template_kwargs = { enable_thinking: s.thinking === "on" };
    const extra = s.extraBody.trim() ? JSON.parse(s.extraBody) : {};
    for (const [key, value] of Object.entries(extra)) {
      if (key === "chat_template_kwargs" && body.chat_template_kwargs && value && typeof value === "object") {
        body.chat_template_kwargs = Object.assign({}, body.chat_template_kwargs, value);
      } else {
        body[key] = value;
      }
    }
    return body;
  }

  // Server-sent events: sse-starlette separates events with CRLF CRLF; comment lines (": ping") are keep-alives.
  function* sseEvents(buffer) {
    const parts = buffer.text.split(/\r\n\r\n|\n\n|\r\r/);
    buffer.text = parts.pop();
    for (const part of parts) {
      const data = part.split(/\r\n|\n|\r/).filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(line.startsWith("data: ") ? 6 : 5)).join("\n");
      if (data) yield data;
    }
  }

  // The max tokens setting is cut to the room the conversation leaves in the context (a server with a short
  // context would refuse every request whose prompt and max_tokens do not fit): /tokenize counts the prompt.
  async function fitMaxTokens(request) {
    if (!request.max_tokens || !state.maxModelLen) return;
    try {
      const ask = { model: request.model, messages: request.messages, add_generation_prompt: true };
      if (request.chat_template_kwargs) ask.chat_template_kwargs = request.chat_template_kwargs;
      if (request.tools) ask.tools = request.tools;
      const response = await apiFetch("tokenize", { method: "POST", body: JSON.stringify(ask) });
      if (!response.ok) return; // the chat request will say what is wrong
      const room = state.maxModelLen - (await response.json()).count;
      if (room >= 1 && room < request.max_tokens) request.max_tokens = room;
    } catch (e) {
      /* sent as it is */
    }
  }

  async function streamAnswer(chat) {
    let request = null, body = null, bodyError = null;
    try {
      request = requestBody(chat); // the history as it is before the answer starts
    } catch (e) {
      bodyError = `Settings: the extra request fields are not valid JSON (${e.message})`;
    }
    const message = { role: "assistant", content: "", reasoning: "", stats: null };
    chat.messages.push(message);
    const controller = new AbortController();
    state.streaming = { controller, message };
    updateComposer();
    render();
    let sent = performance.now();
    let firstAt = null, lastAt = null, reasoningStart = null, reasoningEnd = null, deltas = 0, usage = null;
    try {
      if (bodyError) throw new Error(bodyError);
      await fitMaxTokens(request);
      body = JSON.stringify(request);
      sent = performance.now(); // (TTFT counts from the chat request)
      const response = await apiFetch("v1/chat/completions", { method: "POST", body, signal: controller.signal });
      if (!response.ok) {
        message.error = await errorText(response);
        return;
      }
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      const buffer = { text: "" };
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer.text += decoder.decode(value, { stream: true });
        for (const data of sseEvents(buffer)) {
          if (data === "[DONE]") continue;
          const event = JSON.parse(data);
          if (event.error) {
            message.error = `Error ${event.error.code || ""}: ${event.error.message}`.replace(" :", ":");
            continue;
          }
          if (event.usage) usage = event.usage;
          for (const choice of event.choices || []) {
            const delta = choice.delta || {};
            const now = performance.now();
            if (delta.reasoning_content) {
              if (reasoningStart === null) reasoningStart = now;
              reasoningEnd = now;
              message.reasoning += delta.reasoning_content;
            }
            if (delta.content) {
              message.content += delta.content;
              if (reasoningStart !== null && message.thoughtSeconds === undefined) {
                message.thoughtSeconds = (reasoningEnd - reasoningStart) / 1000;
              }
            }
            if (delta.content || delta.reasoning_content) {
              deltas += 1;
              if (firstAt === null) firstAt = now;
              lastAt = now;
            }
            if (choice.finish_reason) message.finishReason = choice.finish_reason;
          }
          scheduleRender();
        }
      }
    } catch (e) {
      if (e.name === "AbortError") {
        message.stopped = true;
      } else {
        message.error = e.message || String(e);
      }
    } finally {
      if (reasoningStart !== null && message.thoughtSeconds === undefined) {
        message.thoughtSeconds = (reasoningEnd - reasoningStart) / 1000;
      }
      const tokens = usage ? usage.completion_tokens : deltas;
      if (firstAt !== null) {
        const span = (lastAt - firstAt) / 1000;
        message.stats = {
          ttftMs: Math.round(firstAt - sent),
          tokens,
          exact: !!usage, // without the usage chunk (a stopped answer) the count is of streamed deltas
          tokensPerSecond: tokens > 1 && span > 0 ? (tokens - 1) / span : null,
          promptTokens: usage ? usage.prompt_tokens : null,
        };
      }
      state.streaming = null;
      saveChats();
      updateComposer();
      render();
    }
  }

  async function submit() {
    const text = el.input.value;
    if (!text.trim() || state.streaming || !state.model) return;
    const chat = currentChat() || newChat();
    if (chat.messages.length === 0) chat.title = text.trim().slice(0, TITLE_CHARS);
    chat.messages.push({ role: "user", content: text });
    el.input.value = "";
    autoResize();
    saveChats();
    renderChatList();
    await streamAnswer(chat);
  }

  // ---- rendering ----
  let renderPending = false;
  function scheduleRender() {
    // One DOM update per animation frame however many chunks arrived in it.
    if (renderPending) return;
    renderPending = true;
    requestAnimationFrame(() => {
      renderPending = false;
      renderLive();
    });
  }
  // While an answer streams only its own element is rebuilt (earlier messages are not re-parsed).
  function renderLive() {
    const chat = currentChat();
    const live = state.streaming;
    const node = el.messages.lastElementChild;
    if (!chat || !live || chat.messages[chat.messages.length - 1] !== live.message || !node || !node.classList.contains("assistant")) {
      render();
      return;
    }
    const box = el.messages;
    const follow = box.scrollHeight - box.scrollTop - box.clientHeight < NEAR_BOTTOM_PX;
    node.replaceWith(messageElement(chat, live.message, chat.messages.length - 1));
    if (follow) box.scrollTop = box.scrollHeight;
  }
  function button(label, onClick, className) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = label;
    if (className) b.className = className;
    b.addEventListener("click", onClick);
    return b;
  }
  function statsText(m) {
    const parts = [];
    if (m.stats) {
      parts.push(`${m.stats.exact === false ? "≈" : ""}${m.stats.tokens} tokens`);
      if (m.stats.tokensPerSecond !== null) parts.push(`${m.stats.tokensPerSecond.toFixed(1)} tok/s`);
      parts.push(`TTFT ${m.stats.ttftMs} ms`);
    }
    if (m.stopped) parts.push("stopped");
    else if (m.finishReason === "length") parts.push("cut at max tokens");
    return parts.join(" · ");
  }
  function messageElement(chat, m, index) {
    const last = index === chat.messages.length - 1;
    const live = state.streaming && state.streaming.message === m;
    const div = document.createElement("div");
    div.className = `message ${m.role}`;
    if (m.role === "user") {
      div.textContent = m.content;
      const lastUser = chat.messages.slice(index + 1).every((n) => n.role !== "user");
      if (lastUser && !state.streaming) {
        const actions = document.createElement("div");
        actions.className = "actions";
        actions.append(button("Edit", () => editLast(chat, index), "edit"));
        div.append(actions);
      }
      return div;
    }
    if (m.error && !m.content && !m.reasoning) {
      div.classList.add("error");
      div.textContent = m.error;
    } else {
      if (m.reasoning) {
        const details = document.createElement("details");
        details.className = "thinking";
        const thinkingNow = live && !m.content;
        // Open while the model thinks, closed once it answers, unless the reader chose otherwise.
        details.open = m.thinkingOpen === undefined ? thinkingNow : m.thinkingOpen;
        const summary = document.createElement("summary");
        summary.addEventListener("click", () => { m.thinkingOpen = !details.open; });
        summary.textContent = thinkingNow ? "Thinking…" : `Thought for ${(m.thoughtSeconds || 0).toFixed(1)} s`;
        const text = document.createElement("div");
        text.className = "thinking-text";
        text.textContent = m.reasoning; // as text: reasoning is never parsed as markup
        details.append(summary, text);
        div.append(details);
      }
      const content = document.createElement("div");
      content.className = "content";
      content.innerHTML = md.render(m.content); // markdown-it with html:false escapes any HTML in the answer
      div.append(content);
      if (m.error) {
        const note = document.createElement("div");
        note.className = "message error";
        note.textContent = m.error;
        div.append(note);
      }
    }
    const stats = statsText(m);
    if (stats) {
      const s = document.createElement("div");
      s.className = "stats";
      s.textContent = stats;
      div.append(s);
    }
    if (!live) {
      const actions = document.createElement("div");
      actions.className = "actions";
      if (m.content) actions.append(button("Copy", () => navigator.clipboard && navigator.clipboard.writeText(m.content), "copy"));
      if (last && !state.streaming) actions.append(button("Regenerate", () => regenerate(chat), "regenerate"));
      if (actions.childElementCount) div.append(actions);
    }
    return div;
  }
  function render() {
    const chat = currentChat();
    const box = el.messages;
    const follow = box.scrollHeight - box.scrollTop - box.clientHeight < NEAR_BOTTOM_PX;
    if (!chat || chat.messages.length === 0) {
      const empty = document.createElement("p");
      empty.className = "empty";
      empty.textContent = state.model ? `Ask ${state.model} something.` : "Waiting for the server…";
      box.replaceChildren(empty);
    } else {
      box.replaceChildren(...chat.messages.map((m, i) => messageElement(chat, m, i)));
    }
    if (follow) box.scrollTop = box.scrollHeight;
  }
  function renderChatList() {
    el.chatList.replaceChildren(...state.chats.map((chat) => {
      const li = document.createElement("li");
      li.className = chat.id === state.currentId ? "active" : "";
      li.dataset.chatId = chat.id;
      const title = button(chat.title, () => selectChat(chat.id), "chat-title");
      title.title = chat.title;
      const del = button("×", () => deleteChat(chat.id), "chat-delete");
      del.setAttribute("aria-label", `Delete chat ${chat.title}`);
      li.append(title, del);
      return li;
    }));
  }
  function updateComposer() {
    const busy = !!state.streaming;
    el.send.hidden = busy;
    el.stop.hidden = !busy;
    el.send.disabled = !state.model;
  }
  function closeSidebar() {
    el.app.classList.remove("sidebar-open");
  }

  // ---- actions ----
  function selectChat(id) {
    if (state.streaming) return;
    state.currentId = id;
    saveChats();
    renderChatList();
    render();
    closeSidebar();
  }
  function deleteChat(id) {
    if (state.streaming && currentChat() && currentChat().id === id) return;
    state.chats = state.chats.filter((c) => c.id !== id);
    if (state.currentId === id) state.currentId = state.chats.length ? state.chats[0].id : null;
    saveChats();
    renderChatList();
    render();
  }
  function editLast(chat, index) {
    el.input.value = chat.messages[index].content;
    chat.messages.splice(index);
    saveChats();
    render();
    autoResize();
    el.input.focus();
  }
  function regenerate(chat) {
    while (chat.messages.length && chat.messages[chat.messages.length - 1].role === "assistant") chat.messages.pop();
    if (!chat.messages.length) return;
    streamAnswer(chat);
  }
  function autoResize() {
    el.input.style.height = "auto";
    el.input.style.height = `${el.input.scrollHeight}px`;
  }
  function openSettings() {
    const form = el.settingsForm.elements;
    for (const key of Object.keys(DEFAULT_SETTINGS)) form[key].value = state.settings[key];
    form.apiKey.value = state.apiKey;
    el.settingsError.textContent = "";
    el.settings.showModal();
  }
  function saveSettings(event) {
    event.preventDefault();
    const form = el.settingsForm.elements;
    const next = {};
    for (const key of Object.keys(DEFAULT_SETTINGS)) next[key] = form[key].value;
    next.version = SETTINGS_VERSION;
    if (next.extraBody.trim()) {
      let extra;
      try {
        extra = JSON.parse(next.extraBody);
      } catch (e) {
        el.settingsError.textContent = `Extra request fields: not valid JSON (${e.message})`;
        return;
      }
      if (extra === null || typeof extra !== "object" || Array.isArray(extra)) {
        el.settingsError.textContent = "Extra request fields: give a JSON object, e.g. {\"top_k\": 20}";
        return;
      }
    }
    state.settings = next;
    store(STORAGE.settings, JSON.stringify(next));
    state.apiKey = form.apiKey.value.trim();
    store(STORAGE.apiKey, state.apiKey || null);
    el.settings.close();
  }

  // ---- wiring ----
  el.composer.addEventListener("submit", (event) => { event.preventDefault(); submit(); });
  el.input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      submit();
    }
  });
  el.input.addEventListener("input", autoResize);
  el.stop.addEventListener("click", () => { if (state.streaming) state.streaming.controller.abort(); });
  el.newChat.addEventListener("click", () => {
    if (state.streaming) return;
    const chat = currentChat();
    if (!chat || chat.messages.length) newChat();
    renderChatList();
    render();
    closeSidebar();
    el.input.focus();
  });
  el.openSettings.addEventListener("click", () => { closeSidebar(); openSettings(); });
  el.settingsForm.addEventListener("submit", saveSettings);
  el.settingsCancel.addEventListener("click", () => el.settings.close());
  el.toggleSidebar.addEventListener("click", () => el.app.classList.toggle("sidebar-open"));
  el.scrim.addEventListener("click", closeSidebar);
  el.scrim.hidden = false; // shown by CSS only while the sidebar overlays the page

  if (!currentChat()) state.currentId = state.chats.length ? state.chats[0].id : null;
  renderChatList();
  render();
  updateComposer();
  connect();
})();
