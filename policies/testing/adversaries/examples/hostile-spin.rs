//! `hostile-spin`: see [`adversaries::Behaviour::Spin`].
llumen_policy_guest::export_policy!(adversaries::Adversary::new(adversaries::Behaviour::Spin));
