//! `hostile-slow`: see [`adversaries::Behaviour::Slow`].
llumen_policy_guest::export_policy!(adversaries::Adversary::new(adversaries::Behaviour::Slow));
