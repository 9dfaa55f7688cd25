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
{{- include "secretfs.imageRef" (dict "image" .Values.image "tag" .Chart.AppVersion) }}
{{- end }}

{{/* An image reference: repository:tag, or repository:tag@digest when a digest is set. The
runtime pulls by the digest and ignores the tag, which stays to say which release it is. Call with
(dict "image" .Values.registrar.image "tag" "default tag"). */}}
{{- define "secretfs.imageRef" -}}
{{- $ref := printf "%s:%s" .image.repository (.image.tag | default .tag) }}
{{- with .image.digest }}{{ $ref = printf "%s@%s" $ref . }}{{ end }}
{{- $ref }}
{{- end }}

{{/* Scheduling of one DaemonSet (YAML of tolerations, nodeSelector, affinity, priorityClassName):
its own value (csi.X, daemon.X) where it is not null, else the shared top-level X. Both DaemonSets
must run on the same nodes: csi mounts and the daemon serves, so a node with only one of them
cannot publish. Call with (dict "root" $ "own" .Values.csi). */}}
{{- define "secretfs.scheduling" -}}
{{- $own := .own | default dict }}
{{- $out := dict }}
{{- range $key := list "tolerations" "nodeSelector" "affinity" "priorityClassName" }}
{{- $v := index $own $key }}
{{- if kindIs "invalid" $v }}{{ $v = index $.root.Values $key }}{{ end }}
{{- $_ := set $out $key $v }}
{{- end }}
{{- toYaml $out }}
{{- end }}

{{/* Where the csi socket lives on the host; upstream's path, so kubelet finds the driver. */}}
{{- define "secretfs.pluginDir" -}}
{{- printf "%s/plugins/csi-secrets-store" (trimSuffix "/" .Values.kubeletRootDir) }}
{{- end }}

{{/* Paths inside the containers (fixed; the host side is .Values.hostDir). */}}
{{- define "secretfs.daemonSocket" -}}/run/secretfs/sock/daemon.sock{{- end }}
{{- define "secretfs.mountRoot" -}}/run/secretfs/mnt{{- end }}

{{/* Whether the CSIDriver asks kubelet for tokens in `secrets` (KEP-5538). The field exists from
Kubernetes 1.35 (beta; stable in 1.36): older API servers refuse or drop it, so it is never rendered
for them. The version is the cluster's (helm install) or --kube-version's (helm template, whose own
default is a recent Kubernetes). */}}
{{- define "secretfs.tokenInSecrets" -}}
{{- $mode := toString .Values.csiDriver.serviceAccountTokenInSecrets }}
{{- $has := semverCompare ">=1.35-0" .Capabilities.KubeVersion.Version }}
{{- if eq $mode "auto" }}
{{- if and (.Values.csiDriver.tokenRequests | default list) $has }}true{{ end }}
{{- else if eq $mode "true" }}
{{- if not $has }}
{{- fail (printf "csiDriver.serviceAccountTokenInSecrets=true needs Kubernetes 1.35 or newer, not %s (auto turns it on where it exists; with helm template, give --kube-version)" .Capabilities.KubeVersion.Version) }}
{{- end }}true
{{- else if ne $mode "false" }}
{{- fail (printf "csiDriver.serviceAccountTokenInSecrets must be auto, true or false, not %q" $mode) }}
{{- end }}
{{- end }}

{{/* External providers' socket directories, in order and without repeats (a JSON list):
providersDir, then additionalProvidersDirs, as upstream. */}}
{{- define "secretfs.providersDirs" -}}
{{- $dirs := list }}
{{- range concat (list .Values.providersDir) (.Values.additionalProvidersDirs | default list) }}
{{- if and . (not (has . $dirs)) }}{{ $dirs = append $dirs . }}{{ end }}
{{- end }}
{{- toJson $dirs }}
{{- end }}

{{- /*
Upstream's chart values (secrets-store-csi-driver v1.6) that secretfs does not read: refuse them
with the secretfs value to use, rather than render with defaults the migrating user did not ask
for. values.schema.json lets these keys through (it refuses any other unknown key) so that this
message, not a bare "additional property", is what the user sees. The table is deploy/INSTALL.md's.
*/}}
{{- define "secretfs.refuseUpstreamValues" -}}
{{- $linux := dict
  "enabled" "nothing: secretfs is Linux-only"
  "image" "image.repository, image.tag, image.pullPolicy (one image for csi and daemon)"
  "crds" "nothing: CRDs are in the chart's crds/ directory (helm install --skip-crds to skip)"
  "affinity" "affinity"
  "driver" "csi.resources and daemon.resources"
  "registrarImage" "registrar.image"
  "registrar" "registrar.resources and registrar.logVerbosity"
  "livenessProbeImage" "livenessProbe.image"
  "livenessProbe" "livenessProbe.resources"
  "updateStrategy" "csiUpdateStrategy and daemonUpdateStrategy"
  "kubeletRootDir" "kubeletRootDir"
  "providersDir" "providersDir"
  "additionalProvidersDirs" "additionalProvidersDirs"
  "nodeSelector" "nodeSelector"
  "tolerations" "tolerations"
  "metricsAddr" "csi.metricsPort"
  "env" "csi.extraEnv and daemon.extraEnv"
  "priorityClassName" "priorityClassName"
  "daemonsetAnnotations" "daemonsetAnnotations"
  "podAnnotations" "podAnnotations"
  "podLabels" "podLabels"
  "volumes" "daemon.extraVolumes"
  "volumeMounts" "daemon.extraVolumeMounts"
-}}
{{- $top := dict
  "windows" "nothing: no Windows support (upstream writes secrets to the node's disk there)"
  "logVerbosity" "logLevel (DEBUG, INFO, WARNING, ERROR)"
  "logFormatJSON" "logFormat (json or text)"
  "enableSecretRotation" "nothing: rotation is always on (cache.ttl; csiDriver.requiresRepublish)"
  "rotationPollInterval" "cache.ttl (seconds)"
  "providerHealthCheck" "nothing: external providers are asked Version at first use"
  "providerHealthCheckInterval" "nothing: external providers are asked Version at first use"
  "tokenRequests" "csiDriver.tokenRequests"
  "automountServiceAccountToken" "nothing: csi always gets its token, the daemon never"
-}}
{{- $found := list -}}
{{- range $key, $_ := (.Values.linux | default dict) }}
{{- $found = append $found (printf "linux.%s: use %s" $key (get $linux $key | default "nothing (no equivalent)")) }}
{{- end }}
{{- range $key, $use := $top }}
{{- if hasKey $.Values $key }}
{{- $found = append $found (printf "%s: use %s" $key $use) }}
{{- end }}
{{- end }}
{{- if hasKey (.Values.livenessProbe | default dict) "logLevel" }}
{{- $found = append $found "livenessProbe.logLevel: use livenessProbe.logVerbosity" }}
{{- end }}
{{- if hasKey (.Values.rbac | default dict) "install" }}
{{- $found = append $found "rbac.install: use rbac.create" }}
{{- end }}
{{- if hasKey (.Values.rbac | default dict) "pspEnabled" }}
{{- $found = append $found "rbac.pspEnabled: use nothing (PodSecurityPolicy is gone since Kubernetes 1.25)" }}
{{- end }}
{{- if $found }}
{{- fail (printf "\nthese are values of upstream's secrets-store-csi-driver chart, which this chart does not read:\n  %s\nsee \"Upstream chart values and their secretfs equivalents\" in deploy/INSTALL.md" (join "\n  " $found)) }}
{{- end }}
{{- end }}
