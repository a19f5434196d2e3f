//! Where an executor listens and how the router reaches it: a unix socket on this host, or
//! TCP with TLS and a shared secret (never plaintext off-host). One `Client` type for both,
//! the secret sent on every call as `authorization: Bearer <secret>`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Uri};

use crate::pb::executor_client::ExecutorClient;

/// A gRPC client of one executor, with the shared secret attached to each call.
pub type Client = ExecutorClient<InterceptedService<Channel, Auth>>;

/// `--executor`: `unix:///path/to/socket` or `https://host:port`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ExecutorAddress {
    Unix(PathBuf),
    /// A DNS name or an IP literal; a name is re-resolved on a period and each of its
    /// addresses is one worker (a Kubernetes headless Service lists one per pod).
    Https {
        host: String,
        port: u16,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AddressError {
    #[error(
        "--executor {0:?}: expected unix:///path/to/socket or https://host:port (plaintext \
         http:// is refused: executors off this host are reached over TLS only)"
    )]
    Scheme(String),
    #[error("--executor {0:?}: {1}")]
    Invalid(String, &'static str),
}

impl std::str::FromStr for ExecutorAddress {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix://") {
            if path.is_empty() {
                return Err(AddressError::Invalid(s.into(), "the socket path is empty"));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        let Some(rest) = s.strip_prefix("https://") else {
            return Err(AddressError::Scheme(s.into()));
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or(AddressError::Invalid(s.into(), "the port is missing"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| AddressError::Invalid(s.into(), "the port is not a number 1-65535"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || port == 0 || host.contains('/') {
            return Err(AddressError::Invalid(
                s.into(),
                "expected https://host:port",
            ));
        }
        Ok(Self::Https {
            host: host.to_string(),
            port,
        })
    }
}

impl fmt::Display for ExecutorAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix://{}", path.display()),
            Self::Https { host, port } if host.contains(':') => {
                write!(f, "https://[{host}]:{port}")
            }
            Self::Https { host, port } => write!(f, "https://{host}:{port}"),
        }
    }
}

/// Attaches the shared secret to every call.
#[derive(Clone, Default)]
pub struct Auth(Option<AsciiMetadataValue>);

impl tonic::service::Interceptor for Auth {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// How the router authenticates to TCP executors: the CA that signed their certificates and
/// the shared secret (TENSORGATE_EXECUTOR_SECRET).
#[derive(Clone, Default)]
pub struct Credentials {
    ca_pem: Option<Arc<Vec<u8>>>,
    auth: Auth,
    /// The name the executors' certificates carry, when it is not the URL's host.
    tls_domain: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("cannot read --executor-tls-ca {0}: {1}")]
    Ca(PathBuf, std::io::Error),
    #[error("TENSORGATE_EXECUTOR_SECRET must be printable ASCII")]
    Secret,
    #[error(
        "--executor {0} is reached over TLS: it needs --executor-tls-ca (the CA of its \
         certificate) and the shared secret in TENSORGATE_EXECUTOR_SECRET"
    )]
    Missing(String),
}

impl Credentials {
    pub fn new(
        ca: Option<&Path>,
        secret: Option<&str>,
        tls_domain: Option<String>,
    ) -> Result<Self, CredentialsError> {
        let ca_pem = match ca {
            Some(path) => Some(Arc::new(
                std::fs::read(path).map_err(|e| CredentialsError::Ca(path.to_path_buf(), e))?,
            )),
            None => None,
        };
        let auth = match secret {
            Some(s) => Auth(Some(
                format!("Bearer {s}")
                    .parse()
                    .map_err(|_| CredentialsError::Secret)?,
            )),
            None => Auth(None),
        };
        Ok(Self {
            ca_pem,
            auth,
            tls_domain,
        })
    }

    /// Refuses a TCP executor without both the CA and the secret.
    pub fn check(&self, address: &ExecutorAddress) -> Result<(), CredentialsError> {
        match address {
            ExecutorAddress::Https { .. } if self.ca_pem.is_none() || self.auth.0.is_none() => {
                Err(CredentialsError::Missing(address.to_string()))
            }
            _ => Ok(()),
        }
    }
}

/// One dialable executor: a socket, or one resolved address of an https executor with the
/// name its certificate is checked against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    Unix(PathBuf),
    Tcp {
        addr: std::net::SocketAddr,
        host: String,
    },
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix://{}", path.display()),
            Self::Tcp { addr, host } if host == &addr.ip().to_string() => {
                write!(f, "https://{addr}")
            }
            Self::Tcp { addr, host } => write!(f, "https://{host}@{addr}"),
        }
    }
}

/// Connects to `target` (TLS and the secret for TCP).
pub async fn connect(
    target: &Target,
    credentials: &Credentials,
) -> Result<Client, tonic::transport::Error> {
    let channel = match target {
        Target::Unix(socket) => {
            let socket = socket.clone();
            // The URI is required by tonic but unused: the connector dials the unix socket.
            Endpoint::from_static("http://executor")
                .connect_timeout(Duration::from_secs(2))
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let socket = socket.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?))
                    }
                }))
                .await?
        }
        Target::Tcp { addr, host } => {
            let mut tls = ClientTlsConfig::new()
                .domain_name(credentials.tls_domain.clone().unwrap_or(host.clone()));
            if let Some(pem) = &credentials.ca_pem {
                tls = tls.ca_certificate(Certificate::from_pem(pem.as_slice()));
            }
            Endpoint::from_shared(format!("https://{addr}"))?
                .connect_timeout(Duration::from_secs(2))
                .tcp_nodelay(true)
                .tls_config(tls)?
                .connect()
                .await?
        }
    };
    Ok(ExecutorClient::with_interceptor(
        channel,
        credentials.auth.clone(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_print_back() {
        for (text, address) in [
            (
                "unix:///tmp/e.sock",
                ExecutorAddress::Unix("/tmp/e.sock".into()),
            ),
            (
                "https://executor-0.tg:50051",
                ExecutorAddress::Https {
                    host: "executor-0.tg".into(),
                    port: 50051,
                },
            ),
            (
                "https://[::1]:7",
                ExecutorAddress::Https {
                    host: "::1".into(),
                    port: 7,
                },
            ),
        ] {
            assert_eq!(text.parse::<ExecutorAddress>(), Ok(address.clone()));
            assert_eq!(address.to_string(), text);
        }
    }

    #[test]
    fn plaintext_and_malformed_addresses_are_refused_with_the_form() {
        let err = "http://host:1".parse::<ExecutorAddress>().unwrap_err();
        assert!(err.to_string().contains("plaintext"), "{err}");
        for bad in [
            "https://host",
            "https://host:x",
            "https://:5",
            "unix://",
            "host:5",
        ] {
            assert!(bad.parse::<ExecutorAddress>().is_err(), "{bad}");
        }
    }

    #[test]
    fn tcp_executors_need_the_ca_and_the_secret() {
        let tcp: ExecutorAddress = "https://h:1".parse().unwrap();
        let none = Credentials::default();
        assert!(none.check(&tcp).is_err());
        assert!(none.check(&"unix:///s".parse().unwrap()).is_ok());
        let secret_only = Credentials::new(None, Some("s3cret"), None).unwrap();
        assert!(secret_only.check(&tcp).is_err());
        assert!(Credentials::new(None, Some("bad\nsecret"), None).is_err());
    }
}
