//! Claim checks shared by validators that see the token's claims (introspection, JWT, userinfo).

use serde::Deserialize;
use serde_json::{Map, Value};

use extauth_protocol::wire::Reason;

/// What a domain requires of a token's claims. TOML, in the validator table:
/// `require = { scopes = ["xmpp"], audience = "ejabberd", issuer = "https://idp.example.com" }`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(crate) struct ClaimRules {
    /// Every one of these must appear in the space-separated `scope` claim (RFC 7662 section 2.2,
    /// RFC 8693 section 4.2).
    #[serde(default)]
    pub scopes: Vec<String>,
    /// `aud` (a string or an array of strings, RFC 7519 section 4.1.3) must contain this.
    #[serde(default)]
    pub audience: Option<String>,
    /// `iss` must equal this exactly (RFC 7519 section 4.1.1).
    #[serde(default)]
    pub issuer: Option<String>,
}

impl ClaimRules {
    /// `, requires scope [..], audience .., issuer ..` for `check-config`; empty without rules.
    pub(crate) fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.scopes.is_empty() {
            parts.push(format!("scopes {:?}", self.scopes));
        }
        if let Some(a) = &self.audience {
            parts.push(format!("audience {a:?}"));
        }
        if let Some(i) = &self.issuer {
            parts.push(format!("issuer {i:?}"));
        }
        match parts.is_empty() {
            true => String::new(),
            false => format!(", requires {}", parts.join(", ")),
        }
    }

    /// Checks `claims` against the rules.
    ///
    /// # Errors
    /// The [`Reason`] of the first rule that fails: `insufficient_scope`, `wrong_audience`,
    /// `wrong_issuer`.
    pub(crate) fn check(&self, claims: &Map<String, Value>) -> Result<(), Reason> {
        if !self.scopes.is_empty() {
            let granted: Vec<&str> = claims
                .get("scope")
                .and_then(Value::as_str)
                .unwrap_or("")
                .split_whitespace()
                .collect();
            if !self.scopes.iter().all(|s| granted.contains(&s.as_str())) {
                return Err(Reason::InsufficientScope);
            }
        }
        if let Some(audience) = &self.audience {
            let named = match claims.get("aud") {
                Some(Value::String(a)) => a == audience,
                Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(audience)),
                _ => false,
            };
            if !named {
                return Err(Reason::WrongAudience);
            }
        }
        if let Some(issuer) = &self.issuer {
            if claims.get("iss").and_then(Value::as_str) != Some(issuer) {
                return Err(Reason::WrongIssuer);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claims(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn scopes_audience_and_issuer_are_enforced() {
        let rules = ClaimRules {
            scopes: vec!["xmpp".into(), "openid".into()],
            audience: Some("ejabberd".into()),
            issuer: Some("https://idp".into()),
        };
        let good = claims(
            json!({"scope": "openid profile xmpp", "aud": ["x", "ejabberd"], "iss": "https://idp"}),
        );
        assert_eq!(rules.check(&good), Ok(()));
        let mut c = good.clone();
        c.insert("scope".into(), json!("openid xmpp-admin"));
        assert_eq!(rules.check(&c), Err(Reason::InsufficientScope));
        let mut c = good.clone();
        c.insert("aud".into(), json!("other"));
        assert_eq!(rules.check(&c), Err(Reason::WrongAudience));
        let mut c = good.clone();
        c.remove("aud");
        assert_eq!(rules.check(&c), Err(Reason::WrongAudience));
        let mut c = good;
        c.insert("iss".into(), json!("https://idp/"));
        assert_eq!(rules.check(&c), Err(Reason::WrongIssuer));
        assert_eq!(ClaimRules::default().check(&Map::new()), Ok(()));
    }
}
