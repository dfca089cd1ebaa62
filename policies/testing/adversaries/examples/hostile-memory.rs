//! `hostile-memory`: see [`adversaries::Behaviour::MemoryBomb`].
llumen_policy_guest::export_policy!(adversaries::Adversary::new(
    adversaries::Behaviour::MemoryBomb
));
