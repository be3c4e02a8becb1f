//! Unix signals: SIGTERM and SIGINT stop the daemon, SIGHUP reloads its config.

use std::future::Future;

use tokio::signal::unix::{signal, SignalKind};

/// Installs the SIGTERM and SIGINT handlers at once (a stop requested while the daemon
/// is still starting must not kill it with queued samples unwritten) and resolves on
/// the first of them. Must be called within the runtime.
pub fn terminate() -> impl Future<Output = ()> {
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        match handlers {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                log::error!("cannot install signal handlers; stop with SIGKILL");
                std::future::pending::<()>().await
            }
        }
    }
}

/// A stream of SIGHUPs; `None` if the handler cannot be installed.
pub fn hangups() -> Option<tokio::signal::unix::Signal> {
    match signal(SignalKind::hangup()) {
        Ok(hup) => Some(hup),
        Err(e) => {
            log::error!("cannot install the SIGHUP handler, reload disabled: {e}");
            None
        }
    }
}
