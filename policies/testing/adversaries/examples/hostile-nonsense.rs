//! `hostile-nonsense`: see [`adversaries::Behaviour::Nonsense`].
llumen_policy_guest::export_policy!(adversaries::Adversary::new(
    adversaries::Behaviour::Nonsense
));
