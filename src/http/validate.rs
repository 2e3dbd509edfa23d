//! Field validation at the edge: bad input is refused before anything changes.

use super::error::ApiError;

/// Trims and lower-cases an email and checks its shape (one `@`, a dotted domain, no spaces,
/// at most 254 characters as in RFC 5321). Deliverability is not checked.
pub fn email(raw: &str) -> Result<String, ApiError> {
    let email = raw.trim().to_lowercase();
    let valid = email.len() <= 254
        && !email.chars().any(char::is_whitespace)
        && email.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty()
                && !domain.contains('@')
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
        });
    if valid {
        Ok(email)
    } else {
        Err(ApiError::field("email", "not a valid email address"))
    }
}

pub fn password(raw: &str, min: usize, max: usize) -> Result<(), ApiError> {
    let chars = raw.chars().count();
    if chars < min {
        return Err(ApiError::field(
            "password",
            format!("must be at least {min} characters"),
        ));
    }
    if chars > max {
        return Err(ApiError::field(
            "password",
            format!("must be at most {max} characters"),
        ));
    }
    Ok(())
}

/// Trims an optional free-text field; blank becomes `None`; longer than `max` characters fails.
pub fn optional_text(
    field: &str,
    value: Option<String>,
    max: usize,
) -> Result<Option<String>, ApiError> {
    let Some(value) = value else {
        return Ok(None);
    };
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Ok(None);
    }
    if trimmed.chars().count() > max {
        return Err(ApiError::field(
            field,
            format!("must be at most {max} characters"),
        ));
    }
    Ok(Some(trimmed.to_owned()))
}

/// A model id: 1–100 characters of letters, digits and `-._:/@` (e.g. `gpt-4o`,
/// `anthropic/claude-sonnet-4`, `llama3.1:8b`). Whether the model exists is decided by the
/// catalogue when a message is sent.
pub fn model(field: &str, value: Option<String>) -> Result<Option<String>, ApiError> {
    let Some(value) = value else {
        return Ok(None);
    };
    let value = value.trim().to_owned();
    let valid = !value.is_empty()
        && value.len() <= 100
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:/@".contains(&b));
    if valid {
        Ok(Some(value))
    } else {
        Err(ApiError::field(
            field,
            "must be 1-100 characters of letters, digits and -._:/@",
        ))
    }
}

/// `?limit=`: default 20, 1..=100 (API.md, Conventions).
pub fn page_limit(limit: Option<usize>) -> Result<usize, ApiError> {
    match limit {
        None => Ok(20),
        Some(n @ 1..=100) => Ok(n),
        Some(_) => Err(ApiError::field("limit", "must be between 1 and 100")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails() {
        assert_eq!(email("  Alice@Example.COM ").unwrap(), "alice@example.com");
        for bad in [
            "", "alice", "a@b", "a b@c.d", "@c.d", "a@.cd", "a@cd.", "a@b@c.d",
        ] {
            assert!(email(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn models_and_limits() {
        assert_eq!(
            model("m", Some("gpt-4o".into())).unwrap().as_deref(),
            Some("gpt-4o")
        );
        assert!(model("m", Some("has space".into())).is_err());
        assert!(model("m", Some(String::new())).is_err());
        assert_eq!(page_limit(None).unwrap(), 20);
        assert!(page_limit(Some(0)).is_err());
        assert!(page_limit(Some(101)).is_err());
    }
}
