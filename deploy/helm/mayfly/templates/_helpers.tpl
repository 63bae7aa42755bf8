{{/* Chart name. */}}
{{- define "mayfly.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name: the release name, with the chart name unless it already contains it. */}}
{{- define "mayfly.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "mayfly.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "mayfly.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mayfly.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: agent
{{- end -}}

{{- define "mayfly.labels" -}}
helm.sh/chart: {{ include "mayfly.chart" . }}
{{ include "mayfly.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "mayfly.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "mayfly.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "mayfly.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/*
The host names the remote admin API's certificate carries, as a JSON list: the admin Service's
DNS names, for clients that check the host they dialled, then remoteAdmin.serverNames.
*/}}
{{- define "mayfly.adminServerNames" -}}
{{- $svc := printf "%s-admin" (include "mayfly.fullname" .) -}}
{{- $ns := .Release.Namespace -}}
{{- $names := list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns .Values.remoteAdmin.clusterDomain) -}}
{{- concat $names .Values.remoteAdmin.serverNames | uniq | toJson -}}
{{- end -}}

{{/* The admin socket inside the container. */}}
{{- define "mayfly.adminSocket" -}}
{{- printf "%s/admin.sock" .Values.hostPaths.adminSocketDir -}}
{{- end -}}

{{/*
The agent's TOML config. With kubelet.enabled it holds @NODE_NAME@ and @HOST_IP@, filled in by
the render-config init container.
*/}}
{{- define "mayfly.config" -}}
{{- $c := .Values.config -}}
trust_domain = {{ $c.trustDomain | quote }}
socket = {{ printf "%s/workload.sock" .Values.hostPaths.socketDir | quote }}
admin_socket = {{ include "mayfly.adminSocket" . | quote }}
data_dir = {{ .Values.hostPaths.dataDir | quote }}
log_format = {{ $c.logFormat | quote }}
health_addr = {{ printf "0.0.0.0:%d" (int .Values.health.port) | quote }}
{{- if .Values.remoteAdmin.enabled }}
admin_addr = {{ printf "0.0.0.0:%d" (int .Values.remoteAdmin.port) | quote }}
{{- end }}

[leases]
max_ttl = {{ $c.leases.maxTtl | quote }}
default_svid_ttl = {{ $c.leases.defaultSvidTtl | quote }}
max_svid_ttl = {{ $c.leases.maxSvidTtl | quote }}
default_jwt_ttl = {{ $c.leases.defaultJwtTtl | quote }}
max_jwt_ttl = {{ $c.leases.maxJwtTtl | quote }}
retention = {{ $c.leases.retention | quote }}

[admin]
allowed_uids = [{{ range $i, $u := $c.admin.allowedUids }}{{ if $i }}, {{ end }}{{ int $u }}{{ end }}]
allowed_gids = [{{ range $i, $g := $c.admin.allowedGids }}{{ if $i }}, {{ end }}{{ int $g }}{{ end }}]
{{- with .Values.remoteAdmin }}
{{- if .enabled }}
allowed_spiffe_ids = [{{ range $i, $e := .allowedSpiffeIds }}{{ if $i }}, {{ end }}{{ $e | quote }}{{ end }}]
allowed_cert_names = [{{ range $i, $e := .allowedCertNames }}{{ if $i }}, {{ end }}{{ $e | quote }}{{ end }}]
{{- with .clientCaFiles }}
client_ca_files = [{{ range $i, $e := . }}{{ if $i }}, {{ end }}{{ $e | quote }}{{ end }}]
{{- end }}
server_names = [{{ range $i, $e := include "mayfly.adminServerNames" $ | fromJsonArray }}{{ if $i }}, {{ end }}{{ $e | quote }}{{ end }}]
{{- end }}
{{- end }}

[jwt]
key_rotation = {{ $c.jwt.keyRotation | quote }}

[audit]
max_segment_bytes = {{ int64 $c.audit.maxSegmentBytes }}

[attestation]
max_digest_bytes = {{ int64 $c.attestation.maxDigestBytes }}
{{- with $c.ca }}
{{- if or .certFile .keyFile .chainFile .bundleFile .ttl }}

[ca]
{{- with .certFile }}
cert_file = {{ . | quote }}
{{- end }}
{{- with .keyFile }}
key_file = {{ . | quote }}
{{- end }}
{{- with .chainFile }}
chain_file = {{ . | quote }}
{{- end }}
{{- with .bundleFile }}
bundle_file = {{ . | quote }}
{{- end }}
{{- with .ttl }}
ttl = {{ . | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- with $c.store }}
{{- if eq .kind "etcd" }}

[store]
kind = "etcd"
endpoints = [{{ range $i, $e := .endpoints }}{{ if $i }}, {{ end }}{{ $e | quote }}{{ end }}]
prefix = {{ .prefix | quote }}
{{- with .caFile }}
ca_file = {{ . | quote }}
{{- end }}
{{- with .certFile }}
cert_file = {{ . | quote }}
{{- end }}
{{- with .keyFile }}
key_file = {{ . | quote }}
{{- end }}
request_timeout = {{ .requestTimeout | quote }}
max_staleness = {{ .maxStaleness | quote }}
{{- else if ne .kind "redb" }}
{{- fail "config.store.kind: redb or etcd" }}
{{- end }}
{{- end }}
{{- if .Values.kubelet.enabled }}

[kubernetes]
kubelet_url = {{ printf "https://@HOST_IP@:%d" (int .Values.kubelet.port) | quote }}
token_file = {{ .Values.kubelet.tokenFile | quote }}
ca_file = {{ .Values.kubelet.caFile | quote }}
insecure_skip_verify = {{ .Values.kubelet.insecureSkipVerify }}
node_name = "@NODE_NAME@"
{{- end }}
{{- end -}}

{{/*
Stops `helm install` and `helm upgrade` unless the release namespace enforces Pod Security
"privileged" (namespace.requirePrivileged). lookup answers only when Helm talks to the cluster
(install, upgrade, --dry-run=server); offline (helm template, helm lint) it returns nothing, even
for "default", which every cluster has, so nothing is checked there. Helm renders before it
creates the namespace for --create-namespace and before it stores the release, so a namespace
that is missing (about to be made without labels, or not at all) fails here, before anything is
created.
*/}}
{{- define "mayfly.checkNamespace" -}}
{{- if and .Values.namespace.requirePrivileged (not .Values.namespace.create) (lookup "v1" "Namespace" "" "default") -}}
{{- $name := .Release.Namespace -}}
{{- $labels := "pod-security.kubernetes.io/enforce=privileged pod-security.kubernetes.io/warn=privileged pod-security.kubernetes.io/audit=privileged" -}}
{{- $skip := "(or set namespace.requirePrivileged=false if the pods are admitted some other way)" -}}
{{- $ns := lookup "v1" "Namespace" "" $name -}}
{{- if not $ns -}}
{{- fail (printf "namespace %q does not exist. The agent's pods (hostPID, hostPath, SYS_PTRACE) need a namespace that enforces Pod Security \"privileged\", and --create-namespace makes one without that label. Create it first, then install without --create-namespace: kubectl create namespace %s && kubectl label namespace %s %s %s" $name $name $name $labels $skip) -}}
{{- end -}}
{{- $level := dig "metadata" "labels" "pod-security.kubernetes.io/enforce" "" $ns -}}
{{- if ne $level "privileged" -}}
{{- $now := ternary "has no pod-security.kubernetes.io/enforce label (the cluster's default level applies)" (printf "enforces Pod Security %q" $level) (eq $level "") -}}
{{- fail (printf "namespace %q %s. The agent's pods (hostPID, hostPath, SYS_PTRACE) need \"privileged\": kubectl label --overwrite namespace %s %s %s" $name $now $name $labels $skip) -}}
{{- end -}}
{{- end -}}
{{- end -}}
