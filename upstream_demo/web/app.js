// authproxy demo page: the reference frontend client for the sidecar.
//
// ApiClient  - fetch wrapper: bearer token, proactive refresh ~30 s before expiry, one retry after
//              refreshing on 401, exponential backoff on network errors, the sidecar's JSON errors.
//              A refresh that fails at network level or with a 5xx is retried with backoff until
//              it works (only a refused refresh token, 400/401/422, logs out).
// LiveSocket - WebSocket client: the token as a `bearer.<token>` subprotocol (never in the URL,
//              which browsers print in the console on every failed attempt), state (connecting/
//              open/reconnecting/closed), backoff + jitter, re-subscription, 4401 -> refresh and
//              reconnect at once, 4403 -> log out, queued sends while disconnected, seq gap
//              detection. A refresh that cannot be done now means "reconnect later", not "stop".
//              Browsers hide a refused handshake's HTTP status: a 401/403 arrives as close 1006.
// UI         - login card, models table, create form (disabled without models:write), live event
//              log; a banner about a transient failure clears itself once things work again.
"use strict";

const CONFIG = Object.assign(
  { apiUrl: "http://localhost:8000", wsUrl: "ws://localhost:8000/ws" },
  window.AUTHPROXY_CONFIG || {},
);

const REFRESH_MARGIN_MS = 30_000; // refresh this long before the access token expires
const REFRESH_MAX_BACKOFF_MS = 30_000; // a failing refresh is retried at most this far apart
const NETWORK_RETRIES = 3; // retries after the first attempt for network failures
const WS_MAX_BACKOFF_MS = 30_000;
const WS_IDLE_TIMEOUT_MS = 45_000; // three missed heartbeats: the socket is dead even if not closed
const MAX_EVENTS = 200;
const MAX_QUEUED = 100;

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** A failed API call; `code`/`requestId` come from the sidecar's (or backend's) JSON error body. */
class ApiError extends Error {
  constructor(message, { status = 0, code = "network_error", requestId = null, details = null } = {}) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.requestId = requestId;
    this.details = details;
  }
  /** Worth trying again later: the network, or the server side (502/503/504...), not the request. */
  get transient() {
    return this.status === 0 || this.status >= 500;
  }
}

const isTransient = (err) => Boolean(err && (err.status === 0 || err.status >= 500));

/** Tokens for this tab, kept in sessionStorage so a reload stays logged in. */
class Session {
  constructor(storage = window.sessionStorage) {
    this.storage = storage;
    this.data = null;
    try {
      this.data = JSON.parse(storage.getItem("authproxy-demo-session") || "null");
    } catch {
      this.data = null;
    }
  }
  get accessToken() {
    return this.data ? this.data.accessToken : null;
  }
  get refreshToken() {
    return this.data ? this.data.refreshToken : null;
  }
  get expiresAt() {
    return this.data ? this.data.expiresAt : 0;
  }
  get user() {
    return this.data ? this.data.user : null;
  }
  set(grant) {
    this.data = {
      accessToken: grant.access_token,
      refreshToken: grant.refresh_token,
      expiresAt: Date.now() + grant.expires_in * 1000,
      expiresIn: grant.expires_in,
      user: grant.user,
    };
    this.storage.setItem("authproxy-demo-session", JSON.stringify(this.data));
  }
  clear() {
    this.data = null;
    this.storage.removeItem("authproxy-demo-session");
  }
}

class ApiClient {
  constructor(
    baseUrl,
    session,
    { onTokens = () => {}, onAuthLost = () => {}, onRefreshTrouble = () => {} } = {},
  ) {
    this.baseUrl = baseUrl.replace(/\/+$/, "");
    this.session = session;
    this.onTokens = onTokens;
    this.onAuthLost = onAuthLost;
    this.onRefreshTrouble = onRefreshTrouble; // (error, retry delay in ms)
    this.refreshing = null; // one refresh in flight at a time, shared by all callers
    this.refreshTimer = null;
    this.refreshFailures = 0;
  }

