//! From TOML text to a validated [`Policy`], collecting every error with its location.
//!
//! The document is walked by hand (over toml's spanned tree) rather than through serde so that
//! one run reports all problems, not just the first.

use std::{collections::HashMap, ops::Range};

use portguard_common::MAX_SCOPES;
use toml::{
    Spanned,
    de::{DeTable, DeValue},
};

use super::{Location, Mode, Policy, PolicyError, PolicyErrors, PortRange, Scope, Selector};

const TOP_KEYS: [&str; 3] = ["mode", "reserve", "scope"];
const SCOPE_KEYS: [&str; 11] = [
    "name",
    "cgroup",
    "unit",
    "container",
    "ephemeral",
    "pool",
    "block",
    "bind",
    "mode",
    "strict",
    "share",
];
const SELECTOR_KEYS: [&str; 3] = ["cgroup", "unit", "container"];
const MAX_NAME_LEN: usize = 64;
/// A pool's instances are named `name#block` (block index up to 65,535) in 64 bytes.
const MAX_POOL_NAME_LEN: usize = 64 - 6;

/// Parses and validates `text`.
pub fn parse(text: &str) -> Result<Policy, PolicyErrors> {
    let mut errors = Errors { text, list: vec![] };
    let (document, syntax_errors) = DeTable::parse_recoverable(text);
    for error in syntax_errors {
        let span = error.span().unwrap_or(0..0);
        errors.push(span, error.message().trim().to_owned());
    }
    if !errors.list.is_empty() {
        return Err(errors.finish());
    }
    let policy = parse_document(document.get_ref(), &mut errors);
    if errors.list.is_empty() {
        Ok(policy)
    } else {
        Err(errors.finish())
    }
}

struct Errors<'a> {
    text: &'a str,
    list: Vec<PolicyError>,
}

impl Errors<'_> {
    fn push(&mut self, span: Range<usize>, message: String) {
        self.list.push(PolicyError {
            at: Location::of(self.text, span.start),
            message,
        });
    }

    fn finish(mut self) -> PolicyErrors {
        self.list.sort_by_key(|error| error.at);
        PolicyErrors(self.list)
    }
}

fn parse_document(document: &DeTable<'_>, errors: &mut Errors<'_>) -> Policy {
    unknown_keys(document, &TOP_KEYS, "top level", errors);
    let mode = match document.get("mode") {
        Some(value) => parse_mode(value, &["enforce", "audit", "observe"], errors),
        None => Some(Mode::Enforce),
    }
    .unwrap_or(Mode::Enforce);
    let reserve = match document.get("reserve") {
        None => true,
        Some(value) => match value.get_ref() {
            DeValue::Boolean(reserve) => *reserve,
            other => {
                errors.push(
                    value.span(),
                    format!(
                        "`reserve` must be true or false, found {}",
                        type_name(other)
                    ),
                );
                true
            }
        },
    };

    let mut scopes = vec![];
    match document
        .get("scope")
        .map(|value| (value.span(), value.get_ref()))
    {
        None => {}
        Some((_, DeValue::Array(array))) => {
            for (index, table) in array.iter().enumerate() {
                // The kernel maps hold MAX_SCOPES rules: say so here, where `check` sees it,
                // rather than when a daemon compiles the policy.
                if index == MAX_SCOPES as usize {
                    errors.push(
                        table.span(),
                        format!(
                            "too many scopes: at most {MAX_SCOPES} are supported, this is scope {}",
                            index + 1
                        ),
                    );
                    break;
                }
                match table.get_ref() {
                    DeValue::Table(fields) => {
                        if let Some(scope) = parse_scope(fields, table.span(), errors) {
                            scopes.push(scope);
                        }
                    }
                    other => errors.push(
                        table.span(),
                        format!("each scope must be a table, found {}", type_name(other)),
                    ),
                }
            }
        }
        Some((span, other)) => errors.push(
            span,
            format!(
                "`scope` must be an array of tables ([[scope]]), found {}",
                type_name(other)
            ),
        ),
    }
    cross_check(&scopes, errors);
    Policy {
        mode,
        reserve,
        scopes,
    }
}

