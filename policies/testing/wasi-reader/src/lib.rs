//! A would-be dispatch policy that reads the clock, a file and the network
//! through WASI imports. It exists only so the tests can prove the host
//! refuses it at install: a policy's only import is `llumen:policy/history`.
//!
//! The WASI interfaces are declared here in a reduced form (only the
//! functions it calls; the names are WASI 0.2's), so no WASI WIT files are
//! needed: the host refuses the component by its import names, before
//! looking at any signature.
//!
//! Owns nothing but this bait; it is never meant to run anywhere (the host
//! has no implementation of these imports, and must never get one).

wit_bindgen::generate!({
    inline: r#"
        package llumen:testing;

        world wasi-reader {
            import wasi:clocks/wall-clock@0.2.0;
            import wasi:filesystem/preopens@0.2.0;
            import wasi:sockets/instance-network@0.2.0;
            export llumen:policy/fleet@0.1.1;
            export llumen:policy/dispatch@0.1.1;
        }

        package wasi:clocks@0.2.0 {
            interface wall-clock {
                record datetime { seconds: u64, nanoseconds: u32 }
                now: func() -> datetime;
            }
        }
        package wasi:filesystem@0.2.0 {
            interface preopens {
                get-directories: func() -> list<string>;
            }
        }
        package wasi:sockets@0.2.0 {
            interface instance-network {
                instance-network: func() -> u32;
            }
        }
    "#,
    path: "../../../policies-wit",
    world: "llumen:testing/wasi-reader",
    generate_all,
});

use exports::llumen::policy::{dispatch, fleet};
use llumen::policy::types::{InstanceId, InstanceLoad, PolicyInfo, RequestMeta};
use wasi::clocks::wall_clock;
use wasi::filesystem::preopens;
use wasi::sockets::instance_network;

struct WasiReader;

impl fleet::Guest for WasiReader {
    fn info() -> PolicyInfo {
        PolicyInfo {
            name: "wasi-reader".into(),
            version: "0".into(),
        }
    }
    fn reset(_loads: Vec<InstanceLoad>) {}
    fn upsert(_loads: Vec<InstanceLoad>) {}
    fn remove(_instance: InstanceId) {}
}

impl dispatch::Guest for WasiReader {
    fn dispatch(_request: RequestMeta) -> InstanceId {
        let seconds = wall_clock::now().seconds;
        let dirs = preopens::get_directories().len() as u64;
        let network = u64::from(instance_network::instance_network());
        (seconds + dirs + network) as InstanceId
    }
}

export!(WasiReader);
