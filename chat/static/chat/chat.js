// The chat page: REST (session + CSRF) for threads and history, one websocket per open thread for answers.
// Every text from the server goes through textContent, never innerHTML.

const config = JSON.parse(document.getElementById("chat-config").textContent);
const csrfToken = document.querySelector('meta[name="csrf-token"]').content;
const structuredAgents = new Set(config.agents.filter((a) => a.structured).map((a) => a.agent_type));
const agentLabels = Object.fromEntries(config.agents.map((a) => [a.agent_type, a.label]));

// What a tool line says, by how the call went (a saved tool call's `outcome`).
const TOOL_LINES = {
  customer_balance: { success: "Looked up your balance", failed: "Could not look up your balance" },
  recent_transactions: {
    success: "Looked up your recent transactions",
    failed: "Could not look up your recent transactions",
  },
  block_card: {
    pending: "Asked to block your card",
    success: "Blocked your card",
    failed: "Could not block your card",
    denied: "Did not block your card: not approved",
  },
};
// What an approval card asks the customer to allow, from the call's arguments.
const APPROVAL_ACTIONS = {
  block_card: (args) => (args.last4 ? `Block your card ending ${args.last4}` : "Block your card"),
};
const APPROVAL_OUTCOMES = {
  approved: "Approved",
  denied: "Denied",
  expired: "Expired: not decided in time",
};
const TITLE_LENGTH = 60;
const PING_MS = 25_000;
const RECONNECT_MAX_MS = 10_000;

const el = (id) => document.getElementById(id);
const ui = {
  newThread: el("new-thread"),
  agentType: el("agent-type"),
  threadList: el("thread-list"),
  moreThreads: el("more-threads"),
  title: el("thread-title"),
  connection: el("connection"),
  alert: el("alert"),
  messages: el("messages"),
  olderMessages: el("older-messages"),
  composer: el("composer"),
  query: el("query"),
  send: el("send"),
  stop: el("stop"),
};

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function signIn() {
  window.location.assign(`/accounts/login/?next=${encodeURIComponent(location.pathname + location.hash)}`);
}

