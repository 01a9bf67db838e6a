//! The process metrics every Prometheus client library exports (`process_*`, as the Go and
//! Python clients name them), read from `/proc/self` with `procfs`.

/// The families, in OpenMetrics text; empty where `/proc` cannot be read.
pub fn render() -> String {
    let Ok(me) = procfs::process::Process::myself() else {
        return String::new();
    };
    let mut out = String::new();
    let mut family =
        |name: &str, kind: &str, unit: &str, help: &str, sample: &str, value: String| {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            if !unit.is_empty() {
                out.push_str(&format!("# UNIT {name} {unit}\n"));
            }
            out.push_str(&format!("{name}{sample} {value}\n"));
        };
    if let Ok(stat) = me.stat() {
        #[allow(
            clippy::cast_precision_loss,
            reason = "clock ticks and bytes as float seconds and bytes"
        )]
        {
            let tps = procfs::ticks_per_second() as f64;
            family(
                "process_cpu_seconds",
                "counter",
                "seconds",
                "Total user and system CPU time spent in seconds",
                "_total",
                format!("{}", (stat.utime + stat.stime) as f64 / tps),
            );
            family(
                "process_virtual_memory_bytes",
                "gauge",
                "bytes",
                "Virtual memory size in bytes",
                "",
                stat.vsize.to_string(),
            );
            family(
                "process_resident_memory_bytes",
                "gauge",
                "bytes",
                "Resident memory size in bytes",
                "",
                (stat.rss * procfs::page_size()).to_string(),
            );
            if let Ok(boot) = procfs::boot_time_secs() {
                family(
                    "process_start_time_seconds",
                    "gauge",
                    "seconds",
                    "Start time of the process since unix epoch in seconds",
                    "",
                    format!("{}", boot as f64 + stat.starttime as f64 / tps),
                );
            }
        }
        family(
            "process_threads",
            "gauge",
            "",
            "Number of OS threads in the process",
            "",
            stat.num_threads.to_string(),
        );
    }
    if let Ok(n) = me.fd_count() {
        family(
            "process_open_fds",
            "gauge",
            "",
            "Number of open file descriptors",
            "",
            n.to_string(),
        );
    }
    if let Ok(limits) = me.limits() {
        let max = match limits.max_open_files.soft_limit {
            procfs::process::LimitValue::Value(v) => v.to_string(),
            procfs::process::LimitValue::Unlimited => "+Inf".to_owned(),
        };
        family(
            "process_max_fds",
            "gauge",
            "",
            "Maximum number of open file descriptors",
            "",
            max,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_family_has_its_sample() {
        let text = super::render();
        for name in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_virtual_memory_bytes ",
            "process_start_time_seconds ",
            "process_threads ",
            "process_open_fds ",
            "process_max_fds ",
        ] {
            let line = text
                .lines()
                .find(|l| l.starts_with(name))
                .unwrap_or_else(|| panic!("{name} missing in {text}"));
            let value = &line[name.len()..];
            assert!(
                value == "+Inf" || value.parse::<f64>().is_ok_and(|v| v >= 0.0),
                "{line}"
            );
        }
    }
}
