{{- define "nodelens.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "nodelens.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 59 | trimSuffix "-" -}}
{{- else if contains (include "nodelens.name" .) .Release.Name -}}
{{- .Release.Name | trunc 59 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "nodelens.name" .) | trunc 59 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The labels every pod of the release carries: what the Service and NetworkPolicy select. */}}
{{- define "nodelens.selectorLabels" -}}
app.kubernetes.io/name: {{ include "nodelens.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "nodelens.labels" -}}
{{ include "nodelens.selectorLabels" . }}
app.kubernetes.io/part-of: nodelens
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* The agent's config file: what the chart's mounts and ports fix, merged with .Values.config. */}}
{{- define "nodelens.config" -}}
{{- $v := .Values -}}
{{- $paths := list -}}
{{- if $v.certificates.controlPlane -}}
{{- $paths = concat $paths (list "/etc/kubernetes/pki/*.crt" "/etc/kubernetes/pki/etcd/*.crt") -}}
{{- end -}}
{{- if $v.certificates.kubelet -}}
{{- $paths = concat $paths (list "/var/lib/kubelet/pki/kubelet-*-current.pem" "/var/lib/kubelet/pki/kubelet.crt") -}}
{{- end -}}
{{- $fixed := dict
  "node_name" "${NODE_NAME}"
  "state_dir" "/var/lib/nodelens"
  "host" (dict "proc_root" "/proc")
  "logs" (dict "pods_dir" "/var/log/pods" "containers_dir" "/var/log/containers")
  "kubernetes" (dict "enabled" true "pod_resources_socket" "/var/lib/kubelet/pod-resources/kubelet.sock")
  "metrics" (dict "listen" (printf "0.0.0.0:%d" (int $v.metrics.port)))
  "certificates" (dict "paths" $paths)
  "node_logs" (dict
    "journald" (dict "enabled" (ternary "auto" false $v.nodeLogs.journald) "path" $v.nodeLogs.journaldPath "units" $v.nodeLogs.units)
    "kernel" (dict "enabled" (ternary "auto" false $v.nodeLogs.kernel) "path" "/dev/kmsg"))
-}}
{{- $es := dict -}}
{{- if $v.elasticsearch.passwordSecret.name -}}
{{- $_ := set $es "password_file" (printf "/etc/nodelens/elasticsearch-password/%s" $v.elasticsearch.passwordSecret.key) -}}
{{- end -}}
{{- if $v.elasticsearch.caSecret.name -}}
{{- $_ := set $es "ca_file" (printf "/etc/nodelens/elasticsearch-ca/%s" $v.elasticsearch.caSecret.key) -}}
{{- end -}}
{{- if $es -}}
{{- $_ := set $fixed "sinks" (dict "elasticsearch" $es) -}}
{{- end -}}
{{- $config := mergeOverwrite (deepCopy $v.config) $fixed -}}
{{- if and $v.elasticsearch.apiKeySecret.name $config.sinks.elasticsearch.username -}}
{{- fail "elasticsearch.apiKeySecret replaces config.sinks.elasticsearch.username: set one of them" -}}
{{- end -}}
{{- toYaml $config -}}
{{- end -}}

