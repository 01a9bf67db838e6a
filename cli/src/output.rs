//! Output for people (aligned tables) and machines (`-o json`), and the plain HTTP client the
//! commands use against the apiserver's health port and the agent's admin port.

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// How a command prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub(crate) enum Format {
    /// Aligned columns.
    #[default]
    Table,
    /// JSON, for machines.
    Json,
}

/// Columns aligned to their widest cell.
pub(crate) fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: &mut dyn Iterator<Item = String>| -> String {
        let mut out = String::new();
        for (i, cell) in cells.enumerate() {
            let w = widths.get(i).copied().unwrap_or(0);
            if i + 1 == widths.len() {
                out.push_str(&cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.trim_end().to_owned()
    };
    let mut out = line(&mut headers.iter().map(|h| (*h).to_owned()));
    out.push('\n');
    for row in rows {
        out.push_str(&line(&mut row.iter().cloned()));
        out.push('\n');
    }
    out
}

/// `yes` / `no`.
pub(crate) fn yes(b: bool) -> String {
    if b { "yes" } else { "no" }.to_owned()
}

/// A plain HTTP/1.0 GET: the status code and body.
pub(crate) async fn get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .with_context(|| format!("connecting to {addr} timed out"))?
    .with_context(|| format!("connecting to {addr}"))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        s.read_to_string(&mut out),
    )
    .await
    .with_context(|| format!("GET {path} from {addr} timed out"))??;
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("{addr} answered {path} with no HTTP status"))?;
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}

/// GET that must answer 200 with JSON.
pub(crate) async fn get_json(addr: &str, path: &str) -> anyhow::Result<serde_json::Value> {
    let (code, body) = get(addr, path).await?;
    if code != 200 {
        bail!("{addr}{path} answered {code}: {}", body.trim());
    }
    serde_json::from_str(&body).with_context(|| format!("{addr}{path} did not answer JSON"))
}

/// GET a stream of lines: the lines of the body once the answer's headers arrived (a `200`),
/// or the error the server gave.
pub(crate) async fn open_lines(
    addr: &str,
    path: &str,
) -> anyhow::Result<tokio::io::Lines<BufReader<tokio::net::TcpStream>>> {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut lines = BufReader::new(s).lines();
    let status = lines.next_line().await?.unwrap_or_default();
    let code: u16 = status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    // Headers.
    while let Some(l) = lines.next_line().await? {
        if l.is_empty() {
            break;
        }
    }
    if code != 200 {
        let mut body = String::new();
        while let Some(l) = lines.next_line().await? {
            body.push_str(&l);
        }
        bail!("{addr}{path} answered {code}: {body}");
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let t = table(
            &["NAME", "READY"],
            &[
                vec!["c1".into(), "yes".into()],
                vec!["cluster-2".into(), "no".into()],
            ],
        );
        assert_eq!(t, "NAME       READY\nc1         yes\ncluster-2  no\n");
    }
}