  async login(username, password) {
    const grant = await this.request("POST", "/auth/login", {
      body: { username, password },
      auth: false,
    });
    this.acceptGrant(grant);
    return grant;
  }

  logout() {
    clearTimeout(this.refreshTimer);
    this.refreshTimer = null;
    this.refreshFailures = 0;
    this.session.clear();
  }

  /** Exchange the refresh token (single-flight). Rejects and logs out when it is refused. */
  refresh() {
    if (!this.refreshing) {
      this.refreshing = (async () => {
        const refreshToken = this.session.refreshToken;
        if (!refreshToken) throw new ApiError("not logged in", { status: 401, code: "unauthorized" });
        try {
          const grant = await this.request("POST", "/auth/refresh", {
            body: { refresh_token: refreshToken },
            auth: false,
          });
          this.acceptGrant(grant);
          return grant;
        } catch (err) {
          if (err.status === 401 || err.status === 400 || err.status === 422) {
            this.logout();
            this.onAuthLost(err);
          } else if (isTransient(err) && this.session.refreshToken) {
            // Whoever asked (the timer, a 401 retry, a reconnect) gets the error now; the session
            // does not wait for anyone to ask again: the next try is scheduled, with backoff.
            this.retryRefreshLater(err);
          }
          throw err;
        }
      })().finally(() => {
        this.refreshing = null;
      });
    }
    return this.refreshing;
  }

  /** A usable access token, refreshed first if it is about to expire. */
  async freshToken() {
    if (this.session.refreshToken && this.session.expiresAt - Date.now() < REFRESH_MARGIN_MS / 3) {
      await this.refresh();
    }
    return this.session.accessToken;
  }

  acceptGrant(grant) {
    this.refreshFailures = 0;
    this.session.set(grant);
    this.scheduleRefresh();
    this.onTokens(grant);
  }

  scheduleRefresh() {
    clearTimeout(this.refreshTimer);
    if (!this.session.refreshToken) return;
    const lifetime = this.session.expiresAt - Date.now();
    // 30 s before expiry; a token that lives less than four times that, at 3/4 of its life.
    const early = lifetime > 4 * REFRESH_MARGIN_MS ? lifetime - REFRESH_MARGIN_MS : lifetime * 0.75;
    const due = Math.max(1000, early);
    this.refreshTimer = setTimeout(() => this.refreshNow(), due);
  }

  /** Refresh now; a transient failure (network, 5xx) is retried with backoff, never dropped. */
  refreshNow() {
    clearTimeout(this.refreshTimer);
    this.refreshTimer = null;
    // refresh() schedules the retry of a transient failure; a refused one has logged us out.
    return this.refresh().catch(() => {});
  }

  retryRefreshLater(err) {
    this.refreshFailures += 1;
    const base = Math.min(REFRESH_MAX_BACKOFF_MS, 1000 * 2 ** (this.refreshFailures - 1));
    const delay = Math.round(base * (0.75 + Math.random() / 2));
    clearTimeout(this.refreshTimer);
    this.refreshTimer = setTimeout(() => this.refreshNow(), delay);
    this.onRefreshTrouble(err, delay);
  }

  async request(method, path, { body, auth = true, retryOn401 = true } = {}) {
    const headers = { Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (auth && this.session.accessToken) headers.Authorization = `Bearer ${this.session.accessToken}`;
    const response = await this.fetchWithBackoff(`${this.baseUrl}${path}`, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      mode: "cors",
      credentials: "include",
    });
    if (response.status === 401 && auth && retryOn401 && this.session.refreshToken) {
      await this.refresh(); // throws (and logs out) if the refresh token is refused
      return this.request(method, path, { body, auth, retryOn401: false });
    }
    if (!response.ok) throw await ApiClient.errorFrom(response);
    if (response.status === 204) return null;
    const data = await response.json().catch(() => null);
    const total = response.headers.get("X-Total-Count");
    if (Array.isArray(data) && total !== null) data.total = Number(total);
    return data;
  }

