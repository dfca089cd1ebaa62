//! `hostile-self-migration`: see [`adversaries::Behaviour::SelfMigration`].
llumen_policy_guest::export_policy!(adversaries::Adversary::new(
    adversaries::Behaviour::SelfMigration
));
