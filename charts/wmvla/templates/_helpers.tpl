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

{{/* The images' user and group (images/Dockerfile: USER 10001:10001; tests/test_chart.py checks both agree).
The chart's pods run as it so that files they leave on the model-cache volume belong to the user the
pipeline's pods run as. */}}
{{- define "wmvla.imageUid" -}}10001{{- end }}

{{/* "true" when the pipeline's pods are scraped through a PodMonitor: metrics.podMonitor.enabled true, or auto
and the cluster serves prometheus-operator's PodMonitor; never with a Pushgateway (one source per series). */}}
{{- define "wmvla.podMonitorApi" -}}
{{- if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1/PodMonitor" }}true{{ end }}
{{- end }}

{{- define "wmvla.podMonitorOn" -}}
{{- $e := .Values.metrics.podMonitor.enabled }}
{{- if kindIs "bool" $e }}
{{- if $e }}true{{ end }}
{{- else if and (eq (toString $e) "auto") (include "wmvla.podMonitorApi" .) }}true
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
{{- if and (eq .Values.objectStore.credentials.source "workloadIdentity") .Values.serviceAccount.create (not (index .Values.serviceAccount.annotations "eks.amazonaws.com/role-arn")) }}
{{- fail "objectStore.credentials.source=workloadIdentity needs the AWS role on the service account: set serviceAccount.annotations.\"eks.amazonaws.com/role-arn\" (IRSA: arn:aws:iam::ACCOUNT:role/ROLE), or use source existingSecret / create (the store is S3 through boto3: GKE workload identity gives Google credentials, which S3 does not take)" }}
{{- end }}
{{- range $k, $v := .Values.serviceAccount.annotations }}
{{- if hasPrefix "iam.gke.io/" $k }}
{{- fail (printf "serviceAccount.annotations.%s: GKE workload identity gives Google credentials, but wmvla's object store is S3 (boto3): remove it and use objectStore.credentials.source existingSecret / create (GCS through its S3 interoperability takes HMAC keys) or AWS IRSA" $k) }}
{{- end }}
{{- end }}
{{- $uid := include "wmvla.imageUid" . | int }}
{{- range $key := list "runAsUser" "runAsGroup" "fsGroup" }}
{{- if hasKey $.Values.podSecurityContext $key }}
{{- $v := index $.Values.podSecurityContext $key }}
{{- if or (kindIs "invalid" $v) (ne (int $v) $uid) }}
{{- fail (printf "podSecurityContext.%s=%v: the images run as %d:%d (images/Dockerfile USER) and the pipeline's GPU pods write to the model cache as that user; the fill Job must leave it owned by the same user: set podSecurityContext.%s=%d" $key $v $uid $uid $key $uid) }}
{{- end }}
{{- end }}
{{- end }}
{{- $mc := .Values.modelCache }}
{{- if and $mc.create (has "ReadWriteMany" $mc.accessModes) (not $mc.storageClassName) }}
{{- fail "modelCache.accessModes has ReadWriteMany but modelCache.storageClassName is \"\" (the cluster's default class): most default classes (EBS, PD, Azure Disk, local-path) cannot bind ReadWriteMany, so the claim and every GPU pod would stay Pending. Name a class that offers it: modelCache.storageClassName=<efs-sc / filestore / cephfs / nfs-client ...> (kubectl get storageclass), or use modelCache.accessModes={ReadWriteOnce} (then every pod that mounts the cache runs on one node)" }}
{{- end }}
{{- $taken := dict "/" "the root filesystem" "/tmp" "the fill Job's /tmp" "/tmp/wmvla" "the pods' work folder (components.platform.WORKDIR)" "/dev/shm" "the pods' shared memory" "/home/wmvla" "the images' HOME" "/opt/venv" "the images' Python" }}
{{- with get $taken (trimSuffix "/" $mc.mountPath | default "/") }}
{{- fail (printf "modelCache.mountPath=%s is %s: the pods could not mount the model cache there; use another folder, e.g. /models (the default)" $mc.mountPath .) }}
{{- end }}
{{- $pm := .Values.metrics.podMonitor.enabled }}
{{- if and (kindIs "bool" $pm) $pm (not (include "wmvla.podMonitorApi" .)) }}
{{- fail "metrics.podMonitor.enabled=true but the cluster does not serve monitoring.coreos.com/v1 PodMonitor (prometheus-operator's CRD): install prometheus-operator (kube-prometheus-stack), or set metrics.podMonitor.enabled=auto (rendered only where the CRD is) or false. helm template: pass --api-versions monitoring.coreos.com/v1/PodMonitor" }}
{{- end }}
{{- end }}
