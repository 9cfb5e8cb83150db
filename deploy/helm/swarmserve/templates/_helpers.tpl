{{/* Names and labels. */}}
{{- define "swarmserve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "swarmserve.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one role: (dict "root" $ "role" "relay"). */}}
{{- define "swarmserve.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .role }}
{{- end -}}

{{- define "swarmserve.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}

{{/* Where nodes join: the external seeds, or this release's relays (headless Service). */}}
{{- define "swarmserve.seeds" -}}
{{- if .Values.seed.external -}}
{{ toJson .Values.seed.external }}
{{- else -}}
{{ toJson (list (printf "%s-seed.%s.svc.cluster.local:%d" (include "swarmserve.fullname" .) .Release.Namespace (int .Values.relay.port))) }}
{{- end -}}
{{- end -}}

{{/* Environment every node has: (dict "root" $ "port" 7100). SWARMSERVE_* override the config file. */}}
{{- define "swarmserve.env" -}}
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: SWARMSERVE_DATA_DIR
  value: /data
- name: SWARMSERVE_SERVER__LISTEN
  value: {{ printf "0.0.0.0:%d" (int .port) | quote }}
- name: SWARMSERVE_ADVERTISE
  value: {{ printf "$(POD_IP):%d" (int .port) | quote }}
- name: SWARMSERVE_METRICS_LISTEN
  value: {{ printf "0.0.0.0:%d" (int .root.Values.metrics.port) | quote }}
- name: SWARMSERVE_GOSSIP__SEEDS
  value: {{ include "swarmserve.seeds" .root | quote }}
- name: SWARMSERVE_LOG__FORMAT
  value: {{ .root.Values.logFormat | quote }}
- name: SWARMSERVE_LOG__LEVEL
  value: {{ .root.Values.logLevel | quote }}
{{- if .root.Values.ledger.enabled }}
- name: SWARMSERVE_LEDGER__GENESIS
  value: /etc/swarmserve/genesis/genesis.json
{{- end }}
{{- end -}}

{{/* Volumes every pod mounts besides /data: its config, /tmp, the genesis file. */}}
{{- define "swarmserve.volumeMounts" -}}
- name: config
  mountPath: /etc/swarmserve/config
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- if .Values.ledger.enabled }}
- name: genesis
  mountPath: /etc/swarmserve/genesis
  readOnly: true
{{- end }}
{{- end -}}

{{- define "swarmserve.volumes" -}}
- name: config
  configMap:
    name: {{ .name }}
- name: tmp
  emptyDir: {}
{{- if .root.Values.ledger.enabled }}
- name: genesis
  configMap:
    name: {{ .root.Values.ledger.genesisConfigMap }}
{{- end }}
{{- end -}}

{{/* The gRPC health probes (Kubernetes' native gRPC probe on the node's health service). */}}
{{- define "swarmserve.probes" -}}
startupProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: {{ .startup.periodSeconds | default 2 }}
  failureThreshold: {{ .startup.failureThreshold | default 30 }}
readinessProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: 5
  failureThreshold: 2
livenessProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: 10
  failureThreshold: 6
{{- end -}}
