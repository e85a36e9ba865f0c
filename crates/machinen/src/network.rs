//! A VM's egress policy and traffic, read and changed while it runs.
//!
//! The policy ([`NetPolicy`]: a default and allow/deny rules by address,
//! CIDR or domain, each with optional ports) is enforced by the VM's
//! supervisor on the host, between the guest's network device and passt:
//! nothing in the guest can lift it. It is set at boot
//! ([`crate::BootOptions::net_policy`]), kept in snapshots (restores and
//! forks keep it unless given another), and changed with
//! [`Vm::set_network`], which applies to the next packet of every
//! connection. [`Vm::network`] also reports the traffic so far: bytes and
//! packets each way, connections, DNS queries answered and refused, and
//! the refused attempts by destination and rule.

use machinen_proto::{self as proto, timeouts};

pub use machinen_proto::egress::EgressSecretSpec;
pub use machinen_proto::netpolicy::{
    Egress, NetCounters, NetPolicy, NetReport, PolicyChange, Refused, Rule,
};

use crate::error::fail;
use crate::vm::Vm;
use crate::{ErrorCode, Result};

/// Parse rule texts (`10.0.0.0/8:443`, `*.example.com`) given for `what`
/// (a flag's name, for the message).
pub fn parse_rules(what: &str, rules: &[String]) -> Result<Vec<Rule>> {
    rules
        .iter()
        .map(|r| {
            r.parse::<Rule>().map_err(|e| {
                fail(ErrorCode::NetworkPolicyInvalid, format!("{what}: {e}"))
                    .hint("a rule is ADDRESS, CIDR or DOMAIN (*.DOMAIN for every name below it), optionally :PORT or :LOW-HIGH; IPv6 with a port in brackets: [fd00::/8]:53")
                    .into()
            })
        })
        .collect()
}

impl Vm {
    /// The egress policy and the traffic so far (`NETWORK_UNAVAILABLE` for
    /// a VM without a filtered network).
    pub async fn network(&self) -> Result<NetReport> {
        self.network_request(None).await
    }

    /// Change the egress policy; the answer is the policy now in force.
    /// Removing a rule the policy lacks is `NETWORK_POLICY_INVALID`.
    pub async fn set_network(&self, change: PolicyChange) -> Result<NetReport> {
        self.network_request(Some(change)).await
    }

    async fn network_request(&self, change: Option<PolicyChange>) -> Result<NetReport> {
        self.call(
            proto::exchange::Network { change },
            timeouts::CONTROL_ANSWER,
            ErrorCode::NetworkUnavailable,
        )
        .await
    }
}

/// A credential the guest never holds: `$NAME` in the guest is a
/// placeholder, and the runtime's egress proxy puts the value into the
/// headers of HTTPS requests to `hosts` only (see `machinen_proto::egress`
/// and docs/security.md). Set at boot ([`crate::BootOptions::egress_secrets`]);
/// restores and forks keep the names and placeholders and take the values
/// again ([`crate::RestoreOptions::egress_secrets`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressSecret {
    pub name: String,
    /// Host names (`*.` for every name below one) or IP addresses.
    pub hosts: Vec<String>,
    pub value: proto::SecretValue,
}

const EGRESS_SECRET_HINT: &str = "the form is NAME@HOST[,HOST…]=VALUE, or NAME@HOST with NAME set in your environment; HOST may be *.DOMAIN";

impl EgressSecret {
    /// A secret from its parts (the bindings' fields), checked as the
    /// flag's are.
    pub fn new(name: &str, hosts: &[&str], value: &str) -> Result<EgressSecret> {
        let invalid = |e: String| {
            fail(ErrorCode::SecretsInvalid, format!("egress secret: {e}")).hint(EGRESS_SECRET_HINT)
        };
        let hosts = proto::egress::check_parts(name, hosts).map_err(invalid)?;
        proto::egress::check_value(name, value).map_err(invalid)?;
        Ok(EgressSecret {
            name: name.to_string(),
            hosts,
            value: proto::SecretValue(value.as_bytes().to_vec()),
        })
    }

