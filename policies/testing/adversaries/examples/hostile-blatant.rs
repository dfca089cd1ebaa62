//! `hostile-blatant`: see [`adversaries::Behaviour::Blatant`].
llumen_policy_guest::export_policy!(adversaries::Adversary::new(adversaries::Behaviour::Blatant));
