//! `conductor secret set|ls|rm`: the secrets the egress proxy injects (docs/egress.md,
//! "Secrets"). Values are write-only: read from stdin, a file or an environment variable
//! (never from an argument, which `ps` and shell history would show), and never printed.

use std::io::{BufRead, IsTerminal, Read};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use conductor_api::routes::secrets::Secret;
use conductor_core::secrets::{Injection, InjectionRule, SecretSpec};
use conductor_service::secrets::SecretInfo;
use conductor_service::ServiceError;

use super::{open, Cli};

#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Register a secret, or rotate it (same NAME: a new value and rules, version + 1)
    ///
    /// The value is read from stdin (typed without echo on a terminal, or piped in), from
    /// --from-file or from --from-env; never from an argument. One trailing newline is
    /// dropped. A workspace made with `ws create --secret NAME` holds only a placeholder in
    /// <NAME>_TOKEN (`github` -> GITHUB_TOKEN); the egress proxy replaces it by the value
    /// in requests to the rules' hosts, and only there. A rotation applies to the next
    /// request, also in running workspaces.
    ///
    /// Examples:
    ///
    ///   conductor secret set github --from-file ~/.github-token \
    ///       --basic github.com=x-access-token \
    ///       --rule 'api.github.com=Authorization: Bearer {value}'
    ///
    ///   printenv OPENAI_API_KEY | conductor secret set openai \
    ///       --rule 'api.openai.com=Authorization: Bearer {value}'
    #[command(verbatim_doc_comment)]
    Set(SetArgs),
    /// List the registered secrets: name, variable, version, rules (never values).
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Delete a secret; workspaces made with it keep a placeholder that no longer becomes
    /// anything.
    Rm { name: String },
}

