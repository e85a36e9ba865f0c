//! The egress proxy: credentials the guest never holds (see
//! `machinen_proto::egress` for the design and the message sequence).
//!
//! The supervisor owns a per-VM CA (generated at start, its key only in
//! this process's memory), the secrets' values (handed over on the control
//! link), and a pool of `EgressAccept` streams: each one waits in the agent
//! for a guest connection to the proxy and is replaced as soon as it gets
//! one. A new agent session (after a restore, or the keeper's recovery)
//! gets the setup again — the CA is new after a restore, the guest's
//! variables and placeholders are the bundle's.

mod proxy;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use machinen_proto::egress::{EgressSecretSpec, EgressSetup, PROXY_PORT};
use machinen_proto::{self as proto, timeouts, Frame, Request, Response, Secret, SecretValue};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::agent::AgentSession;
use crate::control::Shared;
use crate::netfilter::Net;

/// Accepts waiting in the agent at once: a burst of more connections waits
/// in the guest's listen backlog for a moment.
const ACCEPTORS: usize = 4;
/// Leaf certificates kept (one per host the guest reached with secrets).
const MAX_LEAVES: usize = 256;

/// Errors setting the proxy up.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("making the VM's egress CA")]
    Ca(#[source] rcgen::Error),
    #[error("loading TLS settings")]
    Tls(#[source] rustls::Error),
}

/// The per-VM CA.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    pem: String,
}

impl Ca {
    fn new(vm: &str) -> Result<Ca, rcgen::Error> {
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(DnType::CommonName, format!("machinen egress CA for {vm}"));
        p.distinguished_name
            .push(DnType::OrganizationName, "machinen (this VM only)");
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p.not_before = rcgen::date_time_ymd(2024, 1, 1);
        p.not_after = rcgen::date_time_ymd(2099, 1, 1);
        let key = KeyPair::generate()?;
        let cert = p.self_signed(&key)?;
        let pem = cert.pem();
        Ok(Ca { cert, key, pem })
    }

    /// A certificate for `host` (a name or an address), with its key.
    fn leaf(
        &self,
        host: &str,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), rcgen::Error> {
        let mut p = CertificateParams::new(vec![host.to_string()])?;
        p.distinguished_name.push(DnType::CommonName, host);
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        p.not_before = rcgen::date_time_ymd(2024, 1, 1);
        p.not_after = rcgen::date_time_ymd(2099, 1, 1);
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &self.cert, &self.key)?;
        Ok((
            vec![cert.der().clone(), self.cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        ))
    }
}

/// What the values are: not told yet (a boot's first moments), or told.
enum Values {
    Pending,
    Set(HashMap<String, SecretValue>),
}

/// A VM's egress secrets and proxy.
pub struct Egress {
    specs: Vec<EgressSecretSpec>,
    values: Mutex<Values>,
    values_set: tokio::sync::Notify,
    ca: Ca,
    net: Arc<Net>,
    client_tls: Arc<rustls::ClientConfig>,
    leaves: Mutex<HashMap<String, Arc<rustls::ServerConfig>>>,
    /// The agent session last set up (start-up sets the first one up before
    /// the main command runs; [`run`] then sets up only new ones).
    set_up_in: Mutex<Option<crate::agent::SessionToken>>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Egress {
    pub fn new(
        vm: &str,
        specs: Vec<EgressSecretSpec>,
        net: Arc<Net>,
    ) -> Result<Arc<Egress>, EgressError> {
        let ca = Ca::new(vm).map_err(EgressError::Ca)?;
        // The host's trust store (`SSL_CERT_FILE`/`SSL_CERT_DIR` honoured):
        // the proxy checks the real server as any client on the host would.
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for e in &native.errors {
            tracing::warn!("egress proxy: host trust store: {e}");
        }
        let (added, ignored) = roots.add_parsable_certificates(native.certs);
        tracing::info!("egress proxy: {added} host CA certificates ({ignored} unreadable)");
        let mut client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(EgressError::Tls)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(Egress {
            specs,
            values: Mutex::new(Values::Pending),
            values_set: tokio::sync::Notify::new(),
            ca,
            net,
            client_tls: Arc::new(client),
            leaves: Mutex::new(HashMap::new()),
            set_up_in: Mutex::new(None),
        }))
    }

    /// The setup the agent gets.
    pub fn setup(&self) -> EgressSetup {
        EgressSetup {
            port: PROXY_PORT,
            ca_pem: self.ca.pem.clone(),
            env: self
                .specs
                .iter()
                .map(|s| (s.name.clone(), s.placeholder.clone()))
                .collect(),
        }
    }

