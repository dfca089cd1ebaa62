//! `llumen serve`: assembles a manager with N in-process instances, the
//! sled store, the policy runtime (defaults from the policy directory, or
//! the versions recorded active in sled), the QUIC endpoint (clients,
//! admin, joining instances) and the HTTP endpoint (OpenAI API, metrics).
//!
//! Owns start-up and shutdown order and the serve configuration (flags and
//! the TOML file). Must never hold serving logic of its own.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use llumen_engine::MigrationConfig;
use serde::{Deserialize, Serialize};

use crate::control::manager::{InstanceLink, LocalFactory, Manager, ManagerConfig};
use crate::control::metrics::Metrics;
use crate::front::admin::Admin;
use crate::front::server::{run_quic, ServerContext};
use crate::policy::{PolicyRuntime, RuntimeConfig, StoreHistory};
use crate::process::model::{InstanceShape, LoadedModel, ModelChoice};
use crate::transport::tls;

/// Everything `llumen serve` can be told, from flags or `--config FILE`
/// (TOML, the same names in snake_case; flags override the file).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    pub instances: usize,
    /// `auto`, `tiny`, `smollm2` or a .gguf path.
    pub model: String,
    pub listen: SocketAddr,
    /// HTTP address (OpenAI API, /metrics); empty string = no HTTP.
    pub http: String,
    pub data_dir: Option<PathBuf>,
    /// KV blocks per instance (default: by model).
    pub blocks: Option<usize>,
    pub block_size: usize,
    /// Bounds of the scaling round (default: `instances` for both, i.e. a
    /// fixed fleet).
    pub min_instances: Option<usize>,
    pub max_instances: Option<usize>,
    /// The migration round's period when `migration_every_steps` is 0.
    pub migration_period_ms: u64,
    /// Run the migration round about every this many engine steps per
    /// instance (the Llumnix artifact's cadence: 4); 0: every
    /// `migration_period_ms` instead.
    pub migration_every_steps: u32,
    pub scaling_period_ms: u64,
    /// The first scaling round waits this long after start (the artifact's
    /// 100 s).
    pub scaling_first_check_s: u64,
    /// The component each kind starts on (`<name>.wasm` in the policy dirs).
    pub default_policy: String,
    /// Parameters of the default policy, `name=value` each (the policy's
    /// `params` interface; e.g. `migrate-out-below=10`). Versions restored
    /// from the registry keep the parameters they were swapped in with.
    pub policy_params: Vec<String>,
    pub policy_dir: Option<PathBuf>,
    /// Deadline of one policy call.
    pub policy_deadline_ms: u64,
    /// Execute the migration policy's choices (live migration over QUIC);
    /// false: compute and log them only.
    pub migrate: bool,
    /// Most live migrations in or out of one instance at a time.
    pub max_migrations_per_instance: usize,
    /// How often buffered snapshots and journal events go to disk (a crash
    /// loses at most this much of them).
    pub flush_period_ms: u64,
    /// Snapshots and finished requests' journal entries older than this are
    /// deleted (checked every minute).
    pub retention_s: u64,
    /// How long a new QUIC stream may take to deliver its first frame
    /// before it is answered `Timeout` and closed (slow-loris limit; an
    /// admin frame carrying a policy component must arrive within it too).
    pub first_frame_timeout_ms: u64,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            instances: 2,
            model: "auto".into(),
            listen: "127.0.0.1:7878".parse().unwrap(),
            http: "127.0.0.1:8080".into(),
            data_dir: None,
            blocks: None,
            block_size: 16,
            min_instances: None,
            max_instances: None,
            migration_period_ms: 1000,
            migration_every_steps: 4,
            scaling_period_ms: 5000,
            scaling_first_check_s: 100,
            default_policy: "llumnix".into(),
            policy_params: Vec::new(),
            policy_dir: None,
            policy_deadline_ms: 50,
            migrate: true,
            max_migrations_per_instance: 1,
            flush_period_ms: 1000,
            retention_s: 7 * 24 * 3600,
            first_frame_timeout_ms: 10_000,
        }
    }
}

