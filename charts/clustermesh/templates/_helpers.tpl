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
