// blip2-serve playground: plain JavaScript, no build step, nothing from outside this server (it may have no
// internet). It calls the server's own routes: OpenAI chat completions (caption, n ranked captions, streamed
// answers in a conversation) and, where a retrieval model is served, KServe's blip2_itm.
"use strict";

const root = document.querySelector('meta[name="blip2-root"]').content;
const model = document.querySelector('meta[name="blip2-model"]').content;
const $ = (id) => document.getElementById(id);

const state = { image: null, turns: [], keyNeeded: false };

function headers() {
  const result = { "content-type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) result.authorization = "Bearer " + key;
  return result;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

async function errorOf(response) {
  // OpenAI routes answer {"error": {"message"}}, KServe routes {"error": "..."}
  try {
    const body = await response.json();
    const error = body.error;
    return "HTTP " + response.status + ": " + (typeof error === "string" ? error : (error && error.message) || JSON.stringify(body));
  } catch (e) {
    return "HTTP " + response.status + " " + response.statusText;
  }
}

// ---------- the image ----------

function useFile(file) {
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    state.image = reader.result; // a data: URI, sent as OpenAI's image_url (the server checks it)
    state.imageName = file.name || "image";
    const preview = $("preview");
    preview.src = state.image;
    preview.hidden = false;
    $("drop-help").textContent = state.imageName + " (" + Math.round(file.size / 1024) + " KiB). Drop or paste another to replace it.";
    newConversation();
    clearError();
  };
  reader.onerror = () => showError("could not read " + file.name);
  reader.readAsDataURL(file);
}

function imageBase64() {
  return state.image.slice(state.image.indexOf(",") + 1);
}

function needImage() {
  if (!state.image) {
    showError("Choose an image first.");
    return false;
  }
  return true;
}

// ---------- requests, timing and snippets ----------

function chatBody(messages, extra) {
  return Object.assign({ model: model, messages: messages, max_tokens: Number($("max-tokens").value) || 30 }, extra);
}

function imageMessage(text) {
  const content = [{ type: "image_url", image_url: { url: "IMAGE_DATA_URI" } }];
  if (text) content.push({ type: "text", text: text });
  return { role: "user", content: content };
}

function withImage(body) {
  return JSON.stringify(body).replace('"IMAGE_DATA_URI"', JSON.stringify(state.image));
}

function shellQuote(text) {
  return "'" + text.replace(/'/g, "'\\''") + "'";
}

function showSnippets(path, body, kind) {
  const url = location.origin + root + path;
  const auth = $("api-key").value.trim() ? ' -H "authorization: Bearer $BLIP2_SERVE_API_KEY"' : "";
  const json = JSON.stringify(body, null, 2);
  const name = state.imageName || "image.jpg";
  let curl;
  let python;
  if (kind === "kserve") {
    const shellJson = shellQuote(json).replace('"IMAGE_BASE64"', "\"'\"$(base64 -w0 " + shellQuote(name) + ")\"'\"");
    curl = "curl -s " + url + " -H 'content-type: application/json'" + auth + " \\\n  -d " + shellJson;
    python = [
      "import base64, json, httpx",
      "",
      "body = json.loads(" + pythonJson(json) + ")",
      'body["inputs"][0]["data"] = [base64.b64encode(open(' + JSON.stringify(name) + ', "rb").read()).decode()]',
      "print(httpx.post(" + JSON.stringify(url) + ", json=body" + (auth ? ', headers={"authorization": "Bearer " + KEY}' : "") + ", timeout=60).json())",
    ].join("\n");
  } else {
    const shellJson = shellQuote(json).replace('"IMAGE_DATA_URI"', "\"'\"data:image/jpeg;base64,$(base64 -w0 " + shellQuote(name) + ")\"'\"");
    curl = "curl -s" + (body.stream ? "N" : "") + " " + url + " -H 'content-type: application/json'" + auth + " \\\n  -d " + shellJson;
    const call = "client.chat.completions.create(**request)";
    python = [
      "import base64, json",
      "from openai import OpenAI",
      "",
      "client = OpenAI(base_url=" + JSON.stringify(location.origin + root + "/v1") + ', api_key=' + (auth ? '"<your key>"' : '"unused"') + ")",
      'image = "data:image/jpeg;base64," + base64.b64encode(open(' + JSON.stringify(name) + ', "rb").read()).decode()',
      "request = json.loads(" + pythonJson(json) + ")",
      'request["messages"][0]["content"][0]["image_url"]["url"] = image',
      body.stream
        ? "for chunk in " + call + ":\n    print(chunk.choices[0].delta.content or \"\", end=\"\", flush=True) if chunk.choices else None"
        : "for choice in " + call + ".choices:\n    print(choice.message.content)",
    ].join("\n");
  }
  $("curl-snippet").textContent = curl;
  $("python-snippet").textContent = python;
}

function pythonJson(json) {
  // readable where it can be: the pretty JSON in a raw triple-quoted string
  const quotes = "'''";
  return json.includes(quotes) || json.includes("\\") ? JSON.stringify(json) : "r" + quotes + json + quotes;
}

function busy(button, on) {
  button.disabled = on;
  button.setAttribute("aria-busy", on ? "true" : "false");
}

// ---------- caption ----------

async function caption() {
  clearError();
  if (!needImage()) return;
  const n = Math.min(16, Math.max(1, Number($("choices").value) || 1));
  const extra = n > 1 ? { n: n, temperature: 0.8 } : {};
  const body = chatBody([imageMessage("")], extra);
  showSnippets("/v1/chat/completions", body, "openai");
  const button = $("caption");
  busy(button, true);
  const started = performance.now();
  try {
    const response = await fetch(root + "/v1/chat/completions", { method: "POST", headers: headers(), body: withImage(body) });
    if (!response.ok) {
      showError(await errorOf(response));
      return;
    }
    const reply = await response.json();
    const elapsed = performance.now() - started;
    const list = $("captions");
    list.textContent = "";
    const choices = reply.choices.slice().sort((a, b) => (b.score ?? 0) - (a.score ?? 0));
    for (const choice of choices) {
      const item = document.createElement("li");
      item.className = "caption";
      item.textContent = choice.message.content;
      if (choice.score !== undefined) {
        const score = document.createElement("span");
        score.className = "score";
        score.textContent = "score " + choice.score.toFixed(3);
        item.appendChild(score);
      }
      list.appendChild(item);
    }
    $("latency").textContent = "Caption: " + Math.round(elapsed) + " ms, " + reply.usage.completion_tokens + " tokens.";
  } catch (e) {
    showError("The request failed: " + e.message);
  } finally {
    busy(button, false);
  }
}

// ---------- a conversation, streamed ----------

function newConversation() {
  state.turns = [];
  $("turns").textContent = "";
}

function conversationMessages(question) {
  const messages = [];
  state.turns.forEach((turn, index) => {
    messages.push(index === 0 ? imageMessage(turn.question) : { role: "user", content: turn.question });
    messages.push({ role: "assistant", content: turn.answer });
  });
  messages.push(state.turns.length === 0 ? imageMessage(question) : { role: "user", content: question });
  return messages;
}

async function ask(event) {
  event.preventDefault();
  clearError();
  if (!needImage()) return;
  const question = $("question").value.trim();
  if (!question) {
    showError("Type a question first.");
    return;
  }
  const body = chatBody(conversationMessages(question), { stream: true });
  showSnippets("/v1/chat/completions", body, "openai");
  const button = $("ask");
  busy(button, true);
  const item = document.createElement("li");
  const asked = document.createElement("div");
  asked.className = "question";
  asked.textContent = question;
  const answer = document.createElement("div");
  answer.className = "answer";
  item.append(asked, answer);
  const started = performance.now();
  let first = null;
  let text = "";
  try {
    const response = await fetch(root + "/v1/chat/completions", { method: "POST", headers: headers(), body: withImage(body) });
    if (!response.ok) {
      showError(await errorOf(response));
      return;
    }
    $("turns").appendChild(item);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let pending = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      pending += decoder.decode(value, { stream: true });
      const events = pending.split("\n\n");
      pending = events.pop();
      for (const event of events) {
        const data = event.replace(/^data: /, "");
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) {
          showError("The stream failed: " + chunk.error.message);
          continue;
        }
        for (const choice of chunk.choices || []) {
          const piece = (choice.delta && choice.delta.content) || "";
          if (piece) {
            if (first === null) first = performance.now() - started;
            text += piece;
            answer.textContent = text;
          }
        }
      }
    }
    state.turns.push({ question: question, answer: text });
    $("question").value = "";
    const total = performance.now() - started;
    $("latency").textContent =
      "Answer: first token after " + Math.round(first ?? total) + " ms, all of it after " + Math.round(total) + " ms.";
  } catch (e) {
    showError("The request failed: " + e.message);
  } finally {
    busy(button, false);
  }
}