  async fetchWithBackoff(url, init) {
    for (let attempt = 0; ; attempt++) {
      try {
        return await fetch(url, init);
      } catch (err) {
        // fetch rejects only on network failure (or a CORS refusal, which looks the same).
        if (attempt >= NETWORK_RETRIES) {
          throw new ApiError(`network error calling ${url}: ${err.message}`);
        }
        const delay = 300 * 2 ** attempt * (0.75 + Math.random() / 2);
        await sleep(delay);
      }
    }
  }

  static async errorFrom(response) {
    let body = null;
    try {
      body = await response.json();
    } catch {
      body = null;
    }
    const requestId = (body && body.request_id) || response.headers.get("X-Request-ID");
    const code = (body && body.error) || `http_${response.status}`;
    const message = (body && body.message) || response.statusText || `HTTP ${response.status}`;
    return new ApiError(message, {
      status: response.status,
      code,
      requestId,
      details: body && body.details,
    });
  }
}

class LiveSocket {
  constructor(url, api, { onMessage, onState, onNote, onForbidden, onOpen = () => {} }) {
    this.url = url;
    this.api = api;
    this.onMessage = onMessage;
    this.onState = onState;
    this.onNote = onNote;
    this.onForbidden = onForbidden;
    this.onOpen = onOpen;
    this.ws = null;
    this.state = "closed";
    this.topics = new Set();
    this.queue = [];
    this.attempt = 0;
    this.lastSeq = null;
    this.stopped = true;
    this.reconnectTimer = null;
    this.idleTimer = null;
    this.connToken = null;
    this.reauthToken = null; // a fresh token handed to the open socket, until the sidecar answers
    this.closing = false;
    this.connecting = false;
  }

