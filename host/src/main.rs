//! The `llumen` command line. Errors surface here through anyhow.
//!
//! `serve` (manager + in-process instances), `instance --join` (one instance
//! in its own process), `generate`, `status`, and `policy` (pack and inspect
//! locally; list, install, swap, rollback, shadow and replay through the
//! admin API). Client and admin commands find the server's certificate and
//! the admin token in `--data-dir` (default: the one `serve` uses) unless
//! `--cert`/`--fingerprint`/`--token` say otherwise.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use llumen_host::front::admin::AdminCommand;
use llumen_host::front::api::{GenerateEvent, GenerateRequest};
use llumen_host::front::client::{default_data_dir, trust_from, Client};
use llumen_host::policy::{componentize, PolicyRuntime, RuntimeConfig};
use llumen_host::process::model::{LoadedModel, ModelChoice};
use llumen_host::process::serve::{run_serve, ServeConfig};
use llumen_host::transport::tls;

#[derive(Parser)]
#[command(
    name = "llumen",
    version,
    about = "Serve LLMs on a fleet of instances, scheduled by Wasm policies"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where a client command finds the server.
#[derive(Args, Clone, Debug)]
struct Conn {
    /// The server's QUIC address.
    #[arg(long, default_value = "127.0.0.1:7878")]
    addr: SocketAddr,
    /// The server's data dir (certificate and admin token).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Trust this certificate (PEM) instead of the data dir's.
    #[arg(long)]
    cert: Option<PathBuf>,
    /// Trust the certificate with this sha256 fingerprint.
    #[arg(long)]
    fingerprint: Option<String>,
    /// Admin token (default: read from the data dir).
    #[arg(long, env = "LLUMEN_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

impl Conn {
    fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(default_data_dir)
    }
    async fn connect(&self) -> Result<Client> {
        let trust = trust_from(
            &self.data_dir(),
            self.cert.clone(),
            self.fingerprint.clone(),
        );
        Client::connect(self.addr, &trust)
            .await
            .with_context(|| format!("connecting to llumen at {}", self.addr))
    }
    fn token(&self) -> Result<String> {
        match &self.token {
            Some(t) => Ok(t.clone()),
            None => Ok(tls::read_token(&self.data_dir().join(tls::TOKEN_FILE))?),
        }
    }
}

#[derive(Args, Debug, Default)]
struct ServeFlags {
    /// In-process instances to start.
    #[arg(long)]
    instances: Option<usize>,
    /// auto | tiny | smollm2 | FILE.gguf | profile[:FILE] (auto: SmolLM2
    /// once fetched, else the random-weight test model; profile: instances
    /// step with a latency profile in real time, as in the simulator).
    #[arg(long)]
    model: Option<String>,
    /// QUIC address (clients, admin, joining instances).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// HTTP address (OpenAI API, /metrics); "" for none.
    #[arg(long)]
    http: Option<String>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// TOML file with the same settings (flags override it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// KV blocks per instance.
    #[arg(long)]
    blocks: Option<usize>,
    /// Scaling round bounds (default: a fixed fleet of --instances).
    #[arg(long)]
    min_instances: Option<usize>,
    #[arg(long)]
    max_instances: Option<usize>,
    /// The migration round's period, with --migration-every-steps 0.
    #[arg(long)]
    migration_period_ms: Option<u64>,
    /// Run the migration round about every N engine steps per instance
    /// (default 4, the Llumnix artifact's cadence); 0: on the period.
    #[arg(long)]
    migration_every_steps: Option<u32>,
    #[arg(long)]
    scaling_period_ms: Option<u64>,
    /// Seconds before the first scaling round (default 100, as the artifact).
    #[arg(long)]
    scaling_first_check_s: Option<u64>,
    /// Directory of policy components (default: target/policies).
    #[arg(long)]
    policy_dir: Option<PathBuf>,
    /// The component every kind starts on.
    #[arg(long)]
    default_policy: Option<String>,
    /// A parameter of the default policy, NAME=VALUE (repeatable; e.g.
    /// migrate-out-below=10, select=sjf). `llumen policy inspect FILE` lists
    /// a component's parameters.
    #[arg(long = "policy-param", value_name = "NAME=VALUE")]
    policy_params: Vec<String>,
    #[arg(long)]
    policy_deadline_ms: Option<u64>,
    /// Only compute and log the migration rounds (no live migration).
    #[arg(long)]
    no_migrate: bool,
    /// Most live migrations in or out of one instance at a time.
    #[arg(long)]
    max_migrations_per_instance: Option<usize>,
}

