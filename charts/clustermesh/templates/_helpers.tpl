{{/* The release's base name. */}}
{{- define "clustermesh.fullname" -}}
{{- printf "%s-clustermesh" .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every object. */}}
{{- define "clustermesh.labels" -}}
app.kubernetes.io/name: clustermesh
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
clustermesh.cilium.io/cluster: {{ .Values.cluster.name }}
{{- end -}}

{{/* Selector labels of a component. */}}
{{- define "clustermesh.selector" -}}
app.kubernetes.io/name: clustermesh
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "clustermesh.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}

{{/* The agent's configuration file (its checksum rolls the agents when it changes). */}}
{{- define "clustermesh.agentConfig" -}}
cluster: {{ .Values.cluster.name }}
# Replaced by --node-name from the pod's spec.nodeName.
nodeName: unset
apiserver:
  address: "{{ include "clustermesh.fullname" . }}-apiserver.{{ .Release.Namespace }}.svc:{{ .Values.apiserver.service.port }}"
  ca: /etc/clustermesh/tls/ca.pem
  cert: /etc/clustermesh/tls/local.pem
  key: /etc/clustermesh/tls/local-key.pem
datapath: {{ .Values.agent.datapath }}
bpf: {root: /sys/fs/bpf/clustermesh, cgroup: /run/clustermesh/cgroup}
admin: "127.0.0.1:{{ .Values.agent.adminPort }}"
{{- if .Values.agent.metrics.enabled }}
metrics: "0.0.0.0:{{ .Values.agent.metrics.port }}"
{{- end }}
{{- include "clustermesh.tracing" . }}
{{- end }}

{{/* The tracing section of the apiserver's and the agent's configuration. */}}
{{- define "clustermesh.tracing" -}}
{{- if .Values.tracing.otlpEndpoint }}
tracing:
  otlpEndpoint: {{ .Values.tracing.otlpEndpoint | quote }}
  sampler: {{ .Values.tracing.sampler }}
  samplerArg: {{ .Values.tracing.samplerArg }}
{{- end }}
{{- end }}
