//! The `round-robin` policy component: fewest requests dispatched so far; no
//! migration, no scaling. The logic lives in `llumen-policy-logic`.
llumen_policy_guest::export_policy!(llumen_policy_logic::RoundRobin::default());
