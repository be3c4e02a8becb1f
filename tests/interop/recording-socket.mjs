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

/**
 * A WebSocket class that counts the sockets made with it in `sockets`: how many were
 * opened, how many ended (by `error` or `close`, whichever came first), their `error` and
 * `close` events, and how many were opened while another was still alive; and that keeps
 * on each socket how its close ended, `{code, ms}`, `ms` measured from a `close()` call.
 * Self-contained like RecordingSocket, so that it runs in the page too.
 */
export function countedWebSocket(Base, sockets) {
  Object.assign(sockets, { opened: 0, ended: 0, errors: 0, closes: 0, overlapping: 0, last: null });
  return class CountedWebSocket extends Base {
    constructor(url) {
      super(url);
      if (sockets.opened > sockets.ended) sockets.overlapping++;
      sockets.opened++;
      sockets.last = this;
      let ended = false;
      const end = () => ended || ((ended = true), sockets.ended++);
      this.addEventListener("error", () => (sockets.errors++, end()));
      this.addEventListener("close", (event) => {
        sockets.closes++;
        end();
        this.closed = { code: event.code, ms: performance.now() - this.closingAt };
      });
    }

    close(code, reason) {
      this.closingAt = performance.now();
      super.close(code, reason);
    }
  };
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
    await definedIn(page);
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

/** Defines RecordingSocket and countedWebSocket in the page. */
export async function definedIn(page) {
  await page.evaluate(`globalThis.RecordingSocket ??= ${RecordingSocket}`);
  await page.evaluate(`globalThis.countedWebSocket ??= ${countedWebSocket}`);
}