    /// Parse `NAME@HOST[,HOST…][=VALUE]`; without `=VALUE` the value is
    /// this process's environment variable `NAME`.
    pub fn parse(flag: &str) -> Result<EgressSecret> {
        let hint = EGRESS_SECRET_HINT;
        let a = proto::egress::parse_arg(flag).map_err(|e| {
            fail(ErrorCode::SecretsInvalid, format!("--egress-secret: {e}")).hint(hint)
        })?;
        let value = match a.value {
            Some(v) => v,
            None => {
                let v = std::env::var(&a.name).map_err(|_| {
                    fail(
                        ErrorCode::SecretsInvalid,
                        format!(
                            "--egress-secret {}: no =VALUE, and {} is not set in the environment",
                            a.name, a.name
                        ),
                    )
                    .hint(hint)
                })?;
                proto::egress::check_value(&a.name, &v)
                    .map_err(|e| fail(ErrorCode::SecretsInvalid, e))?;
                v
            }
        };
        Ok(EgressSecret {
            name: a.name,
            hosts: a.hosts,
            value: proto::SecretValue(value.into_bytes()),
        })
    }
}

/// The specs a VM gets: `existing` (a bundle's; their placeholders are in
/// the guest already) with `given` added or re-targeted, each new name with
/// a fresh placeholder. Checks the limits and that the network can carry
/// them.
pub(crate) fn egress_specs(
    network: crate::spec::NetworkMode,
    existing: &[EgressSecretSpec],
    given: &[EgressSecret],
) -> Result<Vec<EgressSecretSpec>> {
    let mut specs = existing.to_vec();
    for g in given {
        if let Some(s) = specs.iter_mut().find(|s| s.name == g.name) {
            s.hosts = g.hosts.clone();
            continue;
        }
        specs.push(EgressSecretSpec {
            name: g.name.clone(),
            hosts: g.hosts.clone(),
            // rand's thread generator is a CSPRNG seeded by the OS.
            placeholder: proto::egress::placeholder(&g.name, &rand::random()),
        });
    }
    if specs.len() > proto::egress::MAX_SECRETS {
        return Err(fail(
            ErrorCode::SecretsInvalid,
            format!(
                "at most {} egress secrets per VM",
                proto::egress::MAX_SECRETS
            ),
        )
        .into());
    }
    if !specs.is_empty() && network != crate::spec::NetworkMode::Nat {
        return Err(fail(
            ErrorCode::BootArgsInvalid,
            format!("egress secrets need --network nat (this VM's network is {network})"),
        )
        .hint("the egress proxy answers for the VM's filtered network; boot with --network nat (the default)")
        .into());
    }
    Ok(specs)
}

impl Vm {
    /// Hand the supervisor the values of this VM's egress secrets
    /// (replacing earlier ones; an empty list says none will come, and
    /// requests that need one are refused). The count it now has.
    pub async fn set_egress_secrets(&self, secrets: &[EgressSecret]) -> Result<u32> {
        let secrets = secrets
            .iter()
            .map(|s| proto::Secret {
                name: s.name.clone(),
                value: s.value.clone(),
            })
            .collect();
        self.call(
            proto::exchange::SetEgressSecrets { secrets },
            timeouts::CONTROL_ANSWER,
            ErrorCode::NetworkUnavailable,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::NetworkMode;

    #[test]
    fn egress_secrets_keep_placeholders_and_need_nat() {
        let s = EgressSecret::parse("API_KEY@api.example.com=sk-1").expect("parse");
        assert!(!format!("{s:?}").contains("sk-1"), "redacted: {s:?}");
        let specs = egress_specs(NetworkMode::Nat, &[], std::slice::from_ref(&s)).expect("specs");
        assert!(specs[0].placeholder.starts_with("machinen-egress-api_key-"));
        // A restore that names it again keeps the guest's placeholder.
        let again = EgressSecret::parse("API_KEY@*.example.com=sk-2").expect("parse");
        let kept = egress_specs(NetworkMode::Nat, &specs, &[again]).expect("specs");
        assert_eq!(kept[0].placeholder, specs[0].placeholder);
        assert_eq!(kept[0].hosts, ["*.example.com"]);
        let err = egress_specs(NetworkMode::None, &[], &[s]).expect_err("none");
        assert_eq!(err.code(), ErrorCode::BootArgsInvalid);
        let err = EgressSecret::parse("SURELY_UNSET_EGRESS_VAR_0451@h").expect_err("unset");
        assert_eq!(err.code(), ErrorCode::SecretsInvalid);
    }
}
