//! `hostile-panic`: see [`adversaries::Behaviour::Panic`].
llumen_policy_guest::export_policy!(adversaries::Adversary::new(adversaries::Behaviour::Panic));
