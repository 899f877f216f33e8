//! The inspection commands (`ztunnel status`, `workloads`, `services`, `policies`,
//! `certificates`, `connections`): each fetches `/config_dump` from a running ztunnel's admin
//! API and prints one view of it, as a table or as JSON. Fetching lives here; turning a dump
//! into text is [`render`], pure so that golden files can pin it down.
use std::{io::Write as _, net::SocketAddr, time::Duration};

use anyhow::{Context as _, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::{Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::admin::ConfigDump;

mod render;

pub use render::render;

/// The admin API path the commands read.
const CONFIG_DUMP_PATH: &str = "/config_dump";

/// How long to wait for the admin API, from connecting to the last byte of the dump. It is
/// on loopback and answers from memory, so anything slower means it is stuck.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// What to show of a running ztunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Subcommand)]
pub enum Command {
    /// Summarise this node: capture mode and kernel features, enrolled pods, certificates,
    /// connections and eBPF map occupancy.
    Status,
    /// List the workloads ztunnel knows.
    Workloads,
    /// List the services ztunnel knows, with their VIPs, ports and endpoint counts.
    Services,
    /// List authorization policies and peer authentications.
    Policies,
    /// List the workload certificates ztunnel holds for this node's pods.
    Certificates,
    /// List active and recently closed connections.
    Connections,
}

impl Command {
    /// Every command, in the order `--help` lists them.
    pub const ALL: [Command; 6] = [
        Command::Status,
        Command::Workloads,
        Command::Services,
        Command::Policies,
        Command::Certificates,
        Command::Connections,
    ];

    /// The command's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Command::Status => "status",
            Command::Workloads => "workloads",
            Command::Services => "services",
            Command::Policies => "policies",
            Command::Certificates => "certificates",
            Command::Connections => "connections",
        }
    }
}

/// Output format of the inspection commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned columns, for people.
    Table,
    /// The relevant part of the dump, pretty-printed, for scripts.
    Json,
}

/// Options shared by the inspection commands. They are global, so they may come before or
/// after the subcommand.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct Options {
    /// The admin API of the ztunnel to inspect (the address `ztunnel run --admin-addr` serves).
    #[arg(
        long,
        global = true,
        env = "ZTUNNEL_ADMIN_ADDR",
        default_value = "127.0.0.1:15000"
    )]
    pub admin: SocketAddr,

    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value = "table")]
    pub output: Output,
}

/// Fetches the dump from the admin API at `opts.admin` and prints `cmd`'s view of it on
/// standard output.
pub fn run(cmd: &Command, opts: &Options) -> anyhow::Result<()> {
    let dump = fetch_dump(opts.admin)?;
    let text = render(cmd, &dump, opts.output)?;
    print(&text)
}

/// `ztunnel bpf-stats [show|on [--for D]|off]`: the kernel's run count and run time per
/// capture program, which it keeps only while statistics are on.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct BpfStatsArgs {
    #[command(subcommand)]
    pub action: Option<BpfStatsAction>,
}

#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum BpfStatsAction {
    /// Show each program's runs and run time (the default).
    Show,
    /// Turn statistics on for a while (they cost every BPF program on the node two clock
    /// reads per run); at most an hour, asking again extends.
    On {
        /// How long, e.g. 30s, 10m, 1h.
        #[arg(long = "for", default_value = "10m", value_parser = humantime::parse_duration)]
        duration: Duration,
    },
    /// Turn statistics off now.
    Off,
}