{{/*
One DaemonSet. Arguments: root (the chart's context), component (agent | gpu-agent |
control-plane-agent), name, gpu (whether this one runs on the GPU nodes with the NVIDIA
runtime), avoidGpu (whether it stays off them), controlPlane (whether it runs on control-plane
nodes only, with their /etc/kubernetes/pki) and avoidControlPlane (whether it stays off them).
*/}}
{{- define "nodelens.daemonset" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $gpuLabel := $v.gpu.nodeLabel -}}
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: {{ .name }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "nodelens.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  selector:
    matchLabels:
      {{- include "nodelens.selectorLabels" $root | nindent 6 }}
      app.kubernetes.io/component: {{ .component }}
  updateStrategy:
    {{- toYaml $v.updateStrategy | nindent 4 }}
  template:
    metadata:
      labels:
        {{- include "nodelens.selectorLabels" $root | nindent 8 }}
        app.kubernetes.io/component: {{ .component }}
        {{- with $v.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        # A config change rolls the pods.
        checksum/config: {{ include "nodelens.config" $root | sha256sum }}
        {{- with $v.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ include "nodelens.fullname" $root }}
      {{- with $v.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      # GPU process attribution and /dev/shm sizes read other pods' processes in /proc.
      hostPID: true
      {{- if .gpu }}
      runtimeClassName: {{ $v.gpu.runtimeClassName }}
      {{- end }}
      {{- /* The chart's placement (GPU or not, never a virtual node) ANDed into each of the
      operator's required node selector terms; the rest of the operator's affinity as given. */}}
      {{- $own := deepCopy ($v.nodeAffinityExpressions | default list) }}
      {{- if or .gpu .avoidGpu }}
      {{- $own = append $own (dict "key" $gpuLabel.key "operator" (ternary "In" "NotIn" .gpu) "values" (list $gpuLabel.value)) }}
      {{- end }}
      {{- if or .controlPlane .avoidControlPlane }}
      {{- $own = append $own (dict "key" "node-role.kubernetes.io/control-plane" "operator" (ternary "Exists" "DoesNotExist" (.controlPlane | default false))) }}
      {{- end }}
      {{- $affinity := deepCopy ($v.affinity | default dict) }}
      {{- $nodeAffinity := get $affinity "nodeAffinity" | default dict }}
      {{- $required := get $nodeAffinity "requiredDuringSchedulingIgnoredDuringExecution" | default dict }}
      {{- $terms := list }}
      {{- range (get $required "nodeSelectorTerms" | default (list dict)) }}
      {{- $term := deepCopy . }}
      {{- $_ := set $term "matchExpressions" (concat (get $term "matchExpressions" | default list) $own) }}
      {{- $terms = append $terms $term }}
      {{- end }}
      {{- if $own }}
      {{- $_ := set $required "nodeSelectorTerms" $terms }}
      {{- $_ := set $nodeAffinity "requiredDuringSchedulingIgnoredDuringExecution" $required }}
      {{- $_ := set $affinity "nodeAffinity" $nodeAffinity }}
      {{- end }}
      {{- with $affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds }}
      securityContext:
        {{- toYaml (mergeOverwrite (dict "seccompProfile" (dict "type" "RuntimeDefault")) (deepCopy ($v.podSecurityContext | default dict))) | nindent 8 }}
      containers:
        - name: nodelens
          image: "{{ $v.image.repository }}:{{ $v.image.tag | default $root.Chart.AppVersion }}{{ with $v.image.digest }}@{{ . }}{{ end }}"
          imagePullPolicy: {{ $v.image.pullPolicy }}
          args: ["run", "--config", "/etc/nodelens/config.yaml"]
          env:
            - name: NODE_NAME
              valueFrom:
                fieldRef:
                  fieldPath: spec.nodeName
            # The agent never reads its own pod's logs, so a stdout sink cannot feed on itself.
            - name: POD_UID
              valueFrom:
                fieldRef:
                  fieldPath: metadata.uid
            # The Events election: holder identity and the Lease's namespace.
            - name: POD_NAME
              valueFrom:
                fieldRef:
                  fieldPath: metadata.name
            - name: POD_NAMESPACE
              valueFrom:
                fieldRef:
                  fieldPath: metadata.namespace
            {{- if .gpu }}
            - name: NVIDIA_VISIBLE_DEVICES
              value: all
            # utility: libnvidia-ml and nvidia-smi, no compute.
            - name: NVIDIA_DRIVER_CAPABILITIES
              value: utility
            {{- end }}
            {{- with $v.elasticsearch.apiKeySecret }}
            {{- if .name }}
            - name: NODELENS_SINKS__ELASTICSEARCH__API_KEY
              valueFrom:
                secretKeyRef:
                  name: {{ .name }}
                  key: {{ .key }}
            {{- end }}
            {{- end }}
            {{- with $v.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          ports:
            - name: metrics
              containerPort: {{ $v.metrics.port }}
              protocol: TCP
          readinessProbe:
            httpGet:
              path: /readyz
              port: metrics
            periodSeconds: 10
          livenessProbe:
            httpGet:
              path: /healthz
              port: metrics
            initialDelaySeconds: 10
            periodSeconds: 20
            failureThreshold: 3
          resources:
            {{- toYaml (or (and .gpu $v.gpu.resources) $v.resources) | nindent 12 }}
          # uid 0 reads the root-owned log files and kubelet certificates through their owner
          # bits; no capability is needed but CAP_SYSLOG for /dev/kmsg under
          # kernel.dmesg_restrict (values.yaml nodeLogs.kernel). securityContext values override.
          {{- $caps := dict "drop" (list "ALL") }}
          {{- if $v.nodeLogs.kernel }}{{- $_ := set $caps "add" (list "SYSLOG") }}{{- end }}
          {{- $container := dict "readOnlyRootFilesystem" true "allowPrivilegeEscalation" false "runAsUser" 0 "capabilities" $caps }}
          {{- if and $v.nodeLogs.kernel $v.nodeLogs.kernelPrivileged }}{{- $_ := set $container "privileged" true }}{{- end }}
          securityContext:
            {{- toYaml (mergeOverwrite $container (deepCopy ($v.securityContext | default dict))) | nindent 12 }}
          volumeMounts:
            - {name: config, mountPath: /etc/nodelens, readOnly: true}
            - {name: state, mountPath: /var/lib/nodelens}
            - {name: pods-logs, mountPath: /var/log/pods, readOnly: true}
            - {name: containers-logs, mountPath: /var/log/containers, readOnly: true}
            - {name: pod-resources, mountPath: /var/lib/kubelet/pod-resources, readOnly: true}
            {{- if .controlPlane }}
            # Only the certificates' directories: the rest of /etc/kubernetes holds admin.conf.
            - {name: kubernetes-pki, mountPath: /etc/kubernetes/pki, readOnly: true}
            {{- end }}
            {{- if $v.certificates.kubelet }}
            # At the host path, so the kubelet's absolute *-current.pem symlinks resolve.
            - {name: kubelet-pki, mountPath: /var/lib/kubelet/pki, readOnly: true}
            {{- end }}
            {{- if $v.elasticsearch.passwordSecret.name }}
            - {name: elasticsearch-password, mountPath: /etc/nodelens/elasticsearch-password, readOnly: true}
            {{- end }}
            {{- if $v.elasticsearch.caSecret.name }}
            - {name: elasticsearch-ca, mountPath: /etc/nodelens/elasticsearch-ca, readOnly: true}
            {{- end }}
            {{- if $v.nodeLogs.journald }}
            - {name: host-var-log, mountPath: /host/var/log, readOnly: true}
            {{- end }}
            {{- if $v.nodeLogs.kernel }}
            - {name: kmsg, mountPath: /dev/kmsg, readOnly: true}
            {{- end }}
            {{- with $v.extraVolumeMounts }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
      volumes:
        - name: config
          configMap:
            name: {{ include "nodelens.fullname" $root }}-config
        - name: state
          hostPath:
            path: /var/lib/nodelens
            type: DirectoryOrCreate
        # Only what the kubelet keeps (type Directory: nothing is created on the host; the
        # state directory above is the agent's only write).
        - name: pods-logs
          hostPath:
            path: /var/log/pods
            type: Directory
        - name: containers-logs
          hostPath:
            path: /var/log/containers
            type: Directory
        - name: pod-resources
          hostPath:
            path: /var/lib/kubelet/pod-resources
            type: Directory
        {{- if $v.nodeLogs.journald }}
        # The host's /var/log, read-only, for the journal in /var/log/journal: mounting the
        # journal's own directory would create it where journald keeps none (type Directory
        # would keep the pod from starting there), and a created directory makes journald
        # persist its journal after its next restart.
        - name: host-var-log
          hostPath:
            path: /var/log
            type: Directory
        {{- end }}
        {{- if $v.nodeLogs.kernel }}
        - name: kmsg
          hostPath:
            path: /dev/kmsg
            type: CharDevice
        {{- end }}
        {{- if .controlPlane }}
        # kubeadm's; this DaemonSet runs on control-plane nodes only.
        - name: kubernetes-pki
          hostPath:
            path: /etc/kubernetes/pki
            type: Directory
        {{- end }}
        {{- if $v.certificates.kubelet }}
        - name: kubelet-pki
          hostPath:
            path: /var/lib/kubelet/pki
            type: Directory
        {{- end }}
        {{- with $v.elasticsearch.passwordSecret }}
        {{- if .name }}
        - name: elasticsearch-password
          secret:
            secretName: {{ .name }}
            items:
              - {key: {{ .key }}, path: {{ .key }}}
        {{- end }}
        {{- end }}
        {{- with $v.elasticsearch.caSecret }}
        {{- if .name }}
        - name: elasticsearch-ca
          secret:
            secretName: {{ .name }}
            items:
              - {key: {{ .key }}, path: {{ .key }}}
        {{- end }}
        {{- end }}
        {{- with $v.extraVolumes }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
{{- end -}}

{{/*
The namespaces whose pods may scrape /metrics, as a JSON list: networkPolicy.prometheusNamespaces
and the older single networkPolicy.prometheusNamespace; with neither and no namespaceSelector,
monitoring. An older values file's prometheusNamespace replaces that default, never adds to it.
*/}}
{{- define "nodelens.prometheusNamespaces" -}}
{{- $np := .Values.networkPolicy -}}
{{- $names := concat ($np.prometheusNamespaces | default list) (compact (list ($np.prometheusNamespace | default ""))) | uniq -}}
{{- if not (or $names $np.namespaceSelector) -}}
{{- $names = list "monitoring" -}}
{{- end -}}
{{- toJson $names -}}
{{- end -}}
