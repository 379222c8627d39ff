//! Reading a TOML document field by field, keeping every value's position, and reporting every problem
//! (wrong type, missing field, unknown field with the closest known name) instead of stopping at the first.

use std::ops::Range;

use toml::de::{DeArray, DeTable, DeValue};

use super::diag::Diags;

/// A value and where it is in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct At<T> {
    pub value: T,
    pub span: Range<usize>,
}

impl<T> At<T> {
    pub fn new(value: T, span: Range<usize>) -> Self {
        Self { value, span }
    }
}

pub fn type_name(v: &DeValue<'_>) -> &'static str {
    match v {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a datetime",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

/// The fields of one TOML table, consumed one by one; `finish` reports the ones nobody asked for.
pub struct Fields<'a, 'i> {
    table: &'a DeTable<'i>,
    /// Where the table is (its header, or the inline table).
    pub span: Range<usize>,
    /// How the operator names this table in messages: `[instance]`, `[[authorization]] #2`.
    pub what: String,
    known: Vec<&'static str>,
}

impl<'a, 'i> Fields<'a, 'i> {
    pub fn new(table: &'a DeTable<'i>, span: Range<usize>, what: impl Into<String>) -> Self {
        Self {
            table,
            span,
            what: what.into(),
            known: vec![],
        }
    }

    /// Whether the table has `key` at all (whatever its type).
    pub fn has(&self, key: &str) -> bool {
        self.table.iter().any(|(k, _)| k.get_ref().as_ref() == key)
    }

    /// Where `key`'s value is, if present.
    pub fn span_of(&self, key: &str) -> Option<Range<usize>> {
        self.table
            .iter()
            .find(|(k, _)| k.get_ref().as_ref() == key)
            .map(|(_, v)| v.span())
    }

    fn raw(&mut self, key: &'static str) -> Option<(&'a DeValue<'i>, Range<usize>)> {
        self.known.push(key);
        self.table
            .iter()
            .find(|(k, _)| k.get_ref().as_ref() == key)
            .map(|(_, v)| (v.get_ref(), v.span()))
    }

    fn wrong_type(
        &self,
        d: &mut Diags,
        key: &str,
        span: &Range<usize>,
        want: &str,
        got: &DeValue<'_>,
    ) {
        d.error(
            span,
            format!(
                "`{key}` in {} must be {want}, not {}",
                self.what,
                type_name(got)
            ),
        );
    }

    pub fn missing(&self, d: &mut Diags, key: &str, example: &str) {
        d.error_fix(
            &self.span,
            format!("{} has no `{key}`", self.what),
            format!("add `{key} = {example}`"),
        );
    }

    pub fn string(&mut self, d: &mut Diags, key: &'static str) -> Option<At<String>> {
        let (v, span) = self.raw(key)?;
        match v {
            DeValue::String(s) => Some(At::new(s.to_string(), span)),
            other => {
                self.wrong_type(d, key, &span, "a string", other);
                None
            }
        }
    }

    pub fn required_string(
        &mut self,
        d: &mut Diags,
        key: &'static str,
        example: &str,
    ) -> Option<At<String>> {
        let present = self.has(key);
        let v = self.string(d, key);
        if !present {
            self.missing(d, key, example);
        }
        v
    }

    /// A value of any type, for fields that accept several (the caller reports a wrong one).
    pub fn value(&mut self, key: &'static str) -> Option<At<&'a DeValue<'i>>> {
        self.raw(key).map(|(v, span)| At::new(v, span))
    }

    pub fn integer(&mut self, d: &mut Diags, key: &'static str) -> Option<At<i64>> {
        let (v, span) = self.raw(key)?;
        integer_value(d, v, span, &format!("`{key}` in {}", self.what))
    }

    pub fn array(&mut self, d: &mut Diags, key: &'static str) -> Option<At<&'a DeArray<'i>>> {
        let (v, span) = self.raw(key)?;
        match v {
            DeValue::Array(a) => Some(At::new(a, span)),
            other => {
                self.wrong_type(d, key, &span, "an array", other);
                None
            }
        }
    }

    /// An array of strings (each with its position).
    pub fn strings(&mut self, d: &mut Diags, key: &'static str) -> Option<Vec<At<String>>> {
        let arr = self.array(d, key)?;
        let mut out = vec![];
        for item in arr.value.iter() {
            match item.get_ref() {
                DeValue::String(s) => out.push(At::new(s.to_string(), item.span())),
                other => d.error(
                    &item.span(),
                    format!(
                        "`{key}` in {} must hold strings, not {}",
                        self.what,
                        type_name(other)
                    ),
                ),
            }
        }
        Some(out)
    }

    pub fn table(&mut self, d: &mut Diags, key: &'static str) -> Option<At<&'a DeTable<'i>>> {
        let (v, span) = self.raw(key)?;
        match v {
            DeValue::Table(t) => Some(At::new(t, span)),
            other => {
                self.wrong_type(d, key, &span, "a table", other);
                None
            }
        }
    }

    /// Reports every field that no `string`/`integer`/... call asked for: a typo, most likely.
    pub fn finish(self, d: &mut Diags) {
        for (k, _) in self.table.iter() {
            let key = k.get_ref().as_ref();
            if self.known.contains(&key) {
                continue;
            }
            let fix = match closest(key, &self.known) {
                Some(near) => format!(
                    "did you mean `{near}`? known fields: {}",
                    self.known.join(", ")
                ),
                None => format!("remove it; known fields: {}", self.known.join(", ")),
            };
            d.error_fix(
                &k.span(),
                format!("unknown field `{key}` in {}", self.what),
                fix,
            );
        }
    }
}

pub fn integer_value(
    d: &mut Diags,
    v: &DeValue<'_>,
    span: Range<usize>,
    what: &str,
) -> Option<At<i64>> {
    match v {
        DeValue::Integer(i) => match i64::from_str_radix(i.as_str(), i.radix()) {
            Ok(n) => Some(At::new(n, span)),
            Err(_) => {
                d.error(&span, format!("{what} is out of range"));
                None
            }
        },
        other => {
            d.error(
                &span,
                format!("{what} must be an integer, not {}", type_name(other)),
            );
            None
        }
    }
}

/// The known name closest to `key` (edit distance <= 3), for "did you mean".
fn closest<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    let len = key.chars().count();
    known
        .iter()
        // The distance is at least the difference in length: skip what cannot be within 3.
        .filter(|k| k.chars().count().abs_diff(len) <= 3)
        .map(|k| (edit_distance(key, k), *k))
        .filter(|(dist, _)| *dist <= 3)
        .min()
        .map(|(_, k)| k)
}

/// Levenshtein distance; O(|a| x |b|) time, two rows of memory.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur: Vec<usize> = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}
