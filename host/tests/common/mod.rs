//! Shared helpers of the end-to-end tests: a real `llumen serve` process
//! (or `llumen instance`), the CLI, and a minimal HTTP/1.1 client.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use llumen_host::front::client::{trust_from, Client};

pub fn llumen() -> &'static str {
    env!("CARGO_BIN_EXE_llumen")
}

/// The policy components built by scripts/build-policies.sh (or the
/// directory `LLUMEN_POLICY_DIR` names).
pub use llumen_host::front::admin::built_policy_dir as policy_dir;

/// The bytes of the component `<name>.wasm` in [`policy_dir`].
pub fn component_bytes(name: &str) -> Vec<u8> {
    let path = policy_dir().join(format!("{name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; build the policy components first with scripts/build-policies.sh",
            path.display()
        )
    })
}

/// The `max_tokens` a journaled request was accepted with (None: no
/// `Accepted` event).
pub fn accepted_max_tokens(store: &llumen_store::Store, request: u64) -> Option<u32> {
    store
        .journal_events(request)
        .unwrap()
        .into_iter()
        .find_map(|e| match e {
            llumen_store::JournalEvent::Accepted { max_tokens, .. } => Some(max_tokens),
            _ => None,
        })
}

/// A running `llumen serve`.
pub struct Server {
    pub child: Child,
    pub ready: serde_json::Value,
    pub data_dir: PathBuf,
    stderr_log: PathBuf,
}