// ---------- image-text matching (retrieval model) ----------

async function match(event) {
  event.preventDefault();
  clearError();
  if (!needImage()) return;
  const text = $("match-text").value.trim();
  if (!text) {
    showError("Type a text to score first.");
    return;
  }
  const body = {
    inputs: [
      { name: "IMAGE", datatype: "BYTES", shape: [1, 1], data: ["IMAGE_BASE64"] },
      { name: "TEXT", datatype: "BYTES", shape: [1, 1], data: [text] },
    ],
  };
  showSnippets("/v2/models/blip2_itm/infer", body, "kserve");
  const button = $("match");
  busy(button, true);
  const started = performance.now();
  try {
    const sent = JSON.stringify(body).replace('"IMAGE_BASE64"', JSON.stringify(imageBase64()));
    const response = await fetch(root + "/v2/models/blip2_itm/infer", { method: "POST", headers: headers(), body: sent });
    if (!response.ok) {
      showError(await errorOf(response));
      return;
    }
    const reply = await response.json();
    const output = (name) => reply.outputs.find((o) => o.name === name).data[0];
    $("match-result").textContent =
      "Match probability " + output("ITM_SCORE").toFixed(3) + ", contrastive similarity " + output("ITC_SCORE").toFixed(3) + ".";
    $("latency").textContent = "Match: " + Math.round(performance.now() - started) + " ms.";
  } catch (e) {
    showError("The request failed: " + e.message);
  } finally {
    busy(button, false);
  }
}