impl ServeFlags {
    fn config(self) -> Result<ServeConfig> {
        let mut c = match &self.config {
            Some(path) => ServeConfig::from_file(path)?,
            None => ServeConfig::default(),
        };
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { c.$f = v; } )* };
        }
        set!(
            instances,
            model,
            listen,
            http,
            migration_period_ms,
            migration_every_steps,
            scaling_period_ms,
            scaling_first_check_s,
            default_policy,
            policy_deadline_ms
        );
        if self.data_dir.is_some() {
            c.data_dir = self.data_dir;
        }
        if self.blocks.is_some() {
            c.blocks = self.blocks;
        }
        if self.min_instances.is_some() {
            c.min_instances = self.min_instances;
        }
        if self.max_instances.is_some() {
            c.max_instances = self.max_instances;
        }
        if self.policy_dir.is_some() {
            c.policy_dir = self.policy_dir;
        }
        if self.no_migrate {
            c.migrate = false;
        }
        if !self.policy_params.is_empty() {
            c.policy_params = self.policy_params;
        }
        if let Some(n) = self.max_migrations_per_instance {
            c.max_migrations_per_instance = n;
        }
        Ok(c)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the manager with in-process instances, QUIC, admin and HTTP.
    Serve(ServeFlags),
    /// Run one instance in this process and join a manager.
    Instance {
        /// The manager's QUIC address.
        #[arg(long)]
        join: SocketAddr,
        #[command(flatten)]
        conn: Conn,
        /// Must match the manager's model.
        #[arg(long, default_value = "auto")]
        model: String,
        #[arg(long)]
        blocks: Option<usize>,
        /// Endpoint for live migrations into this instance (it presents the
        /// manager's certificate from the data dir).
        #[arg(long, default_value = "127.0.0.1:0")]
        migration_listen: SocketAddr,
    },
    /// Stream a completion to stdout.
    Generate {
        #[command(flatten)]
        conn: Conn,
        #[arg(long, default_value_t = 128)]
        max_tokens: u32,
        #[arg(long, default_value_t = 0)]
        priority: u8,
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Send the prompt as plain text rather than a chat turn.
        #[arg(long)]
        raw: bool,
        prompt: String,
    },
    /// Instances, their latest load, active policies.
    Status {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
    /// Live-migrate one running request between two instances now.
    Migrate {
        #[command(flatten)]
        conn: Conn,
        /// Source instance.
        #[arg(long)]
        from: u32,
        /// Destination instance.
        #[arg(long)]
        to: u32,
        /// The request (default: the migration policy's pick).
        #[arg(long)]
        request: Option<u64>,
    },
    /// Policy components: pack and inspect locally; the rest via the admin API.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Turn core Wasm modules built with wit-bindgen into components
    /// (`<dir>/<name>.wasm`, underscores in the name become hyphens).
    Pack {
        /// Directory for the components.
        #[arg(long)]
        out: PathBuf,
        /// Core modules (or components, copied as they are).
        #[arg(required = true)]
        modules: Vec<PathBuf>,
    },
    /// Compile a policy and show what it is: name, version, sha256, kinds.
    Inspect {
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Installed versions, the active one per kind, rollback history.
    List {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
    /// Register a component (without activating it).
    Install {
        #[command(flatten)]
        conn: Conn,
        file: PathBuf,
    },
    /// Make a component (file, or sha256 prefix of an installed one) active for KIND.
    Swap {
        #[command(flatten)]
        conn: Conn,
        kind: String,
        target: String,
        /// A parameter, NAME=VALUE (repeatable; none: the policy's defaults).
        #[arg(long = "param", value_name = "NAME=VALUE")]
        params: Vec<String>,
    },
    /// Make KIND's previous version active again.
    Rollback {
        #[command(flatten)]
        conn: Conn,
        kind: String,
    },
    /// Run a candidate beside KIND's active version and record disagreements
    /// (`--stop` ends it and prints the report).
    Shadow {
        #[command(flatten)]
        conn: Conn,
        kind: String,
        target: Option<String>,
        #[arg(long)]
        stop: bool,
        /// A parameter of the candidate, NAME=VALUE (repeatable).
        #[arg(long = "param", value_name = "NAME=VALUE")]
        params: Vec<String>,
    },
    /// Run a candidate over recorded snapshots and decisions.
    Replay {
        #[command(flatten)]
        conn: Conn,
        kind: String,
        target: String,
        /// Start: µs since the epoch, or seconds ago with a trailing `s` (e.g. 300s).
        #[arg(long)]
        from: String,
        /// End: as --from; default now.
        #[arg(long, default_value = "0s")]
        to: String,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// A parameter of the candidate, NAME=VALUE (repeatable).
        #[arg(long = "param", value_name = "NAME=VALUE")]
        params: Vec<String>,
    },
}

fn main() -> Result<()> {
    llumen_host::process::model::pin_cpu_threads();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LLUMEN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Policy {
            command: PolicyCommand::Pack { out, modules },
        } => pack(&out, &modules),
        Command::Policy {
            command: PolicyCommand::Inspect { json, files },
        } => inspect(&files, json),
        other => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .on_thread_start(llumen_host::process::threads::latency_critical)
                .enable_all()
                .build()?;
            rt.block_on(run(other))
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// A file path, or else a sha256 (prefix) of an installed component.
fn target(t: &str) -> Result<(Option<String>, Vec<u8>)> {
    let path = Path::new(t);
    if path.exists() {
        Ok((None, llumen_host::front::admin::read_component(path)?))
    } else if t.len() >= 4 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok((Some(t.to_string()), Vec::new()))
    } else {
        bail!("{t} is neither a file nor a sha256 prefix")
    }
}

fn time_arg(t: &str) -> Result<u64> {
    let now = llumen_host::process::clock::now_us();
    if let Some(secs) = t.strip_suffix('s') {
        let secs: f64 = secs.parse().with_context(|| format!("bad time {t:?}"))?;
        Ok(now.saturating_sub((secs * 1e6) as u64))
    } else {
        t.parse()
            .with_context(|| format!("bad time {t:?}: µs since the epoch or Ns ago"))
    }
}

async fn admin(conn: &Conn, command: AdminCommand, blob: &[u8]) -> Result<serde_json::Value> {
    let client = conn.connect().await?;
    let token = conn.token()?;
    let reply = client.admin(&token, &command, blob).await;
    client.close().await;
    Ok(reply?)
}

fn print_json(v: &serde_json::Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

async fn run(command: Command) -> Result<()> {
    match command {
        Command::Serve(flags) => {
            let config = flags.config()?;
            run_serve(config, shutdown_signal(), |ready| {
                eprintln!(
                    "llumen: serving {} on {} instance(s): QUIC {} (ALPN llumen/1), HTTP {}\n  data dir {}\n  certificate {} (sha256 {})\n  admin token in {}",
                    ready.model,
                    ready.instances.len(),
                    ready.quic,
                    ready.http.map(|a| format!("http://{a}/v1")).unwrap_or_else(|| "off".into()),
                    ready.data_dir.display(),
                    ready.cert.display(),
                    ready.fingerprint,
                    ready.token_file.display(),
                );
                for p in &ready.policies {
                    eprintln!("  policy {p}");
                }
                // One JSON line on stdout for scripts.
                println!("{}", serde_json::to_string(ready).expect("ready serializes"));
                let _ = std::io::stdout().flush();
            })
            .await
        }
        Command::Instance {
            join,
            conn,
            model,
            blocks,
            migration_listen,
        } => {
            let choice: ModelChoice = model.parse().map_err(anyhow::Error::msg)?;
            let model = LoadedModel::load(&choice).map_err(anyhow::Error::msg)?;
            let mut shape = model.default_shape();
            if let Some(b) = blocks {
                shape.num_blocks = b;
            }
            let trust = trust_from(
                &conn.data_dir(),
                conn.cert.clone(),
                conn.fingerprint.clone(),
            );
            let token = conn.token()?;
            let (identity, _) = tls::load_or_create_identity(&conn.data_dir())?;
            llumen_host::process::instance::run_instance(
                llumen_host::process::instance::JoinOptions {
                    addr: join,
                    trust,
                    token,
                    identity,
                    migration_listen,
                },
                model,
                shape,
                |id| {
                    eprintln!("llumen: joined {join} as instance {id}");
                    println!("{}", serde_json::json!({"event": "joined", "instance": id}));
                    let _ = std::io::stdout().flush();
                },
            )
            .await
        }
        Command::Generate {
            conn,
            max_tokens,
            priority,
            temperature,
            seed,
            raw,
            prompt,
        } => {
            let mut request = GenerateRequest::text(prompt.clone(), max_tokens);
            if !raw {
                request.input = llumen_host::front::api::PromptInput::Chat(vec![
                    llumen_host::front::api::ChatTurn {
                        role: "user".into(),
                        content: prompt,
                    },
                ]);
            }
            request.priority = priority;
            request.temperature = temperature;
            request.seed = seed;
            let client = conn.connect().await?;
            let mut stream = client.generate(&request).await?;
            let mut out = std::io::stdout();
            let result = loop {
                match stream.next().await? {
                    Some(GenerateEvent::Tokens(c)) => {
                        out.write_all(c.text.as_bytes())?;
                        out.flush()?;
                    }
                    Some(GenerateEvent::Finished(f)) => {
                        writeln!(out)?;
                        eprintln!(
                            "[{} tokens, {}, ttft {:.1} ms, total {:.1} ms, instance {}]",
                            f.completion_tokens,
                            f.reason.as_str(),
                            f.ttft_us as f64 / 1e3,
                            f.total_us as f64 / 1e3,
                            f.instance
                        );
                        break Ok(());
                    }
                    Some(GenerateEvent::Error(e)) => break Err(anyhow::anyhow!("server: {e}")),
                    None => break Err(anyhow::anyhow!("stream ended without a final record")),
                }
            };
            drop(stream);
            client.close().await;
            result
        }
        Command::Status { conn, json } => {
            let v = admin(&conn, AdminCommand::Status, &[]).await?;
            if json {
                return print_json(&v);
            }
            println!(
                "model {}  up {:.0} s  requests in flight {} (total {})",
                v["model"].as_str().unwrap_or("?"),
                v["uptime_s"].as_f64().unwrap_or(0.0),
                v["requests_in_flight"],
                v["requests_total"]
            );
            for i in v["instances"].as_array().into_iter().flatten() {
                let l = &i["load"];
                println!(
                    "instance {:>3} {:6} {}  blocks {}/{}  running {}  waiting {}  step {} µs",
                    i["instance"],
                    i["kind"].as_str().unwrap_or(""),
                    if i["draining"].as_bool() == Some(true) {
                        "draining"
                    } else {
                        "serving "
                    },
                    l["used_blocks"],
                    l["total_blocks"],
                    l["running"],
                    l["waiting"],
                    l["step_latency_us"]
                );
            }
            for p in v["policies"].as_array().into_iter().flatten() {
                let active = match p["active"].as_object() {
                    Some(a) => format!(
                        "{} {}",
                        a["name"].as_str().unwrap_or(""),
                        &a["sha256"].as_str().unwrap_or("")
                            [..12.min(a["sha256"].as_str().unwrap_or("").len())]
                    ),
                    None => format!("builtin {}", p["builtin"].as_str().unwrap_or("")),
                };
                println!("policy {:9} {active}", p["kind"].as_str().unwrap_or(""));
            }
            Ok(())
        }
        Command::Migrate {
            conn,
            from,
            to,
            request,
        } => print_json(
            &admin(
                &conn,
                AdminCommand::Migrate {
                    source: from,
                    destination: to,
                    request,
                },
                &[],
            )
            .await?,
        ),
        Command::Policy { command } => match command {
            PolicyCommand::Pack { .. } | PolicyCommand::Inspect { .. } => {
                unreachable!("handled before the runtime starts")
            }
            PolicyCommand::List { conn, json } => {
                let v = admin(&conn, AdminCommand::PolicyList, &[]).await?;
                if json {
                    return print_json(&v);
                }
                for p in v["policies"].as_array().into_iter().flatten() {
                    println!(
                        "{}  {} {}  kinds {}  active for {}",
                        p["sha256"].as_str().unwrap_or(""),
                        p["name"].as_str().unwrap_or(""),
                        p["version"].as_str().unwrap_or(""),
                        p["kinds"],
                        p["active_for"]
                    );
                }
                Ok(())
            }
            PolicyCommand::Install { conn, file } => {
                let bytes = llumen_host::front::admin::read_component(&file)?;
                print_json(&admin(&conn, AdminCommand::PolicyInstall, &bytes).await?)
            }
            PolicyCommand::Swap {
                conn,
                kind,
                target: t,
                params,
            } => {
                let (sha256, blob) = target(&t)?;
                let command = AdminCommand::PolicySwap {
                    kind,
                    sha256,
                    params,
                };
                print_json(&admin(&conn, command, &blob).await?)
            }
            PolicyCommand::Rollback { conn, kind } => {
                print_json(&admin(&conn, AdminCommand::PolicyRollback { kind }, &[]).await?)
            }
            PolicyCommand::Shadow {
                conn,
                kind,
                target: t,
                stop,
                params,
            } => {
                let (sha256, blob) = match (&t, stop) {
                    (Some(t), _) => target(t)?,
                    (None, true) => (None, Vec::new()),
                    (None, false) => bail!("give a component file or sha256, or --stop"),
                };
                print_json(
                    &admin(
                        &conn,
                        AdminCommand::PolicyShadow {
                            kind,
                            sha256,
                            stop,
                            params,
                        },
                        &blob,
                    )
                    .await?,
                )
            }
            PolicyCommand::Replay {
                conn,
                kind,
                target: t,
                from,
                to,
                limit,
                params,
            } => {
                let (sha256, blob) = target(&t)?;
                let command = AdminCommand::PolicyReplay {
                    kind,
                    sha256,
                    params,
                    from_us: time_arg(&from)?,
                    to_us: time_arg(&to)?,
                    limit,
                };
                print_json(&admin(&conn, command, &blob).await?)
            }
        },
    }
}

fn pack(out: &Path, modules: &[PathBuf]) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    for module in modules {
        let bytes =
            std::fs::read(module).with_context(|| format!("reading {}", module.display()))?;
        let component =
            componentize(&bytes).with_context(|| format!("packing {}", module.display()))?;
        let Some(stem) = module.file_stem().and_then(|s| s.to_str()) else {
            bail!("{} has no usable file name", module.display());
        };
        let dest = out.join(format!("{}.wasm", stem.replace('_', "-")));
        // Write then rename, so a reader never sees half a component.
        let tmp = dest.with_extension("wasm.tmp");
        std::fs::write(&tmp, &component).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &dest).with_context(|| format!("writing {}", dest.display()))?;
        eprintln!(
            "packed {} -> {} ({} bytes)",
            module.display(),
            dest.display(),
            component.len()
        );
    }
    Ok(())
}

fn inspect(files: &[PathBuf], json: bool) -> Result<()> {
    let runtime = PolicyRuntime::new(RuntimeConfig::default(), "llumnix")?;
    let mut out = Vec::new();
    for file in files {
        let policy = runtime
            .compile_file(file)
            .with_context(|| format!("loading {}", file.display()))?;
        let params = runtime
            .describe(&policy)
            .with_context(|| format!("asking {} for its parameters", file.display()))?;
        if !json {
            let kinds: Vec<_> = policy.kinds.iter().map(|k| k.as_str()).collect();
            println!(
                "{}: {} {} sha256:{} kinds: {}",
                file.display(),
                policy.name,
                policy.version,
                policy.sha256,
                kinds.join(",")
            );
            for p in &params {
                println!("  {}={}  {}", p.name, p.default_value, p.description);
            }
        }
        out.push(serde_json::json!({
            "file": file,
            "name": policy.name,
            "version": policy.version,
            "sha256": policy.sha256,
            "kinds": policy.kinds,
            "component_bytes": policy.component_bytes.len(),
            "params": params.iter().map(|p| serde_json::json!({
                "name": p.name, "default": p.default_value, "description": p.description,
            })).collect::<Vec<_>>(),
        }));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}
