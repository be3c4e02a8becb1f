//! The `sensorgate` command: parse the command line, load the config, set up logging
//! and the runtime, run the daemon.

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use sensorgate::config::{Config, DEFAULT_CONFIG, DEMO_CONFIG};
use sensorgate::control::client::{self, TokenCommand, TokenOutcome};
use sensorgate::control::ListedToken;
use sensorgate::demo::Rig;
use sensorgate::model::format_time;
use sensorgate::sensors::modbus::scan::{self, ScanOptions};
use sensorgate::sensors::modbus::Parity;
use sensorgate::service;
use tokio::sync::mpsc;

const SYSTEM_CONFIG: &str = "/etc/sensorgate/config.toml";
/// Matches `storage.data_dir` in the demo config.
const DEMO_DATA_DIR: &str = "sensorgate-demo";

const HELP: &str = "\
sensorgate: sensor gateway daemon (REST, WebSocket, SQLite)

USAGE:
    sensorgate [OPTIONS]
    sensorgate check-config FILE
    sensorgate print-default-config
    sensorgate token create --name NAME --scope read|write|admin
    sensorgate token list
    sensorgate token revoke NAME
    sensorgate backup FILE
    sensorgate modbus scan PORT|HOST:PORT [--units 1-247] [--baud 9600,19200 | --all-bauds]
                           [--parity none,even,odd] [--timeout-ms 200]

OPTIONS:
    --config FILE     Config file (default: /etc/sensorgate/config.toml if present)
    --listen ADDR     Address to serve on, e.g. 0.0.0.0:8000 (overrides the config)
    --data-dir DIR    Where the database lives (overrides the config)
    --demo            Simulated sensors, development mode, 127.0.0.1:8000, ./sensorgate-demo/
    --dev             Enable development-only routes (/api/v1/test-sensors/)
    -h, --help        Print this help
    -V, --version     Print the version

modbus scan probes each unit id (holding register 0) at each setting and prints what answers;
each probe waits at most --timeout-ms. Stop the daemon first if it uses the same port.

