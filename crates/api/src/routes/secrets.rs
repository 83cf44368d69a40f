//! `/secrets`: register, rotate, list and delete the secrets the egress proxy injects
//! (docs/egress.md, "Secrets").
//!
//! Secrets are write-only: a value goes in with `POST /secrets` and never comes out. No
//! response carries it, and no error message quotes it: a `value` of the wrong type is
//! refused without showing what was sent ([`SecretValue`]), and the service's checks of a
//! value name the field only. Posting an existing name rotates the secret (new value and
//! rules, `version` + 1): 201 when the name is new, 200 when it was rotated.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use conductor_core::secrets::InjectionRule;
use conductor_core::task::rfc3339;
use conductor_service::secrets::SecretInfo;
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{ApiResult, ErrorBody};
use crate::extract::JsonBody;
use crate::AppState;

/// A secret's value as received: refused without being quoted when it is not a string,
/// and shown as `<redacted>` by `Debug`.
pub struct SecretValue(pub String);

impl std::fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl<'de> Deserialize<'de> for SecretValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct StringOnly;
        impl<'de> Visitor<'de> for StringOnly {
            type Value = SecretValue;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<SecretValue, E> {
                Ok(SecretValue(v.to_string()))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<SecretValue, E> {
                Ok(SecretValue(v))
            }

            // Anything else: serde's own message would quote it ("invalid type: integer `123`").
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<SecretValue, E> {
                Err(not_a_string())
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<SecretValue, E> {
                Err(not_a_string())
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<SecretValue, E> {
                Err(not_a_string())
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<SecretValue, E> {
                Err(not_a_string())
            }
            fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<SecretValue, E> {
                Err(not_a_string())
            }
            fn visit_unit<E: de::Error>(self) -> Result<SecretValue, E> {
                Err(not_a_string())
            }
            fn visit_none<E: de::Error>(self) -> Result<SecretValue, E> {
                Err(not_a_string())
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<SecretValue, A::Error> {
                Err(not_a_string())
            }
            fn visit_map<A: de::MapAccess<'de>>(self, _: A) -> Result<SecretValue, A::Error> {
                Err(not_a_string())
            }
        }
        fn not_a_string<E: de::Error>() -> E {
            E::custom("must be a string (the value is not shown)")
        }
        d.deserialize_any(StringOnly)
    }
}

/// Where a secret goes and what to add to requests going there. The first rule matching
/// a request's host and port decides.
// Documentation only: requests are parsed as `conductor_core::secrets::InjectionRule`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"host": "api.github.com", "inject": {"type": "header", "name": "Authorization", "value": "Bearer {value}"}}))]
#[allow(dead_code)]
pub struct InjectionRuleSchema {
    /// An exact host name (`api.github.com`) or a wildcard (`*.github.com`: its subdomains
    /// only, not the name itself), with an optional `:port`; without one the rule means
    /// port 443 only (a secret never goes into plain HTTP). No addresses, no bundles. The
    /// workspace may reach these hosts (they are added to its allow list).
    #[schema(example = "api.github.com")]
    pub host: String,
    pub inject: InjectionSchema,
}

/// What a rule adds to a request.
#[derive(Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
#[allow(dead_code)]
pub enum InjectionSchema {
    /// Sets header `name` to `value`, a template holding `{value}` exactly once (replaced
    /// by the secret), e.g. `Authorization: Bearer {value}` or `X-Api-Key: {value}`.
    /// Hop-by-hop and framing headers (`Host`, `Content-Length`, `Proxy-Authorization`, …)
    /// cannot be set.
    Header {
        #[schema(example = "Authorization")]
        name: String,
        #[schema(example = "Bearer {value}")]
        value: String,
    },
    /// Sets `Authorization: Basic base64(username:secret)`, the credential git over HTTPS
    /// (and any HTTP client) sends.
    Basic {
        #[schema(example = "x-access-token")]
        username: String,
    },
}

/// Body of `POST /secrets`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutSecret {
    /// `[a-z0-9][a-z0-9_-]{0,62}`. Names the variable that holds the placeholder inside a
    /// workspace (`github` → `GITHUB_TOKEN`).
    #[schema(example = "github")]
    pub name: String,
    /// The secret itself: printable ASCII and spaces (no leading or trailing space), at
    /// most 16 KiB; one trailing newline is dropped. Write-only: no response, and no
    /// error message, ever shows it.
    #[schema(value_type = String, format = Password, write_only, example = "ghp_…")]
    pub value: SecretValue,
    /// Where the secret is injected (at least one rule).
    #[schema(value_type = Vec<InjectionRuleSchema>)]
    pub rules: Vec<InjectionRule>,
}

/// A registered secret: everything but its value.
#[derive(Debug, Serialize, ToSchema)]
pub struct Secret {
    #[schema(example = "github")]
    pub name: String,
    #[schema(value_type = Vec<InjectionRuleSchema>)]
    pub rules: Vec<InjectionRule>,
    /// The variable that holds the secret's placeholder inside a workspace made with it.
    #[schema(example = "GITHUB_TOKEN")]
    pub env_var: String,
    /// 1 when registered, one more per rotation.
    pub version: u32,
    /// RFC 3339 UTC.
    #[schema(example = "2024-05-01T12:34:56.789Z")]
    pub created_at: String,
    /// When the value and rules were last set (registered or rotated), RFC 3339 UTC.
    #[schema(example = "2024-05-01T12:34:56.789Z")]
    pub updated_at: String,
}

impl From<SecretInfo> for Secret {
    fn from(s: SecretInfo) -> Self {
        Secret {
            name: s.name,
            rules: s.rules,
            env_var: s.env_var,
            version: s.version,
            created_at: rfc3339(s.created_at),
            updated_at: rfc3339(s.updated_at),
        }
    }
}

/// Response of `GET /secrets`.
#[derive(Debug, Serialize, ToSchema)]
pub struct SecretList {
    /// By name.
    pub secrets: Vec<Secret>,
}

/// Register a secret, or rotate one (same name: a new value and rules, `version` + 1).
///
/// The value is write-only. A rotation applies to the next request the proxy injects into,
/// also in workspaces already running with the secret; their allow lists keep the hosts
/// of the rules they were made with. A secret defined in the configuration
/// (`secrets.define`) is registered again from its source whenever conductor starts.
#[utoipa::path(
    post, path = "/secrets", tag = "secrets",
    request_body = PutSecret,
    responses(
        (status = 201, description = "Registered (a new name)", body = Secret),
        (status = 200, description = "Rotated (the name existed)", body = Secret),
        (status = 400, description = "Invalid request (field named: `name`, `value`, `rules`, `rules[0].host`, `rules[0].inject.name`, …); the value is never quoted", body = ErrorBody),
    )
)]
pub async fn put_secret(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<PutSecret>,
) -> ApiResult<(StatusCode, Json<Secret>)> {
    let info = state
        .conductor
        .put_secret(&body.name, body.value.0.as_bytes(), body.rules)?;
    let status = if info.version == 1 {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(info.into())))
}

