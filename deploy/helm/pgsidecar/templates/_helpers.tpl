{{- define "pgsidecar.name" -}}
{{- printf "%s-%s" .Release.Name .Values.app.name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "pgsidecar.labels" -}}
app.kubernetes.io/name: {{ .Values.app.name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}

{{- define "pgsidecar.secretName" -}}
{{- .Values.credentials.existingSecret | default (printf "%s-credentials" (include "pgsidecar.name" .)) -}}
{{- end -}}

{{/* Worst-case memory: 16 MiB + 0.5 MiB per client + the largest message, in MiB. */}}
{{- define "pgsidecar.memoryLimit" -}}
{{- if .Values.sidecar.resources.limits.memory -}}
{{- .Values.sidecar.resources.limits.memory -}}
{{- else -}}
{{- $l := .Values.config.limits -}}
{{- $clients := int64 $l.max_client_conn -}}
{{- $msg := int64 $l.max_message_size -}}
{{- printf "%dMi" (add 16 (div (add $clients 1) 2) (div (add $msg 1048575) 1048576)) -}}
{{- end -}}
{{- end -}}
