//! The OTLP exporter: settings from the configuration file's `tracing` section and the
//! standard `OTEL_*` variables, and the `tracing` layer that sends the change spans.
//!
//! Precedence: a key of the `tracing` section, else its `OTEL_*` variable, else the default.
//! Tracing is on when an endpoint is set (`tracing.otlpEndpoint`,
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT`) and
//! `OTEL_SDK_DISABLED` is not `true`.

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use serde::Deserialize;

/// The `tracing` section of the apiserver's and the agent's configuration files.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TracingSection {
    /// The OTLP/gRPC endpoint of the collector, e.g. `http://otel-collector:4317`.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the spans (default: the process kind, `clustermesh-apiserver` or
    /// `clustermesh-agent`).
    #[serde(default)]
    pub service_name: Option<String>,
    /// The sampler, by its `OTEL_TRACES_SAMPLER` name (default `parentbased_always_on`).
    #[serde(default)]
    pub sampler: Option<String>,
    /// The sampler's argument: the ratio of the `*traceidratio` samplers, 0 to 1.
    #[serde(default)]
    pub sampler_arg: Option<f64>,
}

/// A wrong tracing setting.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SettingsError {
    /// The endpoint is not an `http://` or `https://` URL.
    #[error("{origin}: {value:?} is not an http:// or https:// URL of an OTLP/gRPC collector")]
    Endpoint {
        /// Where it was set.
        origin: &'static str,
        /// The value.
        value: String,
    },
    /// An unknown sampler name.
    #[error(
        "{origin}: unknown sampler {value:?} (always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off, parentbased_traceidratio)"
    )]
    Sampler {
        /// Where it was set.
        origin: &'static str,
        /// The value.
        value: String,
    },
    /// A ratio outside 0..=1.
    #[error("{origin}: {value:?} is not a ratio from 0 to 1")]
    Ratio {
        /// Where it was set.
        origin: &'static str,
        /// The value.
        value: String,
    },
    /// An empty service name.
    #[error("{origin} must not be empty")]
    ServiceName {
        /// Where it was set.
        origin: &'static str,
    },
}

/// The sampler kinds of `OTEL_TRACES_SAMPLER`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SamplerKind {
    /// Every trace.
    AlwaysOn,
    /// None.
    AlwaysOff,
    /// A ratio of the trace IDs.
    TraceIdRatio,
    /// As the parent says; roots always.
    ParentBasedAlwaysOn,
    /// As the parent says; roots never.
    ParentBasedAlwaysOff,
    /// As the parent says; roots by ratio.
    ParentBasedTraceIdRatio,
}

impl SamplerKind {
    fn parse(s: &str, origin: &'static str) -> Result<Self, SettingsError> {
        Ok(match s {
            "always_on" => Self::AlwaysOn,
            "always_off" => Self::AlwaysOff,
            "traceidratio" => Self::TraceIdRatio,
            "parentbased_always_on" => Self::ParentBasedAlwaysOn,
            "parentbased_always_off" => Self::ParentBasedAlwaysOff,
            "parentbased_traceidratio" => Self::ParentBasedTraceIdRatio,
            _ => {
                return Err(SettingsError::Sampler {
                    origin,
                    value: s.to_owned(),
                });
            }
        })
    }
}

/// Resolved tracing settings of a process (tracing is on).
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// The collector.
    pub endpoint: String,
    /// `service.name`.
    pub service_name: String,
    /// The sampler.
    pub sampler: SamplerKind,
    /// Its ratio (1 unless set).
    pub ratio: f64,
}