  /**
   * Hand the open socket a refreshed token instead of reconnecting (the sidecar's in-band
   * re-authentication, `websocket.reauth = true`): it answers `authproxy.reauth_ok` and moves the
   * session's expiry. Without an answer (or with `reauth_failed`) nothing is lost: at the old
   * token's expiry the sidecar closes with 4401 and the reconnect path takes over.
   */
  reauthenticate(token) {
    const ws = this.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN || !token || token === this.connToken) return;
    this.reauthToken = token;
    ws.send(JSON.stringify({ type: "authproxy.reauth", token }));
  }

  /** The sidecar's answer to `reauthenticate`; true when `message` was one. */
  onReauthAnswer(message) {
    if (message.type === "authproxy.reauth_ok") {
      this.connToken = this.reauthToken || this.connToken;
      this.reauthToken = null;
      const until = message.expires_at ? clock(new Date(message.expires_at)) : "no expiry";
      this.onNote(`fresh token handed to the open feed (valid until ${until}); no reconnect`);
      return true;
    }
    if (message.type === "authproxy.reauth_failed") {
      this.reauthToken = null;
      this.onNote(`the feed kept its old token (${message.reason}); it reconnects at expiry`, "warn");
      return true;
    }
    return false;
  }

  setState(state) {
    this.state = state;
    this.onState(state);
  }

  start() {
    this.stopped = false;
    this.attempt = 0;
    this.connect();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.reconnectTimer);
    clearTimeout(this.idleTimer);
    this.queue = [];
    if (this.ws) {
      const ws = this.ws;
      this.ws = null;
      ws.close(1000, "logout");
    }
    this.setState("closed");
  }

  subscribe(topics) {
    topics.forEach((t) => this.topics.add(t));
    this.send({ type: "subscribe", topics });
  }

  send(message) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify(message));
    } else {
      this.queue.push(message);
      if (this.queue.length > MAX_QUEUED) this.queue.shift();
    }
  }

  /** Skip the backoff wait (the token was just refreshed: the reason to wait is gone). */
  reconnectNow() {
    if (this.stopped || this.ws || this.closing || this.connecting) return;
    if (this.state !== "reconnecting") return;
    clearTimeout(this.reconnectTimer);
    this.connect();
  }

  async connect() {
    if (this.stopped || this.ws || this.connecting) return; // one socket at a time
    clearTimeout(this.reconnectTimer);
    this.setState(this.attempt === 0 ? "connecting" : "reconnecting");
    let token;
    this.connecting = true; // until the socket exists: a refresh finishing now must not start another
    try {
      token = await this.api.freshToken();
    } catch (err) {
      this.connecting = false;
      if (this.stopped) return;
      if (isTransient(err) && this.api.session.refreshToken) {
        // The refresh could not be done now (network, 5xx): the session is still good; try
        // again later (ApiClient keeps retrying the refresh too).
        this.retryLater(`token refresh failed (${err.status || "network"})`);
        return;
      }
      token = null;
    }
    this.connecting = false;
    if (this.stopped) return;
    if (!token) {
      this.stop();
      return;
    }
    this.connToken = token;
    // The token rides in a subprotocol (`bearer.<token>`): the sidecar authenticates with it and
    // echoes it back; a URL with ?access_token= would be printed in the console on every failure.
    const ws = new WebSocket(this.url, [`bearer.${token}`]);
    this.ws = ws;
    this.lastSeq = null; // seq numbering is per connection
    let opened = false;
    ws.onopen = () => {
      if (this.ws !== ws) return;
      opened = true;
      this.attempt = 0;
      this.setState("open");
      this.onOpen();
      this.armIdleTimer();
      // Re-subscribe first: the server has forgotten our topics. Then flush what queued up,
      // minus subscribes the line above already covers.
      const pending = this.queue.filter((m) => m.type !== "subscribe");
      this.queue = [];
      if (this.topics.size) ws.send(JSON.stringify({ type: "subscribe", topics: [...this.topics] }));
      pending.forEach((m) => ws.send(JSON.stringify(m)));
    };
    ws.onmessage = (event) => {
      if (this.ws !== ws) return;
      this.armIdleTimer();
      let message;
      try {
        message = JSON.parse(event.data);
      } catch {
        this.onNote("ignored a non-JSON message", "warn");
        return;
      }
      if (typeof message.seq === "number") {
        if (this.lastSeq !== null && message.seq !== this.lastSeq + 1) {
          const lost = message.seq - this.lastSeq - 1;
          this.onNote(`seq gap: ${lost} message(s) lost (${this.lastSeq} → ${message.seq})`, "warn");
        }
        this.lastSeq = message.seq;
      }
      if (this.onReauthAnswer(message)) return;
      this.onMessage(message);
    };
    ws.onclose = (event) => {
      if (this.ws !== ws) return;
      this.ws = null;
      clearTimeout(this.idleTimer);
      this.handleClose(event.code, event.reason, opened);
    };
    // onerror is always followed by onclose, which decides what to do.
    ws.onerror = () => {};
  }

  armIdleTimer() {
    clearTimeout(this.idleTimer);
    this.idleTimer = setTimeout(() => {
      if (this.ws) {
        this.onNote("no message for 45 s, reconnecting", "warn");
        this.ws.close(4000, "idle");
      }
    }, WS_IDLE_TIMEOUT_MS);
  }

  async handleClose(code, reason, opened = true) {
    this.closing = true; // decides what comes next: a token refresh now must not also reconnect
    try {
      await this.decideAfterClose(code, reason, opened);
    } finally {
      this.closing = false;
    }
  }

  async decideAfterClose(code, reason, opened) {
    if (this.stopped) return;
    const why = reason ? ` ${reason}` : "";
    if (code === 4401) {
      this.onNote(`closed 4401${why || " token expired"}: reconnecting now with a fresh token`);
      // The proactive refresh usually got there first; refresh only if this socket's token is
      // still the newest we have.
      if (this.api.session.accessToken === this.connToken) {
        try {
          await this.api.refresh();
        } catch {
          // refused: refresh() already logged us out; a network error falls to the next connect
        }
      }
      if (this.stopped) return;
      this.attempt = 0;
      this.connect();
      return;
    }
    if (code === 4403) {
      this.onNote(`closed 4403${why}: access revoked`, "warn");
      this.stop();
      this.onForbidden();
      return;
    }
    if (!opened && this.api.session.accessToken === this.connToken) {
      // A handshake that never opened: browsers hide its HTTP status (a 401 from the sidecar
      // arrives as 1006, like a network failure), so the token may be what was refused. A fresh
      // one costs one refresh; a refused refresh token logs out, a transient failure just waits.
      try {
        await this.api.refresh();
      } catch {
        // handled by refresh(): logged out, or retried later
      }
      if (this.stopped) return;
    }
    this.retryLater(`closed ${code}${why}${opened ? "" : " before opening"}`);
  }

  retryLater(what) {
    const delay = Math.min(WS_MAX_BACKOFF_MS, 500 * 2 ** this.attempt);
    const jittered = Math.round(delay / 2 + Math.random() * (delay / 2));
    this.attempt += 1;
    this.onNote(`${what}; reconnecting in ${(jittered / 1000).toFixed(1)} s`);
    this.setState("reconnecting");
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = setTimeout(() => this.connect(), jittered);
  }
}

