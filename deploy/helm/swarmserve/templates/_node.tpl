{{/* An inference node's StatefulSet (inference, verifier): (dict "root" $ "role" "inference" "spec" .Values.inference "port" N). */}}
{{- define "swarmserve.node" -}}
{{- $root := .root -}}
{{- $name := printf "%s-%s" (include "swarmserve.fullname" $root) .role -}}
{{- $inference := $root.Values.inference -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ $name }}
  labels:
    {{- include "swarmserve.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .role }}
spec:
  clusterIP: None
  selector:
    {{- include "swarmserve.selector" (dict "root" $root "role" .role) | nindent 4 }}
  ports:
    - name: grpc
      port: {{ .port }}
      targetPort: grpc
      appProtocol: grpc
    - name: metrics
      port: {{ $root.Values.metrics.port }}
      targetPort: metrics
---
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: {{ $name }}
  labels:
    {{- include "swarmserve.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .role }}
spec:
  serviceName: {{ $name }}
  replicas: {{ .spec.replicas }}
  podManagementPolicy: Parallel
  selector:
    matchLabels:
      {{- include "swarmserve.selector" (dict "root" $root "role" .role) | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "swarmserve.labels" $root | nindent 8 }}
        app.kubernetes.io/component: {{ .role }}
      annotations:
        checksum/config: {{ toJson .spec.config | sha256sum | trunc 16 }}
    spec:
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      # SIGTERM: the node stops taking requests and lets running streams finish.
      terminationGracePeriodSeconds: 60
      containers:
        - name: {{ .role }}
          image: {{ include "swarmserve.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          {{- if .spec.identityKeySecret.name }}
          # Each pod's key is the Secret's entry named by the pod.
          command: ["/bin/sh", "-c", "SWARMSERVE_IDENTITY_KEY=\"$(cat /etc/swarmserve/keys/$POD_NAME)\" && export SWARMSERVE_IDENTITY_KEY && exec swarmserve inference --config /etc/swarmserve/config/config.yaml"]
          {{- else }}
          args: ["inference", "--config", "/etc/swarmserve/config/config.yaml"]
          {{- end }}
          env:
            {{- include "swarmserve.env" (dict "root" $root "port" .port) | nindent 12 }}
            {{- if $root.Values.ledger.enabled }}
            - name: SWARMSERVE_LEDGER__CONSENSUS_LISTEN
              value: {{ printf "0.0.0.0:%d" (int $root.Values.ledger.consensusPort) | quote }}
            {{- end }}
          ports:
            - name: grpc
              containerPort: {{ .port }}
            - name: metrics
              containerPort: {{ $root.Values.metrics.port }}
            {{- if $root.Values.ledger.enabled }}
            - name: consensus
              containerPort: {{ $root.Values.ledger.consensusPort }}
            {{- end }}
          {{- include "swarmserve.probes" (dict "port" .port "startup" $inference.startupProbe) | nindent 10 }}
          resources:
            {{- $resources := deepCopy .spec.resources }}
            {{- if and (eq .role "inference") $inference.gpu.enabled }}
            {{- $_ := set $resources "limits" (merge (dict "nvidia.com/gpu" $inference.gpu.count) ($resources.limits | default dict)) }}
            {{- end }}
            {{- toYaml $resources | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          volumeMounts:
            - name: data
              mountPath: /data
            {{- if .spec.identityKeySecret.name }}
            - name: keys
              mountPath: /etc/swarmserve/keys
              readOnly: true
            {{- end }}
            {{- include "swarmserve.volumeMounts" $root | nindent 12 }}
      volumes:
        {{- if .spec.identityKeySecret.name }}
        - name: keys
          secret:
            secretName: {{ .spec.identityKeySecret.name }}
            defaultMode: 0400
        {{- end }}
        {{- include "swarmserve.volumes" (dict "root" $root "name" $name) | nindent 8 }}
  volumeClaimTemplates:
    - metadata:
        name: data
      spec:
        accessModes: [ReadWriteOnce]
        {{- with .spec.storage.storageClassName }}
        storageClassName: {{ . }}
        {{- end }}
        resources:
          requests:
            storage: {{ .spec.storage.size }}
{{- end -}}
