//! Policy parameters: named values a policy is given when it is loaded
//! (WIT `llumen:policy/params`, added in 0.1.1), so that one component
//! serves every variant of its rules (thresholds, headroom rule, request
//! selection, metric variant) instead of one component per variant.
//!
//! **Owns**: the parameter vocabulary ([`Param`], [`ParamSpec`],
//! [`ParamError`]) and the parsing helpers policies use to validate values.
//! **Never touches**: where parameters come from (flags, TOML, the admin
//! API: the host's business) or what a policy does with them.
//!
//! Values travel as text so that a policy in any language can read them;
//! each policy parses and validates its own. Setting parameters is all or
//! nothing: an unknown name or a bad value is an error that names it, and
//! the policy keeps the parameters it had.

use core::fmt;
use core::str::FromStr;

/// One parameter setting: `name = value`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Param {
    pub name: String,
    pub value: String,
}

impl Param {
    pub fn new(name: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            value: value.into(),
        }
    }

    /// `name=value` (surrounding white space trimmed on both sides).
    pub fn parse(text: &str) -> Result<Self, ParamError> {
        let (name, value) = text.split_once('=').ok_or_else(|| ParamError {
            name: text.trim().into(),
            message: "expected NAME=VALUE".into(),
        })?;
        let (name, value) = (name.trim(), value.trim());
        if name.is_empty() {
            return Err(ParamError {
                name: String::new(),
                message: format!("{text:?} has no parameter name"),
            });
        }
        Ok(Param::new(name, value))
    }
}

impl fmt::Display for Param {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.name, self.value)
    }
}

/// A parameter a policy knows: its name, its default value and what it
/// means (with the values it takes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamSpec {
    pub name: String,
    pub default_value: String,
    pub description: String,
}

impl ParamSpec {
    pub fn new(name: &str, default_value: impl fmt::Display, description: &str) -> Self {
        Self {
            name: name.into(),
            default_value: default_value.to_string(),
            description: description.into(),
        }
    }
}

/// A parameter the policy refused: unknown, or a value it cannot take.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamError {
    /// The parameter's name as given.
    pub name: String,
    /// Why it was refused (the accepted values, where that helps).
    pub message: String,
}

impl ParamError {
    pub fn unknown(name: &str, known: &[ParamSpec]) -> Self {
        let names: Vec<&str> = known.iter().map(|s| s.name.as_str()).collect();
        ParamError {
            name: name.into(),
            message: if names.is_empty() {
                "this policy takes no parameters".into()
            } else {
                format!("unknown parameter (known: {})", names.join(", "))
            },
        }
    }
}

impl fmt::Display for ParamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.name.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "parameter {:?}: {}", self.name, self.message)
        }
    }
}

/// `value` parsed as a `T`, or an error naming the parameter.
pub fn parse_value<T: FromStr>(param: &Param, what: &str) -> Result<T, ParamError> {
    param.value.parse().map_err(|_| ParamError {
        name: param.name.clone(),
        message: format!("{:?} is not {what}", param.value),
    })
}

/// `value` as one of `choices` (by its text), or an error listing them.
pub fn parse_choice<T: Copy>(param: &Param, choices: &[(&str, T)]) -> Result<T, ParamError> {
    choices
        .iter()
        .find(|(text, _)| *text == param.value)
        .map(|&(_, v)| v)
        .ok_or_else(|| ParamError {
            name: param.name.clone(),
            message: format!(
                "{:?} is not one of {}",
                param.value,
                choices
                    .iter()
                    .map(|(t, _)| *t)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })
}

/// `name=value` settings as given on a command line or in a config file,
/// each parsed ([`Param::parse`]) and none named twice ([`check_unique`]).
pub fn parse_list<'a>(texts: impl IntoIterator<Item = &'a str>) -> Result<Vec<Param>, ParamError> {
    let params = texts
        .into_iter()
        .map(Param::parse)
        .collect::<Result<Vec<_>, _>>()?;
    check_unique(&params)?;
    Ok(params)
}

/// A parameter set that names the same parameter twice is refused (which
/// one was meant?).
pub fn check_unique(params: &[Param]) -> Result<(), ParamError> {
    for (i, p) in params.iter().enumerate() {
        if params[..i].iter().any(|q| q.name == p.name) {
            return Err(ParamError {
                name: p.name.clone(),
                message: "given twice".into(),
            });
        }
    }
    Ok(())
}

/// `params` as one line of text, `name=value&name=value` with `%`, `&`,
/// `=` and `?` percent-encoded: how a version records the parameters it
/// was configured with (e.g. in the registry). [`decode_list`] reads it back.
pub fn encode_list(params: &[Param]) -> String {
    fn escape(text: &str, out: &mut String) {
        for c in text.chars() {
            match c {
                '%' => out.push_str("%25"),
                '&' => out.push_str("%26"),
                '=' => out.push_str("%3D"),
                '?' => out.push_str("%3F"),
                c => out.push(c),
            }
        }
    }
    let mut out = String::new();
    for (i, p) in params.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        escape(&p.name, &mut out);
        out.push('=');
        escape(&p.value, &mut out);
    }
    out
}

/// The parameters [`encode_list`] wrote.
pub fn decode_list(text: &str) -> Result<Vec<Param>, ParamError> {
    fn unescape(text: &str) -> Result<String, ParamError> {
        let mut out = String::new();
        let mut rest = text;
        while let Some(i) = rest.find('%') {
            out.push_str(&rest[..i]);
            let c = match rest.get(i + 1..i + 3) {
                Some("25") => '%',
                Some("26") => '&',
                Some("3D") => '=',
                Some("3F") => '?',
                _ => {
                    return Err(ParamError {
                        name: String::new(),
                        message: format!("bad escape in {text:?}"),
                    })
                }
            };
            out.push(c);
            rest = &rest[i + 3..];
        }
        out.push_str(rest);
        Ok(out)
    }
    if text.is_empty() {
        return Ok(Vec::new());
    }
    text.split('&')
        .map(|pair| {
            let (name, value) = pair.split_once('=').ok_or_else(|| ParamError {
                name: String::new(),
                message: format!("{pair:?} is not name=value"),
            })?;
            Ok(Param::new(unescape(name)?, unescape(value)?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses_clearly() {
        assert_eq!(Param::parse(" a = 3 ").unwrap(), Param::new("a", "3"));
        assert_eq!(Param::parse("a=").unwrap(), Param::new("a", ""));
        assert!(Param::parse("a")
            .unwrap_err()
            .message
            .contains("NAME=VALUE"));
        assert!(Param::parse("=3").is_err());
        let p = Param::new("select", "fifo");
        let e = parse_choice(&p, &[("lcfs", 0), ("sjf", 1)]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "parameter \"select\": \"fifo\" is not one of lcfs, sjf"
        );
        let e = parse_value::<i64>(&Param::new("t", "x"), "an integer").unwrap_err();
        assert!(e.to_string().contains("not an integer"));
        assert!(check_unique(&[Param::new("a", "1"), Param::new("a", "2")]).is_err());
        assert_eq!(parse_list(["a=1", "b=2"]).unwrap().len(), 2);
        assert!(parse_list(["a=1", "a=2"])
            .unwrap_err()
            .message
            .contains("twice"));
        assert!(parse_list(["a"]).is_err());
        assert!(ParamError::unknown("z", &[])
            .message
            .contains("no parameters"));
    }
}
