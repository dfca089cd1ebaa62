//! `hostile-wrong-ids`: see [`adversaries::Behaviour::WrongIds`].
llumen_policy_guest::export_policy!(adversaries::Adversary::new(
    adversaries::Behaviour::WrongIds
));