#[derive(Debug, Args)]
pub struct SetArgs {
    /// Lowercase letters, digits, '-' and '_', starting with a letter or digit.
    pub name: String,
    /// Inject as a header into requests to HOST: `HOST=HEADER: TEMPLATE`, the template
    /// holding `{value}` once, e.g. 'api.github.com=Authorization: Bearer {value}' or
    /// '*.example.com:8443=X-Api-Key: {value}'. HOST is an exact name or `*.suffix` (its
    /// subdomains only), with an optional :port (default 443 only). Repeatable.
    #[arg(long = "rule", value_name = "HOST=HEADER: TEMPLATE")]
    pub rules: Vec<String>,
    /// Inject as HTTP Basic credentials (what git over HTTPS sends) into requests to HOST:
    /// `HOST=USERNAME`, e.g. github.com=x-access-token. Repeatable; tried after the
    /// --rule rules when several match a host.
    #[arg(long = "basic", value_name = "HOST=USERNAME")]
    pub basic: Vec<String>,
    /// Read the value from this file instead of stdin.
    #[arg(long, value_name = "PATH", conflicts_with = "from_env")]
    pub from_file: Option<PathBuf>,
    /// Read the value from this environment variable instead of stdin.
    #[arg(long, value_name = "VAR")]
    pub from_env: Option<String>,
    /// Print the secret's metadata as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `HOST=HEADER: TEMPLATE` as a header rule.
fn header_rule(arg: &str) -> Result<InjectionRule, String> {
    let (host, header) = arg.split_once('=').ok_or("is not HOST=HEADER: TEMPLATE (no '=')")?;
    let (name, template) = header
        .split_once(':')
        .ok_or("is not HOST=HEADER: TEMPLATE (no ':' after the header name)")?;
    Ok(InjectionRule {
        host: host.trim().to_string(),
        inject: Injection::Header {
            name: name.trim().to_string(),
            value: template.trim().to_string(),
        },
    })
}

/// `HOST=USERNAME` as a Basic rule.
fn basic_rule(arg: &str) -> Result<InjectionRule, String> {
    let (host, username) = arg.split_once('=').ok_or("is not HOST=USERNAME (no '=')")?;
    Ok(InjectionRule {
        host: host.trim().to_string(),
        inject: Injection::Basic {
            username: username.trim().to_string(),
        },
    })
}

/// The rules of `--rule` then `--basic`, each with the option and argument it came from.
fn rules_of(args: &SetArgs) -> Result<Vec<(String, InjectionRule)>, ServiceError> {
    let mut out = Vec::new();
    for (flag, items, parse) in [
        (
            "--rule",
            &args.rules,
            header_rule as fn(&str) -> Result<InjectionRule, String>,
        ),
        ("--basic", &args.basic, basic_rule),
    ] {
        for a in items {
            let rule = parse(a).map_err(|m| ServiceError::invalid(format!("{flag} {a:?}"), m))?;
            out.push((format!("{flag} {a:?}"), rule));
        }
    }
    if out.is_empty() {
        return Err(ServiceError::invalid(
            "--rule/--basic",
            "give at least one: where the secret is injected",
        ));
    }
    Ok(out)
}

/// An error about `rules[i]…` named after the option it came from.
fn name_the_option(e: ServiceError, sources: &[String]) -> ServiceError {
    match e {
        ServiceError::Invalid { field, message } => {
            let named = field.strip_prefix("rules[").and_then(|rest| {
                let (i, sub) = rest.split_once(']')?;
                let source = sources.get(i.parse::<usize>().ok()?)?;
                let sub = sub.trim_start_matches('.');
                Some(if sub.is_empty() {
                    source.clone()
                } else {
                    format!("{source} ({sub})")
                })
            });
            ServiceError::invalid(named.unwrap_or(field), message)
        }
        other => other,
    }
}

/// Reads one line from the terminal without echoing it.
fn read_hidden(prompt: &str) -> Result<Vec<u8>, ServiceError> {
    use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg};
    let stdin = std::io::stdin();
    let failed = |e: &dyn std::fmt::Display| ServiceError::host("read the value from the terminal", e.to_string());
    let saved = tcgetattr(&stdin).map_err(|e| failed(&e))?;
    let mut quiet = saved.clone();
    quiet.local_flags.remove(LocalFlags::ECHO);
    eprint!("{prompt}");
    tcsetattr(&stdin, SetArg::TCSANOW, &quiet).map_err(|e| failed(&e))?;
    let mut line = Vec::new();
    let read = stdin.lock().read_until(b'\n', &mut line);
    let _ = tcsetattr(&stdin, SetArg::TCSANOW, &saved);
    eprintln!();
    read.map_err(|e| failed(&e))?;
    Ok(line)
}

/// The value, from the source the options name (its problems are checked by the service,
/// whose messages never quote it).
fn read_value(args: &SetArgs) -> Result<Vec<u8>, ServiceError> {
    if let Some(path) = &args.from_file {
        return std::fs::read(path)
            .map_err(|e| ServiceError::invalid("--from-file", format!("cannot read {}: {e}", path.display())));
    }
    if let Some(var) = &args.from_env {
        return std::env::var_os(var)
            .map(|v| v.into_encoded_bytes())
            .ok_or_else(|| ServiceError::invalid("--from-env", format!("the environment variable {var} is not set")));
    }
    if std::io::stdin().is_terminal() {
        return read_hidden(&format!("value of secret {} (not shown): ", args.name));
    }
    let mut buf = Vec::new();
    std::io::stdin()
        .read_to_end(&mut buf)
        .map_err(|e| ServiceError::host("read the value from stdin", e))?;
    Ok(buf)
}

fn describe_rule(r: &InjectionRule) -> String {
    match &r.inject {
        Injection::Header { name, value } => format!("{} {name}: {value}", r.host),
        Injection::Basic { username } => format!("{} basic {username}:…", r.host),
    }
}

fn json(v: &impl serde::Serialize) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

fn print_table(list: Vec<SecretInfo>) {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_header(["name", "variable", "version", "rules", "updated"]);
    for s in list {
        let rules: Vec<String> = s.rules.iter().map(describe_rule).collect();
        t.add_row([
            s.name.clone(),
            s.env_var.clone(),
            s.version.to_string(),
            rules.join("\n"),
            conductor_core::task::rfc3339(s.updated_at),
        ]);
    }
    println!("{t}");
}

