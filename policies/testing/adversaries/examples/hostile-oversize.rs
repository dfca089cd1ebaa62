//! `hostile-oversize`: see [`adversaries::Behaviour::Oversize`].
llumen_policy_guest::export_policy!(adversaries::Adversary::new(
    adversaries::Behaviour::Oversize
));
