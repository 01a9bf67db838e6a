//! The two text formats of `/metrics`: OpenMetrics 1.0 (what `prometheus-client` writes) when
//! the scraper's `Accept` asks for it, as Prometheus does, else the Prometheus text format
//! 0.0.4, which every other scraper reads (the OpenMetrics body served as `text/plain` makes
//! Prometheus's classic parser lose the counters' types).

/// The OpenMetrics content type.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The Prometheus text format's content type.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether an `Accept` header asks for OpenMetrics (with a non-zero quality).
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| {
        a.split(',').any(|part| {
            let mut fields = part.split(';').map(str::trim);
            let media = fields.next().unwrap_or("");
            media.eq_ignore_ascii_case("application/openmetrics-text")
                && !fields.any(|p| {
                    p.strip_prefix("q=")
                        .and_then(|q| q.trim().parse::<f64>().ok())
                        .is_some_and(|q| q <= 0.0)
                })
        })
    })
}

/// The body and content type for a scrape with `accept`, from the OpenMetrics text.
pub fn negotiate(accept: Option<&str>, openmetrics: String) -> (&'static str, String) {
    if wants_openmetrics(accept) {
        (OPENMETRICS, openmetrics)
    } else {
        (PROMETHEUS_TEXT, to_prometheus_text(&openmetrics))
    }
}

/// OpenMetrics text as the Prometheus text format 0.0.4: a counter's family is named with its
/// `_total`, an info metric becomes a gauge `*_info`, `# UNIT`, `_created` samples, exemplars
/// and `# EOF` go.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // The family being written and its type.
    let mut family = String::new();
    let mut kind = String::new();
    let mut help: Option<String> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            family = name.to_owned();
            // OpenMetrics also escapes the double quote; the 0.0.4 format does not.
            help = Some(text.replace("\\\"", "\""));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, t) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            family = name.to_owned();
            kind = t.to_owned();
            let (exposed, exposed_kind) = match t {
                "counter" => (format!("{name}_total"), "counter"),
                "info" => (format!("{name}_info"), "gauge"),
                "gauge" | "histogram" | "summary" => (name.to_owned(), t),
                _ => (name.to_owned(), "untyped"),
            };
            if let Some(h) = help.take() {
                out.push_str(&format!("# HELP {exposed} {h}\n"));
            }
            out.push_str(&format!("# TYPE {exposed} {exposed_kind}\n"));
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        if name.strip_prefix(family.as_str()) == Some("_created") && kind != "gauge" {
            continue;
        }
        // An exemplar follows the value after " # ".
        let sample = match line[name_end..].find(" # ") {
            Some(i) => &line[..name_end + i],
            None => line,
        };
        out.push_str(sample);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_only_when_asked_for() {
        assert!(wants_openmetrics(Some(
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        )));
        assert!(!wants_openmetrics(Some("text/plain;version=0.0.4")));
        assert!(!wants_openmetrics(Some(
            "application/openmetrics-text; q=0"
        )));
        assert!(!wants_openmetrics(Some("*/*")));
        assert!(!wants_openmetrics(None));
    }

    #[test]
    fn the_prometheus_text_names_counters_with_total_and_drops_what_it_lacks() {
        let om = "# HELP x_requests Requests \\\"served\\\".\n# TYPE x_requests counter\nx_requests_total{a=\"1\"} 3 # {trace_id=\"ab\"} 1.0\nx_requests_created{a=\"1\"} 1700000000.0\n\
                  # HELP x_build Build.\n# TYPE x_build info\nx_build_info{version=\"1\"} 1\n\
                  # HELP x_delay Delay.\n# TYPE x_delay histogram\n# UNIT x_delay seconds\nx_delay_bucket{le=\"1.0\"} 2\nx_delay_bucket{le=\"+Inf\"} 2\nx_delay_sum 0.5\nx_delay_count 2\n\
                  # HELP x_up Up.\n# TYPE x_up gauge\nx_up 1\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP x_requests_total Requests \"served\".\n# TYPE x_requests_total counter\nx_requests_total{a=\"1\"} 3\n\
             # HELP x_build_info Build.\n# TYPE x_build_info gauge\nx_build_info{version=\"1\"} 1\n\
             # HELP x_delay Delay.\n# TYPE x_delay histogram\nx_delay_bucket{le=\"1.0\"} 2\nx_delay_bucket{le=\"+Inf\"} 2\nx_delay_sum 0.5\nx_delay_count 2\n\
             # HELP x_up Up.\n# TYPE x_up gauge\nx_up 1\n"
        );
        assert_eq!(
            negotiate(Some("application/openmetrics-text"), om.to_owned()),
            (OPENMETRICS, om.to_owned())
        );
        assert_eq!(negotiate(None, om.to_owned()).0, PROMETHEUS_TEXT);
    }
}
