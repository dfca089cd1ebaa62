//! The `llumnix` policy component: freeness-based dispatch with priority
//! pools, migration pairing with de-fragmentation, priority headroom and a
//! freeness band for auto-scaling. The logic lives in `llumen-policy-logic`.
llumen_policy_guest::export_policy!(llumen_policy_logic::Llumnix::default());
