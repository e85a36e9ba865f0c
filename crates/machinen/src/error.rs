//! One error type for the whole library, carrying a stable [`ErrorCode`].
//!
//! Each module has its own `thiserror` enum with named fields and a
//! `#[source]`; [`Error`] wraps them and answers `code()`, `retryable()` and
//! `hint()` so that callers (and the CLI) can act on any failure the same way.

pub use machinen_proto::error_code::{ErrorCode, ALL};

/// An error any module can raise directly: a code, what happened, and what
/// the user should do about it.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub code: ErrorCode,
    pub message: String,
    pub hint: Option<String>,
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl Failure {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
            hint: None,
            source: None,
        }
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Failure {
        self.hint = Some(hint.into());
        self
    }

    pub fn source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Failure {
        self.source = Some(Box::new(source));
        self
    }
}

/// Implemented by every module error so [`Error`] can answer uniformly.
pub trait Coded: std::error::Error {
    fn code(&self) -> ErrorCode;
    fn hint(&self) -> Option<String> {
        None
    }
}

impl Coded for Failure {
    fn code(&self) -> ErrorCode {
        self.code
    }
    fn hint(&self) -> Option<String> {
        self.hint.clone()
    }
}

/// The library's error type.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Failure(#[from] Failure),
    #[error(transparent)]
    Install(#[from] crate::assets::InstallError),
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    #[error(transparent)]
    Provision(#[from] crate::provision::ProvisionError),
    #[error(transparent)]
    Bundle(#[from] crate::bundle::BundleError),
    #[error(transparent)]
    Ram(#[from] crate::ramdir::RamError),
    #[error(transparent)]
    Mount(#[from] crate::mounts::MountError),
    #[error(transparent)]
    Chain(Box<crate::chain::ChainError>),
}

impl Error {
    fn inner(&self) -> &dyn Coded {
        match self {
            Error::Failure(e) => e,
            Error::Install(e) => e,
            Error::Image(e) => e,
            Error::Registry(e) => e,
            Error::Provision(e) => e,
            Error::Bundle(e) => e,
            Error::Ram(e) => e,
            Error::Mount(e) => e,
            Error::Chain(e) => e.as_ref(),
        }
    }

    /// The stable code of this error.
    pub fn code(&self) -> ErrorCode {
        self.inner().code()
    }

    /// Whether retrying unchanged may succeed.
    pub fn retryable(&self) -> bool {
        self.code().retryable()
    }

    /// What the user should do, when there is something to say.
    pub fn hint(&self) -> Option<String> {
        self.inner().hint()
    }

    /// The chain of causes below this error's own message.
    pub fn causes(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut cur = std::error::Error::source(self.inner());
        while let Some(e) = cur {
            out.push(e.to_string());
            cur = e.source();
        }
        out
    }

    /// JSON form, as printed by `--json` commands on failure.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "code": self.code().as_str(),
                "message": self.to_string(),
                "causes": self.causes(),
                "hint": self.hint(),
                "retryable": self.retryable(),
            }
        })
    }
}

impl From<crate::chain::ChainError> for Error {
    fn from(e: crate::chain::ChainError) -> Error {
        Error::Chain(Box::new(e))
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Error {
        Error::Failure(Failure::new(ErrorCode::Io, "an operating-system call failed").source(e))
    }
}

/// Shorthand for a coded failure.
pub fn fail(code: ErrorCode, message: impl Into<String>) -> Failure {
    Failure::new(code, message)
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for c in ALL {
            assert!(seen.insert(c.as_str()), "duplicate {c}");
            assert_eq!(ErrorCode::from_wire(c.as_str()), Some(*c));
            let json = serde_json::to_string(c).expect("json");
            assert_eq!(json, format!("\"{}\"", c.as_str()));
        }
    }

    #[test]
    fn failure_carries_code_hint_and_chain() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        let e: Error = fail(ErrorCode::RegistryNotFound, "no VM named x")
            .hint("see `machinen ls`")
            .source(io)
            .into();
        assert_eq!(e.code(), ErrorCode::RegistryNotFound);
        assert_eq!(e.to_string(), "no VM named x");
        assert_eq!(e.causes(), vec!["gone".to_string()]);
        assert_eq!(e.hint().as_deref(), Some("see `machinen ls`"));
        assert!(!e.retryable());
        assert_eq!(e.to_json()["error"]["code"], "REGISTRY_NOT_FOUND");
    }
}
