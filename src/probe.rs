//! `raftkvd probe [URL]`: one GET that exits 0 if the answer is 2xx and 1 otherwise, for
//! health checks where no curl exists (the container image holds only this binary).
//!
//! Without a URL it asks this machine's own client API for `/health`, on the port of
//! `RAFTKVD_PORT` (the variable the daemon reads), over HTTPS when `RAFTKVD_CERT_FILE` is
//! set. Like Kubernetes' HTTPS probes it does not verify the server's certificate: it only
//! reads a status from a loopback port and sends nothing secret. It never touches the
//! data directory.

use std::time::Duration;

/// How long the probe waits for the whole answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Runs the probe with the arguments after `probe`; returns the exit status.
pub fn run(args: &[String]) -> i32 {
    let url = match args {
        [] => match own_health_url() {
            Ok(url) => url,
            Err(e) => {
                eprintln!("raftkvd probe: {e}");
                return 2;
            }
        },
        [url] => url.clone(),
        _ => {
            eprintln!("usage: raftkvd probe [URL]   (default: this node's /health)");
            return 2;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("raftkvd probe: cannot start the async runtime: {e}");
            return 1;
        }
    };
    match runtime.block_on(get(&url)) {
        Ok(status) if status.is_success() => 0,
        Ok(status) => {
            eprintln!("raftkvd probe: GET {url}: {status}");
            1
        }
        Err(e) => {
            eprintln!("raftkvd probe: GET {url}: {e}");
            1
        }
    }
}

/// `/health` on this machine's client port, from the daemon's own environment.
fn own_health_url() -> Result<String, String> {
    let port = std::env::var("RAFTKVD_PORT")
        .map_err(|_| "give a URL, or set RAFTKVD_PORT to the client API's port".to_string())?;
    let port: u16 = port
        .trim()
        .parse()
        .map_err(|_| format!("RAFTKVD_PORT {port:?} is not a port number"))?;
    let scheme = match std::env::var_os("RAFTKVD_CERT_FILE") {
        Some(_) => "https",
        None => "http",
    };
    Ok(format!("{scheme}://127.0.0.1:{port}/health"))
}

async fn get(url: &str) -> Result<reqwest::StatusCode, reqwest::Error> {
    let client = reqwest::Client::builder()
        .timeout(PROBE_TIMEOUT)
        .danger_accept_invalid_certs(true)
        .build()?;
    Ok(client.get(url).send().await?.status())
}