impl ServeConfig {
    /// Reads a TOML file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

/// What a started server tells its caller (printed as one JSON line).
#[derive(Clone, Debug, Serialize)]
pub struct Ready {
    pub event: &'static str,
    pub quic: SocketAddr,
    pub http: Option<SocketAddr>,
    pub data_dir: PathBuf,
    pub cert: PathBuf,
    pub fingerprint: String,
    pub token_file: PathBuf,
    pub model: String,
    pub instances: Vec<u32>,
    pub policies: Vec<String>,
}

/// Runs the server until `shutdown` completes; `ready` is called once it
/// listens.
pub async fn run_serve(
    config: ServeConfig,
    shutdown: impl std::future::Future<Output = ()>,
    ready: impl FnOnce(&Ready),
) -> Result<()> {
    let data_dir = config
        .data_dir
        .clone()
        .unwrap_or_else(crate::front::client::default_data_dir);
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating the data dir {}", data_dir.display()))?;
    let (identity, _created) = tls::load_or_create_identity(&data_dir)?;
    let token = tls::load_or_create_token(&data_dir)?;
    // Writes are flushed by the periodic task below, off the hot path; the
    // batch limit only bounds memory between two flushes.
    let store = Arc::new(
        llumen_store::Store::open(data_dir.join("store"))
            .with_context(|| format!("opening the store in {}", data_dir.display()))?
            .with_batch_size(1 << 16),
    );
    let runtime_config = RuntimeConfig {
        call_deadline: Duration::from_millis(config.policy_deadline_ms.max(1)),
        ..RuntimeConfig::default()
    };
    let runtime = Arc::new(
        PolicyRuntime::with_history(
            runtime_config,
            &config.default_policy,
            Arc::new(StoreHistory::new(store.clone())),
        )
        .context("starting the policy runtime")?,
    );

    let choice: ModelChoice = config.model.parse().map_err(anyhow::Error::msg)?;
    let model = Arc::new(LoadedModel::load(&choice).map_err(anyhow::Error::msg)?);
    let mut shape = model.default_shape();
    if let Some(b) = config.blocks {
        shape.num_blocks = b;
    }
    shape.block_size = match model.required_block_size() {
        Some(b)
            if b != config.block_size && config.block_size != ServeConfig::default().block_size =>
        {
            anyhow::bail!(
                "block size {} differs from the profile's {b}: a profile's steps are timed for its own",
                config.block_size
            )
        }
        Some(b) => b,
        None => config.block_size,
    };
    // What an instance's scheduler accepts: the manager refuses anything
    // longer at admission (the simulator applies the same rule).
    let max_model_len = model.scheduler_config(&shape).max_total_tokens();
    anyhow::ensure!(max_model_len > 0, "instances of {shape:?} hold no tokens");

    let factory: LocalFactory = {
        let model = model.clone();
        let shape: InstanceShape = shape.clone();
        Box::new(move |id, sink, routes| {
            let llumlet =
                model.spawn_llumlet(id, &shape, sink, routes, MigrationConfig::default())?;
            Ok(Arc::new(llumlet) as Arc<dyn InstanceLink>)
        })
    };
    let manager_config = ManagerConfig {
        model_name: model.name.clone(),
        max_model_len,
        migration_period: Duration::from_millis(config.migration_period_ms.max(10)),
        migration_cadence: llumen_fleet::MigrationCadence::every_steps(
            config.migration_every_steps,
        ),
        scaling_period: Duration::from_millis(config.scaling_period_ms.max(10)),
        scaling_first_check: Duration::from_secs(config.scaling_first_check_s),
        min_instances: config.min_instances.unwrap_or(config.instances),
        max_instances: config.max_instances.unwrap_or(config.instances),
        max_moves: 8,
        migrate: config.migrate,
        max_migrations_per_instance: config.max_migrations_per_instance.max(1),
    };
    let manager = Manager::new(
        manager_config,
        runtime,
        store.clone(),
        Arc::new(Metrics::new()),
        model.codec.clone(),
        Some(factory),
    );
    let admin = Arc::new(Admin::new(manager.clone()));
    let dirs = match &config.policy_dir {
        Some(d) => vec![d.clone()],
        None => crate::front::admin::default_policy_dirs(),
    };
    let policies = {
        let admin = admin.clone();
        let default = config.default_policy.clone();
        let params = config.policy_params.clone();
        tokio::task::spawn_blocking(move || admin.restore(&default, &dirs, &params))
            .await?
            .map_err(|e| anyhow::anyhow!("{}", e.message))?
    };
    let mut instances = Vec::new();
    for _ in 0..config.instances {
        instances.push(manager.add_local_instance().map_err(anyhow::Error::msg)?);
    }

    // Ready means dispatchable: wait for every instance's first snapshot.
    for _ in 0..500 {
        if manager.instances_reporting() >= instances.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let endpoint = tls::server_endpoint(config.listen, &identity)?;
    let quic_addr = endpoint.local_addr()?;
    let http = if config.http.is_empty() {
        None
    } else {
        let addr: SocketAddr = config
            .http
            .parse()
            .with_context(|| format!("--http {:?} is not an address", config.http))?;
        Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding HTTP on {addr}"))?,
        )
    };
    let http_addr = http.as_ref().map(|l| l.local_addr()).transpose()?;

    let ctx = Arc::new(ServerContext {
        manager: manager.clone(),
        admin,
        token: token.clone(),
        first_frame_timeout: Duration::from_millis(config.first_frame_timeout_ms.max(1)),
    });
    let quic_task = tokio::spawn(run_quic(endpoint.clone(), ctx));
    // Migrations between the in-process instances go over QUIC through this
    // endpoint, like those between hosts.
    let migration_transport = crate::transport::migration::MigrationTransport::new(
        quic_addr,
        tls::Trust::Fingerprint(identity.fingerprint.clone()),
        token.clone(),
    )?;
    manager.enable_migration(Arc::new(migration_transport), quic_addr);
    let (http_stop, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let http_task = http.map(|listener| {
        let serving: Arc<dyn crate::front::api::Serving> = Arc::new(manager.clone());
        tokio::spawn(crate::front::http::serve_http(
            listener,
            serving,
            async move {
                let _ = http_stopped.await;
            },
        ))
    });
    manager.start_rounds();
    {
        let manager = manager.clone();
        let period = Duration::from_millis(config.flush_period_ms.max(10));
        let retention_us = config.retention_s.saturating_mul(1_000_000);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            let mut last_retention = 0u64;
            loop {
                tick.tick().await;
                let m = manager.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    m.flush();
                    let now = crate::process::clock::now_us();
                    if now >= last_retention + 60_000_000 {
                        let cutoff = now.saturating_sub(retention_us);
                        if let Err(e) = m.store().retain_since(cutoff) {
                            tracing::error!(error = %e, "snapshot retention");
                        }
                        if let Err(e) = m.store().retain_journal_since(cutoff) {
                            tracing::error!(error = %e, "journal retention");
                        }
                    }
                })
                .await;
                let now = crate::process::clock::now_us();
                if now >= last_retention + 60_000_000 {
                    last_retention = now;
                }
            }
        });
    }

    ready(&Ready {
        event: "ready",
        quic: quic_addr,
        http: http_addr,
        cert: data_dir.join(tls::CERT_FILE),
        token_file: data_dir.join(tls::TOKEN_FILE),
        data_dir: data_dir.clone(),
        fingerprint: identity.fingerprint.clone(),
        model: model.name.clone(),
        instances,
        policies,
    });

    shutdown.await;
    tracing::info!("shutting down");
    endpoint.close(0u32.into(), b"server shutting down");
    let _ = http_stop.send(());
    if let Some(t) = http_task {
        let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
    }
    quic_task.abort();
    let m = manager.clone();
    tokio::task::spawn_blocking(move || m.shutdown()).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_file_sets_policy_parameters_and_the_cadence() {
        let c: ServeConfig = toml::from_str(
            r#"
            default_policy = "llumnix"
            policy_params = ["migrate-out-below=10", "select=sjf"]
            migration_every_steps = 2
            scaling_first_check_s = 0
            "#,
        )
        .unwrap();
        assert_eq!(c.policy_params, ["migrate-out-below=10", "select=sjf"]);
        assert_eq!((c.migration_every_steps, c.scaling_first_check_s), (2, 0));
        // Defaults: the artifact's cadence and first scaling check.
        let d = ServeConfig::default();
        assert_eq!((d.migration_every_steps, d.scaling_first_check_s), (4, 100));
        assert!(d.policy_params.is_empty());
        // A misspelt setting is an error, not a default.
        assert!(toml::from_str::<ServeConfig>("policy_param = [\"a=1\"]").is_err());
    }
}
