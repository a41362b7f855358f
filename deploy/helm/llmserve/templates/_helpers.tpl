{{/*
Names. The full name is cut to 40 characters so that "<fullname>-engine-headless" stays a valid
DNS label and StatefulSet pods keep room for their revision-hash label.
*/}}
{{- define "llmserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "llmserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "llmserve.router.fullname" -}}
{{- printf "%s-router" (include "llmserve.fullname" .) -}}
{{- end -}}

{{- define "llmserve.engine.fullname" -}}
{{- printf "%s-engine" (include "llmserve.fullname" .) -}}
{{- end -}}

{{- define "llmserve.engine.headlessName" -}}
{{- printf "%s-engine-headless" (include "llmserve.fullname" .) -}}
{{- end -}}

{{/* The name routers dial, and the name an engine certificate must carry under mTLS. */}}
{{- define "llmserve.engine.headlessFQDN" -}}
{{- printf "%s.%s.svc.%s" (include "llmserve.engine.headlessName" .) .Release.Namespace .Values.clusterDomain -}}
{{- end -}}

{{- define "llmserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "llmserve.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Labels */}}
{{- define "llmserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llmserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "llmserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "llmserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: llmserve
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "llmserve.router.selectorLabels" -}}
{{ include "llmserve.selectorLabels" . }}
app.kubernetes.io/component: router
{{- end -}}

{{- define "llmserve.engine.selectorLabels" -}}
{{ include "llmserve.selectorLabels" . }}
app.kubernetes.io/component: engine
{{- end -}}

{{- define "llmserve.router.labels" -}}
{{ include "llmserve.labels" . }}
app.kubernetes.io/component: router
{{- end -}}

{{- define "llmserve.engine.labels" -}}
{{ include "llmserve.labels" . }}
app.kubernetes.io/component: engine
{{- end -}}

{{/* Image reference from {repository, tag, digest}; call with (list $ .Values.<component>.image). */}}
{{- define "llmserve.image" -}}
{{- $root := index . 0 -}}
{{- $image := index . 1 -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $image.repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) -}}
{{- end -}}
{{- end -}}

{{/* TLS switches: "true" or "" so they work in if-blocks. Misconfigurations fail the render. */}}
{{- define "llmserve.tls.router" -}}
{{- if and .Values.tls.enabled .Values.tls.routerSecret -}}true{{- end -}}
{{- end -}}

{{- define "llmserve.tls.mtls" -}}
{{- $t := .Values.tls -}}
{{- if and $t.enabled (or $t.engineSecret $t.clientSecret $t.caSecret) -}}
{{- if not (and $t.engineSecret $t.clientSecret $t.caSecret) -}}
{{- fail "tls: mTLS needs tls.engineSecret, tls.clientSecret and tls.caSecret together" -}}
{{- end -}}
true
{{- end -}}
{{- end -}}

{{- define "llmserve.tls.validate" -}}
{{- if and .Values.tls.enabled (not .Values.tls.routerSecret) (not (include "llmserve.tls.mtls" .)) -}}
{{- fail "tls.enabled is true but no Secret is set: set tls.routerSecret and/or the mTLS trio (tls.engineSecret, tls.clientSecret, tls.caSecret)" -}}
{{- end -}}
{{- end -}}

{{/* GPUs per engine pod: engine.gpus, else tensorParallelSize, else 0 on the CPU. */}}
{{- define "llmserve.engine.gpus" -}}
{{- if not (kindIs "invalid" .Values.engine.gpus) -}}
{{- .Values.engine.gpus -}}
{{- else if eq .Values.engine.device "cpu" -}}
0
{{- else -}}
{{- .Values.engine.tensorParallelSize -}}
{{- end -}}
{{- end -}}

{{/* Where the model directory appears inside engine and router containers. */}}
{{- define "llmserve.modelPath" -}}
{{- if and (ne .Values.model.source "initCopy") .Values.model.subdir -}}
{{- printf "/model/%s" (trimAll "/" .Values.model.subdir) -}}
{{- else -}}
/model
{{- end -}}
{{- end -}}

{{- define "llmserve.router.tokenizerPath" -}}
{{- if and .Values.router.tokenizer.volume .Values.router.tokenizer.subdir -}}
{{- printf "/model/%s" (trimAll "/" .Values.router.tokenizer.subdir) -}}
{{- else if .Values.router.tokenizer.volume -}}
/model
{{- else -}}
{{- include "llmserve.modelPath" . -}}
{{- end -}}
{{- end -}}

{{/* The model source's volume (named "model-source" for initCopy, which copies it into "model"). */}}
{{- define "llmserve.model.sourceVolume" -}}
{{- $m := .Values.model -}}
{{- if eq $m.source "pvc" -}}
persistentVolumeClaim:
  claimName: {{ required "model.pvc.claimName is required when model.source=pvc" $m.pvc.claimName }}
  readOnly: true
{{- else if eq $m.source "hostPath" -}}
hostPath:
  path: {{ required "model.hostPath.path is required when model.source=hostPath" $m.hostPath.path }}
  type: {{ $m.hostPath.type }}
{{- else -}}
{{- if not $m.initCopy.sourceVolume -}}
{{- fail "model.initCopy.sourceVolume is required when model.source=initCopy" -}}
{{- end -}}
{{- toYaml $m.initCopy.sourceVolume -}}
{{- end -}}
{{- end -}}