    /// Take the values (`EgressSecrets`); every name must be one of the
    /// VM's. Replaces what was there; an empty list says none will come.
    pub fn set_values(&self, secrets: Vec<Secret>) -> Result<u32, String> {
        let mut map = HashMap::new();
        for s in secrets {
            if !self.specs.iter().any(|x| x.name == s.name) {
                return Err(format!(
                    "this VM has no egress secret {:?} (it has: {})",
                    s.name,
                    self.specs
                        .iter()
                        .map(|x| x.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            map.insert(s.name, s.value);
        }
        let n = map.len() as u32;
        *self.values.lock().unwrap_or_else(|e| e.into_inner()) = Values::Set(map);
        self.values_set.notify_waiters();
        Ok(n)
    }

    /// The secrets that apply to `host`, with their values (`None`: the VM
    /// has this secret but was given no value for it). Waits a moment for
    /// the values at boot, when a request may come before them.
    async fn for_host(&self, host: &str) -> Vec<(&EgressSecretSpec, Option<SecretValue>)> {
        let specs: Vec<&EgressSecretSpec> =
            self.specs.iter().filter(|s| s.applies_to(host)).collect();
        if specs.is_empty() {
            return Vec::new();
        }
        let wait = async {
            loop {
                let notified = self.values_set.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if matches!(
                    *self.values.lock().unwrap_or_else(|e| e.into_inner()),
                    Values::Set(_)
                ) {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(timeouts::EGRESS_VALUES_WAIT, wait).await;
        let values = self.values.lock().unwrap_or_else(|e| e.into_inner());
        specs
            .into_iter()
            .map(|s| {
                let v = match &*values {
                    Values::Set(m) => m.get(&s.name).cloned(),
                    Values::Pending => None,
                };
                (s, v)
            })
            .collect()
    }

    /// Whether any secret applies to `host` (the proxy then terminates TLS).
    fn intercepts(&self, host: &str) -> bool {
        self.specs.iter().any(|s| s.applies_to(host))
    }

    fn leaf_config(&self, host: &str) -> Result<Arc<rustls::ServerConfig>, String> {
        let mut leaves = self.leaves.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = leaves.get(host) {
            return Ok(c.clone());
        }
        let (chain, key) = self.ca.leaf(host).map_err(|e| e.to_string())?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| e.to_string())?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let cfg = Arc::new(cfg);
        if leaves.len() >= MAX_LEAVES {
            leaves.clear();
        }
        leaves.insert(host.to_string(), cfg.clone());
        Ok(cfg)
    }
}

/// Send the setup to the agent of `session`, unless it had it already.
pub async fn set_up(egress: &Egress, session: &AgentSession) -> Result<(), String> {
    let done = egress
        .set_up_in
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .is_some_and(|t| t.ptr_eq(&session.token()));
    if done {
        return Ok(());
    }
    let ask = async {
        let mut s = session.open().await.map_err(|e| e.to_string())?;
        proto::send(
            &mut s,
            &Frame::Request(Request::EgressSetup(egress.setup())),
        )
        .await
        .map_err(|e| e.to_string())?;
        match proto::read_frame(&mut s).await.map_err(|e| e.to_string())? {
            Some(Frame::Response(Response::EgressReady)) => Ok(()),
            Some(Frame::Error(e)) => Err(format!("{}: {}", e.code, e.message)),
            other => Err(format!("unexpected answer {other:?}")),
        }
    };
    tokio::time::timeout(timeouts::CONTROL_ANSWER, ask)
        .await
        .map_err(|_| "the agent did not answer".to_string())??;
    *egress.set_up_in.lock().unwrap_or_else(|e| e.into_inner()) = Some(session.token());
    Ok(())
}

/// Keep the proxy served for the VM's life: set each new agent session up
/// (the first one start-up did) and keep [`ACCEPTORS`] accepts waiting in it.
pub async fn run(egress: Arc<Egress>, shared: Arc<Shared>) {
    loop {
        let session = shared.agent.lock().await.clone();
        let Some(session) = session else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        if let Err(e) = set_up(&egress, &session).await {
            tracing::warn!("egress proxy setup: {e}");
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        let acceptors = (0..ACCEPTORS).map(|_| accept_loop(egress.clone(), session.clone()));
        futures::future::join_all(acceptors).await;
        // The session ended: wait for the next one.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Wait for guest connections on one stream after another until the
/// session fails.
async fn accept_loop(egress: Arc<Egress>, session: AgentSession) {
    loop {
        let Ok(mut s) = session.open().await else {
            return;
        };
        if proto::send(&mut s, &Frame::Request(Request::EgressAccept))
            .await
            .is_err()
        {
            return;
        }
        match proto::read_frame(&mut s).await {
            Ok(Some(Frame::Response(Response::Connected))) => {
                let egress = egress.clone();
                tokio::spawn(async move { proxy::serve(egress, s).await });
            }
            Ok(Some(Frame::Error(e))) => {
                tracing::warn!("egress accept: {}: {}", e.code, e.message);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            _ => return,
        }
    }
}
