{{/* Names and labels shared by every object of the chart. */}}

{{- define "secretfs.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "secretfs.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "secretfs.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "secretfs.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "secretfs.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "secretfs.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component: call with (dict "root" $ "component" "csi"). */}}
{{- define "secretfs.selectorLabels" -}}
app.kubernetes.io/name: {{ include "secretfs.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "secretfs.serviceAccountName" -}}
{{- default (printf "%s-csi" (include "secretfs.fullname" .)) .Values.serviceAccount.name }}
{{- end }}

{{- define "secretfs.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Where the csi socket lives on the host; upstream's path, so kubelet finds the driver. */}}
{{- define "secretfs.pluginDir" -}}
{{- printf "%s/plugins/csi-secrets-store" (trimSuffix "/" .Values.kubeletRootDir) }}
{{- end }}

{{/* Paths inside the containers (fixed; the host side is .Values.hostDir). */}}
{{- define "secretfs.daemonSocket" -}}/run/secretfs/sock/daemon.sock{{- end }}
{{- define "secretfs.mountRoot" -}}/run/secretfs/mnt{{- end }}

{{/* Whether the CSIDriver asks kubelet for tokens in `secrets` (KEP-5538). */}}
{{- define "secretfs.tokenInSecrets" -}}
{{- $mode := toString .Values.csiDriver.serviceAccountTokenInSecrets }}
{{- if eq $mode "auto" }}
{{- if and (.Values.csiDriver.tokenRequests | default list) (semverCompare ">=1.35-0" .Capabilities.KubeVersion.Version) }}true{{ end }}
{{- else if eq $mode "true" }}true
{{- else if ne $mode "false" }}
{{- fail (printf "csiDriver.serviceAccountTokenInSecrets must be auto, true or false, not %q" $mode) }}
{{- end }}
{{- end }}
