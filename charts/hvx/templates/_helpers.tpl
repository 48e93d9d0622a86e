{{- define "hvx.image" -}}
{{- $root := index . 0 -}}{{- $name := index . 1 -}}
{{- with $root.Values.images -}}{{- if .registry -}}{{ trimSuffix "/" .registry }}/{{- end -}}{{ $name }}:{{ .tag | default $root.Chart.AppVersion }}{{- end -}}
{{- end -}}

{{- define "hvx.labels" -}}
app.kubernetes.io/name: hvx
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}

{{/* The directory mounted for agent.podLogsPath: the part before any `*`. */}}
{{- define "hvx.podLogsRoot" -}}
{{- regexReplaceAll "/[^/]*\\*.*$" .Values.agent.podLogsPath "" -}}
{{- end -}}
