{{/* The release's full name, at most 63 characters. */}}
{{- define "csi-memfs.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "csi-memfs.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "csi-memfs.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels that select the plugin pods. */}}
{{- define "csi-memfs.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: node-plugin
{{- end -}}

{{- define "csi-memfs.serviceAccountName" -}}
{{- default (include "csi-memfs.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "csi-memfs.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ default .Chart.AppVersion .Values.image.tag }}
{{- end -}}
{{- end -}}

{{/* The plugin's socket directory on the node, as kubelet sees it. */}}
{{- define "csi-memfs.pluginDir" -}}
{{ trimSuffix "/" .Values.kubeletDir }}/plugins/{{ .Values.driverName }}
{{- end -}}

{{/*
csi-memfs.mebibytes turns a quantity the schema accepts (a decimal number
with an optional k, M, G, T, Ki, Mi, Gi or Ti suffix: 2Gi, 1.5Gi, 8G) into
whole MiB, rounded up.
*/}}
{{- define "csi-memfs.mebibytes" -}}
{{- $q := toString . -}}
{{- $n := regexFind "^[0-9]+(\\.[0-9]+)?" $q -}}
{{- $unit := trimPrefix $n $q -}}
{{- $mult := dict "" 1 "k" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 -}}
{{- if or (not $n) (not (hasKey $mult $unit)) -}}
{{- fail (printf "quantity %q: want a number with an optional k, M, G, T, Ki, Mi, Gi or Ti suffix" $q) -}}
{{- end -}}
{{- ceil (divf (mulf (float64 $n) (get $mult $unit)) 1048576) | int64 -}}
{{- end -}}

{{/* The plugin container's resources: the memory limit follows the budget. */}}
{{- define "csi-memfs.resources" -}}
{{- $res := deepCopy .Values.resources -}}
{{- $limits := default (dict) $res.limits -}}
{{- if and (not $limits.memory) .Values.driver.nodeMemoryBudget -}}
{{- $mi := add (include "csi-memfs.mebibytes" .Values.driver.nodeMemoryBudget) (include "csi-memfs.mebibytes" .Values.memoryOverhead) -}}
{{- $_ := set $limits "memory" (printf "%dMi" $mi) -}}
{{- end -}}
{{- if $limits -}}
{{- $_ := set $res "limits" $limits -}}
{{- else -}}
{{- $_ := unset $res "limits" -}}
{{- end -}}
{{- toYaml $res -}}
{{- end -}}
