//! What can stop the server itself (a job's failure is the job's, reported with it).

/// Why `vpipe serve` could not start or keep serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A setting of the server is not usable (a folder that does not exist, a bad address).
    #[error("{0}")]
    BadConfig(String),
    /// Listening, accepting or a server file.
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    /// Opening the device or its meters.
    #[error(transparent)]
    Pipeline(#[from] vpipe_pipeline::Error),
    #[error(transparent)]
    Memory(#[from] vpipe_mem::MemError),
}

pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServeError {
    let context = context.into();
    move |source| ServeError::Io { context, source }
}
