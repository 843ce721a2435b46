//! TLS on both ports, with rustls and no OpenSSL: the certificates and keys named by the
//! `--cert-file`/`--peer-cert-file` families of flags, read from PEM files, turned into
//! the server configuration of a listener and the client configuration of this node's
//! own requests to its peers. Every file is read again on SIGHUP ([`Tls::reload`]): the
//! next handshake uses the new certificates, connections already open keep theirs, and
//! a file that no longer loads leaves the old ones in force (logged, never fatal).
//!
//! It decides nothing about who may do what: it only says who presented which
//! certificate ([`ClientCertificate`]), and refuses at the handshake a peer whose
//! certificate the trusted CA did not sign.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
    SupportedProtocolVersion,
};

/// TLS 1.3 and 1.2, as etcd accepts.
static VERSIONS: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The PEM files of one side (the client API, or the peers).
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// This node's certificate chain, its own certificate first.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA(s) whose certificates the other side must present; `None`: anyone may
    /// connect without a certificate (the client API without `--client-cert-auth`).
    pub trusted_ca: Option<PathBuf>,
}

/// The certificate that the other end of a TLS connection presented, put into every
/// request's extensions by the server (see `http_server.rs`).
#[derive(Clone, Debug)]
pub struct ClientCertificate {
    /// The subject's common name (CN), if it has one.
    pub common_name: Option<String>,
}

impl ClientCertificate {
    /// Reads the subject's common name out of a DER certificate.
    pub fn of(der: &[u8]) -> ClientCertificate {
        let common_name = x509_parser::parse_x509_certificate(der)
            .ok()
            .and_then(|(_, cert)| {
                let subject = cert.subject();
                let cn = subject.iter_common_name().next()?;
                cn.as_str().ok().map(str::to_string)
            });
        ClientCertificate { common_name }
    }
}

/// One side's TLS, as a server and as a client, reloadable.
pub struct Tls {
    files: TlsFiles,
    /// Extra CAs this node trusts as a client only (its join request to a member's
    /// client API, which may have a certificate from the client API's CA).
    extra_client_roots: Vec<PathBuf>,
    server: RwLock<Arc<ServerConfig>>,
    material: Arc<Reloadable>,
    client: Arc<ClientConfig>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).finish()
    }
}

impl Tls {
    /// Loads `files`; an error names the file and what is wrong with it.
    pub fn load(files: TlsFiles, extra_client_roots: Vec<PathBuf>) -> Result<Arc<Tls>, String> {
        let (server, material) = build(&files, &extra_client_roots)?;
        let material = Arc::new(Reloadable {
            current: RwLock::new(Arc::new(material)),
        });
        let mut client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)
            .map_err(|e| format!("TLS client configuration: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(material.clone())
            .with_client_cert_resolver(material.clone());
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(Tls {
            files,
            extra_client_roots,
            server: RwLock::new(Arc::new(server)),
            material,
            client: Arc::new(client),
        }))
    }

    /// Reads every file again; on error the configuration in force stays.
    pub fn reload(&self) -> Result<(), String> {
        let (server, material) = build(&self.files, &self.extra_client_roots)?;
        *self.server.write().unwrap() = Arc::new(server);
        *self.material.current.write().unwrap() = Arc::new(material);
        Ok(())
    }

    /// The acceptor for the next connection.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.server.read().unwrap().clone())
    }

    /// The client configuration (for reqwest's `use_preconfigured_tls`, and the peer
    /// streams): presents this node's certificate, trusts only the configured CAs.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.client.clone()
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }
}

/// The name a peer's certificate must carry: the host of its URL (a DNS name or an IP).
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string()).map_err(|e| format!("{host:?} is not a host name: {e}"))
}

/// What is read from the files: this node's key and certificate and who it trusts.
struct Material {
    key: Arc<CertifiedKey>,
    /// `None` when no CA is configured: this side then trusts no server.
    verifier: Option<Arc<WebPkiServerVerifier>>,
}

fn build(files: &TlsFiles, extra_roots: &[PathBuf]) -> Result<(ServerConfig, Material), String> {
    let chain = read_certificates(&files.cert)?;
    let key_der = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| {
        format!(
            "cannot read a private key from {}: {e}",
            files.key.display()
        )
    })?;
    let key =
        CertifiedKey::from_der(chain.clone(), key_der.clone_key(), &provider()).map_err(|e| {
            format!(
                "{} and {} do not make a usable key pair: {e}",
                files.cert.display(),
                files.key.display()
            )
        })?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| format!("TLS server configuration: {e}"))?;
    let builder = match &files.trusted_ca {
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots_of(&[ca])?), provider())
                    .build()
                    .map_err(|e| format!("cannot trust the CA in {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut server = builder.with_single_cert(chain, key_der).map_err(|e| {
        format!(
            "{} and {} do not make a usable key pair: {e}",
            files.cert.display(),
            files.key.display()
        )
    })?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];

    let mut trusted: Vec<&Path> = files.trusted_ca.iter().map(PathBuf::as_path).collect();
    trusted.extend(extra_roots.iter().map(PathBuf::as_path));
    let verifier = match trusted.is_empty() {
        true => None,
        false => Some(
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots_of(&trusted)?), provider())
                .build()
                .map_err(|e| format!("cannot trust the CA(s) {trusted:?}: {e}"))?,
        ),
    };
    Ok((
        server,
        Material {
            key: Arc::new(key),
            verifier,
        },
    ))
}

fn read_certificates(file: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read certificates from {}: {e}", file.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", file.display()));
    }
    Ok(certs)
}

fn roots_of(files: &[&Path]) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for file in files {
        for cert in read_certificates(file)? {
            roots
                .add(cert)
                .map_err(|e| format!("{} holds an unusable CA certificate: {e}", file.display()))?;
        }
    }
    Ok(roots)
}

/// The client side's certificate and trust, swapped whole on reload: rustls asks it at
/// every handshake, so one `ClientConfig` (and the HTTP clients built on it) serves for
/// the life of the process.
#[derive(Debug)]
struct Reloadable {
    current: RwLock<Arc<Material>>,
}

impl fmt::Debug for Material {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Material")
    }
}

impl Reloadable {
    fn now(&self) -> Arc<Material> {
        self.current.read().unwrap().clone()
    }

    fn verifier(&self) -> Result<Arc<WebPkiServerVerifier>, rustls::Error> {
        self.now().verifier.clone().ok_or_else(|| {
            rustls::Error::General("no trusted CA is configured for this connection".into())
        })
    }
}

impl ResolvesClientCert for Reloadable {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.now().key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ServerCertVerifier for Reloadable {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verifier()?.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier()?.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier()?.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