fn parse_scope(fields: &DeTable<'_>, span: Range<usize>, errors: &mut Errors<'_>) -> Option<Scope> {
    unknown_keys(fields, &SCOPE_KEYS, "scope", errors);
    let at = Location::of(errors.text, span.start);
    let required = |key: &str, errors: &mut Errors<'_>| {
        let value = fields.get(key);
        if value.is_none() {
            errors.push(span.clone(), format!("scope is missing `{key}`"));
        }
        value
    };

    let name = required("name", errors).and_then(|value| {
        let name = string(value, "name", errors)?;
        let valid = !name.is_empty()
            && name.len() <= MAX_NAME_LEN
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !valid {
            errors.push(
                value.span(),
                format!(
                    "scope name `{name}` must be 1-{MAX_NAME_LEN} characters of a-z, 0-9, '_' and '-'"
                ),
            );
            return None;
        }
        Some(name.to_owned())
    });
    let selector = parse_selector(fields, span.clone(), errors);
    let (ephemeral, block) = parse_ports(fields, span.clone(), errors);
    let bind = match fields.get("bind") {
        None => Some(None),
        Some(value) => parse_bind_list(value, errors).map(Some),
    };
    let mode = match fields.get("mode") {
        None => Some(None),
        Some(value) => parse_mode(value, &["enforce", "audit"], errors).map(Some),
    };
    let strict = parse_flag(fields, "strict", false, errors);
    let share = parse_flag(fields, "share", true, errors);
    // Pool instances are named `name#block` in a 64-byte map value.
    if let (Some(name), Some(Some(_))) = (&name, &block)
        && name.len() > MAX_POOL_NAME_LEN
    {
        errors.push(
            span.clone(),
            format!("pool scope name `{name}` is longer than {MAX_POOL_NAME_LEN} characters"),
        );
        return None;
    }
    Some(Scope {
        name: name?,
        selector: selector?,
        ephemeral: ephemeral?,
        block: block?,
        bind: bind?,
        mode: mode?,
        strict: strict?,
        share: share?,
        at,
    })
}

/// A `key = true|false` of a scope, `default` when absent.
fn parse_flag(
    fields: &DeTable<'_>,
    key: &str,
    default: bool,
    errors: &mut Errors<'_>,
) -> Option<bool> {
    let Some(value) = fields.get(key) else {
        return Some(default);
    };
    match value.get_ref() {
        DeValue::Boolean(flag) => Some(*flag),
        other => {
            errors.push(
                value.span(),
                format!("`{key}` must be true or false, found {}", type_name(other)),
            );
            None
        }
    }
}

/// `ephemeral = "lo-hi"`, or `pool = "lo-hi"` with `block = N` (ports per cgroup).
fn parse_ports(
    fields: &DeTable<'_>,
    span: Range<usize>,
    errors: &mut Errors<'_>,
) -> (Option<PortRange>, Option<Option<u16>>) {
    let range_of = |key: &str, errors: &mut Errors<'_>| {
        let value = fields.get(key)?;
        let text = string(value, key, errors)?;
        range(value, text, key, errors)
    };
    match (
        fields.get("ephemeral"),
        fields.get("pool"),
        fields.get("block"),
    ) {
        (Some(_), None, None) => (range_of("ephemeral", errors), Some(None)),
        (None, Some(_), Some(block_value)) => {
            let pool = range_of("pool", errors);
            let block = match block_value.get_ref() {
                DeValue::Integer(integer) => integer.as_str().parse::<u32>().ok(),
                _ => None,
            };
            match (pool, block) {
                (Some(pool), Some(block)) if block >= 1 && block <= pool.len() => {
                    (Some(pool), Some(Some(block as u16)))
                }
                (Some(pool), _) => {
                    errors.push(
                        block_value.span(),
                        format!("`block` must be a whole number of ports from 1 to {} (the pool's size)", pool.len()),
                    );
                    (None, None)
                }
                (None, _) => (None, None),
            }
        }
        (None, Some(pool), None) => {
            errors.push(
                pool.span(),
                "`pool` needs `block`, the ports each cgroup gets".into(),
            );
            (None, None)
        }
        (Some(_), Some(second), _) => {
            errors.push(
                second.span(),
                "give either `ephemeral` or `pool`, not both".into(),
            );
            (None, None)
        }
        (Some(_), None, Some(block)) => {
            errors.push(
                block.span(),
                "`block` goes with `pool`, not `ephemeral`".into(),
            );
            (None, None)
        }
        (None, None, _) => {
            errors.push(
                span,
                "scope needs `ephemeral` (or `pool` and `block`)".into(),
            );
            (None, None)
        }
    }
}

