//! `hostile-recursion`: see [`adversaries::Behaviour::Recursion`].
llumen_policy_guest::export_policy!(adversaries::Adversary::new(
    adversaries::Behaviour::Recursion
));
