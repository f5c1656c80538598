{{/*
Chart name, truncated to 63 characters (DNS label).
*/}}
{{- define "mpmri.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: <release>-<chart>, or the release name when it already contains the chart name.
*/}}
{{- define "mpmri.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart label value: name-version.
*/}}
{{- define "mpmri.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mpmri.namespace" -}}
{{- .Release.Namespace }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "mpmri.labels" -}}
helm.sh/chart: {{ include "mpmri.chart" . }}
{{ include "mpmri.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mpmri-serve
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels (name and instance only, so they stay stable across upgrades).
*/}}
{{- define "mpmri.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mpmri.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Per-component names and labels: call with (dict "root" $ "component" "triton"). */}}
{{- define "mpmri.componentName" -}}
{{- printf "%s-%s" (include "mpmri.fullname" .root | trunc (int (sub 62 (len .component))) | trimSuffix "-") .component }}
{{- end }}

{{- define "mpmri.componentLabels" -}}
{{ include "mpmri.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "mpmri.componentSelectorLabels" -}}
{{ include "mpmri.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "mpmri.triton.fullname" -}}
{{- include "mpmri.componentName" (dict "root" . "component" "triton") }}
{{- end }}

{{- define "mpmri.analysis.fullname" -}}
{{- include "mpmri.componentName" (dict "root" . "component" "analysis") }}
{{- end }}

{{- define "mpmri.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mpmri.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Image reference: [imageRegistry/]repository:tag, the tag defaulting to the chart's appVersion.
Call with (dict "root" $ "image" .Values.analysis.image).
*/}}
{{- define "mpmri.image" -}}
{{- $repository := .image.repository }}
{{- with .root.Values.imageRegistry }}
{{- $repository = printf "%s/%s" (trimSuffix "/" .) $repository }}
{{- end }}
{{- $tag := default .root.Chart.AppVersion .image.tag | toString }}
{{- if has $tag (list "latest" "main" "master") }}
{{- fail (printf "image %s: tag %q is not pinned; use a release tag (default: the chart's appVersion %s)" $repository $tag .root.Chart.AppVersion) }}
{{- end }}
{{- printf "%s:%s" $repository $tag }}
{{- end }}

{{- define "mpmri.triton.image" -}}
{{- include "mpmri.image" (dict "root" . "image" (get .Values.triton.image .Values.triton.variant)) }}
{{- end }}

{{/* Triton gRPC address the analysis service calls. */}}
{{- define "mpmri.triton.url" -}}
{{- default (printf "%s:%d" (include "mpmri.triton.fullname" .) (int .Values.triton.ports.grpc)) .Values.analysis.tritonUrl }}
{{- end }}

{{/* Name of the Secret holding the bearer token. */}}
{{- define "mpmri.auth.secretName" -}}
{{- default (printf "%s-auth" (include "mpmri.analysis.fullname" .)) .Values.analysis.auth.existingSecret }}
{{- end }}

{{/*
tritonserver flags shared by the serving container and the warm-up init container.
*/}}
{{- define "mpmri.triton.serverArgs" -}}
- --model-repository={{ .Values.triton.modelRepository.mountPath }}
- --model-control-mode=explicit
- --load-model={{ .Values.triton.modelName }}
- --strict-readiness=true
- --exit-on-error=true
- --http-address={{ .Values.triton.bindAddress }}
- --grpc-address={{ .Values.triton.bindAddress }}
- --metrics-address={{ .Values.triton.bindAddress }}
- --http-port={{ .Values.triton.ports.http }}
- --grpc-port={{ .Values.triton.ports.grpc }}
- --metrics-port={{ .Values.triton.ports.metrics }}
{{- if eq .Values.triton.variant "cpu" }}
- --model-config-name=cpu
- --allow-gpu-metrics=false
{{- end }}
- --backend-config=python,shm-default-byte-size={{ int64 .Values.triton.pythonShmByteSize }}
- --backend-config=python,shm-growth-byte-size={{ int64 .Values.triton.pythonShmByteSize }}
{{- range .Values.triton.extraServerArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/* Volume mounts of the Triton serving and warm-up containers. */}}
{{- define "mpmri.triton.volumeMounts" -}}
- name: models
  mountPath: {{ .Values.triton.modelRepository.mountPath }}
  readOnly: true
  {{- with .Values.triton.modelRepository.pvc.subPath }}
  {{- if eq $.Values.triton.modelRepository.source "pvc" }}
  subPath: {{ . }}
  {{- end }}
  {{- end }}
- name: dshm
  mountPath: /dev/shm
{{- if and (eq .Values.triton.variant "gpu") .Values.triton.trtEngineCache.enabled }}
- name: trt-engine-cache
  mountPath: {{ .Values.triton.trtEngineCache.path }}
{{- end }}
{{- end }}

{{/* NetworkPolicy egress rule for cluster DNS. */}}
{{- define "mpmri.networkPolicy.dnsEgress" -}}
- to:
    - namespaceSelector: {}
      podSelector:
        matchLabels:
          k8s-app: kube-dns
  ports:
    - port: 53
      protocol: UDP
    - port: 53
      protocol: TCP
{{- end }}
