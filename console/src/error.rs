//! The console's errors: one type for every command, front end and launcher. Each
//! prints as one line, which is what the REPL, the TUI and scripts show.

use vmiscope_introspect::policy::PolicyError;
use vmiscope_introspect::{GlueError, HookError};
use vmiscope_vmm::VmError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A command line the parser could not take: what it expected.
    #[error(transparent)]
    Parse(#[from] crate::commands::ParseError),
    /// The command cannot be done now, or not on this guest: why.
    #[error("{0}")]
    Command(String),
    /// An `expect` that did not hold: what was seen instead.
    #[error("{0}")]
    Expectation(String),
    #[error("the guest has ended ({0})")]
    Ended(String),
    #[error("not stopped at an event")]
    NotStopped,
    #[error("vCPU {0} did not answer")]
    NoAnswer(u32),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Hook(#[from] HookError),
    #[error("hypervisor: {0}")]
    Glue(#[from] GlueError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// An I/O error on `path` while trying to `what` it ("read", "write" …).
    pub fn io(
        what: &'static str,
        path: impl std::fmt::Display,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.to_string();
        move |source| Error::Io { what, path, source }
    }
}

impl From<String> for Error {
    fn from(why: String) -> Error {
        Error::Command(why)
    }
}

impl From<&str> for Error {
    fn from(why: &str) -> Error {
        Error::Command(why.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