/// Exactly one of `cgroup`, `unit` and `container`.
fn parse_selector(
    fields: &DeTable<'_>,
    span: Range<usize>,
    errors: &mut Errors<'_>,
) -> Option<Selector> {
    let mut given: Vec<(&str, &Spanned<DeValue<'_>>)> = SELECTOR_KEYS
        .iter()
        .filter_map(|key| fields.get(*key).map(|value| (*key, value)))
        .collect();
    given.sort_by_key(|(_, value)| value.span().start);
    let (key, value) = match given.as_slice() {
        [one] => *one,
        [] => {
            errors.push(
                span,
                "scope needs one of `cgroup`, `unit` or `container`".into(),
            );
            return None;
        }
        [_, second, ..] => {
            errors.push(
                second.1.span(),
                format!(
                    "scope has more than one of `cgroup`, `unit` and `container` ({}); give exactly one",
                    given.iter().map(|(key, _)| *key).collect::<Vec<_>>().join(", ")
                ),
            );
            return None;
        }
    };
    let text = string(value, key, errors)?;
    let selector = match key {
        "cgroup" => Selector::cgroup(text),
        "unit" => Selector::unit(text),
        _ => Selector::container(text),
    };
    selector
        .map_err(|message| errors.push(value.span(), message))
        .ok()
}

fn parse_bind_list(
    value: &Spanned<DeValue<'_>>,
    errors: &mut Errors<'_>,
) -> Option<Vec<PortRange>> {
    let DeValue::Array(items) = value.get_ref() else {
        errors.push(
            value.span(),
            format!(
                "`bind` must be an array of ports and ranges, found {}",
                type_name(value.get_ref())
            ),
        );
        return None;
    };
    let mut ranges = vec![];
    let mut ok = true;
    for item in items.iter() {
        let parsed = match item.get_ref() {
            DeValue::String(text) => range(item, text, "bind", errors),
            DeValue::Integer(integer) => range(item, integer.as_str(), "bind", errors),
            other => {
                errors.push(
                    item.span(),
                    format!(
                        "`bind` entries must be \"port\" or \"lo-hi\" strings, found {}",
                        type_name(other)
                    ),
                );
                None
            }
        };
        match parsed {
            Some(parsed) => ranges.push(parsed),
            None => ok = false,
        }
    }
    ok.then_some(ranges)
}

/// Errors that need more than one scope: duplicates and overlaps.
fn cross_check(scopes: &[Scope], errors: &mut Errors<'_>) {
    let mut names: HashMap<&str, &Scope> = HashMap::new();
    let mut selectors: HashMap<String, &Scope> = HashMap::new();
    for scope in scopes {
        if let Some(first) = names.insert(&scope.name, scope) {
            errors.list.push(PolicyError {
                at: scope.at,
                message: format!(
                    "scope name `{}` is used twice (first at line {})",
                    scope.name, first.at.line
                ),
            });
        }
        if let Some(first) = selectors.insert(scope.selector.to_string(), scope) {
            errors.list.push(PolicyError {
                at: scope.at,
                message: format!(
                    "scopes `{}` and `{}` both select {}",
                    first.name, scope.name, scope.selector
                ),
            });
        }
    }
    for (index, scope) in scopes.iter().enumerate() {
        for other in &scopes[index + 1..] {
            if let Some(shared) = scope.ephemeral.intersection(&other.ephemeral) {
                errors.list.push(PolicyError {
                    at: other.at,
                    message: format!(
                        "ephemeral ranges of scopes `{}` ({}) and `{}` ({}) overlap on ports {}",
                        scope.name, scope.ephemeral, other.name, other.ephemeral, shared
                    ),
                });
            }
        }
        for allowed in scope.bind.iter().flatten() {
            for other in scopes.iter().filter(|other| other.name != scope.name) {
                if let Some(shared) = allowed.intersection(&other.ephemeral) {
                    errors.list.push(PolicyError {
                        at: scope.at,
                        message: format!(
                            "bind entry {} of scope `{}` lies in the ephemeral range of scope `{}` ({}) on ports {}",
                            allowed, scope.name, other.name, other.ephemeral, shared
                        ),
                    });
                }
            }
        }
    }
}

fn unknown_keys(table: &DeTable<'_>, known: &[&str], place: &str, errors: &mut Errors<'_>) {
    for key in table.keys() {
        if !known.contains(&key.get_ref().as_ref()) {
            errors.push(
                key.span(),
                format!(
                    "unknown key `{}` in {place} (expected one of: {})",
                    key.get_ref(),
                    known.join(", ")
                ),
            );
        }
    }
}

fn parse_mode(
    value: &Spanned<DeValue<'_>>,
    allowed: &[&str],
    errors: &mut Errors<'_>,
) -> Option<Mode> {
    let text = string(value, "mode", errors)?;
    if !allowed.contains(&text) {
        errors.push(
            value.span(),
            format!("mode `{text}` is not one of: {}", allowed.join(", ")),
        );
        return None;
    }
    Some(match text {
        "audit" => Mode::Audit,
        "observe" => Mode::Observe,
        _ => Mode::Enforce,
    })
}

fn string<'v>(
    value: &'v Spanned<DeValue<'_>>,
    key: &str,
    errors: &mut Errors<'_>,
) -> Option<&'v str> {
    match value.get_ref() {
        DeValue::String(text) => Some(text),
        other => {
            errors.push(
                value.span(),
                format!("`{key}` must be a string, found {}", type_name(other)),
            );
            None
        }
    }
}

fn range(
    value: &Spanned<DeValue<'_>>,
    text: &str,
    key: &str,
    errors: &mut Errors<'_>,
) -> Option<PortRange> {
    match PortRange::parse(text) {
        Ok(range) => Some(range),
        Err(message) => {
            errors.push(value.span(), format!("`{key}`: {message}"));
            None
        }
    }
}

fn type_name(value: &DeValue<'_>) -> &'static str {
    match value {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a date-time",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

#[cfg(test)]
mod tests;
