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
