//! The `infaas` policy component (INFaaS++): load-balancing dispatch on the
//! Llumnix load metric, never migrates. The logic lives in `llumen-policy-logic`.
llumen_policy_guest::export_policy!(llumen_policy_logic::Infaas::default());
