// sensorgate reference client: a WebSocket that reconnects by itself and never misses
// an event. Dependency-free ES module, served by the daemon at /sensorgate.js.
//
//   import { SensorgateClient } from "/sensorgate.js";
//   const client = new SensorgateClient({
//     channels: ["sensors", "readings"],
//     snapshot: true,                      // start from the current state
//     onSnapshot: (s) => render(s.sensors, s.readings),
//     onEvent: (e) => apply(e),            // entity_event, system_event, test_event
//     onResync: () => reloadOverRest(),    // events were lost for good: reload state
//     onState: (state) => showBadge(state) // "connecting" | "live" | "offline"
//   });
//   client.connect();
//
// After a drop, or a connection that failed (`error` or `close`, whichever comes first),
// it reconnects with jittered exponential back-off and asks for every event after the
// last `seq` it saw (`since`), so the stream continues without gap or duplicate. A
// snapshot is only asked for on the first connection. `close()` ends it for good with a
// normal closure (1000).
//
// A browser does not notice a network that silently went away (Wi-Fi out of range, a
// gateway unplugged), so the client pings when the socket has been quiet for
// `heartbeatMs` and drops it when nothing at all arrives for twice that long, or when
// it is still not open after that long; the usual back-off and resume follow.

export class SensorgateClient {
  constructor(options = {}) {
    this.options = Object.assign(
      {
        url: null,
        channels: ["general"],
        filters: {},
        snapshot: false,
        token: null,
        minDelayMs: 500,
        maxDelayMs: 30000,
        heartbeatMs: 15000,
        onEvent: () => {},
        onSnapshot: () => {},
        onResync: () => {},
        onState: () => {},
        onMessage: () => {},
      },
      options
    );
    this.lastSeq = null;
    this.state = "offline";
    this.attempt = 0;
    this.socket = null;
    this.closed = false;
    this.nextId = 1;
    this.pending = new Map();
    this.timer = null;
    this.watchdog = null;
    this.lastHeard = 0;
    this.pinged = false;
  }

  /** Opens the socket; reconnects until close() is called. */
  connect() {
    this.closed = false;
    this._open();
  }

  /** Closes for good, with a normal closure (1000), which the server answers in kind. */
  close() {
    this.closed = true;
    clearTimeout(this.timer);
    const socket = this.socket;
    if (socket) {
      socket.close(1000, "client closed");
      this._lost(socket, 1000);
    }
    this._setState("offline");
  }

  /** Skips the back-off wait, for when the network or the page is known to be back. */
  reconnectNow() {
    if (this.closed || this.state !== "offline") return;
    clearTimeout(this.timer);
    this._open();
  }

