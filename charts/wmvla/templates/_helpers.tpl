{{/*
Names. Objects the pipeline refers to by name (secrets, config maps, PVC, service account, priority
class) take their names from values verbatim, because components/platform.py compiles those names into the
pipeline; only the chart's own internals (fill Job, Pushgateway, dashboard, RBAC) are prefixed with the
release's fullname.
*/}}
{{- define "wmvla.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "wmvla.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "wmvla.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of the chart's own workloads (immutable in a Deployment: keep them small). */}}
{{- define "wmvla.selectorLabels" -}}
app.kubernetes.io/name: {{ include "wmvla.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of every object. part-of is the pipeline's part-of label too (Platform.part_of_*). */}}
{{- define "wmvla.labels" -}}
helm.sh/chart: {{ include "wmvla.chart" . }}
{{ include "wmvla.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- if ne .Values.partOf.label "app.kubernetes.io/part-of" }}
app.kubernetes.io/part-of: {{ .Values.partOf.value | quote }}
{{- end }}
{{ .Values.partOf.label }}: {{ .Values.partOf.value | quote }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* metadata.annotations body, or nothing. Call with (dict "ctx" $ "extra" MAP). */}}
{{- define "wmvla.annotations" -}}
{{- $all := merge (dict) (.extra | default dict) (.ctx.Values.commonAnnotations | default dict) }}
{{- with $all -}}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The CPU image, named as components/platform.py's Platform.image("cpu") names it. */}}
{{- define "wmvla.imageCpu" -}}
{{- printf "%s/%s:%s" .Values.images.registry .Values.images.cpu (toString .Values.images.tag) }}
{{- end }}

{{/* WMVLA_RESULTS_URI: s3://bucket/prefix (no trailing slash; an empty prefix is the bucket's root). */}}
{{- define "wmvla.resultsUri" -}}
{{- $prefix := trimAll "/" .Values.objectStore.resultsPrefix }}
{{- if $prefix }}
{{- printf "s3://%s/%s" .Values.objectStore.resultsBucket $prefix }}
{{- else }}
{{- printf "s3://%s" .Values.objectStore.resultsBucket }}
{{- end }}
{{- end }}

{{/* The Pushgateway URL the pods push to: the chart's own when enabled, else metrics.pushgatewayUrl. */}}
{{- define "wmvla.pushgatewayUrl" -}}
{{- if .Values.metrics.pushgateway.enabled }}
{{- printf "http://%s-pushgateway.%s.svc:%d" (include "wmvla.fullname" .) .Release.Namespace (int .Values.metrics.pushgateway.port) }}
{{- else }}
{{- .Values.metrics.pushgatewayUrl }}
{{- end }}
{{- end }}

{{/* The object-store secret's name as the pods see it ("" under workload identity: no static keys). */}}
{{- define "wmvla.storeSecretName" -}}
{{- if ne .Values.objectStore.credentials.source "workloadIdentity" }}
{{- .Values.objectStore.credentials.secretName }}
{{- end }}
{{- end }}

{{/* The HF token secret's name ("" when source is none). */}}
{{- define "wmvla.hfSecretName" -}}
{{- if ne .Values.huggingface.token.source "none" }}
{{- .Values.huggingface.token.secretName }}
{{- end }}
{{- end }}

{{/*
Affinity of the chart's own pods: what values give, else a preference for nodes outside the GPU pool
(downloads and a Pushgateway do not need a GPU node's time).
*/}}
{{- define "wmvla.affinity" -}}
{{- if .affinity }}
{{- toYaml .affinity }}
{{- else -}}
nodeAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      preference:
        matchExpressions:
          - key: {{ .gpuPool.nodeLabel }}
            operator: DoesNotExist
{{- end }}
{{- end }}

{{/* Cross-field checks the schema cannot word clearly; included by serviceaccount.yaml (rendered in every configuration). */}}
{{- define "wmvla.validate" -}}
{{- /* an existing account (serviceAccount.create=false) carries its own annotations: not checked */}}
{{- if and (eq .Values.objectStore.credentials.source "workloadIdentity") .Values.serviceAccount.create (not .Values.serviceAccount.annotations) }}
{{- fail "objectStore.credentials.source=workloadIdentity needs the cloud role on the service account: set serviceAccount.annotations (AWS IRSA: eks.amazonaws.com/role-arn: arn:aws:iam::ACCOUNT:role/ROLE; GKE: iam.gke.io/gcp-service-account: NAME@PROJECT.iam.gserviceaccount.com), or use source existingSecret / create" }}
{{- end }}
{{- end }}
