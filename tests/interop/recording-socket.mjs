// A WebSocket that keeps every message it receives and how it closed. It uses the
// standard WebSocket interface only and nothing from outside its own body, so the same
// class runs in Node (with the `ws` package or Node's own WebSocket) and, sent as source
// text, in Chromium's page.

export class RecordingSocket {
  constructor(WebSocketClass, url) {
    this.received = [];
    this.closed = null;
    this.closingAt = null;
    const socket = new WebSocketClass(url);
    this.socket = socket;
    this.opened = new Promise((resolve, reject) => {
      socket.addEventListener("open", () => resolve());
      socket.addEventListener("error", () => reject(new Error(`could not connect to ${url}`)));
    });
    socket.addEventListener("message", (event) => this.received.push(JSON.parse(event.data)));
    socket.addEventListener("close", (event) => {
      const ms = this.closingAt === null ? null : performance.now() - this.closingAt;
      this.closed = { code: event.code, reason: event.reason, wasClean: event.wasClean, ms };
    });
  }

  send(message) {
    this.socket.send(JSON.stringify(message));
  }

  /** Starts the close handshake; `closed.ms` is measured from here. */
  close(code) {
    this.closingAt = performance.now();
    this.socket.close(code);
  }

  state() {
    return { received: this.received, closed: this.closed };
  }
}

/** Opens a RecordingSocket in this process; the handle the checks drive. */
export function localSocket(WebSocketClass) {
  return async (url) => {
    const socket = new RecordingSocket(WebSocketClass, url);
    await socket.opened;
    return {
      state: async () => socket.state(),
      send: async (message) => socket.send(message),
      close: async (code) => socket.close(code),
    };
  };
}

/** Opens a RecordingSocket with the page's own WebSocket; the same handle, through the page. */
export function pageSocket(page) {
  return async (url) => {
    await page.evaluate(`globalThis.RecordingSocket ??= ${RecordingSocket}`);
    const socket = await page.evaluateHandle(async (url) => {
      const socket = new globalThis.RecordingSocket(WebSocket, url);
      await socket.opened;
      return socket;
    }, url);
    return {
      state: () => socket.evaluate((s) => s.state()),
      send: (message) => socket.evaluate((s, message) => s.send(message), message),
      close: (code) => socket.evaluate((s, code) => s.close(code), code),
    };
  };
}
