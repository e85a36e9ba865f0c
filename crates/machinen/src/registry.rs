//! The VM registry (to be written).

use crate::error::{Coded, ErrorCode};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("no VM named {name}")]
    NotFound { name: String },
}

impl Coded for RegistryError {
    fn code(&self) -> ErrorCode {
        ErrorCode::RegistryNotFound
    }
}