{{/*
Model volumes for a pod: "model" is what the container reads. For initCopy it is an emptyDir
filled from "model-source". Call with (list $ sizeLimitForTheCopy).
*/}}
{{- define "llmserve.model.volumes" -}}
{{- $root := index . 0 -}}
{{- $m := $root.Values.model -}}
{{- if eq $m.source "initCopy" -}}
- name: model-source
  {{- include "llmserve.model.sourceVolume" $root | nindent 2 }}
- name: model
  emptyDir:
    {{- with $m.initCopy.medium }}
    medium: {{ . }}
    {{- end }}
    sizeLimit: {{ index . 1 }}
{{- else -}}
- name: model
  {{- include "llmserve.model.sourceVolume" $root | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Writable scratch space for a read-only root filesystem. Call with the component's scratch values. */}}
{{- define "llmserve.scratch.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .tmpSizeLimit }}
- name: cache
  emptyDir:
    sizeLimit: {{ .cacheSizeLimit }}
{{- end -}}

{{- define "llmserve.scratch.mounts" -}}
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: /cache
{{- end -}}

{{/* Libraries write caches under $HOME or XDG paths; point them at the writable emptyDirs. */}}
{{- define "llmserve.scratch.env" -}}
- name: HOME
  value: /cache
- name: XDG_CACHE_HOME
  value: /cache
- name: TMPDIR
  value: /tmp
{{- end -}}

{{/* Secret volume holding only the named keys, readable by the pod's group. */}}
{{- define "llmserve.secretVolume" -}}
{{- $name := index . 0 -}}
{{- $secret := index . 1 -}}
- name: {{ $name }}
  secret:
    secretName: {{ $secret }}
    # 0440 in decimal (YAML 1.1 and 1.2 read a leading 0 differently): owner and fsGroup read.
    defaultMode: 288
    items:
      {{- range (index . 2) }}
      - key: {{ . }}
        path: {{ . }}
      {{- end }}
{{- end -}}

{{/*
Probe: native gRPC on a port (an optional 4th item names the health service), an HTTP GET of a
path (the 4th item) on a port, or TCP when the port speaks TLS (kubelet's gRPC probe cannot).
*/}}
{{- define "llmserve.probe" -}}
{{- $handler := index . 0 -}}
{{- $port := index . 1 -}}
{{- $p := index . 2 -}}
{{- $target := "" -}}
{{- if gt (len .) 3 -}}
{{- $target = index . 3 -}}
{{- end -}}
{{- if eq $handler "grpc" -}}
grpc:
  port: {{ $port }}
  {{- with $target }}
  service: {{ . }}
  {{- end }}
{{- else if eq $handler "http" -}}
httpGet:
  path: {{ $target }}
  port: {{ $port }}
{{- else -}}
tcpSocket:
  port: {{ $port }}
{{- end }}
periodSeconds: {{ $p.periodSeconds }}
timeoutSeconds: {{ $p.timeoutSeconds }}
failureThreshold: {{ $p.failureThreshold }}
{{- end -}}

{{/*
Settings kept in each component's ConfigMap, as strings. Containers receive them as env vars
and reference them in args as $(NAME), which kubelet expands; the pod template carries the
ConfigMap's checksum so a change rolls the pods.
*/}}
{{- define "llmserve.router.settings" -}}
LLMSERVE_ENGINES: {{ default (printf "dns:%s:%d" (include "llmserve.engine.headlessFQDN" .) (int .Values.engine.port)) .Values.router.engines | quote }}
LLMSERVE_ROUTING_POLICY: {{ .Values.router.routingPolicy | quote }}
LLMSERVE_MAX_CONNECTION_AGE_S: {{ .Values.router.maxConnectionAgeSeconds | int | quote }}
LLMSERVE_LOG_FORMAT: {{ .Values.router.logFormat | quote }}
{{- end -}}

{{- define "llmserve.engine.settings" -}}
{{- $e := .Values.engine -}}
LLMSERVE_DTYPE: {{ $e.dtype | quote }}
LLMSERVE_DEVICE: {{ $e.device | quote }}
LLMSERVE_TENSOR_PARALLEL_SIZE: {{ $e.tensorParallelSize | int | quote }}
{{- if not (kindIs "invalid" $e.maxModelLen) }}
LLMSERVE_MAX_MODEL_LEN: {{ $e.maxModelLen | int | quote }}
{{- end }}
LLMSERVE_MAX_NUM_SEQS: {{ $e.maxNumSeqs | int | quote }}
LLMSERVE_MAX_NUM_BATCHED_TOKENS: {{ $e.maxNumBatchedTokens | int | quote }}
LLMSERVE_BLOCK_SIZE: {{ $e.blockSize | int | quote }}
LLMSERVE_GPU_MEMORY_UTILIZATION: {{ $e.gpuMemoryUtilization | toString | quote }}
LLMSERVE_LOG_FORMAT: {{ $e.logFormat | quote }}
{{- end -}}

{{/* env entries reading every settings key from the ConfigMap. Call with (list settingsDict configMapName). */}}
{{- define "llmserve.settings.env" -}}
{{- $cm := index . 1 -}}
{{- range $key, $_ := index . 0 }}
- name: {{ $key }}
  valueFrom:
    configMapKeyRef:
      name: {{ $cm }}
      key: {{ $key }}
{{- end }}
{{- end -}}
