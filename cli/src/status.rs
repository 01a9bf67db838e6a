//! `clustermesh status`: this cluster's apiserver and each remote it imports, from the
//! apiserver's `/status` on its health port. Exit code 1 when the apiserver or any remote is
//! not ready; a remote is ready only while it is connected, its snapshot is imported and its
//! backends are not withdrawn (the same `ready` as the JSON and the READY column).

use anyhow::Context;
use serde_json::Value;

use crate::output::{Format, get_json, table, yes};

/// Whether everything is ready, and the text to print.
pub(crate) async fn status(health: &str, format: Format) -> anyhow::Result<(bool, String)> {
    let s = get_json(health, "/status")
        .await
        .with_context(|| format!("asking the apiserver at {health} (is it running?)"))?;
    let remotes = s["remotes"].as_array().cloned().unwrap_or_default();
    let all_ready = s["ready"] == true && remotes.iter().all(|r| r["ready"] == true);
    let text = match format {
        Format::Json => serde_json::to_string_pretty(&s)? + "\n",
        Format::Table => render(&s, &remotes),
    };
    Ok((all_ready, text))
}

/// [`status`] once everything is ready, or at the end of `limit` (then not ready, with a
/// line on standard error saying so). Asked every second; an apiserver that does not answer
/// yet is waited for too.
pub(crate) async fn wait(
    health: &str,
    format: Format,
    limit: std::time::Duration,
) -> anyhow::Result<(bool, String)> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let last = status(health, format).await;
        if matches!(last, Ok((true, _))) || tokio::time::Instant::now() >= deadline {
            if !matches!(last, Ok((true, _))) {
                eprintln!("not ready after {}", humantime::format_duration(limit));
            }
            return last;
        }
        tokio::time::sleep(
            std::time::Duration::from_secs(1)
                .min(deadline.saturating_duration_since(tokio::time::Instant::now())),
        )
        .await;
    }
}

/// `"(12s ago) "` for a Unix time.
fn ago(unix: Option<u64>) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    unix.map_or_else(String::new, |t| {
        format!("({}s ago) ", now.saturating_sub(t))
    })
}

fn count(r: &Value, kind: &str) -> String {
    r["counts"][kind].as_u64().unwrap_or(0).to_string()
}

fn render(s: &Value, remotes: &[Value]) -> String {
    let mut out = format!(
        "cluster {} (id {}): apiserver {}\n",
        s["cluster"].as_str().unwrap_or("?"),
        s["id"].as_u64().map_or("?".to_owned(), |i| i.to_string()),
        if s["ready"] == true {
            "ready".to_owned()
        } else if s["store"]["healthy"] == false {
            format!(
                "NOT READY (kvstore unavailable{}: {})",
                ago(s["store"]["since"].as_u64())
                    .trim_end()
                    .replace('(', " since ")
                    .replace(')', ""),
                s["store"]["error"].as_str().unwrap_or("?")
            )
        } else {
            "NOT READY (first sync not done)".to_owned()
        }
    );
    // Policies loaded with parts the datapath does not enforce as written (each part failing
    // closed): said here, not only in the log.
    if let Some(notes) = s["policiesNotEnforcedAsWritten"]
        .as_object()
        .filter(|n| !n.is_empty())
    {
        out.push_str(&format!(
            "{} policies with parts not enforced as written (translated to fail closed):\n",
            notes.len()
        ));
        for (policy, list) in notes {
            for note in list
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                out.push_str(&format!("  {policy}: {note}\n"));
            }
        }
    }
    if remotes.is_empty() {
        out.push_str("no remote clusters (connect one with `clustermesh connect`)\n");
        return out;
    }
    let rows: Vec<Vec<String>> = remotes
        .iter()
        .map(|r| {
            let synced: Vec<&str> = r["synced"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            vec![
                r["name"].as_str().unwrap_or("?").to_owned(),
                yes(r["connected"] == true),
                yes(r["ready"] == true),
                if synced.is_empty() {
                    "-".to_owned()
                } else {
                    synced.join(",")
                },
                count(r, "nodes"),
                count(r, "ip"),
                count(r, "identities"),
                count(r, "services"),
                r["failures"].as_u64().unwrap_or(0).to_string(),
                format!(
                    "{:.1}s",
                    r["secondsSinceLastMessage"].as_f64().unwrap_or(0.0)
                ),
                yes(r["withdrawn"] == true),
                r["refused"]
                    .as_str()
                    .map(|x| format!("refused: {x}"))
                    .or_else(|| {
                        r["quotaExceeded"]
                            .as_str()
                            .map(|q| format!("import stopped: quota exceeded ({q})"))
                    })
                    .or_else(|| {
                        r["lastFailure"]
                            .as_str()
                            .map(|f| format!("{}{f}", ago(r["lastFailureTime"].as_u64())))
                    })
                    .unwrap_or_else(|| "-".to_owned()),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "REMOTE",
            "CONNECTED",
            "READY",
            "SYNCED",
            "NODES",
            "ENDPOINTS",
            "IDENTITIES",
            "SERVICES",
            "FAILURES",
            "LAST MESSAGE",
            "WITHDRAWN",
            "LAST FAILURE",
        ],
        &rows,
    ));
    out
}
