//! The `llumen` command line. Errors surface here through anyhow.
//!
//! Today it carries the policy tooling (`policy pack`, `policy inspect`);
//! `serve`, `instance`, `generate`, `status` and the admin verbs of `policy`
//! join as the runtime grows (see docs/ARCHITECTURE.md).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use llumen_host::policy::{componentize, PolicyRuntime, RuntimeConfig};

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

#[derive(Subcommand)]
enum Command {
    /// Policy components: pack and inspect.
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
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Policy {
            command: PolicyCommand::Pack { out, modules },
        } => pack(&out, &modules),
        Command::Policy {
            command: PolicyCommand::Inspect { json, files },
        } => inspect(&files, json),
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
        }
        out.push(serde_json::json!({
            "file": file,
            "name": policy.name,
            "version": policy.version,
            "sha256": policy.sha256,
            "kinds": policy.kinds,
            "component_bytes": policy.component_bytes.len(),
        }));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}