Token and backup commands use the database of --config (or /etc/sensorgate/config.toml) or --data-dir:
through the daemon when one runs on it (as the service's user or root), otherwise the file itself.

Logging is set with RUST_LOG (default: info).
";

/// What the command line asks for.
enum Command {
    Run(RunArgs),
    Token(RunArgs, TokenCommand),
    Backup(RunArgs, PathBuf),
    CheckConfig(PathBuf),
    ModbusScan(String, ScanOptions),
    PrintDefaultConfig,
    Help,
    Version,
}

#[derive(Default)]
struct RunArgs {
    config: Option<PathBuf>,
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    demo: bool,
    dev: bool,
}

fn parse_args() -> Result<Command, lexopt::Error> {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_env();
    let mut args = RunArgs::default();
    while let Some(arg) = parser.next()? {
        match arg {
            Long("config") => args.config = Some(parser.value()?.into()),
            Long("listen") => args.listen = Some(parser.value()?.parse()?),
            Long("data-dir") => args.data_dir = Some(parser.value()?.into()),
            Long("demo") => args.demo = true,
            Long("dev") => args.dev = true,
            Short('h') | Long("help") => return Ok(Command::Help),
            Short('V') | Long("version") => return Ok(Command::Version),
            Value(word) if word == "check-config" => {
                return Ok(Command::CheckConfig(parser.value()?.into()))
            }
            Value(word) if word == "print-default-config" => {
                return Ok(Command::PrintDefaultConfig)
            }
            Value(word) if word == "backup" => {
                let target: PathBuf = parser.value()?.into();
                while let Some(arg) = parser.next()? {
                    match arg {
                        Long("config") => args.config = Some(parser.value()?.into()),
                        Long("data-dir") => args.data_dir = Some(parser.value()?.into()),
                        _ => return Err(arg.unexpected()),
                    }
                }
                return Ok(Command::Backup(args, target));
            }
            Value(word) if word == "modbus" => {
                let action = parser.value()?.string()?;
                if action != "scan" {
                    return Err(format!("unknown modbus command {action:?}; expected scan").into());
                }
                let target = parser.value()?.string()?;
                return Ok(Command::ModbusScan(
                    target,
                    parse_scan_options(&mut parser)?,
                ));
            }
            Value(word) if word == "token" => {
                let action = parser.value()?.string()?;
                let token = parse_token_command(&mut parser, &mut args, &action)?;
                return Ok(Command::Token(args, token));
            }
            _ => return Err(arg.unexpected()),
        }
    }
    Ok(Command::Run(args))
}

/// The options of `modbus scan`.
fn parse_scan_options(parser: &mut lexopt::Parser) -> Result<ScanOptions, lexopt::Error> {
    use lexopt::prelude::*;
    let mut options = ScanOptions {
        units: 1..=247,
        bauds: vec![9600],
        parities: vec![Parity::None],
        timeout: std::time::Duration::from_millis(200),
    };
    while let Some(arg) = parser.next()? {
        match arg {
            Long("units") => options.units = scan::parse_units(&parser.value()?.string()?)?,
            Long("baud") => {
                options.bauds = parser
                    .value()?
                    .string()?
                    .split(',')
                    .map(|b| {
                        b.trim()
                            .parse::<u32>()
                            .ok()
                            .filter(|b| (300..=4_000_000).contains(b))
                    })
                    .collect::<Option<Vec<u32>>>()
                    .ok_or("--baud takes speeds from 300 to 4000000, separated by commas")?
            }
            Long("all-bauds") => options.bauds = scan::USUAL_BAUDS.to_vec(),
            Long("parity") => {
                options.parities = parser
                    .value()?
                    .string()?
                    .split(',')
                    .map(|p| match p.trim() {
                        "none" => Some(Parity::None),
                        "even" => Some(Parity::Even),
                        "odd" => Some(Parity::Odd),
                        _ => None,
                    })
                    .collect::<Option<Vec<Parity>>>()
                    .ok_or("--parity takes none, even and odd, separated by commas")?
            }
            Long("timeout-ms") => {
                let ms: u64 = parser.value()?.parse()?;
                if !(10..=5000).contains(&ms) {
                    return Err("--timeout-ms must be between 10 and 5000".into());
                }
                options.timeout = std::time::Duration::from_millis(ms);
            }
            _ => return Err(arg.unexpected()),
        }
    }
    Ok(options)
}

/// Probes a Modbus line and prints what answers.
fn modbus_scan(target: &str, options: &ScanOptions) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("sensorgate: {e}");
            return ExitCode::FAILURE;
        }
    };
    let settings = if target.starts_with('/') {
        options.bauds.len() * options.parities.len()
    } else {
        1
    };
    let probes = options.units.clone().count() * settings;
    eprintln!(
        "probing {probes} unit ids and settings on {target}, at most {:?} each",
        options.timeout
    );
    let found = runtime.block_on(scan::scan(target, options, |found| {
        let heard = match &found.heard {
            scan::Heard::Register(value) => format!("answers (holding register 0 = {value})"),
            scan::Heard::Exception(name) => format!("answers (exception {name})"),
            scan::Heard::Garbled => "sends frames that do not decode: try other settings".into(),
        };
        println!("unit {:>3} at {}: {heard}", found.unit, found.settings);
    }));
    match found {
        Ok(found) if found.iter().any(|f| f.heard != scan::Heard::Garbled) => ExitCode::SUCCESS,
        Ok(_) => {
            eprintln!("no device answered");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("sensorgate: {e}");
            ExitCode::from(2)
        }
    }
}

/// The rest of `token create|list|revoke`; `--config` and `--data-dir` say which
/// database.
fn parse_token_command(
    parser: &mut lexopt::Parser,
    args: &mut RunArgs,
    action: &str,
) -> Result<TokenCommand, lexopt::Error> {
    use lexopt::prelude::*;
    let (mut name, mut scope) = (None, None);
    while let Some(arg) = parser.next()? {
        match arg {
            Long("config") => args.config = Some(parser.value()?.into()),
            Long("data-dir") => args.data_dir = Some(parser.value()?.into()),
            Long("name") if action == "create" => name = Some(parser.value()?.string()?),
            Long("scope") if action == "create" => scope = Some(parser.value()?.parse()?),
            Value(value) if action == "revoke" && name.is_none() => name = Some(value.string()?),
            _ => return Err(arg.unexpected()),
        }
    }
    let missing = |what: &str| lexopt::Error::from(format!("token {action}: {what} is missing"));
    match action {
        "create" => Ok(TokenCommand::Create {
            name: name.ok_or_else(|| missing("--name"))?,
            scope: scope.ok_or_else(|| missing("--scope read|write|admin"))?,
        }),
        "list" => Ok(TokenCommand::List),
        "revoke" => Ok(TokenCommand::Revoke(
            name.ok_or_else(|| missing("the token name"))?,
        )),
        other => {
            Err(format!("unknown token command {other:?}; expected create, list or revoke").into())
        }
    }
}