/**
 * Read a Server-Sent Events body, calling `onEvent(type, data)` for each event; resolves with the
 * last event (what ended the stream) or null.
 */
async function readEvents(body, onEvent) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let last = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return last;
    buffer += value.replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) {
        last = { event, data: data.join("\n") };
        onEvent(event, last.data);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// UI

const $ = (selector) => document.querySelector(selector);
const WRITE_SCOPE = "models:write";
const WHOAMI_PLACEHOLDER = "Identity headers the sidecar sent upstream appear here.";

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

function statusBadge(status) {
  return el("span", { class: `badge status-${status}` }, status);
}

function clock(date = new Date()) {
  return date.toLocaleTimeString([], { hour12: false });
}

class DemoPage {
  constructor() {
    this.session = new Session();
    this.api = new ApiClient(CONFIG.apiUrl, this.session, {
      onTokens: () => {
        this.renderUser();
        this.recovered();
        this.socket.reauthenticate(this.session.accessToken);
        this.socket.reconnectNow();
      },
      onAuthLost: (err) => this.loggedOut(`Session ended: ${err.message}`),
      onRefreshTrouble: (err, delay) => {
        const why = err.status ? `${err.status} ${err.code}` : "network error";
        const left = Math.round((this.session.expiresAt - Date.now()) / 1000);
        const state = left > 0 ? `token expires in ${left} s` : "token expired";
        this.showError(
          `Token refresh failed (${why}); retrying in ${(delay / 1000).toFixed(0)} s (${state})`,
          { transient: true },
        );
      },
    });
    this.socket = new LiveSocket(CONFIG.wsUrl, this.api, {
      onMessage: (m) => this.onSocketMessage(m),
      onState: (s) => this.renderSocketState(s),
      onNote: (text, level) => this.note(text, level),
      onForbidden: () => this.loggedOut("Access revoked (WebSocket closed with 4403)"),
      onOpen: () => this.recovered(),
    });
    this.models = new Map();
    this.reloadTimer = null;
    this.errorTransient = false; // the banner shows a failure that may go away by itself
  }

  init() {
    $("#api-url").textContent = CONFIG.apiUrl;
    $("#ws-url").textContent = `WebSocket ${CONFIG.wsUrl}`;
    $("#login-form").addEventListener("submit", (e) => {
      e.preventDefault();
      this.login();
    });
    $("#prefill-admin").addEventListener("click", () => this.prefill("admin@example.com", "admin"));
    $("#prefill-viewer").addEventListener("click", () =>
      this.prefill("viewer@example.com", "viewer"),
    );
    $("#logout-button").addEventListener("click", () => this.logout());
    $("#refresh-models").addEventListener("click", () => this.loadModels());
    $("#clear-events").addEventListener("click", () => ($("#events").textContent = ""));
    $("#error-dismiss").addEventListener("click", () => this.showError(null));
    $("#whoami-button").addEventListener("click", () => this.whoami());
    $("#chat-form").addEventListener("submit", (e) => {
      e.preventDefault();
      this.chat($("#chat-question").value);
    });
    $("#create-form").addEventListener("submit", (e) => {
      e.preventDefault();
      this.createModel();
    });
    setInterval(() => this.renderExpiry(), 1000);
    this.renderSocketState("closed");
    if (this.session.refreshToken) {
      // Reload with a live session: resume it (refreshing first if the access token is stale).
      this.api
        .freshToken()
        .then(() => {
          this.api.scheduleRefresh();
          this.loggedIn();
        })
        .catch((err) => {
          if (isTransient(err) && this.session.refreshToken) {
            // The IdP or the network is down for now: keep the session; refresh() has scheduled
            // its retry and put up the banner.
            this.loggedIn();
          } else {
            this.loggedOut(null);
          }
        });
    } else {
      this.loggedOut(null);
    }
  }

  prefill(username, password) {
    $("#username").value = username;
    $("#password").value = password;
  }

  /** Show `err` in the banner (null hides it). A transient one (network, 5xx) clears itself
   * at the next sign of recovery: fresh tokens, an open socket, an API call that works. */
  showError(err, { transient = isTransient(err) } = {}) {
    this.errorTransient = Boolean(err) && transient;
    if (!err) {
      $("#error").textContent = "";
      $("#error-box").hidden = true;
      return;
    }
    let text = typeof err === "string" ? err : err.message;
    if (err.code && err.code !== "network_error") text = `${err.code}: ${text}`;
    if (err.status) text = `${err.status} ${text}`;
    if (err.requestId) text += ` (request ${err.requestId})`;
    $("#error").textContent = text;
    $("#error-box").hidden = false;
  }

  recovered() {
    if (this.errorTransient) this.showError(null);
  }

  async login() {
    const button = $("#login-button");
    button.disabled = true;
    try {
      await this.api.login($("#username").value.trim(), $("#password").value);
      $("#password").value = "";
      this.showError(null);
      this.loggedIn();
    } catch (err) {
      this.showError(err);
    } finally {
      button.disabled = false;
    }
  }

  logout() {
    this.api.logout();
    this.loggedOut(null);
  }

  loggedIn() {
    $("#login-card").hidden = true;
    $("#app-view").hidden = false;
    this.renderUser();
    this.socket.stop();
    this.socket.topics.clear();
    this.socket.subscribe(["models"]);
    this.socket.start();
    this.loadModels();
  }

  loggedOut(message) {
    this.socket.stop();
    this.api.logout();
    this.models.clear();
    $("#models-body").textContent = "";
    $("#whoami").textContent = WHOAMI_PLACEHOLDER;
    $("#events").textContent = "";
    $("#app-view").hidden = true;
    $("#login-card").hidden = false;
    this.renderUser();
    if (message) this.showError(message);
  }

  /** May this user change models? The sidecar would refuse them 403 anyway: say so up front. */
  get canWrite() {
    const user = this.session.user;
    return Boolean(user && user.scopes.includes(WRITE_SCOPE));
  }

  renderUser() {
    const user = this.session.user;
    $("#user").textContent = user ? user.sub : "";
    $("#user-scopes").textContent = user ? user.scopes.join(" ") : "";
    $("#user-box").hidden = !user;
    const write = this.canWrite;
    for (const id of ["#model-name", "#model-framework", "#create-button"]) $(id).disabled = !write;
    $("#create-hint").hidden = write || !user;
    if (this.models.size) this.renderModels();
    this.renderExpiry();
  }

  renderExpiry() {
    const node = $("#token-expiry");
    if (!this.session.user) {
      node.textContent = "";
      return;
    }
    const left = Math.round((this.session.expiresAt - Date.now()) / 1000);
    node.textContent = left > 0 ? `token ${left} s` : "token expired";
    node.classList.toggle("expired", left <= 0);
  }

  renderSocketState(state) {
    const badge = $("#ws-state");
    badge.textContent = state;
    badge.className = `badge ws-${state}`;
  }

  // -- models ---------------------------------------------------------------------------------

  async loadModels() {
    try {
      const models = await this.api.request("GET", "/api/models?limit=100");
      this.models = new Map(models.map((m) => [m.id, m]));
      const total = models.total ?? models.length;
      $("#models-count").textContent = `(${total})`;
      this.renderModels();
      this.recovered();
    } catch (err) {
      this.showError(err);
    }
  }

  scheduleReload() {
    clearTimeout(this.reloadTimer);
    this.reloadTimer = setTimeout(() => this.loadModels(), 300);
  }

  renderModels() {
    const body = $("#models-body");
    body.textContent = "";
    if (!this.models.size) {
      body.append(el("tr", {}, el("td", { class: "empty", colspan: "5" }, "No models yet.")));
      return;
    }
    for (const model of this.models.values()) body.append(this.modelRow(model));
  }

  modelRow(model) {
    // Offer only the transition that makes sense from the current status.
    const idle = { start: ["stopped", "stopping"], stop: ["running", "starting"] };
    const write = this.canWrite;
    const action = (label, verb) => {
      const button = el(
        "button",
        {
          type: "button",
          class: `ghost small ${verb}`,
          "data-action": verb,
          onclick: () => this.modelAction(model.id, verb),
        },
        label,
      );
      button.disabled = !write || !idle[verb].includes(model.status);
      if (!write) button.title = `needs the ${WRITE_SCOPE} scope`;
      return button;
    };
    return el(
      "tr",
      { dataset: { modelId: model.id } },
      el("td", { class: "name" }, model.name, el("span", { class: "id" }, model.id)),
      el("td", { class: "framework" }, model.framework),
      el("td", { class: "status" }, statusBadge(model.status)),
      el("td", { class: "created-by muted" }, model.created_by || "—"),
      el("td", { class: "actions" }, action("Start", "start"), " ", action("Stop", "stop")),
    );
  }

  updateRow(modelId, status) {
    const row = document.querySelector(`tr[data-model-id="${CSS.escape(modelId)}"]`);
    if (status === "deleted") {
      this.models.delete(modelId);
      if (row) row.remove();
      return;
    }
    const model = this.models.get(modelId);
    if (!model || !row) {
      this.scheduleReload(); // a model we have not seen yet
      return;
    }
    model.status = status;
    const fresh = this.modelRow(model);
    fresh.classList.add("flash");
    row.replaceWith(fresh);
  }

  async modelAction(modelId, verb) {
    try {
      const model = await this.api.request("POST", `/api/models/${encodeURIComponent(modelId)}/${verb}`);
      if (model) this.updateRow(model.id, model.status);
    } catch (err) {
      this.showError(err);
    }
  }

  async createModel() {
    const name = $("#model-name").value.trim();
    if (!name) return;
    try {
      const model = await this.api.request("POST", "/api/models", {
        body: { name, framework: $("#model-framework").value },
      });
      $("#model-name").value = "";
      this.models.set(model.id, model);
      this.renderModels();
      this.showError(null);
    } catch (err) {
      this.showError(err);
    }
  }

  async whoami() {
    try {
      const me = await this.api.request("GET", "/api/whoami");
      $("#whoami").textContent = JSON.stringify(
        { identity_headers: me.identity_headers, scopes: me.scopes },
        null,
        2,
      );
      this.recovered();
    } catch (err) {
      this.showError(err);
    }
  }

  // -- a streamed chat completion (Server-Sent Events through the sidecar) ----------------------

  /**
   * POST /api/chat/completions with `stream: true`, read as it arrives. The sidecar binds the
   * stream to the token that opened it: when the token expires (or is revoked) mid-stream it
   * ends the stream with `event: auth_expired` (or `auth_revoked`) and the JSON error. The page
   * then refreshes its token and asks again, once.
   */
  async chat(question, retried = false) {
    const out = $("#chat-answer");
    const status = $("#chat-status");
    const model = [...this.models.keys()][0];
    if (!model) {
      status.textContent = "no model to ask";
      return;
    }
    if (!retried) out.textContent = "";
    $("#chat-button").disabled = true;
    status.textContent = "streaming…";
    try {
      const token = await this.api.freshToken();
      const response = await fetch(`${CONFIG.apiUrl}/api/chat/completions`, {
        method: "POST",
        headers: { "Content-Type": "application/json", Authorization: `Bearer ${token}` },
        body: JSON.stringify({ model, stream: true, messages: [{ role: "user", content: question }] }),
        mode: "cors",
        credentials: "include",
      });
      if (!response.ok) throw await ApiClient.errorFrom(response);
      const ended = await readEvents(response.body, (event, data) => {
        if (event === "message" && data !== "[DONE]") {
          const delta = JSON.parse(data).choices[0].delta.content;
          if (delta) out.textContent += delta;
        }
      });
      if (ended && ended.event.startsWith("auth_")) {
        const error = JSON.parse(ended.data);
        this.note(`chat stream ended by the sidecar: ${ended.event} (${error.details.reason})`, "warn");
        status.textContent = `${ended.event}: ${error.message}`;
        if (!retried) {
          await this.api.refresh();
          out.textContent += " ⟲ ";
          return this.chat(question, true);
        }
        return;
      }
      status.textContent = "done";
    } catch (err) {
      status.textContent = "failed";
      this.showError(err);
    } finally {
      $("#chat-button").disabled = false;
    }
  }

  // -- live events ----------------------------------------------------------------------------

  onSocketMessage(message) {
    switch (message.type) {
      case "model_update":
        this.logEvent(message);
        this.updateRow(message.model_id, message.status);
        break;
      case "subscribed":
        this.note(`subscribed to ${message.topics.join(", ")}`);
        break;
      case "error":
        this.note(`server: ${message.message}`, "warn");
        break;
      default:
        break; // heartbeat, pong, unsubscribed
    }
  }

  logEvent(message) {
    const details = message.details || {};
    const from = details.previous_status ? `${details.previous_status} → ` : "";
    const action = details.action ? ` (${details.action})` : "";
    const entry = el(
      "li",
      { class: "event", dataset: { modelId: message.model_id, seq: String(message.seq) } },
      el("time", { datetime: message.timestamp }, clock(new Date(message.timestamp))),
      el(
        "span",
        { class: "what" },
        el("strong", {}, message.model_id),
        ` ${from}`,
        statusBadge(message.status),
        action,
      ),
      el("span", { class: "seq", title: "sequence number" }, `#${message.seq}`),
    );
    this.prepend(entry);
  }

  note(text, level = "") {
    this.prepend(
      el("li", { class: `note ${level}`.trim() }, el("time", {}, clock()), el("span", {}, text)),
    );
  }

  prepend(entry) {
    const list = $("#events");
    list.prepend(entry);
    while (list.children.length > MAX_EVENTS) list.lastElementChild.remove();
  }
}

window.authproxyDemo = new DemoPage();
window.authproxyDemo.init();