/// Runs `ztunnel bpf-stats`: switches through `POST /bpf_stats` or reads `GET /bpf_stats`,
/// and prints the status the daemon answers with.
pub fn run_bpf_stats(args: &BpfStatsArgs, opts: &Options) -> anyhow::Result<()> {
    let (method, path) = match &args.action {
        None | Some(BpfStatsAction::Show) => (hyper::Method::GET, "/bpf_stats".to_owned()),
        Some(BpfStatsAction::On { duration }) => (
            hyper::Method::POST,
            format!(
                "/bpf_stats?enabled=true&duration={}s",
                duration.as_secs().max(1)
            ),
        ),
        Some(BpfStatsAction::Off) => (hyper::Method::POST, "/bpf_stats?enabled=false".to_owned()),
    };
    let body = block_on_request(opts.admin, method, &path)?;
    let status: crate::ebpf::run_stats::Status = serde_json::from_slice(&body)
        .with_context(|| format!("failed to parse the answer to {path} from {}", opts.admin))?;
    print(&render::bpf_stats(&status, opts.output)?)
}

/// `ztunnel capture-log [show|on [--level L] [--program P]…|off [--program P]…]`: the
/// capture programs' decisions in ztunnel's log (`POST /logging?capture=…`).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct CaptureLogArgs {
    #[command(subcommand)]
    pub action: Option<CaptureLogAction>,
}

#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum CaptureLogAction {
    /// Show the log filter and which program groups log their decisions (the default).
    Show,
    /// Log the decisions of every program group, or of those named.
    On {
        /// `warn` (what fails closed: drops, refusals, full maps, misses), `info` (and
        /// what is captured or steered) or `debug` (and what is left alone, and why).
        #[arg(long, default_value = "debug", value_parser = ["warn", "info", "debug"])]
        level: String,
        /// connect, tc, sk_lookup, sockops, sockopt or dns; all when left out.
        #[arg(long = "program", value_delimiter = ',')]
        programs: Vec<String>,
    },
    /// Stop logging the decisions of every program group, or of those named.
    Off {
        #[arg(long = "program", value_delimiter = ',')]
        programs: Vec<String>,
    },
}

impl CaptureLogAction {
    /// The `capture=` setting this asks for (`None`: only show).
    fn spec(&self) -> Option<String> {
        let spec = |programs: &[String], level: &str| {
            if programs.is_empty() {
                level.to_owned()
            } else {
                programs
                    .iter()
                    .map(|p| format!("{p}:{level}"))
                    .collect::<Vec<_>>()
                    .join(",")
            }
        };
        match self {
            CaptureLogAction::Show => None,
            CaptureLogAction::On { level, programs } => Some(spec(programs, level)),
            CaptureLogAction::Off { programs } => Some(spec(programs, "off")),
        }
    }
}

/// Runs `ztunnel capture-log`.
pub fn run_capture_log(args: &CaptureLogArgs, opts: &Options) -> anyhow::Result<()> {
    let (method, path) = match args.action.as_ref().and_then(CaptureLogAction::spec) {
        None => (hyper::Method::GET, "/logging".to_owned()),
        Some(spec) => (hyper::Method::POST, format!("/logging?capture={spec}")),
    };
    let body = block_on_request(opts.admin, method, &path)?;
    print(&String::from_utf8_lossy(&body))
}

/// `ztunnel capture watch [--pod NS/NAME]`.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum CaptureCommand {
    /// Print each capture decision live, one line each (`-o json`: one JSON object
    /// each), until interrupted. While anyone watches, the programs report every
    /// decision (each costs a ring-buffer write).
    Watch {
        /// Only this pod's decisions (`namespace/name`).
        #[arg(long)]
        pod: Option<String>,
    },
}

