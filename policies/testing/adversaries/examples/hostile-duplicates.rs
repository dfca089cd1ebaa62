//! `hostile-duplicates`: see [`adversaries::Behaviour::Duplicates`].
llumen_policy_guest::export_policy!(adversaries::Adversary::new(
    adversaries::Behaviour::Duplicates
));