/// Copies the database of the configured data directory: through the daemon when one
/// serves it, otherwise from the file.
fn backup_command(args: &RunArgs, target: &Path) -> ExitCode {
    let config = match resolve_config(args, None) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("sensorgate: {e}");
            return ExitCode::from(2);
        }
    };
    match client::backup(&config.storage, target) {
        Ok(bytes) => {
            eprintln!("backup written to {} ({bytes} bytes)", target.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sensorgate: backup failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a token command: through the daemon when one serves the configured data
/// directory (it sees the change at once), otherwise on the database file.
fn token_command(args: &RunArgs, command: TokenCommand) -> ExitCode {
    let config = match resolve_config(args, None) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("sensorgate: {e}");
            return ExitCode::from(2);
        }
    };
    match client::token(&config.storage, command) {
        Ok(TokenOutcome::Created { name, scope, token }) => {
            println!("{token}");
            eprintln!("token {name:?} created with scope {scope}; it is shown only this once");
        }
        Ok(TokenOutcome::Listed(list)) => print_tokens(&list),
        Ok(TokenOutcome::Revoked(name)) => eprintln!("token {name:?} revoked"),
        Err(e) => {
            eprintln!("sensorgate: {e}");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

fn print_tokens(list: &[ListedToken]) {
    let rows: Vec<[String; 4]> = list
        .iter()
        .map(|t| {
            let last = t
                .last_used_at
                .map(format_time)
                .unwrap_or_else(|| "never".into());
            [
                t.name.clone(),
                t.scope.to_string(),
                format_time(t.created_at),
                last,
            ]
        })
        .collect();
    print_table(["NAME", "SCOPE", "CREATED", "LAST USED"], &rows);
}

/// Prints rows under a header, each column as wide as its widest cell.
fn print_table<const N: usize>(header: [&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(|h| h.chars().count());
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; N]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header);
    for row in rows {
        line(row.each_ref().map(String::as_str));
    }
}

/// The config to run with: the file, or the demo's (with the stand-in devices of `rig`),
/// or the packaged default, with command-line flags on top.
fn resolve_config(args: &RunArgs, rig: Option<&Rig>) -> Result<Config, String> {
    let mut config = match (&args.config, rig) {
        (Some(_), Some(_)) => return Err("--demo runs its own config; leave out --config".into()),
        (Some(path), None) => Config::load(path).map_err(|e| e.to_string())?,
        (None, Some(rig)) => {
            let text = format!("{DEMO_CONFIG}\n{}", rig.sensors_toml());
            Config::parse(&text, Path::new("<demo>")).map_err(|e| e.to_string())?
        }
        (None, None) if Path::new(SYSTEM_CONFIG).exists() => {
            Config::load(Path::new(SYSTEM_CONFIG)).map_err(|e| e.to_string())?
        }
        (None, None) => {
            Config::parse(DEFAULT_CONFIG, Path::new("<default>")).map_err(|e| e.to_string())?
        }
    };
    if let Some(listen) = args.listen {
        config.server.listen = listen;
    }
    if let Some(dir) = &args.data_dir {
        config.storage.data_dir = dir.clone();
    }
    if args.dev {
        config.server.dev = true;
    }
    Ok(config)
}

/// Re-reads the config on every SIGHUP and passes it on when it is valid; an invalid
/// file is refused with a log line and the running config stays. Runs for as long as
/// the daemon does.
async fn forward_reloads(
    args: &RunArgs,
    rig: Option<&Rig>,
    reloads: mpsc::Sender<Config>,
) -> Infallible {
    if let Some(mut hangups) = service::hangups() {
        while hangups.recv().await.is_some() {
            match resolve_config(args, rig) {
                Ok(config) => {
                    let _ = reloads.send(config).await;
                }
                Err(e) => log::error!("configuration not reloaded, keeping the running one: {e}"),
            }
        }
    }
    std::future::pending().await
}

fn run(args: RunArgs) -> ExitCode {
    // Under a file size limit (`LimitFSIZE=`, `ulimit -f`) a write past it then fails, and
    // storage reports and rides out the failure, instead of the signal killing the daemon.
    // SAFETY: setting a signal's disposition to "ignore" touches no memory of ours.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let rig = if args.demo {
        let dir = args
            .data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEMO_DATA_DIR));
        match Rig::start(&dir) {
            Ok(rig) => Some(rig),
            Err(e) => {
                eprintln!(
                    "sensorgate: cannot set up the demo devices in {}: {e}",
                    dir.display()
                );
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let config = match resolve_config(&args, rig.as_ref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("sensorgate: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sensorgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let listener = match tokio::net::TcpListener::bind(config.server.listen).await {
            Ok(l) => l,
            Err(e) => {
                log::error!("cannot listen on {}: {e}", config.server.listen);
                return ExitCode::FAILURE;
            }
        };
        let addr = listener.local_addr().unwrap_or(config.server.listen);
        log::info!("listening on http://{addr}/");
        if args.demo {
            // Written, not println!: a closed stdout must not take the daemon down.
            let banner = format!(
                "sensorgate demo running with simulated sensors (Ctrl-C to stop)\n  \
                 dashboard:  http://{addr}/\n  \
                 sensors:    http://{addr}/api/v1/sensores/\n  \
                 readings:   http://{addr}/api/v1/lecturas/\n  \
                 live:       ws://{addr}/api/v1/ws?channel=readings\n  \
                 api docs:   http://{addr}/api/v1/openapi.json\n  \
                 data in:    {}\n",
                config.storage.data_dir.display()
            );
            let mut stdout = std::io::stdout();
            let _ = stdout
                .write_all(banner.as_bytes())
                .and_then(|()| stdout.flush());
        }
        if config.server.dev {
            log::warn!("development mode: /api/v1/test-sensors/ is enabled");
        }
        let (reloads, reloaded) = mpsc::channel(1);
        let daemon = sensorgate::app::run(config, listener, service::terminate(), reloaded);
        let result = tokio::select! {
            result = daemon => result,
            never = forward_reloads(&args, rig.as_ref(), reloads) => match never {},
        };
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                log::error!("{e}");
                ExitCode::FAILURE
            }
        }
    })
}