/// Runs `ztunnel capture watch`: streams `GET /capture/watch` and prints each event as
/// it comes. Connecting and the answer's head are bounded by [`FETCH_TIMEOUT`]; the
/// stream itself runs until interrupted or the daemon ends it.
pub fn run_capture(cmd: &CaptureCommand, opts: &Options) -> anyhow::Result<()> {
    let CaptureCommand::Watch { pod } = cmd;
    let path = match pod {
        Some(p) => format!("/capture/watch?pod={p}"),
        None => "/capture/watch".to_owned(),
    };
    let addr = opts.admin;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("failed to start a runtime for the admin API client")?;
    rt.block_on(async {
        let resp = match tokio::time::timeout(FETCH_TIMEOUT, send(addr, hyper::Method::GET, &path))
            .await
        {
            Ok(r) => r?,
            Err(_elapsed) => bail!(
                "the ztunnel admin API at {addr} did not answer GET {path} within {}s",
                FETCH_TIMEOUT.as_secs()
            ),
        };
        let status = resp.status();
        let mut body = resp.into_body();
        if status != StatusCode::OK {
            let text = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            bail!(
                "the admin API at {addr} answered GET {path} with {status}: {}",
                String::from_utf8_lossy(&text).trim()
            );
        }
        let mut pending = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.with_context(|| format!("the stream from {addr} broke"))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            pending.extend_from_slice(&data);
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let line = String::from_utf8_lossy(&line[..end]).into_owned();
                let text = match opts.output {
                    Output::Json => line,
                    Output::Table => {
                        match serde_json::from_str::<crate::diagnostics::CaptureEvent>(&line) {
                            Ok(e) => e.to_string(),
                            Err(_) => line,
                        }
                    }
                };
                print(&format!("{text}\n"))?;
            }
        }
        Ok(())
    })
}

fn print(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        // `ztunnel connections | head` closes the pipe early: that is not a failure.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("failed to write to standard output"),
    }
}

/// One request to the admin API at `addr` on a runtime of its own, bounded by
/// [`FETCH_TIMEOUT`]; the body of a 200 answer.
fn block_on_request(addr: SocketAddr, method: hyper::Method, path: &str) -> anyhow::Result<Bytes> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("failed to start a runtime for the admin API client")?;
    rt.block_on(async {
        match tokio::time::timeout(FETCH_TIMEOUT, request(addr, method.clone(), path)).await {
            Ok(body) => body,
            Err(_elapsed) => Err(anyhow!(
                "the ztunnel admin API at {addr} did not answer {method} {path} within {}s",
                FETCH_TIMEOUT.as_secs()
            )),
        }
    })
}

/// GETs `/config_dump` from the admin API at `addr` and parses it.
pub fn fetch_dump(addr: SocketAddr) -> anyhow::Result<ConfigDump> {
    let body = block_on_request(addr, hyper::Method::GET, CONFIG_DUMP_PATH)?;
    parse_dump(&body).with_context(|| {
        format!(
            "failed to parse {CONFIG_DUMP_PATH} from {addr} (is this ztunnel binary the same version as the running one?)"
        )
    })
}

/// One HTTP/1.1 request; the answer, its body still to read.
async fn send(
    addr: SocketAddr,
    method: hyper::Method,
    path: &str,
) -> anyhow::Result<hyper::Response<hyper::body::Incoming>> {
    let stream = TcpStream::connect(addr).await.with_context(|| {
        format!(
            "failed to connect to the ztunnel admin API at {addr}; check that `ztunnel run` is up \
             on this node, or pass its admin address with --admin (or ZTUNNEL_ADMIN_ADDR)"
        )
    })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .with_context(|| format!("failed to start HTTP/1.1 with the admin API at {addr}"))?;
    // Drives the connection while the request is in flight; dropped with the runtime.
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method.clone())
        .uri(path)
        .header(header::HOST, addr.to_string())
        .header(header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .with_context(|| format!("failed to build the request for {path}"))?;
    sender
        .send_request(req)
        .await
        .with_context(|| format!("failed to {method} {path} at the admin API at {addr}"))
}

/// One HTTP/1.1 request; the body of a 200 answer, an error naming the status otherwise.
async fn request(addr: SocketAddr, method: hyper::Method, path: &str) -> anyhow::Result<Bytes> {
    let resp = send(addr, method.clone(), path).await?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .with_context(|| format!("failed to read the answer to {method} {path} from {addr}"))?
        .to_bytes();
    if status != StatusCode::OK {
        bail!(
            "the admin API at {addr} answered {method} {path} with {status}: {}",
            String::from_utf8_lossy(&body).trim()
        );
    }
    Ok(body)
}