pub async fn run(cli: &Cli, cmd: &SecretCommand) -> Result<ExitCode, ServiceError> {
    match cmd {
        SecretCommand::Set(args) => {
            let sourced = rules_of(args)?;
            let (sources, rules): (Vec<String>, Vec<InjectionRule>) = sourced.into_iter().unzip();
            // Check the name and rules before asking for the value.
            SecretSpec {
                name: args.name.clone(),
                rules: rules.clone(),
            }
            .validate("")
            .map_err(|(f, m)| name_the_option(ServiceError::invalid(f, m), &sources))?;
            let value = read_value(args)?;
            let c = open(cli).await?;
            let s = c
                .put_secret(&args.name, &value, rules)
                .map_err(|e| name_the_option(e, &sources))?;
            if args.json {
                println!("{}", json(&Secret::from(s)));
            } else {
                let verb = if s.version == 1 { "registered" } else { "rotated" };
                println!(
                    "{verb} secret {} (version {}); workspaces made with --secret {} hold a placeholder in {}",
                    s.name, s.version, s.name, s.env_var
                );
            }
        }
        SecretCommand::Ls { json: as_json } => {
            let list = open(cli).await?.list_secrets()?;
            if *as_json {
                let list: Vec<Secret> = list.into_iter().map(Into::into).collect();
                println!("{}", json(&list));
            } else {
                print_table(list);
            }
        }
        SecretCommand::Rm { name } => {
            open(cli).await?.delete_secret(name)?;
            println!("deleted secret {name}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(rules: &[&str], basic: &[&str]) -> SetArgs {
        SetArgs {
            name: "github".into(),
            rules: rules.iter().map(|s| s.to_string()).collect(),
            basic: basic.iter().map(|s| s.to_string()).collect(),
            from_file: None,
            from_env: None,
            json: false,
        }
    }

    #[test]
    fn rules_parse_from_the_options() {
        let got = rules_of(&args(
            &[
                "api.github.com=Authorization: Bearer {value}",
                "*.example.com:8443=X-Api-Key:{value}",
            ],
            &["github.com=x-access-token"],
        ))
        .unwrap();
        let rules: Vec<InjectionRule> = got.iter().map(|(_, r)| r.clone()).collect();
        assert_eq!(
            rules,
            vec![
                InjectionRule {
                    host: "api.github.com".into(),
                    inject: Injection::Header {
                        name: "Authorization".into(),
                        value: "Bearer {value}".into()
                    }
                },
                InjectionRule {
                    host: "*.example.com:8443".into(),
                    inject: Injection::Header {
                        name: "X-Api-Key".into(),
                        value: "{value}".into()
                    }
                },
                InjectionRule {
                    host: "github.com".into(),
                    inject: Injection::Basic {
                        username: "x-access-token".into()
                    }
                },
            ]
        );
        assert_eq!(got[2].0, "--basic \"github.com=x-access-token\"");
    }

    #[test]
    fn bad_options_are_named() {
        for (a, field) in [
            (args(&[], &[]), "--rule/--basic"),
            (args(&["api.github.com"], &[]), "--rule \"api.github.com\""),
            (
                args(&["api.github.com=Authorization"], &[]),
                "--rule \"api.github.com=Authorization\"",
            ),
            (args(&[], &["github.com"]), "--basic \"github.com\""),
        ] {
            match rules_of(&a) {
                Err(ServiceError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{a:?}: {other:?}"),
            }
        }
        let (sources, rules): (Vec<String>, Vec<InjectionRule>) =
            rules_of(&args(&["a.example=X: {value}"], &["a..b.example=git"]))
                .unwrap()
                .into_iter()
                .unzip();
        let (f, m) = SecretSpec {
            name: "github".into(),
            rules,
        }
        .validate("")
        .unwrap_err();
        match name_the_option(ServiceError::invalid(f, m), &sources) {
            ServiceError::Invalid { field, message } => {
                assert_eq!(field, "--basic \"a..b.example=git\" (host)");
                assert!(message.contains("empty label"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }
}