// ---------- what this server offers ----------

async function discover() {
  const response = await fetch(root + "/v2/repository/index", { method: "POST", headers: headers(), body: "{}" });
  if (response.status === 401) {
    $("key-section").hidden = false;
    return;
  }
  if (!response.ok) return;
  const models = await response.json();
  $("match-section").hidden = !models.some((m) => m.name === "blip2_itm");
}

function setUp() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => useFile(e.target.files[0]));
  drop.addEventListener("click", () => $("file").click());
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") {
      e.preventDefault();
      $("file").click();
    }
  });
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    useFile(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    const file = Array.from(e.clipboardData.files || [])[0];
    if (file) useFile(file);
  });
  $("caption").addEventListener("click", caption);
  $("ask-form").addEventListener("submit", ask);
  $("match-form").addEventListener("submit", match);
  $("new-chat").addEventListener("click", newConversation);
  $("api-key").addEventListener("change", discover);
  for (const button of document.querySelectorAll("button.copy")) {
    button.addEventListener("click", async () => {
      const text = $(button.dataset.target).textContent;
      try {
        await navigator.clipboard.writeText(text);
        button.textContent = "Copied";
      } catch (e) {
        button.textContent = "Select and copy";
      }
      setTimeout(() => (button.textContent = "Copy"), 1500);
    });
  }
  discover().catch((e) => showError("This server did not answer: " + e.message));
}

setUp();
