// The chat page: a conversation streamed from POST /v1/chat/completions (server-sent events).
// Plain browser JavaScript, no dependencies. Text is always inserted with textContent.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const app = document.querySelector(".app");
  const els = {
    messages: $("messages"), empty: $("empty"), composer: $("composer"), prompt: $("prompt"),
    send: $("send"), stop: $("stop"), newChat: $("new-chat"), fileInput: $("file-input"),
    attachments: $("attachments"), modelName: $("model-name"), settings: $("settings"),
    toggleSettings: $("toggle-settings"), closeSettings: $("close-settings"), scrim: $("scrim"),
    system: $("system-prompt"), temperature: $("temperature"), temperatureValue: $("temperature-value"),
    topP: $("top-p"), topPValue: $("top-p-value"), maxTokens: $("max-tokens"), seed: $("seed"),
    apiKey: $("api-key"), stats: $("stats"),
  };

  const MAX_IMAGE_SIDE = 2048; // larger images are scaled down in the browser before sending
  const state = {
    model: null,
    history: [], // OpenAI messages of the conversation (without the system prompt)
    pending: [], // data URLs of images attached to the next message
    controller: null, // AbortController of the reply in flight
    conversation: 0, // counts "New chat"s: a reply that ends after one belongs to no conversation
  };

  // ----- settings (kept in localStorage) -----
  const SETTINGS = ["system", "temperature", "topP", "maxTokens", "seed", "apiKey"];
  function loadSettings() {
    let saved = {};
    try { saved = JSON.parse(localStorage.getItem("llama4-chat-settings") || "{}"); } catch (_) { /* ignore */ }
    for (const k of SETTINGS) if (saved[k] !== undefined) els[k].value = saved[k];
    showRanges();
  }
  function saveSettings() {
    const out = {};
    for (const k of SETTINGS) out[k] = els[k].value;
    try { localStorage.setItem("llama4-chat-settings", JSON.stringify(out)); } catch (_) { /* private mode */ }
  }
  function showRanges() {
    els.temperatureValue.textContent = Number(els.temperature.value).toFixed(2);
    els.topPValue.textContent = Number(els.topP.value).toFixed(2);
  }
  for (const k of SETTINGS) els[k].addEventListener("input", () => { showRanges(); saveSettings(); });
  els.apiKey.addEventListener("change", loadModel);

  function headers() {
    const h = { "Content-Type": "application/json" };
    if (els.apiKey.value.trim()) h.Authorization = "Bearer " + els.apiKey.value.trim();
    return h;
  }

  // ----- settings panel -----
  const wide = () => window.matchMedia("(min-width: 901px)").matches;
  function setSettingsOpen(open) {
    if (wide()) app.classList.toggle("settings-closed", !open);
    else app.classList.toggle("settings-open", open);
    els.toggleSettings.setAttribute("aria-expanded", String(open));
  }
  function settingsOpen() {
    return wide() ? !app.classList.contains("settings-closed") : app.classList.contains("settings-open");
  }
  els.toggleSettings.addEventListener("click", () => setSettingsOpen(!settingsOpen()));
  els.closeSettings.addEventListener("click", () => setSettingsOpen(false));
  els.scrim.addEventListener("click", () => setSettingsOpen(false));
  els.scrim.hidden = false;

  // ----- model -----
  async function loadModel() {
    try {
      const r = await fetch("/v1/models", { headers: headers() });
      if (r.status === 401) {
        setModel("API key needed (Settings)", "offline");
        return;
      }
      const body = await r.json();
      state.model = body.data[0].id;
      setModel(state.model + (body.data[0].vision ? " · vision" : ""), "online");
    } catch (e) {
      setModel("server unreachable", "offline");
    }
  }
  function setModel(text, cls) {
    els.modelName.textContent = text;
    els.modelName.className = "model-name " + cls;
  }

  // ----- rendering -----
  function scrollToEnd() { els.messages.scrollTop = els.messages.scrollHeight; }

  function addMessage(role, text, images) {
    els.empty.hidden = true;
    const row = document.createElement("div");
    row.className = "message " + role;
    const avatar = document.createElement("div");
    avatar.className = "avatar";
    avatar.textContent = role === "user" ? "You" : role === "assistant" ? "L4" : "!";
    const bubble = document.createElement("div");
    bubble.className = "bubble";
    if (images && images.length) {
      const box = document.createElement("div");
      box.className = "images";
      for (const src of images) {
        const img = document.createElement("img");
        img.src = src;
        img.alt = "attached image";
        box.appendChild(img);
      }
      bubble.appendChild(box);
    }
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = text || "";
    bubble.appendChild(body);
    row.append(avatar, bubble);
    els.messages.appendChild(row);
    scrollToEnd();
    return { row, bubble, body };
  }

  function addMeta(view, items) {
    const meta = document.createElement("div");
    meta.className = "meta";
    for (const [text, cls] of items) {
      const span = document.createElement("span");
      span.className = cls || "";
      span.textContent = text;
      meta.appendChild(span);
    }
    view.bubble.appendChild(meta);
  }

  function showError(message) {
    const view = addMessage("error", message);
    view.row.classList.add("error");
  }

  // ----- attachments -----
  function renderAttachments() {
    els.attachments.replaceChildren();
    els.attachments.hidden = state.pending.length === 0;
    state.pending.forEach((src, i) => {
      const thumb = document.createElement("div");
      thumb.className = "thumb";
      const img = document.createElement("img");
      img.src = src;
      img.alt = "image to send";
      const remove = document.createElement("button");
      remove.type = "button";
      remove.title = "Remove image";
      remove.textContent = "×";
      remove.addEventListener("click", () => { state.pending.splice(i, 1); renderAttachments(); });
      thumb.append(img, remove);
      els.attachments.appendChild(thumb);
    });
  }

  function readAsDataURL(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(file);
    });
  }

  // Scale a large image down (keeps requests small; the model tiles it anyway).
  function shrink(dataURL) {
    return new Promise((resolve) => {
      const img = new Image();
      img.onload = () => {
        const side = Math.max(img.naturalWidth, img.naturalHeight);
        if (side <= MAX_IMAGE_SIDE) return resolve(dataURL);
        const scale = MAX_IMAGE_SIDE / side;
        const canvas = document.createElement("canvas");
        canvas.width = Math.round(img.naturalWidth * scale);
        canvas.height = Math.round(img.naturalHeight * scale);
        canvas.getContext("2d").drawImage(img, 0, 0, canvas.width, canvas.height);
        resolve(canvas.toDataURL("image/jpeg", 0.9));
      };
      img.onerror = () => resolve(dataURL); // let the server say what is wrong with it
      img.src = dataURL;
    });
  }

  async function addFiles(files) {
    for (const file of files) {
      if (!file.type.startsWith("image/")) {
        showError(`"${file.name}" is not an image.`);
        continue;
      }
      try {
        state.pending.push(await shrink(await readAsDataURL(file)));
      } catch (e) {
        showError(`Could not read "${file.name}": ${e}`);
      }
    }
    renderAttachments();
  }
  els.fileInput.addEventListener("change", () => { addFiles([...els.fileInput.files]); els.fileInput.value = ""; });
  els.prompt.addEventListener("paste", (e) => {
    const files = [...(e.clipboardData?.files || [])].filter((f) => f.type.startsWith("image/"));
    if (files.length) { e.preventDefault(); addFiles(files); }
  });
  els.composer.addEventListener("dragover", (e) => { e.preventDefault(); els.composer.classList.add("dragging"); });
  els.composer.addEventListener("dragleave", () => els.composer.classList.remove("dragging"));
  els.composer.addEventListener("drop", (e) => {
    e.preventDefault();
    els.composer.classList.remove("dragging");
    addFiles([...e.dataTransfer.files]);
  });

  // ----- composer -----
  function autosize() {
    els.prompt.style.height = "auto";
    els.prompt.style.height = Math.min(els.prompt.scrollHeight, 200) + "px";
  }
  els.prompt.addEventListener("input", autosize);
  els.prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      els.composer.requestSubmit();
    }
  });
  els.composer.addEventListener("submit", (e) => { e.preventDefault(); send(); });
  els.stop.addEventListener("click", () => state.controller?.abort());
  els.newChat.addEventListener("click", () => {
    state.controller?.abort();
    state.conversation += 1;
    state.history = [];
    state.pending = [];
    renderAttachments();
    els.messages.replaceChildren(els.empty);
    els.empty.hidden = false;
    els.stats.textContent = "";
    els.prompt.value = "";
    autosize();
    els.prompt.focus();
  });

  function setBusy(busy) {
    els.send.hidden = busy;
    els.stop.hidden = !busy;
  }

  function requestBody(messages) {
    const body = {
      messages,
      stream: true,
      stream_options: { include_usage: true },
      temperature: Number(els.temperature.value),
      top_p: Number(els.topP.value),
    };
    if (state.model) body.model = state.model;
    const maxTokens = parseInt(els.maxTokens.value, 10);
    if (maxTokens > 0) body.max_tokens = maxTokens;
    const seed = parseInt(els.seed.value, 10);
    if (Number.isFinite(seed)) body.seed = seed;
    return body;
  }

  async function send() {
    const text = els.prompt.value.trim();
    if (state.controller || (!text && !state.pending.length)) return;
    const conversation = state.conversation;
    const images = state.pending;
    state.pending = [];
    renderAttachments();
    els.prompt.value = "";
    autosize();

    const content = images.length
      ? [...images.map((url) => ({ type: "image_url", image_url: { url } })), ...(text ? [{ type: "text", text }] : [])]
      : text;
    addMessage("user", text, images);
    const userMessage = { role: "user", content };
    const messages = [];
    if (els.system.value.trim()) messages.push({ role: "system", content: els.system.value.trim() });
    messages.push(...state.history, userMessage);

    const view = addMessage("assistant", "");
    view.row.classList.add("streaming");
    const typing = document.createElement("div");
    typing.className = "typing";
    typing.innerHTML = "<span></span><span></span><span></span>";
    view.bubble.insertBefore(typing, view.body);

    const controller = new AbortController();
    state.controller = controller;
    setBusy(true);
    let reply = "";
    let finish = null;
    let usage = null;
    let failure = null;
    const started = performance.now();
    let firstToken = null;
    try {
      const r = await fetch("/v1/chat/completions", {
        method: "POST", headers: headers(), body: JSON.stringify(requestBody(messages)), signal: controller.signal,
      });
      if (!r.ok) {
        let message = `${r.status} ${r.statusText}`;
        try { message = (await r.json()).error.message || message; } catch (_) { /* not JSON */ }
        if (r.status === 401) message += " (set the API key in Settings)";
        throw new Error(message);
      }
      const reader = r.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data:")) continue;
            const data = line.slice(5).trim();
            if (data === "[DONE]") continue;
            const chunk = JSON.parse(data);
            if (chunk.error) throw new Error(chunk.error.message);
            if (chunk.usage) usage = chunk.usage;
            for (const choice of chunk.choices || []) {
              const delta = choice.delta || {};
              if (delta.content) {
                if (firstToken === null) { firstToken = performance.now(); typing.remove(); }
                reply += delta.content;
                view.body.textContent = reply;
                scrollToEnd();
              }
              if (choice.finish_reason) finish = choice.finish_reason;
            }
          }
        }
      }
    } catch (e) {
      if (e.name === "TypeError" && !firstToken) failure = `cannot reach the server (is llama4 serve still running?): ${e.message}`;
      else if (e.name !== "AbortError") failure = e.message || String(e);
    } finally {
      typing.remove();
      view.row.classList.remove("streaming");
      if (state.controller === controller) state.controller = null;
      setBusy(false);
    }

    if (conversation !== state.conversation) return; // "New chat" was pressed: this turn is gone
    const stopped = controller.signal.aborted;
    if (failure && !reply) {
      view.row.remove();
      showError(failure);
      if (!els.prompt.value) { // give the message back, to edit and send again
        els.prompt.value = text;
        state.pending = [...images, ...state.pending];
        renderAttachments();
        autosize();
      }
      return;
    }
    state.history.push(userMessage);
    if (reply) state.history.push({ role: "assistant", content: reply });
    const meta = [];
    if (stopped) meta.push(["stopped", "tag warn"]);
    else if (finish === "length") meta.push(["length limit", "tag warn"]);
    if (failure) meta.push([failure, "tag warn"]);
    if (usage) {
      const seconds = (performance.now() - (firstToken ?? started)) / 1000;
      const rate = seconds > 0 ? usage.completion_tokens / seconds : 0;
      meta.push([`${usage.completion_tokens} tokens · ${rate.toFixed(1)} tok/s`, ""]);
      els.stats.textContent = `Last reply: ${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens, `
        + `first token after ${(((firstToken ?? started) - started) / 1000).toFixed(2)} s.`;
    }
    if (meta.length) addMeta(view, meta);
    if (!stopped && !document.hidden) els.prompt.focus();
  }

  // ----- start -----
  loadSettings();
  if (!wide()) setSettingsOpen(false);
  loadModel();
  autosize();
  els.prompt.focus();
})();
