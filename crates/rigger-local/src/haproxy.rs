//! Talking to the local load balancer through HAProxy's stats socket (its runtime API): each
//! web server's state and health-check result, and draining a server before it goes.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// One web server as HAProxy sees it, across the http and https backends.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerStat {
    /// `UP`, `DOWN`, `UP 1/2`, `DRAIN`, `MAINT`, ...; DOWN in either backend wins.
    pub status: String,
    /// Sessions in progress, both backends together.
    pub current_sessions: u64,
    /// The last health check: e.g. `L7STS` (HTTP status), `L4CON` (connection refused).
    pub check_status: String,
    /// The HTTP status of the last check, when there was one.
    pub check_code: String,
    /// HAProxy's words for the last check (`last_chk`).
    pub check_detail: String,
}

/// Sends one runtime API command and returns HAProxy's answer.
pub async fn command(socket: &Path, command: &str) -> std::io::Result<String> {
    let timeout = Duration::from_secs(2);
    let mut stream = tokio::time::timeout(timeout, tokio::net::UnixStream::connect(socket))
        .await
        .map_err(std::io::Error::other)??;
    stream.write_all(format!("{command}\n").as_bytes()).await?;
    let mut text = String::new();
    tokio::time::timeout(timeout, stream.read_to_string(&mut text))
        .await
        .map_err(std::io::Error::other)??;
    Ok(text)
}

/// Every web server's stat (`show stat`).
pub async fn stats(socket: &Path) -> std::io::Result<BTreeMap<String, ServerStat>> {
    Ok(parse_stats(&command(socket, "show stat").await?))
}

/// Every web server's status word.
pub async fn server_states(socket: &Path) -> std::io::Result<BTreeMap<String, String>> {
    Ok(stats(socket)
        .await?
        .into_iter()
        .map(|(id, stat)| (id, stat.status))
        .collect())
}

/// Stops sending new requests to `server` in both backends; requests in progress finish.
pub async fn drain(socket: &Path, server: &str) -> std::io::Result<()> {
    for backend in ["web_https", "web_http"] {
        let answer = command(
            socket,
            &format!("set server {backend}/{server} state drain"),
        )
        .await?;
        if !answer.trim().is_empty() {
            tracing::debug!(%server, %backend, answer = answer.trim(), "drain");
        }
    }
    Ok(())
}

fn parse_stats(text: &str) -> BTreeMap<String, ServerStat> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .trim_start_matches("# ")
        .split(',')
        .collect();
    let column = |name: &str| header.iter().position(|h| *h == name);
    let (Some(sv), Some(st)) = (column("svname"), column("status")) else {
        return BTreeMap::new();
    };
    let field = |fields: &[&str], name: &str| {
        column(name)
            .and_then(|i| fields.get(i))
            .map_or(String::new(), |f| (*f).to_owned())
    };
    let mut servers: BTreeMap<String, ServerStat> = BTreeMap::new();
    for line in lines {
        let fields: Vec<&str> = line.split(',').collect();
        let (Some(name), Some(status)) = (fields.get(sv), fields.get(st)) else {
            continue;
        };
        if *name == "FRONTEND" || *name == "BACKEND" || name.is_empty() {
            continue;
        }
        let entry = servers
            .entry((*name).to_owned())
            .or_insert_with(|| ServerStat {
                status: (*status).to_owned(),
                ..ServerStat::default()
            });
        if !status.starts_with("UP") {
            entry.status = (*status).to_owned();
        }
        entry.current_sessions += field(&fields, "scur").parse::<u64>().unwrap_or(0);
        // The https backend runs the checks; the http one tracks it.
        let check_status = field(&fields, "check_status");
        if !check_status.is_empty() {
            entry.check_status = check_status;
            entry.check_code = field(&fields, "check_code");
            entry.check_detail = field(&fields, "last_chk");
        }
    }
    servers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_merge_both_backends_and_keep_the_check() {
        let text = "# pxname,svname,scur,status,check_status,check_code,last_chk\n\
                    http_in,FRONTEND,3,OPEN,,,\n\
                    web_https,web-1,2,UP,L7OK,200,OK\n\
                    web_https,web-2,0,DOWN,L7STS,503,HTTP status check returned code <3C>503<3E>\n\
                    web_https,BACKEND,2,UP,,,\n\
                    web_http,web-1,1,UP,,,\n\
                    web_http,web-2,0,DOWN,,,\n";
        let stats = parse_stats(text);
        assert_eq!(stats["web-1"].current_sessions, 3);
        assert_eq!(stats["web-1"].status, "UP");
        assert_eq!(stats["web-2"].status, "DOWN");
        assert_eq!(stats["web-2"].check_status, "L7STS");
        assert_eq!(stats["web-2"].check_code, "503");
        assert!(stats["web-2"].check_detail.contains("503"));
    }
}