impl Settings {
    /// The settings from `section` and the environment (`env` looks a variable up); `None`
    /// when tracing is off.
    pub fn resolve(
        section: &TracingSection,
        default_service_name: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, SettingsError> {
        let env = |k: &str| env(k).filter(|v| !v.trim().is_empty());
        if env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        let endpoint = match (
            &section.otlp_endpoint,
            env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
        ) {
            (Some(e), _) => Some((e.clone(), "tracing.otlpEndpoint")),
            (None, Some(e)) => Some((e, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")),
            (None, None) => {
                env("OTEL_EXPORTER_OTLP_ENDPOINT").map(|e| (e, "OTEL_EXPORTER_OTLP_ENDPOINT"))
            }
        };
        let Some((endpoint, origin)) = endpoint else {
            return Ok(None);
        };
        let endpoint = endpoint.trim().to_owned();
        let host = endpoint
            .strip_prefix("http://")
            .or_else(|| endpoint.strip_prefix("https://"));
        if host.is_none_or(|h| h.is_empty() || h.starts_with('/')) {
            return Err(SettingsError::Endpoint {
                origin,
                value: endpoint,
            });
        }
        let service_name = match (&section.service_name, env("OTEL_SERVICE_NAME")) {
            (Some(n), _) if n.trim().is_empty() => {
                return Err(SettingsError::ServiceName {
                    origin: "tracing.serviceName",
                });
            }
            (Some(n), _) => n.clone(),
            (None, Some(n)) => n,
            (None, None) => default_service_name.to_owned(),
        };
        let sampler = match (&section.sampler, env("OTEL_TRACES_SAMPLER")) {
            (Some(s), _) => SamplerKind::parse(s, "tracing.sampler")?,
            (None, Some(s)) => SamplerKind::parse(s.trim(), "OTEL_TRACES_SAMPLER")?,
            (None, None) => SamplerKind::ParentBasedAlwaysOn,
        };
        let ratio = match (section.sampler_arg, env("OTEL_TRACES_SAMPLER_ARG")) {
            (Some(r), _) => check_ratio(r, "tracing.samplerArg", &r.to_string())?,
            (None, Some(s)) => {
                let r = s.trim().parse::<f64>().map_err(|_| SettingsError::Ratio {
                    origin: "OTEL_TRACES_SAMPLER_ARG",
                    value: s.clone(),
                })?;
                check_ratio(r, "OTEL_TRACES_SAMPLER_ARG", &s)?
            }
            (None, None) => 1.0,
        };
        Ok(Some(Self {
            endpoint,
            service_name,
            sampler,
            ratio,
        }))
    }

    /// The settings from `section` and the process environment.
    pub fn from_env(
        section: &TracingSection,
        default_service_name: &str,
    ) -> Result<Option<Self>, SettingsError> {
        Self::resolve(section, default_service_name, |k| std::env::var(k).ok())
    }

    fn sampler(&self) -> Sampler {
        let ratio = Sampler::TraceIdRatioBased(self.ratio);
        match self.sampler {
            SamplerKind::AlwaysOn => Sampler::AlwaysOn,
            SamplerKind::AlwaysOff => Sampler::AlwaysOff,
            SamplerKind::TraceIdRatio => ratio,
            SamplerKind::ParentBasedAlwaysOn => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
            SamplerKind::ParentBasedAlwaysOff => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
            SamplerKind::ParentBasedTraceIdRatio => Sampler::ParentBased(Box::new(ratio)),
        }
    }
}

fn check_ratio(r: f64, origin: &'static str, text: &str) -> Result<f64, SettingsError> {
    if (0.0..=1.0).contains(&r) {
        Ok(r)
    } else {
        Err(SettingsError::Ratio {
            origin,
            value: text.to_owned(),
        })
    }
}

/// Building the exporter failed.
#[derive(Debug, thiserror::Error)]
#[error("building the OTLP exporter for {endpoint} failed")]
pub struct ExporterError {
    endpoint: String,
    #[source]
    source: opentelemetry_otlp::ExporterBuildError,
}

/// The running exporter of a process: flushes the spans it holds when shut down.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Starts the OTLP exporter (inside a tokio runtime) and returns it with the `tracing`
    /// layer that feeds it the change spans (and nothing else). `resource` adds attributes
    /// such as `k8s.cluster.name`.
    pub fn start<S>(
        settings: &Settings,
        resource: Vec<KeyValue>,
    ) -> Result<(Self, impl tracing_subscriber::Layer<S>), ExporterError>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        use tracing_subscriber::Layer as _;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(settings.endpoint.clone())
            .build()
            .map_err(|source| ExporterError {
                endpoint: settings.endpoint.clone(),
                source,
            })?;
        let resource = Resource::builder()
            .with_service_name(settings.service_name.clone())
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .with_attribute(KeyValue::new("process.pid", i64::from(std::process::id())))
            .with_attributes(resource)
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(settings.sampler())
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("clustermesh");
        let layer = tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(tracing_subscriber::filter::filter_fn(|m| {
                m.target() == crate::TARGET
            }));
        Ok((Self { provider }, layer))
    }

    /// Sends what is buffered and stops the exporter.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "flushing the last spans to the OTLP collector failed");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        reason = "test code: a panic is the failure report"
    )]

    use std::collections::HashMap;

    use super::*;

    fn resolve(
        section: &TracingSection,
        vars: &[(&str, &str)],
    ) -> Result<Option<Settings>, SettingsError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Settings::resolve(section, "clustermesh-agent", |k| vars.get(k).cloned())
    }

    #[test]
    fn tracing_is_off_without_an_endpoint_or_when_the_sdk_is_disabled() {
        assert_eq!(resolve(&TracingSection::default(), &[]), Ok(None));
        assert_eq!(
            resolve(
                &TracingSection::default(),
                &[("OTEL_TRACES_SAMPLER", "always_on")]
            ),
            Ok(None)
        );
        assert_eq!(
            resolve(
                &TracingSection::default(),
                &[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                    ("OTEL_SDK_DISABLED", "TRUE")
                ]
            ),
            Ok(None)
        );
    }

    #[test]
    fn keys_win_over_variables_which_win_over_defaults() {
        let env = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://general:4317"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4317"),
            ("OTEL_SERVICE_NAME", "from-env"),
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.01"),
        ];
        assert_eq!(
            resolve(&TracingSection::default(), &env).unwrap().unwrap(),
            Settings {
                endpoint: "http://traces:4317".into(),
                service_name: "from-env".into(),
                sampler: SamplerKind::ParentBasedTraceIdRatio,
                ratio: 0.01,
            }
        );
        let keys = TracingSection {
            otlp_endpoint: Some("https://keys:4317".into()),
            service_name: Some("from-keys".into()),
            sampler: Some("traceidratio".into()),
            sampler_arg: Some(0.5),
        };
        assert_eq!(
            resolve(&keys, &env).unwrap().unwrap(),
            Settings {
                endpoint: "https://keys:4317".into(),
                service_name: "from-keys".into(),
                sampler: SamplerKind::TraceIdRatio,
                ratio: 0.5,
            }
        );
        assert_eq!(
            resolve(
                &TracingSection::default(),
                &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://general:4317")]
            )
            .unwrap()
            .unwrap(),
            Settings {
                endpoint: "http://general:4317".into(),
                service_name: "clustermesh-agent".into(),
                sampler: SamplerKind::ParentBasedAlwaysOn,
                ratio: 1.0,
            }
        );
    }

    #[tokio::test]
    async fn the_exporter_starts_for_an_http_and_an_https_collector() {
        for endpoint in ["http://127.0.0.1:4317", "https://127.0.0.1:4317"] {
            let settings = Settings {
                endpoint: endpoint.into(),
                service_name: "clustermesh-agent".into(),
                sampler: SamplerKind::ParentBasedTraceIdRatio,
                ratio: 0.01,
            };
            let (telemetry, _layer) =
                Telemetry::start::<tracing_subscriber::Registry>(&settings, Vec::new())
                    .unwrap_or_else(|e| panic!("{endpoint}: {e:?}"));
            telemetry.shutdown();
        }
    }

    #[test]
    fn wrong_settings_are_refused_with_where_they_came_from() {
        let ep = |e: &str| TracingSection {
            otlp_endpoint: Some(e.into()),
            ..TracingSection::default()
        };
        for bad in ["collector:4317", "ftp://c", "http://", "http:///x"] {
            let e = resolve(&ep(bad), &[]).unwrap_err();
            assert!(
                e.to_string().starts_with("tracing.otlpEndpoint: "),
                "{bad}: {e}"
            );
        }
        let e = resolve(
            &ep("http://c:4317"),
            &[("OTEL_TRACES_SAMPLER", "sometimes")],
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("OTEL_TRACES_SAMPLER: unknown sampler \"sometimes\""),
            "{e}"
        );
        for arg in ["1.5", "-0.1", "NaN", "half"] {
            let e = resolve(&ep("http://c:4317"), &[("OTEL_TRACES_SAMPLER_ARG", arg)]).unwrap_err();
            assert_eq!(
                e,
                SettingsError::Ratio {
                    origin: "OTEL_TRACES_SAMPLER_ARG",
                    value: arg.into()
                }
            );
        }
        let s = TracingSection {
            sampler_arg: Some(2.0),
            ..ep("http://c:4317")
        };
        assert!(matches!(
            resolve(&s, &[]),
            Err(SettingsError::Ratio {
                origin: "tracing.samplerArg",
                ..
            })
        ));
        let s = TracingSection {
            service_name: Some(" ".into()),
            ..ep("http://c:4317")
        };
        assert_eq!(
            resolve(&s, &[]),
            Err(SettingsError::ServiceName {
                origin: "tracing.serviceName"
            })
        );
    }
}