/// List the registered secrets (never their values).
#[utoipa::path(
    get, path = "/secrets", tag = "secrets",
    responses((status = 200, description = "Every secret, by name", body = SecretList))
)]
pub async fn list_secrets(State(state): State<AppState>) -> ApiResult<Json<SecretList>> {
    let secrets = state.conductor.list_secrets()?;
    Ok(Json(SecretList {
        secrets: secrets.into_iter().map(Into::into).collect(),
    }))
}

/// A registered secret (never its value).
#[utoipa::path(
    get, path = "/secrets/{name}", tag = "secrets",
    params(("name" = String, Path, description = "Secret name")),
    responses(
        (status = 200, description = "The secret", body = Secret),
        (status = 404, description = "No such secret", body = ErrorBody),
    )
)]
pub async fn get_secret(State(state): State<AppState>, Path(name): Path<String>) -> ApiResult<Json<Secret>> {
    Ok(Json(state.conductor.get_secret(&name)?.into()))
}

/// Delete a secret. Workspaces made with it keep their placeholder, which from then on
/// goes out unchanged (nothing is injected any more).
#[utoipa::path(
    delete, path = "/secrets/{name}", tag = "secrets",
    params(("name" = String, Path, description = "Secret name")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such secret", body = ErrorBody),
    )
)]
pub async fn delete_secret(State(state): State<AppState>, Path(name): Path<String>) -> ApiResult<StatusCode> {
    state.conductor.delete_secret(&name)?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use conductor_core::secrets::Injection;

    use super::*;
    use crate::extract::parse_json;

    const VALUE: &str = "ghp_0123456789abcdef";

    #[test]
    fn a_body_parses_into_the_core_rules() {
        let body = format!(
            r#"{{"name": "github", "value": "{VALUE}", "rules": [
                {{"host": "api.github.com", "inject": {{"type": "header", "name": "Authorization", "value": "Bearer {{value}}"}}}},
                {{"host": "github.com", "inject": {{"type": "basic", "username": "x-access-token"}}}}]}}"#
        );
        let b: PutSecret = parse_json(body.as_bytes()).unwrap();
        assert_eq!(b.name, "github");
        assert_eq!(b.value.0, VALUE);
        assert_eq!(
            b.rules[0].inject,
            Injection::Header {
                name: "Authorization".into(),
                value: "Bearer {value}".into()
            }
        );
        assert_eq!(
            b.rules[1].inject,
            Injection::Basic {
                username: "x-access-token".into()
            }
        );
        assert!(!format!("{b:?}").contains(VALUE), "Debug redacts the value");
    }

    #[test]
    fn bad_bodies_name_the_field_and_never_quote_the_value() {
        let rule = r#"{"host": "a.example", "inject": {"type": "basic", "username": "git"}}"#;
        for (body, field) in [
            (
                format!(r#"{{"name": "a", "value": 123456789, "rules": [{rule}]}}"#),
                "value",
            ),
            (
                format!(r#"{{"name": "a", "value": ["s3cr3t-in-a-list"], "rules": [{rule}]}}"#),
                "value",
            ),
            (
                format!(r#"{{"name": "a", "value": {{"k": "s3cr3t-in-a-map"}}, "rules": [{rule}]}}"#),
                "value",
            ),
            (format!(r#"{{"name": "a", "value": true, "rules": [{rule}]}}"#), "value"),
            (format!(r#"{{"name": "a", "rules": [{rule}]}}"#), "value"),
            (r#"{"name": "a", "value": "s3cr3t"}"#.to_string(), "rules"),
            (r#"{"value": "s3cr3t", "rules": []}"#.to_string(), "name"),
            (
                format!(r#"{{"name": "a", "value": "s3cr3t", "rules": [{rule}], "extra": 1}}"#),
                "extra",
            ),
            (
                r#"{"name": "a", "value": "s3cr3t", "rules": [{"host": "a.example", "inject": {"type": "cookie"}}]}"#
                    .to_string(),
                "rules[0].inject.type",
            ),
            (
                r#"{"name": "a", "value": "s3cr3t", "rules": [{"host": "a.example", "inject": {"type": "basic"}}]}"#
                    .to_string(),
                "rules[0].inject.username",
            ),
            (
                r#"{"name": "a", "value": "s3cr3t", "rules": [{"inject": {"type": "basic", "username": "git"}}]}"#
                    .to_string(),
                "rules[0].host",
            ),
        ] {
            let e = parse_json::<PutSecret>(body.as_bytes()).expect_err(&body);
            assert_eq!(
                (e.code, e.field.as_deref()),
                ("invalid_request", Some(field)),
                "{body}: {}",
                e.message
            );
            for secret in ["123456789", "s3cr3t", "true"] {
                assert!(!e.message.contains(secret), "{body}: {}", e.message);
            }
        }
    }

    #[test]
    fn metadata_shows_times_as_rfc3339_and_no_value() {
        let s = Secret::from(SecretInfo {
            name: "github".into(),
            rules: vec![],
            env_var: "GITHUB_TOKEN".into(),
            created_at: 1_714_566_896_789,
            updated_at: 1_714_566_896_790,
            version: 2,
        });
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["created_at"], "2024-05-01T12:34:56.789Z");
        assert_eq!(v["updated_at"], "2024-05-01T12:34:56.790Z");
        assert_eq!(v["version"], 2);
        assert!(v.get("value").is_none());
    }
}