/// Parses a dump, naming the field that does not fit when it fails (the likely cause is a
/// daemon of another version).
fn parse_dump(body: &[u8]) -> anyhow::Result<ConfigDump> {
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        anyhow::Error::new(e.into_inner()).context(format!("at {path}"))
    })
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead as _, BufReader};
    use std::net::TcpListener;

    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        command: Command,
        #[command(flatten)]
        options: Options,
    }

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("ztunnel").chain(args.iter().copied()))
            .expect("arguments parse")
    }

    #[test]
    fn options_default_to_the_local_admin_api_and_tables() {
        let cli = parse(&["status"]);
        assert_eq!(cli.command, Command::Status);
        // Unless the environment of the test run sets it, which no test does.
        if std::env::var_os("ZTUNNEL_ADMIN_ADDR").is_none() {
            assert_eq!(cli.options.admin, SocketAddr::from(([127, 0, 0, 1], 15000)));
        }
        assert_eq!(cli.options.output, Output::Table);
    }

    #[test]
    fn options_are_accepted_before_and_after_the_command() {
        for args in [
            &["-o", "json", "--admin", "127.0.0.1:15999", "connections"][..],
            &[
                "connections",
                "--output",
                "json",
                "--admin",
                "127.0.0.1:15999",
            ][..],
        ] {
            let cli = parse(args);
            assert_eq!(cli.command, Command::Connections, "{args:?}");
            assert_eq!(cli.options.output, Output::Json, "{args:?}");
            assert_eq!(cli.options.admin, SocketAddr::from(([127, 0, 0, 1], 15999)));
        }
    }

    #[test]
    fn every_command_parses_by_its_name() {
        for cmd in Command::ALL {
            assert_eq!(parse(&[cmd.name()]).command, cmd);
        }
    }

    /// Serves one HTTP answer on loopback and returns the address.
    fn serve_once(status_line: &'static str, body: Vec<u8>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addr = listener.local_addr().expect("bound address");
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().expect("accept");
            let mut reader = BufReader::new(&stream);
            let mut line = String::new();
            // The request head ends with an empty line; a GET has no body.
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                line.clear();
            }
            let head = format!(
                "{status_line}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let mut w = &stream;
            let _ = w
                .write_all(head.as_bytes())
                .and_then(|()| w.write_all(&body));
        });
        addr
    }

    #[test]
    fn fetch_parses_the_dump_the_admin_api_serves() {
        let body = std::fs::read(render::golden_dir().join("config_dump.json")).expect("fixture");
        let addr = serve_once("HTTP/1.1 200 OK", body);
        let dump = fetch_dump(addr).expect("fetch succeeds");
        assert_eq!(dump.workloads.len(), 4);
        assert_eq!(dump.connections.opened_total, 42);
    }

    #[test]
    fn unreachable_admin_api_error_names_the_address_and_the_fix() {
        // A port that was just free: nothing listens there any more.
        let addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind loopback");
        let err = format!("{:#}", fetch_dump(addr).expect_err("nothing listens"));
        assert!(err.contains(&addr.to_string()), "{err}");
        assert!(err.contains("ztunnel run"), "{err}");
        assert!(err.contains("--admin"), "{err}");
    }

    #[test]
    fn error_status_is_reported_with_its_body() {
        let addr = serve_once(
            "HTTP/1.1 404 Not Found",
            b"endpoints: GET /fast_path\n".to_vec(),
        );
        let err = format!("{:#}", fetch_dump(addr).expect_err("404"));
        assert!(err.contains("404 Not Found"), "{err}");
        assert!(err.contains("endpoints: GET /fast_path"), "{err}");
    }

    #[test]
    fn unparsable_dump_error_names_the_field() {
        let addr = serve_once(
            "HTTP/1.1 200 OK",
            br#"{"config": {}, "workloads": [{"uid": 7}]}"#.to_vec(),
        );
        let err = format!("{:#}", fetch_dump(addr).expect_err("bad dump"));
        assert!(err.contains("workloads[0].uid"), "{err}");
        assert!(err.contains("same version"), "{err}");
    }
}
