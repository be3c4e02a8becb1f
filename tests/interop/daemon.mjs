// The daemon the Node and browser clients talk to: a real sensorgate on a loopback port
// with a data directory of its own, stopped by its pid; its REST API; and the events a
// sensor's life should produce for a subscriber.
//
//   SENSORGATE_BIN  the daemon binary (default: target/debug/sensorgate)

import { spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const BINARY = process.env.SENSORGATE_BIN
  ? path.resolve(process.env.SENSORGATE_BIN)
  : path.join(ROOT, "target/debug/sensorgate");

// The suite writes faster than a person would; the default write limits would answer 429.
const CONFIG = "[limits]\nwrites_per_second = 10000.0\nwrite_burst = 10000.0\n";

// Whatever ends this process, no daemon it started is left running, nor its data.
const running = new Set();
process.on("exit", () =>
  running.forEach((daemon) => {
    daemon.proc.kill("SIGKILL");
    rmSync(daemon.dir, { recursive: true, force: true });
  })
);
for (const signal of ["SIGINT", "SIGTERM"]) process.once(signal, () => process.exit(1));

/** Polls `probe` until it returns something truthy, and returns that. */
export async function waitFor(what, probe, timeoutMs = 10000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/** The entity events among `messages`, as `[event_type, entity_id]` pairs. */
export const entityEvents = (messages) =>
  messages.filter((m) => m.type === "entity_event").map((m) => [m.event_type, m.entity_id]);

/** The `seq`s of the events among `messages`. */
export const eventSeqs = (messages) => messages.filter((m) => m.type === "entity_event").map((m) => m.seq);

export class Daemon {
  constructor() {
    this.dir = mkdtempSync(path.join(tmpdir(), "sensorgate-interop-"));
    this.dataDir = path.join(this.dir, "data");
    this.config = path.join(this.dir, "config.toml");
    mkdirSync(this.dataDir);
    writeFileSync(this.config, CONFIG);
    this.log = [];
  }

  /** Starts the daemon and resolves once it says it is ready. */
  start(listen = "127.0.0.1:0") {
    const proc = spawn(BINARY, ["--config", this.config, "--listen", listen, "--data-dir", this.dataDir], {
      stdio: ["ignore", "ignore", "pipe"],
      env: { ...process.env, RUST_LOG: "warn,sensorgate=info" },
    });
    this.proc = proc;
    running.add(this);
    proc.once("exit", () => running.delete(this));
    let address = null;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`the daemon did not start:\n${this.tail()}`)), 30000);
      proc.stderr.on("data", (chunk) => {
        const lines = chunk.toString().split("\n").filter(Boolean);
        this.log.push(...lines);
        for (const line of lines) {
          address ??= line.match(/listening on http:\/\/([^/\s]+)\//)?.[1];
          if (address && / sensorgate::app\] ready/.test(line)) {
            clearTimeout(timer);
            this.url = `http://${address}`;
            this.wsUrl = `ws://${address}`;
            this.port = Number(address.split(":").pop());
            this.token = readFileSync(path.join(this.dataDir, "admin.token"), "utf8").trim();
            resolve(this);
          }
        }
      });
      proc.once("error", (e) => {
        clearTimeout(timer);
        reject(new Error(`the daemon did not start: ${e.message}`));
      });
      proc.once("exit", (code, signal) => {
        clearTimeout(timer);
        reject(new Error(`the daemon exited (${code ?? signal}):\n${this.tail()}`));
      });
    });
  }

  /** SIGTERM, as a supervisor would; SIGKILL if it has not exited within 20 s. */
  async stop() {
    const proc = this.proc;
    if (!proc || proc.exitCode !== null || proc.signalCode !== null) return;
    const exited = new Promise((resolve) => proc.once("exit", resolve));
    proc.kill("SIGTERM");
    const timer = setTimeout(() => proc.kill("SIGKILL"), 20000);
    await exited;
    clearTimeout(timer);
  }

  /** Stops it and starts it again on the same port with the same data, as systemd would. */
  async restart() {
    await this.stop();
    await this.start(`127.0.0.1:${this.port}`);
  }

  /** Stops it and removes its data. */
  async remove() {
    await this.stop();
    rmSync(this.dir, { recursive: true, force: true });
  }

  tail(lines = 40) {
    return this.log.slice(-lines).join("\n");
  }

  /** Log lines that report an error or a panic. */
  problems() {
    return this.log.filter((line) => / ERROR |panicked/.test(line));
  }

  /** A REST call with the admin token; resolves with the status and the JSON body. */
  async request(method, route, body) {
    const response = await fetch(this.url + route, {
      method,
      headers: { Authorization: `Bearer ${this.token}`, ...(body ? { "Content-Type": "application/json" } : {}) },
      body: body ? JSON.stringify(body) : undefined,
    });
    return { status: response.status, body: await response.json() };
  }

  async expect(status, method, route, body) {
    const answer = await this.request(method, route, body);
    if (answer.status !== status) {
      throw new Error(`${method} ${route}: ${answer.status} ${JSON.stringify(answer.body)}, expected ${status}`);
    }
    return answer.body;
  }

  /** Creates a sensor, renames its model and deletes it; resolves with the events a
   * subscriber to its `tipo` gets, in order, as `[event_type, entity_id]` pairs. */
  async sensorLife(tipo) {
    const { id } = await this.expect(201, "POST", "/api/v1/sensores/", { tipo, modelo: "DHT22" });
    await this.expect(200, "PUT", `/api/v1/sensores/${id}`, { modelo: "BME280" });
    await this.expect(200, "DELETE", `/api/v1/sensores/${id}`);
    return [
      ["created", id],
      ["updated", id],
      ["deleted", id],
    ];
  }
}
