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

impl ServeError {
    /// The exit code of the process that this error ends (the table of `vpipe_pipeline::exit_code`).
    pub fn exit_code(&self) -> u8 {
        match self {
            ServeError::BadConfig(_) => 2,
            ServeError::Io { .. } => 1,
            ServeError::Pipeline(e) => vpipe_pipeline::exit_code(vpipe_pipeline::causes(e)),
            ServeError::Memory(_) => 1,
        }
    }
}

pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServeError {
    let context = context.into();
    move |source| ServeError::Io { context, source }
}