  /** Sends a client message and resolves with the server's answer to it. */
  request(message) {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      if (!this.socket || this.socket.readyState !== WebSocket.OPEN) {
        reject(new Error("not connected"));
        return;
      }
      this.pending.set(id, { resolve, reject });
      this.socket.send(JSON.stringify(Object.assign({}, message, { id })));
    });
  }

  /** Adds channels and replaces the filters named (sensor_id, tipo, event_type, rate_ms). */
  subscribe(changes) {
    if (changes.channels) {
      this.options.channels = Array.from(new Set(this.options.channels.concat(changes.channels)));
    }
    for (const key of ["sensor_id", "tipo", "event_type", "rate_ms"]) {
      if (key in changes) this.options.filters[key] = changes[key];
    }
    return this.request(Object.assign({ type: "subscribe" }, changes));
  }

  /** Leaves channels. */
  unsubscribe(channels) {
    this.options.channels = this.options.channels.filter((c) => !channels.includes(c));
    return this.request({ type: "unsubscribe", channels });
  }

  _url() {
    const base =
      this.options.url ||
      (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/api/v1/ws";
    const params = new URLSearchParams();
    params.set("channel", this.options.channels.join(","));
    for (const [key, value] of Object.entries(this.options.filters)) {
      if (value === null || value === undefined) continue;
      params.set(key, Array.isArray(value) ? value.join(",") : String(value));
    }
    if (this.lastSeq !== null) params.set("since", String(this.lastSeq));
    else if (this.options.snapshot) params.set("snapshot", "true");
    if (this.options.token) params.set("token", this.options.token);
    return base + "?" + params.toString();
  }

  _open() {
    this._setState("connecting");
    const socket = new WebSocket(this._url());
    this.socket = socket;
    this.lastHeard = Date.now();
    this.pinged = false;
    socket.onmessage = (message) => {
      if (this.socket !== socket) return;
      this.lastHeard = Date.now();
      this.pinged = false;
      this._receive(message.data);
    };
    // Browsers report a failed connection with `error` and then `close`; Node's WebSocket
    // reports a refused one with `error` alone. Whichever comes first ends the socket and
    // schedules the one reconnection; `_lost` ignores the other.
    socket.onclose = (event) => this._lost(socket, event.code);
    socket.onerror = () => this._lost(socket, 1006);
    clearInterval(this.watchdog);
    this.watchdog = setInterval(() => this._watch(socket), this.options.heartbeatMs / 3);
  }

  _watch(socket) {
    const quiet = Date.now() - this.lastHeard;
    if (quiet > 2 * this.options.heartbeatMs) {
      // Waiting for the close handshake on a dead network takes minutes: give up on
      // the socket now and let it close in the background.
      socket.close(4000, "no answer");
      this._lost(socket, 4000);
    } else if (quiet > this.options.heartbeatMs && !this.pinged && socket.readyState === WebSocket.OPEN) {
      this.pinged = true;
      socket.send(JSON.stringify({ type: "ping", id: this.nextId++ }));
    }
  }

  _lost(socket, code) {
    if (this.socket !== socket) return;
    this.socket = null;
    clearInterval(this.watchdog);
    for (const { reject } of this.pending.values()) reject(new Error("connection closed"));
    this.pending.clear();
    this._setState("offline");
    if (!this.closed) this._retry(code);
  }

  _retry(code) {
    // A client closed for being slow (4008) comes back at once and catches up with
    // `since`; every other drop backs off, with jitter so a room of dashboards does not
    // reconnect in lockstep after a restart.
    const exponential = Math.min(this.options.maxDelayMs, this.options.minDelayMs * 2 ** this.attempt);
    const delay = code === 4008 ? 0 : exponential / 2 + Math.random() * (exponential / 2);
    this.attempt += 1;
    this.timer = setTimeout(() => this._open(), delay);
  }

  _receive(text) {
    let message;
    try {
      message = JSON.parse(text);
    } catch {
      return;
    }
    this.options.onMessage(message);
    if (message.id !== undefined && message.id !== null && this.pending.has(message.id)) {
      const { resolve, reject } = this.pending.get(message.id);
      this.pending.delete(message.id);
      if (message.type === "error") reject(Object.assign(new Error(message.detail), message));
      else resolve(message);
      return;
    }
    switch (message.type) {
      case "connection":
        this.attempt = 0;
        this._setState("live");
        break;
      case "snapshot":
        this._advance(message.seq);
        this.options.onSnapshot(message);
        break;
      case "resync":
        // Events after our position are gone (retention) or unknown (a new database):
        // the caller reloads its state; events from oldest_seq on follow. After an
        // unknown_seq they are numbered below our position, so it moves back to
        // where the server resumes, or none of them would be accepted.
        this.lastSeq = message.oldest_seq > 0 ? message.oldest_seq - 1 : null;
        this.options.onResync(message);
        break;
      case "entity_event":
      case "system_event":
      case "test_event":
        if (this.lastSeq !== null && message.seq <= this.lastSeq) return;
        this._advance(message.seq);
        this.options.onEvent(message);
        break;
    }
  }

  _advance(seq) {
    if (typeof seq === "number" && (this.lastSeq === null || seq > this.lastSeq)) this.lastSeq = seq;
  }

  _setState(state) {
    if (this.state === state) return;
    this.state = state;
    this.options.onState(state);
  }
}
