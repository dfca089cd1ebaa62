//! `hostile-leak`: see [`adversaries::Behaviour::Leak`].
llumen_policy_guest::export_policy!(adversaries::Adversary::new(adversaries::Behaviour::Leak));
