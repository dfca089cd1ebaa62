//! The `queue-length` policy component: least outstanding requests (waiting,
//! then running, then used blocks); no migration, no scaling. The logic lives
//! in `llumen-policy-logic`.
llumen_policy_guest::export_policy!(llumen_policy_logic::QueueLength);