// A path under /api/v1/, or an absolute URL from a Link header. Answers {data, next}.
async function api(path, { method = "GET", body } = {}) {
  let response;
  try {
    response = await fetch(path.startsWith("http") ? path : `/api/v1/${path}`, {
      method,
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRFToken": csrfToken },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch {
    throw new ApiError(0, "network", "The server cannot be reached. Check your connection and try again.");
  }
  if (response.status === 401) {
    signIn();
    throw new ApiError(401, "not_authenticated", "Your session has ended. Please sign in again.");
  }
  const data = response.status === 204 ? null : await response.json().catch(() => null);
  if (!response.ok) {
    const error = data?.error ?? {};
    throw new ApiError(response.status, error.code, error.message ?? `The server answered ${response.status}.`);
  }
  const next = /<([^>]+)>;\s*rel="next"/.exec(response.headers.get("Link") ?? "");
  return { data, next: next ? next[1] : null };
}

function showAlert(message) {
  ui.alert.textContent = message;
  ui.alert.hidden = !message;
}

function make(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// --- Thread list -------------------------------------------------------------------------------------------------

let olderThreads = null;

function threadItem(thread) {
  const button = make("button");
  button.type = "button";
  button.dataset.threadId = thread.id;
  button.append(
    make("span", "thread-title", thread.title || "New conversation"),
    make("span", "thread-meta", `${agentLabels[thread.agent_type] ?? thread.agent_type} · ${when(thread.updated_at)}`),
  );
  button.addEventListener("click", () => openThread(thread.id));
  if (thread.id === current?.id) button.setAttribute("aria-current", "true");
  const item = make("li");
  item.append(button);
  return item;
}

function when(timestamp) {
  const date = new Date(timestamp);
  const today = new Date().toDateString() === date.toDateString();
  return today
    ? date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : date.toLocaleDateString([], { day: "numeric", month: "short" });
}

async function loadThreads(url = "threads?limit=20") {
  const { data, next } = await api(url);
  const items = data.map(threadItem);
  if (url.startsWith("http")) ui.threadList.append(...items);
  else ui.threadList.replaceChildren(...items);
  olderThreads = next;
  ui.moreThreads.hidden = !next;
  return data;
}

// --- Messages ----------------------------------------------------------------------------------------------------

const STATE_TEXT = {
  in_progress: "Being written…",
  awaiting_approval: "Waiting for your approval.",
  incomplete: "Stopped: this answer is incomplete.",
  failed: "The assistant could not finish this answer.",
  interrupted: "Interrupted: the server stopped while writing this answer. Ask again.",
};

// How an answer ended, as the page tells it: a failure because its server stopped reads as an interruption.
function displayStatus(message) {
  if (message.status === "failed" && message.metadata?.error?.code === "run_interrupted") return "interrupted";
  return message.status;
}

function riskLevel(level) {
  if (level >= 7) return "high";
  if (level >= 4) return "medium";
  return "low";
}

function userBubble(message) {
  const item = make("li", "message user");
  item.dataset.messageId = message.id;
  item.append(make("p", "text", message.content));
  return item;
}

function assistantBubble(id, status) {
  const item = make("li", "message assistant");
  item.dataset.messageId = id;
  item.dataset.status = status;
  const banner = make("p", "banner", "Your card has been blocked.");
  banner.hidden = true;
  const risk = make("span", "risk");
  risk.hidden = true;
  item.append(make("ul", "tools"), banner, make("p", "text"), risk, make("ul", "actions"), make("p", "state"));
  setStatus(item, status);
  return item;
}

function setStatus(bubble, status) {
  bubble.dataset.status = status;
  bubble.querySelector(".state").textContent = STATE_TEXT[status] ?? "";
}

// Renders a structured output, whole or partial: a field the model has not produced yet is absent, not a default.
function renderOutput(bubble, output) {
  if (typeof output.support_advice === "string") bubble.querySelector(".text").textContent = output.support_advice;
  const banner = bubble.querySelector(".banner");
  banner.hidden = output.block_card !== true;
  const risk = bubble.querySelector(".risk");
  if (Number.isInteger(output.risk_level)) {
    const level = riskLevel(output.risk_level);
    risk.dataset.level = level;
    risk.textContent = `Risk: ${level} (${output.risk_level}/10)`;
    risk.hidden = false;
  }
  if (Array.isArray(output.follow_up_actions)) {
    bubble.querySelector(".actions").replaceChildren(...output.follow_up_actions.map((a) => make("li", "", a)));
  }
}

function toolLine(name, outcome) {
  const line = make("li");
  line.dataset.tool = name;
  // A call asked for approval reports a result even when denied: the line waits for it, and says which.
  if (outcome === "pending") line.dataset.asked = "";
  setToolOutcome(line, outcome);
  return line;
}

function setToolOutcome(line, outcome) {
  const words = line.dataset.tool.replaceAll("_", " ");
  const fallback = {
    pending: `Asked to use ${words}`,
    success: `Looked up ${words}`,
    failed: `Could not look up ${words}`,
    denied: `Did not use ${words}: not approved`,
  };
  line.dataset.outcome = outcome;
  line.textContent = TOOL_LINES[line.dataset.tool]?.[outcome] ?? fallback[outcome];
}

function askedLine(bubble, name) {
  return bubble.querySelector(`.tools [data-tool="${CSS.escape(name)}"][data-asked]`);
}

function toolResult(bubble, name) {
  const asked = askedLine(bubble, name);
  if (!asked) {
    bubble.querySelector(".tools").append(toolLine(name, "success"));
    return;
  }
  delete asked.dataset.asked;
  if (asked.dataset.outcome === "pending") setToolOutcome(asked, "success");
}

function approvalCard(approval) {
  const words = approval.tool.replaceAll("_", " ");
  const args = Object.keys(approval.args).length ? ` ${JSON.stringify(approval.args)}` : "";
  const action = APPROVAL_ACTIONS[approval.tool]?.(approval.args) ?? `Use ${words}${args}`;
  const card = make("section", "approval");
  card.dataset.approvalId = approval.id;
  card.setAttribute("role", "group");
  card.setAttribute("aria-label", `Approval needed: ${action}`);
  const buttons = make("div", "approval-buttons");
  for (const [label, approved] of [["Approve", true], ["Deny", false]]) {
    const button = make("button", approved ? "" : "quiet", label);
    button.type = "button";
    button.addEventListener("click", () => decide(card, approved));
    buttons.append(button);
  }
  const deadline = new Date(approval.expires_at).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  card.append(
    make("p", "approval-ask", "The assistant asks for your approval to:"),
    make("p", "approval-action", action),
    make("p", "approval-expiry", `Decide by ${deadline}: without your answer, it is not done.`),
    buttons,
    make("p", "approval-outcome"),
  );
  return card;
}

function setDeciding(card, deciding) {
  card.setAttribute("aria-busy", String(deciding));
  for (const button of card.querySelectorAll("button")) button.disabled = deciding;
}

function approvalDecided(bubble, approval) {
  const card = bubble.querySelector(`.approval[data-approval-id="${CSS.escape(approval.id)}"]`);
  if (card) {
    card.dataset.outcome = approval.status;
    card.removeAttribute("aria-busy");
    card.querySelector(".approval-buttons")?.remove();
    card.querySelector(".approval-expiry")?.remove();
    card.querySelector(".approval-outcome").textContent = APPROVAL_OUTCOMES[approval.status] ?? approval.status;
  }
  const asked = askedLine(bubble, approval.tool);
  if (asked && approval.status !== "approved") setToolOutcome(asked, "denied");
}

function messageBubble(message) {
  if (message.role === "user") return userBubble(message);
  const bubble = assistantBubble(message.id, displayStatus(message));
  const tools = bubble.querySelector(".tools");
  tools.append(...message.tool_calls.map((call) => toolLine(call.name, call.outcome)));
  if (message.approval) tools.after(approvalCard(message.approval));
  if (current.structured && message.output) renderOutput(bubble, message.output);
  else bubble.querySelector(".text").textContent = message.content;
  return bubble;
}

// A saved answer keeps a decided approval as its tool line only: while the page is open, the card the customer
// decided on (or is deciding on) stays as shown.
function keepShownApprovals(bubbles) {
  const byId = new Map(bubbles.map((bubble) => [bubble.dataset.messageId, bubble]));
  for (const shown of ui.messages.querySelectorAll(".approval")) {
    const bubble = byId.get(shown.closest(".message").dataset.messageId);
    if (!bubble || bubble.contains(shown)) continue;
    const loaded = bubble.querySelector(`.approval[data-approval-id="${CSS.escape(shown.dataset.approvalId)}"]`);
    if (loaded) loaded.replaceWith(shown);
    else if (shown.dataset.outcome) bubble.querySelector(".tools").after(shown);
  }
}

function scrollToEnd(force = false) {
  const list = ui.messages;
  if (force || list.scrollHeight - list.scrollTop - list.clientHeight < 80) list.scrollTop = list.scrollHeight;
}

// --- The open thread ---------------------------------------------------------------------------------------------

let current = null; // {id, thread, structured}
let olderMessages = null;
let pending = null; // the query awaiting its message_created: {requestId, text}
let requestSeq = 0;
let streaming = null; // the id of the answer being written
const lastSeq = new Map(); // answer id -> seq of the last of its events shown: where to resume it

function setStreaming(messageId) {
  streaming = messageId;
  const running = messageId !== null;
  // Stop takes the place of Send; the focus stays in the composer.
  if (document.activeElement === (running ? ui.send : ui.stop)) ui.query.focus();
  ui.send.hidden = running;
  ui.stop.hidden = !running;
  // Screen readers announce the answer once it is whole, not at every delta.
  ui.messages.setAttribute("aria-busy", String(running));
}

async function loadMessages() {
  const opened = current;
  const { data: thread } = await api(`threads/${opened.id}`);
  const messages = thread.messages;
  // The thread holds its latest messages; only the messages list gives the cursor to the older ones.
  const older = thread.has_more_messages
    ? (await api(`threads/${opened.id}/messages?limit=${messages.length}`)).next
    : null;
  if (current !== opened) return;
  opened.thread = thread;
  opened.structured = structuredAgents.has(thread.agent_type);
  ui.title.textContent = thread.title || "New conversation";
  const run = thread.active_run;
  if (run && !lastSeq.has(run.message_id)) join(run.message_id);
  // The answer being written shows what its events say, not what was saved of it (older): the bubble they have
  // written so far, or an empty one they replay into from the first.
  const bubbles = messages.map((message) =>
    message.id === streaming ? (find(message.id) ?? assistantBubble(message.id, "streaming")) : messageBubble(message),
  );
  keepShownApprovals(bubbles);
  ui.messages.replaceChildren(...bubbles);
  olderMessages = older;
  ui.olderMessages.hidden = !older;
  scrollToEnd(true);
}

// Follows an answer being written that the page has heard nothing of yet, from its first event: an open socket
// asks for them, and a socket about to open asks at its handshake.
function join(messageId) {
  lastSeq.set(messageId, 0);
  setStreaming(messageId);
  if (socket?.readyState === WebSocket.OPEN) {
    socket.send(JSON.stringify({ type: "resume", message_id: messageId, after: 0 }));
  }
}

async function openThread(id) {
  if (current?.id === id) return;
  disconnect();
  showAlert("");
  setStreaming(null);
  lastSeq.clear();
  ui.query.disabled = ui.send.disabled = true;
  // Another thread may be opened while this one loads: every step after an await checks it is still current.
  const opening = { id, thread: null, structured: false };
  current = opening;
  history.replaceState(null, "", `#${id}`);
  for (const button of ui.threadList.querySelectorAll("button")) {
    if (button.dataset.threadId === id) button.setAttribute("aria-current", "true");
    else button.removeAttribute("aria-current");
  }
  ui.messages.replaceChildren();
  try {
    await loadMessages();
  } catch (error) {
    if (current !== opening) return;
    current = null;
    ui.title.textContent = "Choose or start a conversation";
    showAlert(error.status === 404 ? "This conversation does not exist any more." : error.message);
    return;
  }
  if (current !== opening) return;
  ui.query.disabled = ui.send.disabled = false;
  ui.query.focus();
  connect();
}

async function createThread(agentType) {
  const { data: thread } = await api("threads", { method: "POST", body: { agent_type: agentType } });
  ui.threadList.prepend(threadItem(thread));
  await openThread(thread.id);
}

// A new thread is named after its first question.
async function nameThread(query) {
  const thread = current.thread;
  if (thread.title) return;
  const words = query.replace(/\s+/g, " ");
  const title = words.length > TITLE_LENGTH ? `${words.slice(0, TITLE_LENGTH - 1).trimEnd()}…` : words;
  thread.title = title;
  ui.title.textContent = title;
  await api(`threads/${thread.id}`, { method: "PATCH", body: { title } });
}

// --- Websocket ---------------------------------------------------------------------------------------------------

let socket = null;
let retries = 0;
let retryTimer = null;
let pingTimer = null;

function disconnect() {
  clearTimeout(retryTimer);
  clearInterval(pingTimer);
  retries = 0;
  if (socket) {
    const closing = socket;
    socket = null;
    closing.close(1000);
  }
  ui.connection.textContent = "";
}

function connect() {
  const id = current.id;
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  // An answer being written goes on from its last event shown: the server gives what the page missed first.
  const resume = streaming ? `?resume=${streaming}&after=${lastSeq.get(streaming)}` : "";
  const ws = new WebSocket(`${scheme}://${location.host}/ws/v1/threads/${id}/${resume}`);
  socket = ws;
  ws.addEventListener("open", () => {
    if (socket !== ws) return;
    retries = 0;
    ui.connection.textContent = "";
    pingTimer = setInterval(() => ws.send(JSON.stringify({ type: "ping" })), PING_MS);
  });
  ws.addEventListener("message", (frame) => {
    if (socket === ws) onEvent(JSON.parse(frame.data));
  });
  ws.addEventListener("close", (event) => {
    if (socket !== ws) return;
    socket = null;
    clearInterval(pingTimer);
    if (event.code === 4401) return signIn();
    if (event.code === 4404) {
      setStreaming(null);
      ui.connection.textContent = "";
      showAlert("This conversation does not exist any more.");
      return;
    }
    reconnectLater(id);
  });
}

function reconnectLater(id) {
  const delay = Math.min(1000 * 2 ** retries, RECONNECT_MAX_MS);
  retries += 1;
  ui.connection.textContent = `Connection lost. Reconnecting in ${Math.round(delay / 1000)} s…`;
  retryTimer = setTimeout(() => reconnect(id), delay);
}

async function reconnect(id) {
  if (current?.id !== id) return;
  ui.connection.textContent = "Reconnecting…";
  // Resuming the answer being written gives what the page missed of it; anything else that happened meanwhile is
  // in the saved thread.
  if (!streaming) {
    try {
      await loadMessages();
    } catch {
      if (current?.id === id) reconnectLater(id);
      return;
    }
  }
  if (current?.id === id) connect();
}

// A frame that acts on the thread; false, and the user told, while the socket is down.
function sendFrame(frame) {
  if (socket?.readyState !== WebSocket.OPEN) {
    showAlert("Not connected: try again once the connection is back.");
    return false;
  }
  socket.send(JSON.stringify(frame));
  return true;
}

function find(messageId) {
  return ui.messages.querySelector(`[data-message-id="${CSS.escape(messageId)}"]`);
}

function bubbleFor(messageId) {
  let bubble = find(messageId);
  if (!bubble) {
    bubble = assistantBubble(messageId, "streaming");
    ui.messages.append(bubble);
  }
  return bubble;
}

function refresh() {
  loadMessages().catch((error) => showAlert(error.message));
}

function onEvent(event) {
  if (Number.isInteger(event.seq)) {
    // Each event of an answer once, though a resumed run may give again what the page shows.
    if (event.seq <= (lastSeq.get(event.message_id) ?? 0)) return;
    lastSeq.set(event.message_id, event.seq);
    setStreaming(event.event === "done" ? null : event.message_id);
  }
  switch (event.event) {
    case "message_created":
      if (event.request_id && event.request_id === pending?.requestId) pending = null;
      if (!find(event.message.id)) ui.messages.append(userBubble(event.message));
      scrollToEnd(true);
      break;
    case "message_started":
      showAlert("");
      setStatus(bubbleFor(event.message_id), "streaming");
      scrollToEnd(true);
      break;
    case "text_delta": {
      const bubble = bubbleFor(event.message_id);
      if (current.structured) renderOutput(bubble, JSON.parse(event.token));
      else bubble.querySelector(".text").append(event.token);
      scrollToEnd();
      break;
    }
    case "tool_result":
      toolResult(bubbleFor(event.message_id), event.tool_result.name);
      break;
    case "approval_required": {
      const tools = bubbleFor(event.message_id).querySelector(".tools");
      tools.append(toolLine(event.approval.tool, "pending"));
      tools.after(approvalCard(event.approval));
      scrollToEnd(true);
      break;
    }
    case "approval_decided":
      approvalDecided(bubbleFor(event.message_id), event.approval);
      break;
    case "message_complete": {
      // A blocking query's answer arrives whole here, with no deltas before it.
      const bubble = bubbleFor(event.message_id);
      if (current.structured && event.output) renderOutput(bubble, event.output);
      else if (typeof event.content === "string") bubble.querySelector(".text").textContent = event.content;
      setStatus(bubble, event.status ?? "complete");
      break;
    }
    case "error": {
      if (event.error_type === "resume_expired") {
        // The run's events are no longer kept: the saved thread says how it ended.
        setStreaming(null);
        refresh();
        break;
      }
      showAlert(event.error);
      // A refused query gives its text back, unless the user has started typing another.
      if (event.request_id && event.request_id === pending?.requestId) {
        if (!ui.query.value) ui.query.value = pending.text;
        pending = null;
      }
      const card = event.request_id && ui.messages.querySelector(`[data-request-id="${CSS.escape(event.request_id)}"]`);
      if (card && !card.dataset.outcome) setDeciding(card, false);
      break;
    }
    case "done":
      // The saved thread knows how the answer ended (complete, incomplete, failed) and its final output.
      refresh();
      loadThreads().catch(() => {});
      break;
    default:
      break;
  }
}

function decide(card, approved) {
  requestSeq += 1;
  const requestId = `a${requestSeq}`;
  if (!sendFrame({ type: "approval", approval_id: card.dataset.approvalId, approved, request_id: requestId })) return;
  card.dataset.requestId = requestId;
  setDeciding(card, true);
}

function send() {
  const text = ui.query.value.trim();
  // While an answer is written the question waits in the box.
  if (!text || !current || streaming) return;
  if (socket?.readyState === WebSocket.CONNECTING) {
    socket.addEventListener("open", send, { once: true });
    return;
  }
  if (socket?.readyState !== WebSocket.OPEN) {
    showAlert("Not connected: your message is kept and can be sent once the connection is back.");
    return;
  }
  requestSeq += 1;
  pending = { requestId: `q${requestSeq}`, text: ui.query.value };
  socket.send(JSON.stringify({ type: "query", query: text, request_id: pending.requestId }));
  ui.query.value = "";
  showAlert("");
  nameThread(text).catch((error) => showAlert(error.message));
}

// --- Wiring ------------------------------------------------------------------------------------------------------

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});
ui.query.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  }
});
ui.stop.addEventListener("click", () => {
  sendFrame({ type: "cancel" });
  ui.query.focus();
});
ui.newThread.addEventListener("submit", (event) => {
  event.preventDefault();
  createThread(ui.agentType.value).catch((error) => showAlert(error.message));
});
ui.moreThreads.addEventListener("click", () => loadThreads(olderThreads).catch((error) => showAlert(error.message)));
ui.olderMessages.addEventListener("click", async () => {
  try {
    const { data, next } = await api(olderMessages);
    ui.messages.prepend(...data.map(messageBubble));
    olderMessages = next;
    ui.olderMessages.hidden = !next;
  } catch (error) {
    showAlert(error.message);
  }
});
window.addEventListener("hashchange", () => {
  const id = location.hash.slice(1);
  if (id) openThread(id);
});

async function start() {
  try {
    const threads = await loadThreads();
    const id = location.hash.slice(1) || threads[0]?.id;
    if (id) await openThread(id);
    else ui.agentType.focus();
  } catch (error) {
    showAlert(error.message);
  }
}

start();
