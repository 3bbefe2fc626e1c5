//! Exceptions: allow-list rules that turn a would-be alert into an allowed event.
//! Stored as JSON; unknown fields are errors, so a typo never silently widens a rule.

use serde::{Deserialize, Serialize};

use crate::alert::Alert;
use crate::arch::{Cr, DtrKind};
use crate::event::EventInfo;
use crate::hooks::Class;

/// An inclusive address range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Range {
    #[serde(with = "hex")]
    pub from: u64,
    #[serde(with = "hex")]
    pub to: u64,
}

/// Addresses and register values in an exceptions file: written as `"0x…"`
/// strings (as the journal writes them), read as such or as plain numbers.
mod hex {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NumOrText {
        Num(u64),
        Text(String),
    }

    fn parse(v: NumOrText) -> Result<u64, String> {
        match v {
            NumOrText::Num(n) => Ok(n),
            NumOrText::Text(t) => {
                let h = t
                    .strip_prefix("0x")
                    .ok_or_else(|| format!("`{t}` is not a number or \"0x…\""))?;
                u64::from_str_radix(h, 16).map_err(|_| format!("`{t}` is not hex"))
            }
        }
    }

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{v:#x}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        parse(NumOrText::deserialize(d)?).map_err(D::Error::custom)
    }

    /// The same for an optional field.
    pub mod opt {
        use super::*;

        pub fn serialize<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
            match v {
                Some(v) => super::serialize(v, s),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
            Option::<NumOrText>::deserialize(d)?
                .map(|v| parse(v).map_err(D::Error::custom))
                .transpose()
        }
    }
}

impl Range {
    pub fn contains(&self, v: u64) -> bool {
        self.from <= v && v <= self.to
    }
}

/// One rule; every field that is present must match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub class: Class,
    /// Memory: the accessed guest-virtual (or, failing that, physical) address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub victim: Option<Range>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "hex::opt")]
    pub msr: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cr: Option<Cr>,
    /// CR: the rule covers a change only if every changed bit is in this mask.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "hex::opt")]
    pub cr_bits: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtr: Option<DtrKind>,
    /// The originator: the instruction's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rip: Option<Range>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpl: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Exceptions {
    pub rules: Vec<Rule>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExceptionError {
    #[error("exceptions file: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("exceptions file: rule {0}: {1}")]
    Invalid(usize, String),
}

impl Exceptions {
    pub fn parse(text: &str) -> Result<Exceptions, ExceptionError> {
        let e: Exceptions = serde_json::from_str(text)?;
        for (i, r) in e.rules.iter().enumerate() {
            if let Some(v) = r.victim.or(r.rip)
                && v.from > v.to
            {
                return Err(ExceptionError::Invalid(
                    i,
                    format!("range from {:#x} is above to {:#x}", v.from, v.to),
                ));
            }
            if r.cpl.is_some_and(|c| c > 3) {
                return Err(ExceptionError::Invalid(i, "cpl must be 0..=3".into()));
            }
            if r.msr.is_some_and(|m| m > u64::from(u32::MAX)) {
                return Err(ExceptionError::Invalid(i, "an MSR index is 32 bits".into()));
            }
        }
        Ok(e)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("rules serialise")
    }

    /// The first rule matching `alert`.
    pub fn matching(&self, alert: &Alert) -> Option<usize> {
        self.rules.iter().position(|r| r.matches(alert))
    }
}

impl Rule {
    pub fn matches(&self, a: &Alert) -> bool {
        if self.class != a.class
            || self.rip.is_some_and(|r| !r.contains(a.rip))
            || self.cpl.is_some_and(|c| c != a.cpl)
        {
            return false;
        }
        match &a.event {
            EventInfo::Mem { gla, gpa, .. } => self
                .victim
                .is_none_or(|v| v.contains(*gla) || v.contains(*gpa)),
            EventInfo::Msr { index, .. } => self.msr.is_none_or(|m| m == u64::from(*index)),
            EventInfo::Cr { cr, old, new, .. } => {
                self.cr.is_none_or(|c| c == *cr)
                    && self.cr_bits.is_none_or(|m| (old ^ new) & !m == 0)
            }
            EventInfo::Dtr { dtr, .. } => self.dtr.is_none_or(|d| d == *dtr),
            EventInfo::Breakpoint { gva, .. } => self.victim.is_none_or(|v| v.contains(*gva)),
            EventInfo::Integrity { gva, .. } => self.victim.is_none_or(|v| v.contains(*gva)),
            EventInfo::Xcr { .. } | EventInfo::Introcall { .. } => true,
        }
    }

