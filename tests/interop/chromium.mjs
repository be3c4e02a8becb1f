// The headless Chromium both browser suites drive: the binary and the flags that keep it
// from reaching out to the network or to a display of its own.

/** The browser's binary, from CHROMIUM or Debian's default place. */
export const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";

/** Flags for a Chromium that runs in a container and talks to the daemon alone. */
export const CHROMIUM_ARGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];