impl Server {
    /// Starts `llumen serve --model tiny` on free ports in `data_dir`.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Server {
        Self::start_env(data_dir, extra, &[])
    }

    /// [`Server::start`] with extra environment variables (e.g. a
    /// `LLUMEN_LOG` filter).
    pub fn start_env(data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let stderr_log = data_dir.with_extension("stderr.log");
        let log = std::fs::File::create(&stderr_log).unwrap();
        let mut child = Command::new(llumen())
            .args([
                "serve",
                "--model",
                "tiny",
                "--listen",
                "127.0.0.1:0",
                "--http",
                "127.0.0.1:0",
            ])
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--policy-dir")
            .arg(policy_dir())
            .args(extra)
            .env("LLUMEN_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("starting llumen serve");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let ready: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| {
            panic!(
                "llumen serve did not start ({e}): stdout {line:?}, stderr:\n{}",
                std::fs::read_to_string(&stderr_log).unwrap_or_default()
            )
        });
        assert_eq!(ready["event"], "ready");
        Server {
            child,
            ready,
            data_dir: data_dir.to_path_buf(),
            stderr_log,
        }
    }

    pub fn quic(&self) -> SocketAddr {
        self.ready["quic"].as_str().unwrap().parse().unwrap()
    }
    pub fn http(&self) -> SocketAddr {
        self.ready["http"].as_str().unwrap().parse().unwrap()
    }

    pub async fn client(&self) -> Client {
        Client::connect(self.quic(), &trust_from(&self.data_dir, None, None))
            .await
            .expect("connecting")
    }

    pub fn token(&self) -> String {
        llumen_host::transport::tls::read_token(
            &self.data_dir.join(llumen_host::transport::tls::TOKEN_FILE),
        )
        .unwrap()
    }

    /// Runs a `llumen` client command against this server.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new(llumen());
        cmd.args(args)
            .arg("--addr")
            .arg(self.quic().to_string())
            .arg("--data-dir")
            .arg(&self.data_dir);
        cmd.output().expect("running llumen")
    }

    /// `llumen ARGS --json`, parsed; panics with stderr on failure.
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "llumen {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "llumen {args:?}: not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// SIGTERM, then wait (the server flushes sled and exits).
    pub fn stop(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "llumen serve did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 exchange (`Connection: close`): status and body.
pub fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let status: u16 = text[9..12].parse().unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

/// The `data:` payloads of an SSE body.
pub fn sse_events(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

/// A `llumen instance --model tiny --join` process of `server`, its stderr
/// in `log_dir/<name>.log`, with extra `env`; returns it and its instance id.
pub fn join_instance(
    server: &Server,
    log_dir: &Path,
    name: &str,
    env: &[(&str, &str)],
) -> (Child, u32) {
    let (child, id, _) = join_instance_with(server, log_dir, name, env, 256);
    (child, id)
}

/// Waits until `n` instances have reported a load to the manager.
pub async fn wait_for_loads(client: &Client, token: &str, n: usize) {
    for _ in 0..200 {
        let s = client
            .admin(token, &llumen_host::front::admin::AdminCommand::Status, &[])
            .await
            .unwrap();
        let loads = s["instances"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| !i["load"].is_null())
            .count();
        if loads >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{n} instances did not report their loads");
}

// ---- Helpers of the reliability tests (faults, load, recovery). ----

impl Server {
    /// The process id of `llumen serve`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Where this server's stderr goes.
    pub fn stderr_path(&self) -> &Path {
        &self.stderr_log
    }

    /// `kill -9`: no flush, no goodbye to clients or instances; then reaps it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// [`join_instance`] with `blocks` KV blocks; the log goes to
/// `log_dir/<name>.log` (its path is returned too).
pub fn join_instance_with(
    server: &Server,
    log_dir: &Path,
    name: &str,
    env: &[(&str, &str)],
    blocks: usize,
) -> (Child, u32, PathBuf) {
    let log_path = log_dir.join(format!("{name}.log"));
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = Command::new(llumen())
        .args(["instance", "--model", "tiny", "--blocks"])
        .arg(blocks.to_string())
        .arg("--join")
        .arg(server.quic().to_string())
        .arg("--data-dir")
        .arg(&server.data_dir)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("starting llumen instance");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| {
        panic!(
            "llumen instance {name}: {e}: {line:?}\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        )
    });
    (child, v["instance"].as_u64().unwrap() as u32, log_path)
}

/// `llumen status` through an admin stream.
pub async fn status(client: &Client, token: &str) -> serde_json::Value {
    client
        .admin(token, &llumen_host::front::admin::AdminCommand::Status, &[])
        .await
        .expect("status")
}

/// Migrations the manager started and has not seen end.
pub fn migrations_in_flight(status: &serde_json::Value) -> u64 {
    let m = &status["migrations"];
    let n = |k: &str| m[k].as_u64().unwrap_or(0);
    n("started").saturating_sub(n("committed") + n("aborted") + n("not_started"))
}

/// True when every instance holds no block, request or migration, the
/// manager has no request in flight and no migration running.
pub fn fleet_is_clean(status: &serde_json::Value) -> bool {
    status["instances"].as_array().unwrap().iter().all(|i| {
        let l = &i["load"];
        l["used_blocks"] == 0
            && l["running"] == 0
            && l["waiting"] == 0
            && l["migrating_in"] == 0
            && l["migrating_out"] == 0
    }) && status["requests_in_flight"] == 0
        && migrations_in_flight(status) == 0
}

/// Waits (up to `within`) until [`fleet_is_clean`]; the last status seen
/// and whether it was clean.
pub async fn wait_clean(
    client: &Client,
    token: &str,
    within: Duration,
) -> (bool, serde_json::Value) {
    let deadline = Instant::now() + within;
    loop {
        let s = status(client, token).await;
        if fleet_is_clean(&s) {
            return (true, s);
        }
        if Instant::now() >= deadline {
            return (false, s);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A field of /proc/PID/status in KiB (`VmHWM`: peak resident set,
/// `VmRSS`: resident now).
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The `p`-th percentile (0..=100, nearest rank) of ascending `sorted`.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The tests' seeded generator (SplitMix64, with `below`, `range`,
/// `chance` and `shuffle`): their choices replay from their seed.
pub type Rng = llumen_engine::SplitMix64;

/// The seed of a seeded test: `$name` in the environment, else `default`.
pub fn seed_from_env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A temporary directory for a test; kept (and its path printed) when
/// `LLUMEN_KEEP_TEST_DIR` is set, for reading the processes' logs.
pub fn test_dir() -> tempfile::TempDir {
    let mut dir = tempfile::tempdir().unwrap();
    if std::env::var_os("LLUMEN_KEEP_TEST_DIR").is_some() {
        dir.disable_cleanup(true);
        eprintln!("test dir kept: {}", dir.path().display());
    }
    dir
}