    /// The narrowest rule that allows exactly what `alert` reported.
    pub fn from_alert(a: &Alert) -> Rule {
        let exact = |v: u64| Some(Range { from: v, to: v });
        let mut r = Rule {
            class: a.class,
            victim: None,
            msr: None,
            cr: None,
            cr_bits: None,
            dtr: None,
            rip: if a.instruction.is_some() {
                exact(a.rip)
            } else {
                None
            },
            cpl: Some(a.cpl),
            comment: Some(format!("from alert {}: {}", a.id, a.reason)),
        };
        match &a.event {
            EventInfo::Mem { gla, size, .. } => {
                r.victim = Some(Range {
                    from: *gla,
                    to: gla + size.saturating_sub(1),
                })
            }
            EventInfo::Msr { index, .. } => r.msr = Some(u64::from(*index)),
            EventInfo::Cr { cr, old, new, .. } => {
                r.cr = Some(*cr);
                r.cr_bits = Some(old ^ new);
            }
            EventInfo::Dtr { dtr, .. } => r.dtr = Some(*dtr),
            EventInfo::Breakpoint { gva, .. } | EventInfo::Integrity { gva, .. } => {
                r.victim = exact(*gva)
            }
            _ => {}
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_read_as_numbers_or_hex_strings_and_write_as_hex() {
        let e = Exceptions::parse(
            r#"{"rules": [{"class": "msr", "msr": 3221225602}, {"class": "ept", "rip": {"from": "0x100000", "to": 1048832}}]}"#,
        )
        .unwrap();
        assert_eq!(e.rules[0].msr, Some(0xc000_0082));
        assert_eq!(
            e.rules[1].rip,
            Some(Range {
                from: 0x100000,
                to: 0x100100
            })
        );
        let text = e.to_json();
        assert!(text.contains("\"msr\": \"0xc0000082\""), "{text}");
        assert_eq!(Exceptions::parse(&text).unwrap(), e);
        assert!(
            Exceptions::parse(r#"{"rules": [{"class": "msr", "msr": "0x1ffffffff"}]}"#).is_err()
        );
        assert!(Exceptions::parse(r#"{"rules": [{"class": "msr", "msr": "12"}]}"#).is_err());
    }

    #[test]
    fn malformed_files_are_refused_with_the_place() {
        let e =
            Exceptions::parse("{\"rules\": [ {\"class\": \"msr\", \"msrr\": 1} ]}").unwrap_err();
        assert!(e.to_string().contains("unknown field `msrr`"), "{e}");
        let e = Exceptions::parse("{\"rules\": [ {\"class\": \"bogus\"} ]}").unwrap_err();
        assert!(e.to_string().contains("unknown variant"), "{e}");
        let e = Exceptions::parse("{\"rules\": [").unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
        let e = Exceptions::parse(
            "{\"rules\": [ {\"class\": \"ept\", \"victim\": {\"from\": 9, \"to\": 1}} ]}",
        )
        .unwrap_err();
        assert!(e.to_string().contains("rule 0"), "{e}");
        assert!(
            Exceptions::parse("{\"rules\": []}")
                .unwrap()
                .rules
                .is_empty()
        );
    }

    #[test]
    fn an_alert_turned_into_a_rule_matches_it_and_only_it() {
        use crate::verdict::Verdict;
        let mem = |gla: u64| EventInfo::Mem {
            gla,
            gpa: gla,
            size: 2,
            access: crate::AccessKind::Write,
            data: Some(1),
            old: Some(0),
        };
        let mut a = Alert {
            id: 1,
            event_id: 1,
            at_us: 0,
            repeats: 0,
            last_event_id: 1,
            overridden: None,
            class: Class::Ept,
            vcpu: 0,
            rip: 0x100ae1,
            writer: None,
            task: None,
            cr3: 0x1000,
            cpl: 0,
            instruction: Some("mov [rbx+0x140],ax".into()),
            event: mem(0x239200),
            hook: crate::HookId(3),
            hook_name: "policy:idt".into(),
            verdict: Verdict::NotAllowed,
            enforced: true,
            reason: "IDT entry modified".into(),
        };
        let rule = Rule::from_alert(&a);
        let ex = Exceptions::parse(&Exceptions { rules: vec![rule] }.to_json()).unwrap();
        assert_eq!(
            ex.matching(&a),
            Some(0),
            "round-trips through JSON and matches"
        );
        a.rip = 0x200000;
        assert_eq!(ex.matching(&a), None, "another originator is not covered");
        a.rip = 0x100ae1;
        a.event = mem(0x239300);
        assert_eq!(ex.matching(&a), None, "another victim is not covered");
    }
}