fn main() -> ExitCode {
    let command = match parse_args() {
        Ok(command) => command,
        Err(e) => {
            eprintln!("sensorgate: {e}\n\n{HELP}");
            return ExitCode::from(2);
        }
    };
    match command {
        Command::Help => {
            print!("{HELP}");
            ExitCode::SUCCESS
        }
        Command::Version => {
            println!("sensorgate {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::PrintDefaultConfig => {
            print!("{DEFAULT_CONFIG}");
            ExitCode::SUCCESS
        }
        Command::CheckConfig(path) => match Config::load(&path) {
            Ok(config) if !config.alert_problems(&path).is_empty() => {
                for problem in config.alert_problems(&path) {
                    eprintln!("{problem}");
                }
                ExitCode::FAILURE
            }
            Ok(config) => {
                let count = config.sensors.len();
                let noun = if count == 1 { "sensor" } else { "sensors" };
                let rules = match config.alerts.rules.len() {
                    0 => String::new(),
                    1 => ", 1 alert rule".to_owned(),
                    n => format!(", {n} alert rules"),
                };
                println!("{}: ok ({count} {noun}{rules})", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Run(args) => {
            service::give_back_memory_promptly();
            service::init_logging();
            run(args)
        }
        Command::ModbusScan(target, options) => modbus_scan(&target, &options),
        Command::Token(args, command) => token_command(&args, command),
        Command::Backup(args, target) => backup_command(&args, &target),
    }
}
